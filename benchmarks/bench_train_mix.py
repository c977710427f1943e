"""Router-training attention cost: forward + backward of the training mix O = z*O_FA + (1-z)*O_SA
(attention.train_mix_attention) with O_FA from the elastic op (`op`) or torch SDPA (`sdpa`; `auto` takes it for
unpadded CUDA batches), at SmolLM2-135M's attention shape (9 query / 3 KV heads, head_dim 64, bf16), and the
agreement of the two.

  python -m benchmarks.bench_train_mix --out benchmarks/results/train_mix/<date>_h200/train_mix_h200.md   (GPU)

Timings: CUDA-event medians (triton.testing.do_bench when available) of one layer's mix, forward + backward with
a fixed random upstream gradient; fresh random inputs per shape, never zeros. The model has 30 such layers.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from benchmarks.harness import median_ms
from elastic_cuda.attention import PaddingLayout, train_mix_attention
from elastic_cuda.ops import STREAM

HQ, HKV, D = 9, 3, 64
SINK, WINDOW = 64, 512


def make(B, S, padded, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, S, HQ, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, S, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, S, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g)
    z = (torch.rand(B, HKV, device="cuda", generator=g) < 0.5).float()
    grad = torch.randn(B, S, HQ, D, device="cuda", dtype=torch.bfloat16, generator=g)
    padding = None
    if padded:  # a micro-batch: the shorter sample left-padded by a quarter of S
        mask = torch.ones(B, S, dtype=torch.bool, device="cuda")
        mask[-1, : S // 4] = False
        padding = PaddingLayout.from_mask(mask, S, S)
    return q, k, v, z, grad, padding


def run(branch, q, k, v, z, grad, padding, want_grads=False):
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v, z)]
    out = train_mix_attention(*leaves[:3], leaves[3], STREAM, sink=SINK, window=WINDOW, padding=padding,
                              full_branch=branch)
    out.backward(grad)
    if want_grads:
        return [out.detach().float()] + [t.grad.float() for t in leaves]
    return None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="markdown file; the JSON goes beside it")
    p.add_argument("--lengths", default="1024,2048,4096,8192")
    args = p.parse_args()
    rows, results = [], []
    for B, padded in ((1, False), (2, True)):
        for S in (int(x) for x in args.lengths.split(",")):
            q, k, v, z, grad, padding = make(B, S, padded, seed=S + B)
            ref, got = (run(b, q, k, v, z, grad, padding, want_grads=True) for b in ("op", "sdpa"))
            errs = {n: float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                    for n, a, b in zip(("out", "dq", "dk", "dv", "dz"), got, ref)}
            ms = {b: median_ms(lambda b=b: run(b, q, k, v, z, grad, padding)) for b in ("op", "sdpa")}
            results.append({"B": B, "S": S, "padded": padded, "ms": ms, "speedup": ms["op"] / ms["sdpa"],
                            "max_rel_err_sdpa_vs_op": errs})
            rows.append(f"| {B} | {S} | {'yes' if padded else 'no'} | {ms['op']:.3f} | {ms['sdpa']:.3f} | "
                        f"{ms['op'] / ms['sdpa']:.2f}x | " + " / ".join(f"{errs[n]:.1e}" for n in errs) + " |")
            print(rows[-1], flush=True)
    name = torch.cuda.get_device_name()
    text = "\n".join([
        f"# Training-mix attention, one layer, forward + backward ({name}, torch {torch.__version__}, bf16)", "",
        f"SmolLM2-135M shape: {HQ} query / {HKV} KV heads, head_dim {D}; STREAM sink {SINK}, window {WINDOW}; "
        "z random per (sample, KV head). `op`: O_FA from the elastic op; `sdpa`: from torch SDPA "
        "(train_mix_attention full_branch='sdpa'; 'auto' takes it for unpadded CUDA batches). Errors: "
        "max |sdpa - op| / max |op| of the output and the gradients of q, k, v and z (bf16 inputs, both exact "
        "attention).",
        "Command: `python -m benchmarks.bench_train_mix --out <file>.md`", "",
        "| B | S | padded | op ms | sdpa ms | speedup | rel err out / dq / dk / dv / dz |",
        "|---|---|---|---|---|---|---|"] + rows) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"device": name, "torch": torch.__version__, "results": results}, f, indent=1)
    print(text)


if __name__ == "__main__":
    main()
