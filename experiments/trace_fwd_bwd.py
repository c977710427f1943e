"""Where does a forward + backward of elastic attention spend the time beyond its forward and its backward alone?
(issue #17: bench_backward's 6/8 STREAM 32K fwd+bwd was 24.46 ms against bwd alone 17.65 + a 5.4 ms forward.)

bf16, Llama-3.1-8B attention shape (Hq 32, Hkv 8, D 128, B 1), every head FULL and 6 of 8 KV heads STREAM (sink 128,
window 2048), timed as benchmarks.bench_backward times them (triton do_bench medians, L2 cleared between calls):
  fwd             the forward on leaves that do not require grad
  fwd_grad        the forward on leaves that require grad (the graph is built and dropped)
  bwd             torch.autograd.grad of a kept forward graph (bench_backward's ours_bwd row)
  fwd+bwd_grad    forward + torch.autograd.grad (no .grad accumulation)
  fwd+bwd         forward + .backward(dO) into leaves whose .grad already exists (bench_backward's ours row)
then one fwd+bwd under torch.profiler: every CUDA kernel with its device time, summed by name.
Routings: F / S per KV head (env ROUTINGS, default FFFFFFFF,FFSSSSSS; TABLES=0 skips the kernel tables).
usage: python -m experiments.trace_fwd_bwd [S,S,...]"""
from __future__ import annotations

import os
import sys
from collections import defaultdict

import torch
from triton.testing import do_bench

import elastic_cuda
from elastic_cuda import FULL, STREAM


def _ms(fn):
    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=10, rep=200, return_mode="median")


def _kernels(fn):
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    per_name = defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per_name[ev.name][0] += 1
            per_name[ev.name][1] += ev.device_time / 1e3
    return sorted(per_name.items(), key=lambda kv: -kv[1][1])


def main():
    seqs = [int(s) for s in (sys.argv[1] if len(sys.argv) > 1 else "32768").split(",")]
    for S in seqs:
        gen = torch.Generator(device="cuda").manual_seed(S)
        q0 = torch.randn(1, S, 32, 128, device="cuda", generator=gen).bfloat16()
        k0 = torch.randn(1, S, 8, 128, device="cuda", generator=gen).bfloat16()
        v0 = torch.randn(1, S, 8, 128, device="cuda", generator=gen).bfloat16()
        do = torch.randn(1, S, 32, 128, device="cuda", generator=gen).bfloat16()
        leaves = [t.clone().requires_grad_(True) for t in (q0, k0, v0)]
        for name in os.environ.get("ROUTINGS", "FFFFFFFF,FFSSSSSS").split(","):
            hm = torch.tensor([[FULL if c == "F" else STREAM for c in name]], dtype=torch.int32, device="cuda")

            def attend(q, k, v):
                return elastic_cuda.ops.attention(q, k, v, hm, sink=128, window=2048, strategy="auto")

            out = attend(*leaves)
            rows = {
                "fwd": _ms(lambda: attend(q0, k0, v0)),
                "fwd_grad": _ms(lambda: attend(*leaves)),
                "bwd": _ms(lambda out=out: torch.autograd.grad(out, leaves, do, retain_graph=True)),
                "fwd+bwd_grad": _ms(lambda: torch.autograd.grad(attend(*leaves), leaves, do)),
                "fwd+bwd": _ms(lambda: attend(*leaves).backward(do)),
            }
            print(f"S {S} {name}: " + " | ".join(f"{k} {v:.3f}" for k, v in rows.items()), flush=True)
            if os.environ.get("TABLES", "1") == "0":
                continue
            total = 0.0
            for kname, (count, ms) in _kernels(lambda: attend(*leaves).backward(do)):
                total += ms
                print(f"    {ms:8.3f} ms  x{count:<3d} {kname[:150]}")
            print(f"    {total:8.3f} ms  kernels in all", flush=True)
            del out


if __name__ == "__main__":
    main()
