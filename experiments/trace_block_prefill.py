"""Where does a FULL + BLOCK prefill launch spend its time, the XAttention estimate included? (issue #15: at 32K,
6 of 8 KV heads BLOCK at ~30% of causal blocks, ours 7.82 ms + the estimate 0.99 against cuDNN dense 14.70 = 1.67x,
target 1.7x; the mix alone should approach 0.25 x dense + the BLOCK heads' own time.)

bf16, Llama-3.1-8B attention shape (Hq 32, Hkv 8, D 128, B 1), block 128, the masks and routing of
benchmarks.bench_block_prefill (routing seed 11, density 0.3). Triton do_bench medians (L2 cleared between calls) of
  estimate      xattn_block_mask for the routing's BLOCK heads (what the backend runs per layer)
  mix           elastic attention over that routing and mask (strategy auto)
  all_full / all_block   the same launch with every head FULL / every head BLOCK on the random mask
  all_block_full_rows    every head BLOCK on the mix's mask (its FULL heads' rows all causal blocks: the walker at
                density 1)
  est+mix       the estimate and the mix on its mask back to back (random inputs: the estimate keeps most blocks)
then every kernel of est+mix under torch.profiler (device ms, summed by name).
usage: python -m experiments.trace_block_prefill [S,S,...]"""
from __future__ import annotations

import sys

import torch

import elastic_cuda
from benchmarks.bench_block_prefill import BLK, random_block_mask, with_full_heads
from benchmarks.harness import Case, routing
from elastic_cuda.attention.xattn import xattn_block_mask
from experiments.trace_fwd_bwd import _kernels, _ms


def main():
    seqs = [int(s) for s in (sys.argv[1] if len(sys.argv) > 1 else "32768").split(",")]
    for S in seqs:
        case = Case("llama", 1, S)
        hm = torch.where(routing(1, case.Hkv, 0.75, seed=11) == 1, 2, 0).to(torch.int32)
        sparse = random_block_mask(1, case.Hq, S, 0.3, 11)
        mask = with_full_heads(sparse, hm, case.G)
        full, block = torch.zeros_like(hm), torch.full_like(hm, 2)

        def attend(mode, m=mask):
            return elastic_cuda.ops.attention(case.q, case.k, case.v, mode, block_mask=m, block_size=BLK)

        def est_mix():
            m = xattn_block_mask(case.q, case.k, block_size=BLK, head_mode=hm)
            return elastic_cuda.ops.attention(case.q, case.k, case.v, hm, block_mask=m, block_size=BLK)

        rows = {
            "estimate": _ms(lambda: xattn_block_mask(case.q, case.k, block_size=BLK, head_mode=hm)),
            "mix": _ms(lambda: attend(hm)),
            "all_full": _ms(lambda: attend(full)),
            "all_block": _ms(lambda: attend(block, sparse)),
            "all_block_full_rows": _ms(lambda: attend(block)),
            "est+mix": _ms(est_mix),
        }
        ideal = 0.25 * rows["all_full"] + 0.75 * rows["all_block"]
        print(f"S {S} routing {hm.tolist()}: " + " | ".join(f"{k} {v:.3f}" for k, v in rows.items())
              + f" | 0.25 full + 0.75 block {ideal:.3f}", flush=True)
        total = 0.0
        for name, (count, ms) in _kernels(est_mix):
            total += ms
            print(f"    {ms:8.3f} ms  x{count:<3d} {name[:150]}")
        print(f"    {total:8.3f} ms  kernels in all", flush=True)


if __name__ == "__main__":
    main()
