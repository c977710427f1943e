"""Elastic attention vs the peers a user already has, in one process (forward, bf16, causal prefill).

Methods (per shape, S, MSR):
  ours_fused / ours_grouped / ours_auto   elastic_cuda.attention with that strategy (fused / auto / the sparse
                                          heads of grouped run the sm_90a wgmma kernel on Hopper when there is
                                          no block mask)
  ours_fused_sm80                         strategy "fused" with ELASTIC_CUDA_SM90=0: the mma.sync kernel, for
                                          comparison on Hopper
  ours_grouped_cudnn                      strategy "grouped_cudnn" (cuDNN dense for the FULL pairs, one host
                                          sync per call: the sync-free grouped uses FA2 varlen)
  cudnn_dense / flash2_dense              SDPA over all heads (the MSR-independent bars)
  flex_hybrid                             one compiled flex_attention call, per-head analytic BlockMask
  serial                                  gather FULL pairs -> cuDNN SDPA, gather STREAM pairs -> compiled Flex,
                                          index_copy_ both back (host-known routing, as ../shared/reference/
                                          anchor_bench.py)
  fa4_dense / serial_fa4                  FlashAttention-4 (PyPI flash-attn-4) dense causal, and FULL heads ->
                                          FA4 dense + STREAM heads -> FA4 sliding window (no sink), scattered
                                          back (B = 1; absent where flash-attn-4 is not installed)
  ideal                                   (1 - MSR) x cuDNN dense + the streaming pairs alone under Flex
Also: ours vs Flex numerically (one case per run), our dense TFLOP/s (MSR 0), boundary_pool time vs S, and a
forward+backward row at BWD_S (ours vs cuDNN vs Flex).

STREAM semantics are token-level (j < sink or i - j < window, j <= i): Flex gets a token-exact mask_mod and an
analytic BlockMask whose full/partial block classes are derived from the same rule, so both compute the same
function (checked numerically each run).

Env: SEQS (Llama lengths, default 4096,8192,32768,65536,131072), SMOL_SEQS (SmolLM2 lengths, default
4096,32768), MODELS (default llama,smollm2), MSRS (default 0,0.25,0.5,0.75,1), B4_SEQ (batch-4 case with
different routing per sample, default 8192; 0 skips), BWD_S (default 32768; 0 skips), POOL_SEQS, SKIP
(comma list of methods to leave out), BENCH_BUDGET_S (stop starting new sections after this many seconds,
default 330). Writes bench.json, bench.md and bench_<model>_b<B>.png under --out (default
benchmarks/results/attention/<date>_<gpu>/). Run from the repository root: `python -m benchmarks.bench_attention`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch
from torch.nn.attention import SDPBackend

from benchmarks.harness import (DEV, MODELS, RESULTS, T0, Case, bench, default_out, env_list, fa4, flex_fn, rec,
                                rel_err, routing, sdpa, try_bench, write_with_errors)

SINK, WINDOW, BLK = 128, 2048, 128
CHECK_TOL = 1e-2  # two bf16 kernels of the same function differ by ~2-5e-3 (relative Frobenius)
OUR_STRATEGIES = ("fused", "grouped", "grouped_cudnn", "auto", "fused_sm80")
OUT_DIR: str | None = None  # --out, set by main()


# ----------------------------------------------------------------------------- Flex
def stream_block_mask(S, modes_bq, sink=SINK, window=WINDOW, blk=BLK, uniform_stream=False):
    """Analytic BlockMask for per-(batch, q head) modes [B, H] (0 causal, 1 token-level streaming).
    uniform_stream=True: every head streams and the mask broadcasts over any batch (mask_mod reads no modes).

    A block pair is 'full' when every (q, kv) in it is visible and 'partial' when some may be; the bounds are
    computed from the token rule on the block corners, so the mask_mod below is exact on partial blocks."""
    from torch.nn.attention.flex_attention import BlockMask

    nb = (S + blk - 1) // blk
    Bm, H = modes_bq.shape
    qb = torch.arange(nb, device=DEV)[:, None]
    kb = torch.arange(nb, device=DEV)[None, :]
    q_lo, q_hi = qb * blk, qb * blk + blk - 1
    k_lo, k_hi = kb * blk, kb * blk + blk - 1
    all_causal, any_causal = k_hi <= q_lo, k_lo <= q_hi
    all_stream = (k_hi < sink) | (q_hi - k_lo < window)
    any_stream = (k_lo < sink) | ((q_lo - k_hi).clamp_min(0) < window)
    is_s = modes_bq.view(Bm, H, 1, 1).bool()
    full = torch.where(is_s, (all_causal & all_stream), all_causal)
    anyv = torch.where(is_s, (any_causal & any_stream), any_causal)
    part = anyv & ~full

    def to_idx(m):
        cnt = m.sum(-1).to(torch.int32)
        idx = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return cnt, idx

    fc, fi = to_idx(full)
    pc, pi = to_idx(part)
    modes = modes_bq

    def mask_mod(b, h, q_idx, kv_idx):
        ok = (modes[b, h] == 0) | (kv_idx < sink) | (q_idx - kv_idx < window)
        return (q_idx >= kv_idx) & ok

    def stream_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & ((kv_idx < sink) | (q_idx - kv_idx < window))

    if uniform_stream:
        mask_mod = stream_mod

    return BlockMask.from_kv_blocks(pc, pi, fc, fi, BLOCK_SIZE=blk, mask_mod=mask_mod, seq_lengths=(S, S))


# ----------------------------------------------------------------------------- peers
_SM80_FORCED = False  # whether this script set ELASTIC_CUDA_SM90=0
_SM90_ENV = os.environ.get("ELASTIC_CUDA_SM90")  # the caller's value, restored for the other strategies


def _force_sm80(on: bool):
    """ELASTIC_CUDA_SM90=0 for the fused_sm80 rows only. The extension reads its switches once per process, so
    they are set and reloaded only when the wanted state changes, which keeps the reload out of the timed calls;
    switches this script did not set (e.g. sm90_check.py's variants) are left alone."""
    global _SM80_FORCED
    if _SM80_FORCED == on:
        return
    import elastic_cuda

    if on:
        os.environ["ELASTIC_CUDA_SM90"] = "0"
    elif _SM90_ENV is None:
        os.environ.pop("ELASTIC_CUDA_SM90", None)
    else:
        os.environ["ELASTIC_CUDA_SM90"] = _SM90_ENV
    elastic_cuda.ops.reload_kernel_options()
    _SM80_FORCED = on


def ours(case, head_mode, strategy):
    import elastic_cuda

    def run():
        _force_sm80(strategy == "fused_sm80")
        return elastic_cuda.ops.attention(case.q, case.k, case.v, head_mode, sink=SINK, window=WINDOW,
                                          strategy="fused" if strategy == "fused_sm80" else strategy)
    return run


def flex_hybrid(case, head_mode):
    bm = stream_block_mask(case.S, head_mode.repeat_interleave(case.G, 1))
    flex = flex_fn()
    return lambda: flex(case.qt, case.kt, case.vt, block_mask=bm, enable_gqa=True)


def serial_parts(case, head_mode):
    """Pairs (b, kv head) flattened: q [B*Hkv, G, S, D], k/v [B*Hkv, 1, S, D]; FULL pairs to cuDNN SDPA,
    STREAM pairs to Flex; host-known indices (this peer syncs on the routing, which ours does not)."""
    B, Hkv, G, S, D = case.B, case.Hkv, case.G, case.S, case.D
    qp = case.qt.view(B * Hkv, G, S, D)
    kp = case.kt.view(B * Hkv, 1, S, D)
    vp = case.vt.view(B * Hkv, 1, S, D)
    flat = head_mode.flatten()
    fa = (flat == 0).nonzero().flatten()
    sa = (flat == 1).nonzero().flatten()
    bm_sa = stream_block_mask(S, torch.ones(1, 1, dtype=torch.int32, device=DEV), uniform_stream=True) \
        if len(sa) else None
    flex = flex_fn()

    def run_full():
        return sdpa(qp.index_select(0, fa), kp.index_select(0, fa), vp.index_select(0, fa),
                    SDPBackend.CUDNN_ATTENTION)

    def run_stream():
        return flex(qp.index_select(0, sa), kp.index_select(0, sa), vp.index_select(0, sa), block_mask=bm_sa,
                    enable_gqa=True)

    def serial():
        out = torch.empty_like(qp)
        if len(fa):
            out.index_copy_(0, fa, run_full())
        if len(sa):
            out.index_copy_(0, sa, run_stream())
        return out

    qs, ks, vs = (qp.index_select(0, sa).contiguous(), kp.index_select(0, sa).contiguous(),
                  vp.index_select(0, sa).contiguous()) if len(sa) else (None, None, None)
    stream_only = (lambda: flex(qs, ks, vs, block_mask=bm_sa, enable_gqa=True)) if len(sa) else None
    return serial, stream_only


def serial_fa4(case, head_mode, fa):
    """What a user composes from FlashAttention-4 by hand: FULL KV heads (and their query heads) gathered into FA4
    dense causal, STREAM heads into FA4's sliding window (window_size=(WINDOW - 1, 0): the same window, but no sink
    tokens, so a slightly cheaper function than ours), outputs scattered back. Host-known routing; B = 1 only."""
    if case.B != 1:
        raise ValueError("serial_fa4: B = 1 cases only")
    ar = torch.arange(case.G, device=DEV)
    kf, ks = (head_mode[0] == 0).nonzero().flatten(), (head_mode[0] == 1).nonzero().flatten()
    qf, qs = (kf[:, None] * case.G + ar).flatten(), (ks[:, None] * case.G + ar).flatten()
    q, k, v = case.q, case.k, case.v

    def run():
        out = torch.empty_like(q)
        if len(kf):
            out.index_copy_(2, qf, fa(q.index_select(2, qf), k.index_select(2, kf), v.index_select(2, kf),
                                      causal=True))
        if len(ks):
            out.index_copy_(2, qs, fa(q.index_select(2, qs), k.index_select(2, ks), v.index_select(2, ks),
                                      causal=True, window_size=(WINDOW - 1, 0)))
        return out
    return run


# ----------------------------------------------------------------------------- sections
def sweep_case(case, msrs, skip):
    dense = {}
    for name, be in (("cudnn_dense", SDPBackend.CUDNN_ATTENTION), ("flash2_dense", SDPBackend.FLASH_ATTENTION)):
        ms = try_bench(name, case, lambda be=be: (lambda: sdpa(case.qt, case.kt, case.vt, be)), skip)
        if ms is not None:
            dense[name] = ms
            RESULTS[-1]["tflops"] = case.flops / ms / 1e9
    peer = fa4()
    fa = peer[0] if peer is not None else None
    if fa is not None:
        ms = try_bench("fa4_dense", case, lambda: (lambda: fa(case.q, case.k, case.v, causal=True)), skip)
        if ms is not None:
            RESULTS[-1]["tflops"] = case.flops / ms / 1e9
    for i, msr in enumerate(msrs):
        hm = routing(case.B, case.Hkv, msr, seed=1000 + i)
        actual = float((hm == 1).float().mean())  # SmolLM2 (3 kv heads) cannot hit every MSR exactly
        for strat in OUR_STRATEGIES:
            ms = try_bench(f"ours_{strat}", case, lambda s=strat: ours(case, hm, s), skip, msr=msr,
                           msr_actual=actual)
            if ms is not None and msr == 0:
                RESULTS[-1]["tflops"] = case.flops / ms / 1e9  # all FULL: our dense rate
        try_bench("flex_hybrid", case, lambda: flex_hybrid(case, hm), skip, msr=msr, msr_actual=actual)
        if fa is not None and case.B == 1:
            try_bench("serial_fa4", case, lambda: serial_fa4(case, hm, fa), skip, msr=msr, msr_actual=actual)
        if "serial" in skip:
            continue
        try:
            serial, stream_only = serial_parts(case, hm)
            try_bench("serial", case, lambda: serial, skip, msr=msr, msr_actual=actual)
            if "cudnn_dense" in dense and "ideal" not in skip:
                t_sa = 0.0
                if stream_only is not None:
                    stream_only()
                    t_sa = bench(stream_only, case.S)
                rec(kind="fwd", method="ideal", **case.key(msr=msr),
                    ms=(1 - actual) * dense["cudnn_dense"] + t_sa, stream_only_ms=t_sa, msr_actual=actual)
        except Exception as e:
            rec(kind="fwd", method="serial", **case.key(msr=msr), error=repr(e)[:300])


def numeric_check(model, S, B=1, msr=0.5):
    """Ours (each strategy) vs Flex with the same token-exact mask, and ours at MSR 0 vs cuDNN dense."""
    import elastic_cuda

    case = Case(model, B, S)
    hm = routing(B, case.Hkv, msr, seed=7)
    try:
        ref = flex_hybrid(case, hm)().transpose(1, 2)
    except Exception as e:
        rec(kind="check", model=model, S=S, B=B, error="flex: " + repr(e)[:300])
        return
    for strat in OUR_STRATEGIES:
        try:
            out = ours(case, hm, strat)()
            err = rel_err(out, ref)
            rec(kind="check", model=model, S=S, B=B, msr=msr, method=f"ours_{strat}", vs="flex_hybrid",
                rel_err=err, finite=bool(torch.isfinite(out).all()), ok=bool(err < CHECK_TOL))
        except Exception as e:
            rec(kind="check", model=model, S=S, B=B, msr=msr, method=f"ours_{strat}", error=repr(e)[:300])
    hm0 = torch.zeros_like(hm)
    try:
        ref0 = sdpa(case.qt, case.kt, case.vt, SDPBackend.CUDNN_ATTENTION).transpose(1, 2)
        out0 = elastic_cuda.ops.attention(case.q, case.k, case.v, hm0, strategy="auto")
        err = rel_err(out0, ref0)
        rec(kind="check", model=model, S=S, B=B, msr=0.0, method="ours_auto", vs="cudnn_dense", rel_err=err,
            ok=bool(err < CHECK_TOL))
    except Exception as e:
        rec(kind="check", model=model, S=S, B=B, msr=0.0, method="ours_auto", error=repr(e)[:300])


def pool_section(seqs):
    import elastic_cuda

    for S in seqs:
        try:
            keys = torch.randn(1, S, 8, 128, device=DEV, dtype=torch.bfloat16)
            fn = lambda: elastic_cuda.boundary_pool(keys)  # noqa: E731
            fn()
            rec(kind="boundary_pool", S=S, Hkv=8, D=128, ms=bench(fn, 0))
        except Exception as e:
            rec(kind="boundary_pool", S=S, error=repr(e)[:300])


def fwd_bwd_section(S, skip):
    import elastic_cuda

    case = Case("llama", 1, S)
    do = torch.randn_like(case.q)
    do_t = do.transpose(1, 2).contiguous()
    leaves = [t.detach().requires_grad_(True) for t in (case.q, case.k, case.v)]
    leaves_t = [t.detach().requires_grad_(True) for t in (case.qt, case.kt, case.vt)]

    def one(name, fn, **extra):
        if name in skip:
            return
        try:
            fn()
            torch.cuda.synchronize()
            ms = bench(fn, S)
            rec(kind="fwd_bwd", method=name, **case.key(**extra), ms=ms, tflops=3.5 * case.flops / ms / 1e9)
        except Exception as e:
            rec(kind="fwd_bwd", method=name, **case.key(**extra), error=repr(e)[:300])

    def cudnn_fb():
        sdpa(*leaves_t, SDPBackend.CUDNN_ATTENTION).backward(do_t)

    one("cudnn_dense", cudnn_fb)
    for msr in (0.0, 0.75):
        hm = routing(1, case.Hkv, msr, seed=11)

        def ours_fb(hm=hm):
            elastic_cuda.ops.attention(*leaves, hm, sink=SINK, window=WINDOW, strategy="auto").backward(do)

        one("ours_auto", ours_fb, msr=msr)
        try:
            bm = stream_block_mask(S, hm.repeat_interleave(case.G, 1))

            def flex_fb(bm=bm):
                flex_fn()(*leaves_t, block_mask=bm, enable_gqa=True).backward(do_t)

            one("flex_hybrid", flex_fb, msr=msr)
        except Exception as e:
            rec(kind="fwd_bwd", method="flex_hybrid", **case.key(msr=msr), error=repr(e)[:300])


# ----------------------------------------------------------------------------- report
METHOD_ORDER = ["ours_auto", "ours_fused", "ours_grouped", "ours_grouped_cudnn", "ours_fused_sm80", "flex_hybrid",
                "serial", "serial_fa4", "ideal", "flash2_dense", "fa4_dense"]


def speedups():
    """{(model, B, S): {method: {msr: speedup vs cudnn_dense}}} from the fwd rows."""
    base = {(r["model"], r["B"], r["S"]): r["ms"] for r in RESULTS
            if r.get("kind") == "fwd" and r.get("method") == "cudnn_dense" and "ms" in r}
    table = {}
    for r in RESULTS:
        if r.get("kind") != "fwd" or "ms" not in r:
            continue
        key = (r["model"], r["B"], r["S"])
        if key not in base or r["method"] == "cudnn_dense":
            continue
        table.setdefault(key, {}).setdefault(r["method"], {})[r.get("msr")] = base[key] / r["ms"]
    return base, table


def write_markdown(path, msrs):
    base, table = speedups()
    lines = ["# Elastic attention forward benchmark", "",
             f"torch {torch.__version__}, {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}, bf16, sink {SINK}, window {WINDOW}; "
             "cells: ms (speedup vs cuDNN SDPA dense at the same shape). MSR = fraction of KV heads STREAM.", ""]
    ms_of = {}
    for r in RESULTS:
        if r.get("kind") == "fwd" and "ms" in r:
            ms_of[(r["model"], r["B"], r["S"], r["method"], r.get("msr"))] = r["ms"]
    for key in sorted(base):
        model, B, S = key
        lines += [f"## {MODELS[model]['name']}, B={B}, S={S}: cuDNN dense {base[key]:.2f} ms", "",
                  "| MSR | " + " | ".join(METHOD_ORDER) + " |", "|---" * (len(METHOD_ORDER) + 1) + "|"]
        for msr in msrs:
            cells = []
            for m in METHOD_ORDER:
                t = ms_of.get((model, B, S, m, msr if m not in ("flash2_dense", "fa4_dense") else None))
                cells.append("-" if t is None else f"{t:.2f} ({base[key] / t:.2f}x)")
            lines.append(f"| {msr} | " + " | ".join(cells) + " |")
        rates = [f"{r['method']} {r['tflops']:.0f}" for r in RESULTS
                 if r.get("kind") == "fwd" and "tflops" in r and (r["model"], r["B"], r["S"]) == key]
        if rates:  # cudnn_dense / flash2_dense, and ours at MSR 0 (all heads FULL)
            lines += ["", "Dense causal forward TFLOP/s (ours at MSR 0): " + ", ".join(rates)]
        lines.append("")
    other = [r for r in RESULTS if r.get("kind") in ("check", "boundary_pool", "fwd_bwd")]
    if other:
        lines += ["## Checks, boundary_pool, forward+backward", "", "```"]
        lines += [json.dumps({k: v for k, v in r.items() if k != "elapsed_s"}) for r in other]
        lines += ["```", ""]
    write_with_errors(path, lines)


def write_plots(out_dir):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker  # noqa: F401
    except Exception as e:
        rec(kind="plot", error=repr(e)[:200])
        return
    _, table = speedups()
    for model, B in sorted({(k[0], k[1]) for k in table}):
        seqs = sorted(k[2] for k in table if k[:2] == (model, B))
        fig, axes = plt.subplots(1, len(seqs), figsize=(4.2 * len(seqs), 3.6), squeeze=False)
        for ax, S in zip(axes[0], seqs):
            for m in METHOD_ORDER:
                pts = table[(model, B, S)].get(m)
                if not pts:
                    continue
                if m == "flash2_dense":
                    ax.axhline(pts[None], ls=":", color="gray", label=m)
                    continue
                xs = sorted(x for x in pts if x is not None)
                ax.plot(xs, [pts[x] for x in xs], marker="o", label=m, ls="--" if m == "ideal" else "-")
            ax.axhline(1.0, color="black", lw=0.8)
            ax.set_title(f"S={S // 1024}K")
            ax.set_xlabel("MSR (fraction of KV heads streaming)")
            ax.set_yscale("log", base=2)
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.2gx"))
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].set_ylabel("speedup vs cuDNN SDPA dense")
        axes[0][-1].legend(fontsize=7)
        fig.suptitle(f"{MODELS[model]['name']} attention, batch {B}, bf16 forward")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"bench_{model}_b{B}.png"), dpi=110)
        plt.close(fig)


