"""Interleaved A/B of the training mix's fused elementwise kernels (csrc/train_mix/, issue #17 "train_mix <= 1.3x
dense fwd+bwd"): the train_mix op forward + backward with the fused kernels (default) and with ELASTIC_TRAIN_MIX_FUSED=0
(the torch expressions), beside one dense causal forward + backward of the same shape (the elastic op, every head
FULL; torch SDPA on cuDNN). bf16, Llama-3.1-8B attention shape (Hq 32, Hkv 8, D 128, B 1), STREAM sink 128 / window
2048, hard z with round(MSR * 8) KV heads sparse. Also the elementwise work alone, fused vs torch: the forward's output
mix, dz, and the backward's weighting + gradient sums.

Rounds interleave the variants (CUDA-event means of `iters` calls each); the median over rounds is reported, ms.
  python -m experiments.time_train_mix_fused [--lengths 8192,32768] [--msrs 0.5,0.75] [--rounds 5] [--out DIR]
writes DIR/train_mix_fused.json and .md (default benchmarks/results/train_mix/<date>_<gpu>_fused_ab/)."""
from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

from benchmarks.harness import default_out, event_mean_ms, kernel_switches, sdpa
from elastic_cuda.ops import FULL, STREAM, attention, train_mix
from elastic_cuda.ops._train_mix import _z_rows

HQ, HKV, D, SINK, WINDOW = 32, 8, 128, 128, 2048


def _case(S, msr):
    g = torch.Generator(device="cuda").manual_seed(S)
    q = torch.randn(1, S, HQ, D, device="cuda", generator=g).bfloat16()
    k, v = (torch.randn(1, S, HKV, D, device="cuda", generator=g).bfloat16() for _ in range(2))
    do = torch.randn(1, S, HQ, D, device="cuda", generator=g).bfloat16()
    z = torch.ones(1, HKV, device="cuda")
    z[0, torch.randperm(HKV, generator=torch.Generator().manual_seed(S))[:round(msr * HKV)]] = 0.0
    return q, k, v, z, do


def _variants(case):
    q, k, v, z, do = case
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v, z)]

    def mix():
        out = train_mix(*leaves[:3], leaves[3], STREAM, sink=SINK, window=WINDOW)
        torch.autograd.grad(out, leaves, do)

    modes = torch.full((1, HKV), FULL, dtype=torch.int32, device="cuda")

    def dense():
        out = attention(*leaves[:3], modes)
        torch.autograd.grad(out, leaves[:3], do)

    def cudnn():
        from torch.nn.attention import SDPBackend

        out = sdpa(*(t.transpose(1, 2) for t in leaves[:3]), SDPBackend.CUDNN_ATTENTION).transpose(1, 2)
        torch.autograd.grad(out, leaves[:3], do)

    # the elementwise work alone, on tensors of the real sizes
    of, os_ = torch.randn_like(q), torch.randn_like(q)
    dq2, dk2 = (torch.randn_like(q), torch.randn_like(q)), (torch.randn_like(k), torch.randn_like(k))
    zr = _z_rows(z, q, None)

    def mix_out_torch():
        return zr * of + (1 - zr) * os_

    def dz_torch():
        prod = (do.float() * (of.float() - os_.float())).sum(-1)
        dz = prod.view(1, prod.shape[1], HKV, -1).sum((1, 3))
        return dz, (zr * do).contiguous(), ((1 - zr) * do).contiguous()

    def sums_torch():
        return dq2[0] + dq2[1], dk2[0] + dk2[1], dk2[0] + dk2[1]

    combine, mix_dz = torch.ops.elastic.train_mix_combine, torch.ops.elastic.train_mix_dz
    return {
        "train_mix fused": ("1", mix),
        "train_mix torch": ("0", mix),
        "dense elastic": ("1", dense),
        "dense cuDNN": ("1", cudnn),
        "out mix fused": ("1", lambda: combine(of, os_, z, None)),
        "out mix torch": ("1", mix_out_torch),
        "dz fused": ("1", lambda: mix_dz(do, of, os_, None, kv_heads=HKV)),
        "dz + weighted dO torch": ("1", dz_torch),
        "grad combine fused": ("1", lambda: (combine(*dq2, z, None), combine(*dk2, z, None), combine(*dk2, z, None))),
        "grad sums torch": ("1", sums_torch),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lengths", default="8192,32768")
    ap.add_argument("--msrs", default="0.5,0.75")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out_dir = args.out or default_out("train_mix", "fused_ab")
    os.makedirs(out_dir, exist_ok=True)
    results = []
    for S in (int(x) for x in args.lengths.split(",")):
        for msr in (float(x) for x in args.msrs.split(",")):
            variants = _variants(_case(S, msr))
            iters = 20 if S <= 8192 else 4
            times = {name: [] for name in variants}
            for _ in range(args.rounds):
                for name, (fused, fn) in variants.items():
                    with kernel_switches(ELASTIC_TRAIN_MIX_FUSED=fused):
                        times[name].append(event_mean_ms(fn, iters if "train_mix" in name or "dense" in name else 50))
            ms = {name: statistics.median(t) for name, t in times.items()}
            results.append({"S": S, "msr": msr, "ms": ms, "rounds": times})
            print(json.dumps({"S": S, "msr": msr, "ms": ms}), flush=True)
            del variants
            torch.cuda.empty_cache()
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rounds": args.rounds}
    with open(os.path.join(out_dir, "train_mix_fused.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    names = list(results[0]["ms"]) if results else []
    lines = [f"# train_mix fused elementwise kernels A/B ({meta['device']}, torch {meta['torch']}, bf16, Llama shape, "
             f"B 1, medians of {args.rounds} interleaved rounds, ms)", "",
             "| S | MSR | " + " | ".join(names) + " | fused / dense elastic | torch / dense elastic | fused / cuDNN |",
             "|---|---|" + "---|" * (len(names) + 3)]
    for r in results:
        ms = r["ms"]
        lines.append(f"| {r['S']} | {r['msr']:g} | " + " | ".join(f"{ms[n]:.3f}" for n in names) +
                     f" | {ms['train_mix fused'] / ms['dense elastic']:.2f}x | "
                     f"{ms['train_mix torch'] / ms['dense elastic']:.2f}x | "
                     f"{ms['train_mix fused'] / ms['dense cuDNN']:.2f}x |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "train_mix_fused.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
