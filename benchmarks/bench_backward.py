"""Forward+backward of elastic attention (bf16, Llama-3.1-8B attention shape, B 1) against cuDNN, FlashAttention-4
and Flex, with both of our backward kernels timed in one process.

Rows per S (BWD_SEQS, default 8192,32768) and routing (every head FULL; 6 of 8 KV heads STREAM, sink 128, window
2048):
  ours_sm90     elastic_cuda.attention (strategy auto) forward + backward, the Hopper wgmma backward (the default on
                an H200; dQ by TMA reduce-add)
  ours_sm90_atomic  the same with ELASTIC_SM90_BWD_DQ_TMA=0 (dQ by vector atomics instead of TMA reduce-add)
  ours_sm90_det the same under torch.use_deterministic_algorithms(True): dQ tiles added in key-tile order
  ours_sm80     the same with ELASTIC_CUDA_SM90_BWD=0: the mma.sync backward (reload_kernel_options switches it)
  (BWD_PATHS picks among sm90, sm90_atomic, sm90_det, sm80; default all four)
  ours_sm90_early  in ELASTIC_BUILD_EXPERIMENTS=1 builds only: ELASTIC_SM90_BWD_EARLY_RELEASE=1 (kernel_options.h)
  ours_bwd_<path>                 the backward alone (autograd.grad of a kept forward graph)
  cudnn_dense / fa4_dense         SDPA cuDNN and FlashAttention-4, dense causal over every head
  flex_hybrid                     compiled flex_attention with the per-head analytic BlockMask of bench_attention
Each row is the median of BWD_ROUNDS (default 3) interleaved rounds (every method once per round, in row order).
Writes bench_backward.json, .md and .png under --out (default benchmarks/results/attention/<date>_<gpu>/) and prints
the table; --from-json rewrites the .md and .png from a saved run. Run from the repository root:
`python -m benchmarks.bench_backward`.
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics

import torch
from torch.nn.attention import SDPBackend

from benchmarks.bench_attention import SINK, WINDOW, stream_block_mask
from benchmarks.harness import (RESULTS, Case, bench, env_list, fa4, flex_fn, grouped_bars, kernel_switches, out_args, rec,
                                reference_lines, routing, save_panels, sdpa)


@contextlib.contextmanager
def deterministic(on: bool):
    """torch.use_deterministic_algorithms for the block (the Hopper backward's deterministic dQ order), restored after."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def section(S: int, rounds: int):
    """The rows of one S. Every method is checked once, then timed in `rounds` interleaved rounds (each round times
    every method once, in row order; the row is the median of its rounds): one pass per method let the GPU's clock
    state differ between neighbouring rows by several percent (e.g. ours 6/8 STREAM at 32K 24.7 ms in the benchmark,
    22.9-23.4 ms alone, with Flex timed between)."""
    import elastic_cuda

    case = Case("llama", 1, S)
    do = torch.randn_like(case.q)
    do_t = do.transpose(1, 2).contiguous()
    leaves = [t.detach().requires_grad_(True) for t in (case.q, case.k, case.v)]
    leaves_t = [t.detach().requires_grad_(True) for t in (case.qt, case.kt, case.vt)]
    timed = []  # (method, fn, row fields, kernel switches, deterministic)
    kept = []   # forward graphs the backward-alone rows differentiate

    def one(name, fn, switches=None, det=False, **extra):
        try:
            with deterministic(det), kernel_switches(**(switches or {})):
                fn()
                torch.cuda.synchronize()
            timed.append((name, fn, extra, switches or {}, det))
        except Exception as e:  # a peer missing or failing: its row says why
            rec(kind="fwd_bwd", method=name, **case.key(**extra), error=repr(e)[:300])

    one("cudnn_dense", lambda: sdpa(*leaves_t, SDPBackend.CUDNN_ATTENTION).backward(do_t))
    peer = fa4()
    if peer is not None:
        fa = peer[0]
        one("fa4_dense", lambda: fa(*leaves, causal=True).backward(do))
    for msr in (0.0, 0.75):
        hm = routing(1, case.Hkv, msr, seed=11)
        experiments = "experiments_built=1" in elastic_cuda.ops.reload_kernel_options()
        paths = env_list("BWD_PATHS", "sm90,sm90_atomic,sm90_det,sm80", str.strip)
        for path in paths + (["sm90_early"] if experiments and "sm90_early" not in paths else []):
            switches = dict(ELASTIC_CUDA_SM90_BWD="0" if path == "sm80" else "1",
                            ELASTIC_SM90_BWD_EARLY_RELEASE="1" if path == "sm90_early" else "0",
                            ELASTIC_SM90_BWD_DQ_TMA="0" if path == "sm90_atomic" else "1")

            def ours_fb(hm=hm):
                elastic_cuda.ops.attention(*leaves, hm, sink=SINK, window=WINDOW, strategy="auto").backward(do)

            one(f"ours_{path}", ours_fb, switches, path == "sm90_det", msr=msr)
            kept.append(elastic_cuda.ops.attention(*leaves, hm, sink=SINK, window=WINDOW, strategy="auto"))

            def ours_b(out=kept[-1]):
                torch.autograd.grad(out, leaves, do, retain_graph=True)

            one(f"ours_bwd_{path}", ours_b, switches, path == "sm90_det", msr=msr)
        try:
            bm = stream_block_mask(S, hm.repeat_interleave(case.G, 1))
            one("flex_hybrid", lambda bm=bm: flex_fn()(*leaves_t, block_mask=bm, enable_gqa=True).backward(do_t),
                msr=msr)
        except Exception as e:
            rec(kind="fwd_bwd", method="flex_hybrid", **case.key(msr=msr), error=repr(e)[:300])

    times = [[] for _ in timed]
    for _ in range(rounds):
        for i, (name, fn, extra, switches, det) in enumerate(timed):
            with deterministic(det), kernel_switches(**switches):
                times[i].append(bench(fn, S))
    for (name, fn, extra, switches, det), ms_rounds in zip(timed, times):
        ms = statistics.median(ms_rounds)
        rec(kind="fwd_bwd", method=name, **case.key(**extra), ms=ms, ms_rounds=[round(t, 4) for t in ms_rounds],
            tflops=3.5 * case.flops / ms / 1e9)
    del kept


def write_markdown(path):
    lines = ["| S | STREAM heads | method | ms | TFLOP/s (3.5x causal fwd) |", "|---|---|---|---|---|"]
    for r in RESULTS:
        if r.get("kind") != "fwd_bwd":
            continue
        msr = r.get("msr")
        cell = f"{r['ms']:.2f} | {r['tflops']:.0f}" if "ms" in r else f"error: {r['error'][:80]} |"
        lines.append(f"| {r['S']} | {'-' if msr is None else f'{round(msr * 8)}/8'} | {r['method']} | {cell} |")
    text = "\n".join(lines)
    print(text)
    with open(path, "w") as f:
        f.write(text + "\n")


def write_plot(path):
    """One panel per S: forward + backward ms of each method for every head FULL and 6 of 8 KV heads STREAM (the
    backward-alone rows left out), the dense peers (cuDNN, FlashAttention-4) as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in RESULTS if r.get("kind") == "fwd_bwd" and "ms" in r]
    seqs = sorted({r["S"] for r in rows})
    if not seqs:
        return
    fig, axes = plt.subplots(1, len(seqs), figsize=(4.2 * len(seqs), 3.8), squeeze=False)
    for ax, S in zip(axes[0], seqs):
        mine = [r for r in rows if r["S"] == S and r.get("msr") is not None and not r["method"].startswith("ours_bwd")]
        msrs = sorted({r["msr"] for r in mine})
        methods = sorted({r["method"] for r in mine}, key=lambda m: (not m.startswith("ours"), m))
        grouped_bars(ax, [f"{round(m * 8)}/8 STREAM" for m in msrs],
                     {m: [next((r["ms"] for r in mine if r["method"] == m and r["msr"] == x), float("nan"))
                          for x in msrs] for m in methods}, fontsize=8)
        reference_lines(ax, [(f"{name} (every head)",
                              next((r["ms"] for r in rows if r["S"] == S and r["method"] == name), None), style)
                             for name, style in (("cudnn_dense", "k--"), ("fa4_dense", "r:"))])
        ax.set_title(f"S={S}", fontsize=9)
        ax.set_ylabel("fwd+bwd ms (median of rounds)")
    save_panels(fig, axes, "Forward + backward, Llama-3.1-8B attention shape, bf16, B=1", path)


def main():
    args = out_args("attention", __doc__.splitlines()[0], "bench_backward.md / .png")
    out_dir = args.out
    if args.from_json:
        with open(args.from_json) as f:
            RESULTS.extend(json.load(f))
    else:
        rounds = int(os.environ.get("BWD_ROUNDS", "3"))
        for S in env_list("BWD_SEQS", "8192,32768"):
            section(S, rounds)
            torch.cuda.empty_cache()
        with open(os.path.join(out_dir, "bench_backward.json"), "w") as f:
            json.dump(RESULTS, f, indent=1)
    write_markdown(os.path.join(out_dir, "bench_backward.md"))
    write_plot(os.path.join(out_dir, "bench_backward.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
