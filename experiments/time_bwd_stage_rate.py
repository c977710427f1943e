"""Why does the Hopper backward run 6 of 8 KV heads STREAM ~20% slower per stage than every head FULL? (issue #17; a
stage is one 64-row query tile x one 128-key tile of one query head, the unit of the kernel's work.)

bf16, Llama-3.1-8B attention shape (Hq 32, Hkv 8, D 128, B 1); the backward alone (torch.autograd.grad of a kept
forward graph; triton do_bench medians, rounds interleaved, median of rounds) for
  all_full          every head FULL
  stream6           2 FULL + 6 STREAM (sink 128, window 2048): the benchmark's case
  stream6_wide      2 FULL + 6 STREAM with window = S: the STREAM code path with FULL visibility (same stages as
                    all_full), so a per-stage cost of the STREAM path shows apart from the short-CTA structure
  stream8           every head STREAM (sink 128, window 2048): short CTAs only, besides the sink tiles
Each row prints its stage count (from the visibility rule, as the kernel's producer walks it), the ms per stage and
SM, and the time predicted at all_full's rate.
usage: python -m experiments.time_bwd_stage_rate [S,S,...] [rounds]"""
from __future__ import annotations

import statistics
import sys

import torch
from triton.testing import do_bench

import elastic_cuda
from elastic_cuda import FULL, STREAM

HQ, HKV, D, BM, BN, SINK = 32, 8, 128, 64, 128, 128


def stages(S: int, modes, window: int) -> int:
    """(query tile, key tile, query head) triples the backward visits: FULL causal; STREAM j < sink or i - j < window."""
    num_m, num_n = -(-S // BM), -(-S // BN)
    total = 0
    for mode in modes:
        for kt in range(num_n):
            j0, j1 = kt * BN, min(S, kt * BN + BN) - 1
            for m in range(j0 // BM, num_m):
                i0, i1 = m * BM, min(S, m * BM + BM) - 1
                if i1 < j0:
                    continue
                if mode == STREAM and not (j0 < SINK or i0 - j1 < window):
                    break  # later query tiles are farther from the keys
                total += HQ // HKV
    return total


def main():
    seqs = [int(s) for s in (sys.argv[1] if len(sys.argv) > 1 else "32768").split(",")]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for S in seqs:
        g = torch.Generator(device="cuda").manual_seed(S)
        leaves = [torch.randn(1, S, h, D, device="cuda", generator=g).bfloat16().requires_grad_(True)
                  for h in (HQ, HKV, HKV)]
        do = torch.randn(1, S, HQ, D, device="cuda", generator=g).bfloat16()
        cases = {"all_full": ([FULL] * 8, 2048), "stream6": ([FULL] * 2 + [STREAM] * 6, 2048),
                 "stream6_wide": ([FULL] * 2 + [STREAM] * 6, S), "stream8": ([STREAM] * 8, 2048)}
        fns, times = {}, {name: [] for name in cases}
        for name, (modes, window) in cases.items():
            hm = torch.tensor([modes], dtype=torch.int32, device="cuda")
            out = elastic_cuda.ops.attention(*leaves, hm, sink=SINK, window=window)
            fns[name] = lambda out=out: torch.autograd.grad(out, leaves, do, retain_graph=True)
            fns[name]()
        torch.cuda.synchronize()
        for _ in range(rounds):
            for name in cases:
                times[name].append(do_bench(fns[name], warmup=5, rep=200, return_mode="median"))
        rate = None
        for name, (modes, window) in cases.items():
            ms, n = statistics.median(times[name]), stages(S, modes, window)
            per = ms / (n / sms) * 1e3  # us per stage and SM
            rate = rate or per
            print(f"S {S} {name}: {ms:.3f} ms, {n} stages, {per:.3f} us per stage and SM, "
                  f"{ms / (n * rate / sms / 1e3):.3f}x the all_full rate's time", flush=True)


if __name__ == "__main__":
    main()
