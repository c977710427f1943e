"""A/B of the sm90 forward's online-softmax rules (issue #16), Llama-3.1-8B attention shape (Hq 32, Hkv 8, D 128),
bf16, B 1, causal; cuDNN SDPA (dense, k/v expanded to 32 heads outside the timing) beside.

Variants (csrc/attention/kernel_options.h; the defaults since this study: exact alpha + max slack):
  slack     default: alpha exactly 1 when a row's max did not move, and a row keeps its max until a tile exceeds it
            by > 8 (log2), so O is ~never rescaled
  exact     ELASTIC_SM90_MAX_SLACK=0: exact alpha only (the max moves with every rise, O rescaled then)
  previous  ELASTIC_SM90_EXACT_ALPHA=0 ELASTIC_SM90_MAX_SLACK=0: alpha = exp2(rounding error) (~never 1), O rescaled
            ~every tile (the kernel before 2026-12-02)
  uncached  ELASTIC_SM90_WALK_CACHED=0 (with slack): BLOCK heads' mask row / column recomputed per key tile in the
            consumers (divisions by the block size) as before; for FULL / STREAM the same kernel path as slack, i.e.
            a null A/B that shows the run-to-run spread
Cases: dense (every head FULL) at the lengths given (default 8K, 32K, 128K), 6/8 STREAM at 32K (2 FULL + 6 STREAM
KV heads, sink 128, window 2048), all-BLOCK at 32K (experiments/block_inputs.py, density 0.3, mask per query head).
Interleaved rounds (every variant once per round), median over rounds of do_bench medians.
usage: python -m experiments.time_sm90_softmax [dense lengths, e.g. 8192,32768,131072] [rounds]"""
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import elastic_cuda
from elastic_cuda import BLOCK, FULL, STREAM
from experiments.block_inputs import HKV, HQ, D
from experiments.block_inputs import llama_block_inputs

VARIANTS = {"exact": {"ELASTIC_SM90_MAX_SLACK": "0"},
            "previous": {"ELASTIC_SM90_EXACT_ALPHA": "0", "ELASTIC_SM90_MAX_SLACK": "0"}, "slack": {},
            "uncached": {"ELASTIC_SM90_WALK_CACHED": "0"}}
SWITCHES = ("ELASTIC_SM90_EXACT_ALPHA", "ELASTIC_SM90_MAX_SLACK", "ELASTIC_SM90_WALK_CACHED")


def set_variant(env):
    for name in SWITCHES:
        os.environ.pop(name, None)
    os.environ.update(env)
    elastic_cuda.ops.reload_kernel_options()  # the switches are read once, at load or here


def causal_tflops(S, ms):
    return 4.0 * HQ * D * S * S / 2 / (ms * 1e-3) / 1e12


def bench(fn, S):
    rep = 300 if S <= 32768 else 1200
    return do_bench(fn, warmup=30, rep=rep, return_mode="median")


def main():
    dense = [int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "8192,32768,131072").split(",")]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    cases = [(f"dense {S // 1024}K", S, "full") for S in dense]
    cases += [("6/8 STREAM 32K", 32768, "stream"), ("all-BLOCK 32K", 32768, "block")]
    print("case | " + " | ".join(f"{v} ms" for v in VARIANTS) + " | cuDNN ms | speed exact vs previous | slack vs "
          "previous | slack vs uncached | TFLOP/s slack (dense) | TFLOP/s cuDNN", flush=True)
    for name, S, kind in cases:
        q, k, v, mask = llama_block_inputs(S, seed=S)
        hm = {"full": [FULL] * HKV, "stream": [FULL, FULL] + [STREAM] * 6, "block": [BLOCK] * HKV}[kind]
        hm = torch.tensor([hm], dtype=torch.int32, device="cuda")
        bm = mask if kind == "block" else None
        fn = lambda: torch.ops.elastic.attention(q, k, v, hm, bm, sink=128, window=2048, strategy="fused")  # noqa
        res = {v_: [] for v_ in VARIANTS}
        for _ in range(rounds):
            for var, env in VARIANTS.items():
                set_variant(env)
                res[var].append(bench(fn, S))
        set_variant({})
        med = {var: statistics.median(t) for var, t in res.items()}
        cudnn = float("nan")
        if kind == "full":
            qt = q.transpose(1, 2).contiguous()
            kt = k.repeat_interleave(HQ // HKV, dim=2).transpose(1, 2).contiguous()
            vt = v.repeat_interleave(HQ // HKV, dim=2).transpose(1, 2).contiguous()
            try:
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    cudnn = bench(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True), S)
            except RuntimeError as e:  # no cuDNN attention in this torch build / GPU
                print(f"  cuDNN SDPA failed: {str(e).splitlines()[0]}", flush=True)
            del qt, kt, vt
        dense_tf = f"{causal_tflops(S, med['slack']):.0f}" if kind == "full" else "-"
        cudnn_tf = f"{causal_tflops(S, cudnn):.0f}" if kind == "full" and cudnn == cudnn else "-"
        print(f"{name} | " + " | ".join(f"{med[v_]:.3f}" for v_ in VARIANTS) + f" | {cudnn:.3f} | "
              f"{med['previous'] / med['exact']:.3f}x | {med['previous'] / med['slack']:.3f}x | "
              f"{med['uncached'] / med['slack']:.3f}x | {dense_tf} | {cudnn_tf}"
              f"   (rounds: " + "; ".join(f"{v_} " + " ".join(f"{t:.3f}" for t in res[v_]) for v_ in VARIANTS)
              + ")", flush=True)
        del q, k, v, mask
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
