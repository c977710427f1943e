"""Does the forward's time depend on which KV heads are FULL? (issue #17: bench_backward's 6/8 STREAM routing, seed
11, has its FULL heads at KV heads 6 and 7 and its fwd+bwd took ~1.3 ms more than the same routing with the FULL
heads at 0 and 1.) The sm90 forward hands out work in chunks of KV heads (ELASTIC_SM90_L2_ORDER, item_coord in
attention_fwd_sm90_pipeline.cuh), longest items first inside a chunk only.

bf16, Llama-3.1-8B attention shape (Hq 32, Hkv 8, D 128, B 1), 2 FULL + 6 STREAM KV heads (sink 128, window 2048)
placed as given (F / S per KV head), each with the L2 work order on (the default) and off; triton do_bench
medians, rounds interleaved, median of rounds.
usage: python -m experiments.time_fwd_head_placement [S,S,...] [rounds]   (env PLACEMENTS=FFSSSSSS,SSSSSSFF,...)"""
from __future__ import annotations

import os
import statistics
import sys

import torch
from triton.testing import do_bench

import elastic_cuda
from benchmarks.harness import kernel_switches


def main():
    seqs = [int(s) for s in (sys.argv[1] if len(sys.argv) > 1 else "32768").split(",")]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    placements = os.environ.get("PLACEMENTS", "FFSSSSSS,SSSSSSFF,SSSFFSSS,FSSSSSSF").split(",")
    for S in seqs:
        g = torch.Generator(device="cuda").manual_seed(S)
        q = torch.randn(1, S, 32, 128, device="cuda", generator=g).bfloat16()
        k = torch.randn(1, S, 8, 128, device="cuda", generator=g).bfloat16()
        v = torch.randn(1, S, 8, 128, device="cuda", generator=g).bfloat16()
        res = {}
        for _ in range(rounds):
            for pl in placements:
                hm = torch.tensor([[0 if c == "F" else 1 for c in pl]], dtype=torch.int32, device="cuda")
                for order in ("1", "0"):
                    with kernel_switches(ELASTIC_SM90_L2_ORDER=order):
                        fn = lambda: elastic_cuda.ops.attention(q, k, v, hm, sink=128, window=2048)  # noqa: E731
                        fn()
                        torch.cuda.synchronize()
                        res.setdefault((pl, order), []).append(do_bench(fn, warmup=10, rep=200,
                                                                        return_mode="median"))
        print(f"S {S}: " + " | ".join(f"{pl} l2_order={o} {statistics.median(t):.3f}" for (pl, o), t in res.items()),
              flush=True)


if __name__ == "__main__":
    main()
