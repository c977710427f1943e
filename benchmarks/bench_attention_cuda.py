"""Timing of the fused CUDA attention forward (and fwd+bwd) against SDPA cuDNN / FlashAttention-2.

Llama-3.1-8B shape (Hq 32, Hkv 8, D 128, bf16, batch 1), dense causal at S in $SEQS (default 8192,32768),
and MSR mixes (fraction of KV heads routed to STREAM, sink 128 + window 2048). Medians of
triton.testing.do_bench on random data. Prints one JSON line per measurement (and appends to $OUT/bench.jsonl).
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import elastic_cuda  # noqa: E402

Hq, Hkv, D = 32, 8, 128
SINK, WIN = 128, 2048
OUT = os.environ.get("OUT", "/tmp")
TAG = os.environ.get("BENCH_TAG", "")


def rec(**kw):
    kw["tag"] = TAG
    line = json.dumps(kw)
    print(line, flush=True)
    with open(os.path.join(OUT, "bench.jsonl"), "a") as f:
        f.write(line + "\n")


def causal_flops(S, H):
    return 4 * S * S / 2 * D * H


def stream_flops(S, H):  # visible pairs of sink + window, matmul flops
    pairs = sum(min(i + 1, WIN) + max(0, min(SINK, i + 1 - WIN)) for i in range(0, S, 64)) * 64
    return 4 * pairs * D * H


def main():
    seqs = [int(s) for s in os.environ.get("SEQS", "8192,32768").split(",")]
    with_bwd = os.environ.get("BENCH_BWD", "1") == "1"
    only_ours = os.environ.get("ONLY_OURS", "0") == "1"
    for S in seqs:
        torch.manual_seed(0)
        q = torch.randn(1, S, Hq, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, S, Hkv, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, S, Hkv, D, device="cuda", dtype=torch.bfloat16)
        fl = causal_flops(S, Hq)
        if not only_ours:
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            for name, be in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
                try:
                    with sdpa_kernel([be]):
                        fn = lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)  # noqa
                        fn()
                        ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
                    rec(kernel=name, S=S, msr=0.0, ms=ms, tflops=fl / ms / 1e9)
                except Exception as e:  # backend unavailable for this shape
                    rec(kernel=name, S=S, error=str(e)[:200])
        for msr in (0.0, 0.25, 0.5, 0.75, 1.0):
            n_stream = int(round(msr * Hkv))
            modes = torch.zeros(1, Hkv, dtype=torch.int32, device="cuda")
            modes[0, Hkv - n_stream:] = 1
            fn = lambda: elastic_cuda.ops.attention(q, k, v, modes, sink=SINK, window=WIN, strategy="fused")  # noqa
            fn()
            ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
            useful = fl * (1 - msr) + stream_flops(S, Hq) * msr
            rec(kernel="elastic_fused", S=S, msr=msr, ms=ms, tflops=useful / ms / 1e9,
                floor_ms=useful / 790e12 * 1e3)
        if with_bwd:
            qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
            modes = torch.zeros(1, Hkv, dtype=torch.int32, device="cuda")
            out = elastic_cuda.ops.attention(qg, kg, vg, modes, strategy="fused")
            g = torch.randn_like(out)
            fn = lambda: torch.autograd.grad(out, (qg, kg, vg), g, retain_graph=True)  # noqa
            fn()
            ms = do_bench(fn, warmup=5, rep=50, return_mode="median")
            rec(kernel="elastic_fused_bwd", S=S, msr=0.0, ms=ms, tflops=2.5 * fl / ms / 1e9)


if __name__ == "__main__":
    main()
