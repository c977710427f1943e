"""Interleaved A/B timing of the decode kernels' variants (issue #13; kernel_options.h switches ELASTIC_DECODE_COPY,
ELASTIC_DECODE_FUSED_COMBINE, ELASTIC_DECODE_COMBINE, ELASTIC_DECODE_PDL, ELASTIC_DECODE_LATE_Q; csrc/decode/), H200,
bf16, Llama-3.1-8B shape (Hq 32, Hkv 8, D 128), one query per step, batch B at S tokens, a fraction MSR of each sample's KV heads STREAM
(sink 128, window 2048), cuDNN SDPA beside on the same dense cache.

Variants timed unless VARIANTS names others (DEFAULT_NAMES): default (round 1: plain copies, round 1's combine,
plain launch), zfill (zero-fill copies), combine_v2 (round 2's latency-light combine on round 1's split kernel),
v2_pdl (+ the combine as a programmatic dependent launch, signalled at the end of each split CTA), v2_pdl_early (the
signal as each split CTA's first instruction, round 2's placement: does it alone bring back round 2's 10-30% loss
at batch 8?), v1_pdl (PDL with round 1's combine), v2_zfill (the v2 combine with zero-fill copies); main (the build's
defaults named in full) and fused_v2 (one launch: each pair's last split CTA merges the partials with all its threads,
ELASTIC_DECODE_FUSED_COMBINE=v2), fused_v2_keep (the same without the tickets' memset per call, diagnostic), late_q
(main with Q loaded after the split kernel's prologue copies, ELASTIC_DECODE_LATE_Q=1), fused_v2_late_q (both).

Timing is bench_decode's time_ms (calls over enough cache copies to exceed L2, captured back to back in one CUDA
graph, median of replays). Variants are interleaved: ROUNDS rounds, each times every variant once on the same
copies in a rotated order, and a variant's time is the median over rounds (so clock / thermal drift spreads over all
variants instead of biasing the one timed last). Per variant: ms, % of 4.8 TB/s HBM peak (KV bytes the case must
read / time), ratio to the first named variant (default), the STREAM time over the same variant's dense time; per
case the output's relative error against cuDNN SDPA (dense) and the max |diff| against the first variant's output
(0 for every variant of round 1's combine: equal copies, same arithmetic; the v2 combine sums in another fp32 order,
so one bf16 rounding step at most), and which kernels ran: decode_mma_kernel's layout (L) and PDL trigger (T), the
combine kernel (v1 / v2, "fused" when none).

  python -m experiments.time_decode_variants [--out DIR]
Env: SEQS (32768,131072), BATCHES (1,8), MSRS (0,0.75), VARIANTS (DEFAULT_NAMES below), ROUNDS (3).
Writes decode_variants.json and decode_variants.md under --out (default benchmarks/results/decode/variants).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys

import torch

from benchmarks.bench_decode import D, HBM_PEAK, HKV, HQ, L2_FLUSH_BYTES, SINK, WINDOW, pools, routing, time_ms
from benchmarks.harness import env_list, kernel_switches

VARIANTS = {  # name -> switches (unset ones are the defaults)
    # each variant names every switch it depends on (copy, combine, PDL), whatever the build's defaults are
    "default": {"ELASTIC_DECODE_COPY": "plain", "ELASTIC_DECODE_COMBINE": "v1", "ELASTIC_DECODE_PDL": "0"},
    "zfill": {"ELASTIC_DECODE_COPY": "zfill", "ELASTIC_DECODE_COMBINE": "v1", "ELASTIC_DECODE_PDL": "0"},
    "combine_v2": {"ELASTIC_DECODE_COPY": "plain", "ELASTIC_DECODE_COMBINE": "v2", "ELASTIC_DECODE_PDL": "0"},
    "v2_pdl": {"ELASTIC_DECODE_COPY": "plain", "ELASTIC_DECODE_COMBINE": "v2", "ELASTIC_DECODE_PDL": "1"},
    "v2_pdl_early": {"ELASTIC_DECODE_COPY": "plain", "ELASTIC_DECODE_COMBINE": "v2", "ELASTIC_DECODE_PDL": "early"},
    "v1_pdl": {"ELASTIC_DECODE_COPY": "plain", "ELASTIC_DECODE_COMBINE": "v1", "ELASTIC_DECODE_PDL": "1"},
    "v2_zfill": {"ELASTIC_DECODE_COPY": "zfill", "ELASTIC_DECODE_COMBINE": "v2", "ELASTIC_DECODE_PDL": "0"},
    "plain": {"ELASTIC_DECODE_COPY": "plain"},
    "tma": {"ELASTIC_DECODE_COPY": "tma"},
    "pairs": {"ELASTIC_DECODE_COPY": "pairs"},
    "fused": {"ELASTIC_DECODE_FUSED_COMBINE": "1"},
    "plain_fused": {"ELASTIC_DECODE_COPY": "plain", "ELASTIC_DECODE_FUSED_COMBINE": "1"},
    "tma_fused": {"ELASTIC_DECODE_COPY": "tma", "ELASTIC_DECODE_FUSED_COMBINE": "1"},
    # the build's defaults named in full (plain copies, v2 combine launched plainly, no fused combine)
    "main": {"ELASTIC_DECODE_COPY": "plain", "ELASTIC_DECODE_COMBINE": "v2", "ELASTIC_DECODE_PDL": "0",
             "ELASTIC_DECODE_FUSED_COMBINE": "0", "ELASTIC_DECODE_LATE_Q": "0"},
    # the defaults with Q loaded after the split kernel's prologue copies (ELASTIC_DECODE_LATE_Q)
    "late_q": {"ELASTIC_DECODE_COPY": "plain", "ELASTIC_DECODE_COMBINE": "v2", "ELASTIC_DECODE_PDL": "0",
               "ELASTIC_DECODE_FUSED_COMBINE": "0", "ELASTIC_DECODE_LATE_Q": "1"},
    # one launch: the pair's last split CTA merges its partials with all its threads (decode_fused_merge.cuh)
    "fused_v2": {"ELASTIC_DECODE_COPY": "plain", "ELASTIC_DECODE_PDL": "0", "ELASTIC_DECODE_FUSED_COMBINE": "v2"},
    # the same without the per-call memset of the tickets (diagnostic: what that graph node costs)
    "fused_v2_keep": {"ELASTIC_DECODE_COPY": "plain", "ELASTIC_DECODE_PDL": "0",
                      "ELASTIC_DECODE_FUSED_COMBINE": "v2_keep"},
    "fused_v2_late_q": {"ELASTIC_DECODE_COPY": "plain", "ELASTIC_DECODE_PDL": "0",
                        "ELASTIC_DECODE_FUSED_COMBINE": "v2", "ELASTIC_DECODE_LATE_Q": "1"},
}
DEFAULT_NAMES = ("default", "zfill", "combine_v2", "v2_pdl", "v2_pdl_early", "v1_pdl")
SWITCHES = ("ELASTIC_DECODE_COPY", "ELASTIC_DECODE_FUSED_COMBINE", "ELASTIC_DECODE_COMBINE", "ELASTIC_DECODE_PDL",
            "ELASTIC_DECODE_LATE_Q")


def kernel_instance(fn):
    """decode_mma_kernel<dtype, D, rows, L, T> of the launched instance: layout L and PDL trigger T (None, None if the
    FMA kernel ran), and which combine kernel ran (v1, v2, or None: fused)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if "decode_" in e.name]
    inst = [m.groups() for n in names  # decode_mma_kernel<T, D, kRows, kLayout, kTrigger, kVariant>
            for m in [re.search(r"decode_mma_kernel<[^,<>]+,\s*\d+,\s*\d+,\s*(\d+),\s*(\d+),\s*\d+>", n)] if m]
    combine = ("v2" if any("decode_combine_v2_kernel<" in n for n in names)
               else "v1" if any("decode_combine_kernel<" in n for n in names) else None)
    return {"layout": inst[0][0] if inst else None, "trigger": inst[0][1] if inst else None, "combine": combine}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/decode/variants")
    args = ap.parse_args()
    for name in SWITCHES + ("ELASTIC_DECODE_MMA", "ELASTIC_DECODE_ONE_WAVE"):
        if os.environ.get(name):
            sys.exit(f"time_decode_variants: unset {name} (the script sets the switches itself)")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    from elastic_cuda.ops import decode_attention

    seqs = env_list("SEQS", "32768,131072")
    batches = env_list("BATCHES", "1,8")
    msrs = env_list("MSRS", "0,0.75", float)
    names = env_list("VARIANTS", ",".join(DEFAULT_NAMES), str.strip)
    rounds = int(os.environ.get("ROUNDS", "3"))
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"time_decode_variants: VARIANTS has unknown names {unknown}; known: {list(VARIANTS)}")
    base_name = names[0]  # the ratio column's and the max-diff column's reference
    os.makedirs(args.out, exist_ok=True)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    rows = []
    for S in seqs:
        for B in batches:
            gen = torch.Generator("cuda").manual_seed(S + B)
            q = torch.randn(B, 1, HQ, D, device="cuda", dtype=torch.bfloat16, generator=gen)
            lens = torch.full((B,), S, dtype=torch.int32, device="cuda")
            dense = {}
            for msr in msrs:
                modes_cpu = routing(B, msr, seed=S + B)
                tensors, nbytes = pools(B, S, modes_cpu, gen)
                copies = [tensors] + [pools(B, S, modes_cpu, gen)[0]
                                      for _ in range(math.ceil(L2_FLUSH_BYTES / nbytes) - 1)]

                def ours(t):
                    fk, fv, sk, sv, modes, slot = t
                    return decode_attention(q, fk, fv, sk, sv, modes, slot, lens, sink=SINK, window=WINDOW)

                with kernel_switches(**VARIANTS[base_name]):
                    base = ours(copies[0]).float()
                ref, cudnn_ms = None, None
                if msr == 0:
                    qt = q.transpose(1, 2)
                    kv = [(t[0].view(B, HKV, S, D), t[1].view(B, HKV, S, D)) for t in copies]

                    def peer(k4, v4):
                        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                            return scaled_dot_product_attention(qt, k4, v4, enable_gqa=True)
                    try:
                        ref = peer(*kv[0]).transpose(1, 2).double()
                        cudnn_ms, _ = time_ms([lambda k4=k4, v4=v4: peer(k4, v4) for k4, v4 in kv])
                    except Exception as e:  # noqa: BLE001  (a build without cuDNN GQA decode)
                        print(f"cudnn sdpa failed: {e!r:.200}", flush=True)
                times = {n: [] for n in names}
                info = {}
                for r in range(rounds):
                    for n in names[r % len(names):] + names[:r % len(names)]:
                        with kernel_switches(**VARIANTS[n]):
                            if r == 0:
                                out = ours(copies[0])
                                info[n] = kernel_instance(lambda: ours(copies[0]))
                                info[n]["max_diff_vs_base"] = (out.float() - base).abs().max().item()
                                if ref is not None:
                                    info[n]["rel_err_vs_cudnn"] = ((out.double() - ref).norm() / ref.norm()).item()
                            times[n].append(time_ms([lambda t=t: ours(t) for t in copies])[0])
                for n in names:
                    ms = statistics.median(times[n])
                    if msr == 0:
                        dense[n] = ms
                    row = dict(S=S, B=B, msr=msr, variant=n, ms=ms, rounds_ms=times[n], kv_bytes=nbytes,
                               hbm_frac=nbytes / (ms * 1e-3) / HBM_PEAK, copies=len(copies),
                               vs_base=ms / statistics.median(times[base_name]),
                               vs_own_dense=ms / dense[n] if msr > 0 and n in dense else None,
                               cudnn_ms=cudnn_ms,
                               cudnn_hbm_frac=None if cudnn_ms is None else nbytes / (cudnn_ms * 1e-3) / HBM_PEAK,
                               **info[n])
                    rows.append(row)
                    print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()
                                      if k != "rounds_ms"}), flush=True)
                del tensors, copies
                torch.cuda.empty_cache()
    with open(os.path.join(args.out, "decode_variants.json"), "w") as f:
        json.dump(rows, f, indent=1)
    lines = ["| S | B | MSR | variant | ms | % HBM | vs base | vs own dense | cuDNN ms (% HBM) | err vs cuDNN | "
             f"max diff vs {base_name} | kernels |", "|" + "---|" * 12]
    for r in rows:
        cud = "" if r["cudnn_ms"] is None or r["msr"] > 0 else f"{r['cudnn_ms']:.4f} ({100 * r['cudnn_hbm_frac']:.0f}%)"
        own = "" if r["vs_own_dense"] is None else f"{r['vs_own_dense']:.3f}"
        lines.append(
            f"| {r['S']} | {r['B']} | {r['msr']:g} | {r['variant']} | {r['ms']:.4f} | {100 * r['hbm_frac']:.1f} | "
            f"{r['vs_base']:.3f} | {own} | {cud} | {r.get('rel_err_vs_cudnn', float('nan')):.2e} | "
            f"{r['max_diff_vs_base']:.2e} | L{r['layout']} T{r['trigger']} {r['combine'] or 'fused'} |")
    with open(os.path.join(args.out, "decode_variants.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