def flush(msrs):
    """Write what has been measured so far (a stage timeout must not lose the whole sweep)."""
    with open(os.path.join(OUT_DIR, "bench.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)
    write_markdown(os.path.join(OUT_DIR, "bench.md"), msrs)


def main():
    global OUT_DIR
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("BENCH_OUT"))
    args = ap.parse_args()
    OUT_DIR = args.out or default_out("attention")
    os.makedirs(OUT_DIR, exist_ok=True)
    if not torch.cuda.is_available():
        print("bench_attention: needs a CUDA device", file=sys.stderr)
        return 2
    budget = float(os.environ.get("BENCH_BUDGET_S", "330"))
    msrs = env_list("MSRS", "0,0.25,0.5,0.75,1", float)
    models = env_list("MODELS", "llama,smollm2", str)
    skip = set(env_list("SKIP", "", str))
    seqs = {"llama": env_list("SEQS", "4096,8192,32768,65536,131072"),
            "smollm2": env_list("SMOL_SEQS", "4096,32768")}
    rec(kind="env", torch=torch.__version__, cuda=torch.version.cuda, gpu=torch.cuda.get_device_name(),
        cudnn=torch.backends.cudnn.version(), budget_s=budget)
    torch.manual_seed(0)

    def within_budget(what):
        if time.time() - T0 > budget:
            rec(kind="skipped", what=what, reason=f"BENCH_BUDGET_S={budget} reached")
            return False
        return True

    try:
        import elastic_cuda

        rec(kind="ours", has_cuda_kernels=elastic_cuda.has_cuda_kernels())
    except Exception as e:
        rec(kind="ours", error=repr(e)[:300])
    first = min(seqs[models[0]]) if models and seqs[models[0]] else 4096
    numeric_check(models[0] if models else "llama", min(first, 8192), B=1)
    b4 = int(os.environ.get("B4_SEQ", "8192"))
    if b4:
        numeric_check(models[0] if models else "llama", min(b4, 8192), B=4)
    for model in models:
        for S in seqs[model]:
            if not within_budget(f"{model} S={S}"):
                continue
            case = Case(model, 1, S)
            sweep_case(case, msrs, skip)
            del case
            torch.cuda.empty_cache()
            flush(msrs)
    if b4 and within_budget(f"batch 4 S={b4}"):
        sweep_case(Case(models[0] if models else "llama", 4, b4), msrs, skip)
        torch.cuda.empty_cache()
        flush(msrs)
    if within_budget("boundary_pool"):
        pool_section(env_list("POOL_SEQS", "1024,4096,16384,65536,131072"))
    bwd = int(os.environ.get("BWD_S", "32768"))
    if bwd and within_budget(f"fwd+bwd S={bwd}"):
        fwd_bwd_section(bwd, skip)
    flush(msrs)
    write_plots(OUT_DIR)
    # short summary last (the device tool returns the tail of the output)
    base, table = speedups()
    print("\n=== speedup vs cuDNN dense (ours_auto | flex_hybrid | serial) ===")
    for key in sorted(table):
        row = table[key]
        cells = []
        for msr in msrs:
            vals = [row.get(m, {}).get(msr) for m in ("ours_auto", "flex_hybrid", "serial")]
            cells.append(f"{msr}: " + "|".join("-" if x is None else f"{x:.2f}" for x in vals))
        print(f"{key[0]} B{key[1]} S{key[2]} cudnn {base[key]:.2f}ms  " + "  ".join(cells))
    print(f"total {time.time() - T0:.0f}s; {sum('error' in r for r in RESULTS)} errors recorded")
    return 0


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` -> SystemExit -> results still written
    try:
        rc = main()
    except (Exception, SystemExit):  # a crash or a SIGTERM: still leave whatever was measured
        traceback.print_exc()
        if OUT_DIR is not None:  # None: main() stopped before it knew where (bad arguments, --help)
            os.makedirs(OUT_DIR, exist_ok=True)
            with open(os.path.join(OUT_DIR, "bench.json"), "w") as f:
                json.dump(RESULTS, f, indent=1, default=str)
        rc = 1
    sys.exit(rc)
