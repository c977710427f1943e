"""Cost of the non-finite rule (csrc/attention/nonfinite.cuh) on the fused forward, Llama-3.1-8B shape (Hq 32, Hkv 8,
D 128), bf16, B 1, finite inputs: every head FULL, and 6 of 8 KV heads STREAM (sink 128, window 2048).

Per case and length: the default forward (prepass + the kernels' flag tests), the same forward with
ELASTIC_NONFINITE_PREPASS=0 (no prepass: the kernels' per-item / per-tile tests only), their difference (the prepass,
vs one read of K and V at 4.8 TB/s), and, for information, the rare path with one NaN V element per KV head (every
key tile of every head takes it). Run the same script on main for the base kernel: there the switch does nothing
(unknown variables are ignored), so both columns time the base forward.
Medians of triton.testing.do_bench, the variants interleaved twice, minimum kept. Usage:
  python -m experiments.time_nonfinite [8192,32768] [sm90|sm80]
"""
import os
import sys

import torch
from triton.testing import do_bench

import elastic_cuda
from elastic_cuda import FULL, STREAM

HQ, HKV, D, SINK, WINDOW = 32, 8, 128, 128, 2048
lengths = [int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "8192,32768").split(",")]
path = sys.argv[2] if len(sys.argv) > 2 else "sm90"
os.environ["ELASTIC_CUDA_SM90"] = "1" if path == "sm90" else "0"
print(f"path {path}; options: {elastic_cuda.ops.reload_kernel_options()}", flush=True)


def bench(q, k, v, hm, prepass):
    os.environ["ELASTIC_NONFINITE_PREPASS"] = prepass
    elastic_cuda.ops.reload_kernel_options()  # the switches are read once, at load or here
    fn = lambda: torch.ops.elastic.attention(q, k, v, hm, None, sink=SINK, window=WINDOW, strategy="fused")  # noqa
    return do_bench(fn, warmup=50, rep=300, return_mode="median")


for S in lengths:
    g = torch.Generator(device="cuda").manual_seed(S)
    q = torch.randn(1, S, HQ, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, S, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, S, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g)
    kv_read_us = 2 * k.numel() * k.element_size() / 4.8e12 * 1e6
    cases = {"full": torch.full((1, HKV), FULL), "6/8 stream": torch.tensor([[FULL, FULL] + [STREAM] * 6])}
    for name, hm in cases.items():
        hm = hm.to(device="cuda", dtype=torch.int32)
        res = {}
        for _ in range(2):
            for prepass in ("1", "0"):
                res.setdefault(prepass, []).append(bench(q, k, v, hm, prepass))
        on, off = min(res["1"]), min(res["0"])
        v_bad = v.clone()
        v_bad[0, S // 3, :, 5] = float("nan")  # one bad key per KV head: every tile of every head takes the rare path
        rare = bench(q, k, v_bad, hm, "1")
        out = torch.ops.elastic.attention(q, k, v_bad, hm, None, sink=SINK, window=WINDOW, strategy="fused")[0]
        nan_rows = int(torch.isnan(out).any(-1).sum())
        print(f"S={S:6d} {name:10s} default {on:8.3f} ms  no-prepass {off:8.3f} ms  prepass {1e3 * (on - off):7.1f} us "
              f"({100 * (on - off) / off:5.2f}%; one K+V read at 4.8 TB/s {kv_read_us:6.1f} us)  "
              f"rare path {rare:8.3f} ms ({nan_rows} NaN rows)", flush=True)
os.environ.pop("ELASTIC_NONFINITE_PREPASS")
elastic_cuda.ops.reload_kernel_options()
