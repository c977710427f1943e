"""What the GPU benchmarks share: the model shapes, one case's inputs in both layouts, timing, the records every
run appends to (printed as JSON lines as they come, so a killed run still shows what it measured), the dense and
Flex peers, and the markdown writer that appends the records carrying an error.

Run the benchmarks from the repository root as modules (`python -m benchmarks.bench_attention`), so the checkout's
elastic_cuda (or the installed one) is imported; nothing here edits sys.path.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

DEV = "cuda"
MODELS = {"llama": dict(Hq=32, Hkv=8, D=128, name="Llama-3.1-8B"),
          "smollm2": dict(Hq=9, Hkv=3, D=64, name="SmolLM2-135M")}
T0 = time.time()
RESULTS: list[dict] = []
RESULTS_ROOT = "benchmarks/results"


def default_out(topic: str, what: str | None = None) -> str:
    """benchmarks/results/<topic>/<date>_<what>/, the one naming scheme of results/; `what` defaults to the device
    (the last word of the GPU's name, lower case: 'h200'; 'cpu' without one)."""
    if what is None:
        what = torch.cuda.get_device_name().split()[-1].lower() if torch.cuda.is_available() else "cpu"
    return os.path.join(RESULTS_ROOT, topic, f"{datetime.date.today().isoformat()}_{what}")


def env_list(name, default, cast=int):
    raw = os.environ.get(name, default)
    return [cast(x) for x in raw.split(",") if x.strip()] if raw else []


def rec(**kw):
    kw["elapsed_s"] = round(time.time() - T0, 1)
    RESULTS.append(kw)
    print(json.dumps(kw, default=str), flush=True)


def bench(fn, S):
    """triton do_bench median; long sequences get few reps so the sweep fits its time budget."""
    from triton.testing import do_bench

    if S >= 131072:
        return do_bench(fn, warmup=1, rep=1000, return_mode="median")
    if S >= 65536:
        return do_bench(fn, warmup=10, rep=800, return_mode="median")
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def event_median_ms(fn, reps: int = 30, warmup: int = 5) -> float:
    """Median ms of `reps` CUDA-event timings of fn() on the current stream, each call timed alone."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def event_mean_ms(fn, iters: int) -> float:
    """Mean ms of `iters` back-to-back fn() calls between two CUDA events, after one warm-up call (the interleaved
    A/B studies' timer: the queue stays full, so launch gaps between calls are not counted)."""
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters


def median_ms(fn, reps: int = 30) -> float:
    """Median ms of fn on the current CUDA stream: triton do_bench when available, else CUDA events."""
    try:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))
    except ImportError:
        return event_median_ms(fn, reps)


def out_args(topic: str, description: str, outputs: str):
    """The command line every benchmark takes: --out (default results/<topic>/<date>_<gpu>/, created) and
    --from-json (rewrite `outputs` from a saved run, without a GPU)."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", default=None, help=f"default {RESULTS_ROOT}/{topic}/<date>_<gpu>/")
    ap.add_argument("--from-json", default=None, help=f"rewrite {outputs} from this saved JSON (no GPU)")
    args = ap.parse_args()
    args.out = args.out or default_out(topic)
    os.makedirs(args.out, exist_ok=True)
    return args


class TimeBudget:
    """A run's wall-clock budget in seconds from the start of the process (T0; None: no limit), so that a benchmark
    the lead runs in a fixed device slot cannot overrun it: the next unit of work (a step, a case) starts only if it
    ends in time by the longest unit seen at its size so far (twice the longest of any size at a new size)."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.longest: dict = {}

    @classmethod
    def from_env(cls, name: str = "BUDGET_S", default: str | None = None) -> "TimeBudget":
        raw = os.environ.get(name, default)
        try:
            return cls(float(raw) if raw else None)
        except ValueError:
            raise ValueError(f"{name} must be a number of seconds, got {raw!r}") from None

    def allows(self, size) -> bool:
        if self.seconds is None:
            return True
        guess = self.longest.get(size, 2 * max(self.longest.values(), default=0.0))
        return time.time() - T0 + guess <= self.seconds

    def took(self, size, seconds: float):
        self.longest[size] = max(self.longest.get(size, 0.0), seconds)


@contextlib.contextmanager
def kernel_switches(**env):
    """The kernels' A/B switches (csrc/attention/kernel_options.h) set to `env` (name -> "0"/"1") for the block, then
    restored to what they were (unset or the caller's value); the extension re-reads them on entry and on exit."""
    import elastic_cuda

    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    elastic_cuda.ops.reload_kernel_options()
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        elastic_cuda.ops.reload_kernel_options()


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def causal_flops(B, S, Hq, D):
    return 4.0 * B * S * S / 2 * D * Hq


def routing(B, Hkv, msr, seed):
    """head_mode [B, Hkv] int32 (0 FULL, 1 STREAM) with round(msr * Hkv) STREAM heads per sample; each sample
    gets its own random choice of heads (different routing per sample)."""
    g = torch.Generator().manual_seed(seed)
    n_sa = round(msr * Hkv)
    m = torch.zeros(B, Hkv, dtype=torch.int32)
    for b in range(B):
        m[b, torch.randperm(Hkv, generator=g)[:n_sa]] = 1
    return m.to(DEV)


_FLEX = None


def flex_fn():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention
        import torch._dynamo

        for k in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                  "accumulated_cache_size_limit"):
            if hasattr(torch._dynamo.config, k):
                setattr(torch._dynamo.config, k, 4096)
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def sdpa(q, k, v, backend):
    with sdpa_kernel([backend]):
        try:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        except Exception:
            G = q.shape[1] // k.shape[1]
            return F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1),
                                                  is_causal=True)


class Case:
    """One (model, B, S): inputs in our layout (BSHD) and in the peers' layout (BHSD)."""

    def __init__(self, model, B, S):
        m = MODELS[model]
        self.model, self.B, self.S = model, B, S
        self.Hq, self.Hkv, self.D = m["Hq"], m["Hkv"], m["D"]
        self.G = self.Hq // self.Hkv
        self.q = torch.randn(B, S, self.Hq, self.D, device=DEV, dtype=torch.bfloat16)
        self.k = torch.randn(B, S, self.Hkv, self.D, device=DEV, dtype=torch.bfloat16)
        self.v = torch.randn(B, S, self.Hkv, self.D, device=DEV, dtype=torch.bfloat16)
        self.qt = self.q.transpose(1, 2).contiguous()
        self.kt = self.k.transpose(1, 2).contiguous()
        self.vt = self.v.transpose(1, 2).contiguous()
        self.flops = causal_flops(B, S, self.Hq, self.D)

    def key(self, **kw):
        return dict(model=self.model, B=self.B, S=self.S, **kw)


def fa4():
    """FlashAttention-4 (PyPI flash-attn-4, CuTe DSL; its Hopper path on an H200) as a peer: (attend, its
    BlockSparseTensorsTorch), attend being flash_attn_func returning the output alone; None when it is not
    installed (its rows are then missing, and one record says why)."""
    try:
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
        from flash_attn.cute.interface import flash_attn_func
    except Exception as e:  # not installed: a peer this machine cannot run
        if not any(r.get("method") == "fa4_unavailable" for r in RESULTS):
            rec(kind="note", method="fa4_unavailable", error=repr(e)[:300])
        return None

    def attend(*args, **kw):
        out = flash_attn_func(*args, **kw)
        return out[0] if isinstance(out, tuple) else out  # (out, lse)
    return attend, BlockSparseTensorsTorch


def try_bench(name, case, make, skip, **extra):
    if name in skip:
        return None
    try:
        fn = make()
        fn()
        torch.cuda.synchronize()
        ms = bench(fn, case.S)
        rec(kind="fwd", method=name, **case.key(**extra), ms=ms)
        return ms
    except Exception as e:
        rec(kind="fwd", method=name, **case.key(**extra), error=repr(e)[:300])
        return None


def write_with_errors(path, lines):
    """Write markdown `lines` to path, followed by every RESULTS record that carries an error."""
    errors = [r for r in RESULTS if "error" in r]
    if errors:
        lines = lines + ["## Errors (peers skipped)", "", "```"] + [json.dumps(r)[:400] for r in errors] + ["```"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def grouped_bars(ax, labels, series, fontsize=None):
    """One group of bars per x label and one bar per series in every group (series: name -> values in label order),
    each label ticked under its group's middle: the bar charts of the benchmarks' plots."""
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        ax.bar([j + i * width for j in range(len(labels))], values, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels,
                  **({} if fontsize is None else {"fontsize": fontsize}))


def reference_lines(ax, lines):
    """Horizontal lines across a panel for the peers that have one time per panel (e.g. cuDNN dense):
    lines = [(label, ms or None, style)], style as in matplotlib ("k--"); a None time draws nothing."""
    for label, ms, style in lines:
        if ms is not None:
            ax.axhline(ms, color=style[0], linestyle=style[1:], label=label)


def save_panels(fig, axes, title, path, dpi=110):
    """Finish a row of benchmark panels: the first panel's legend, the title, and the PNG at `path`."""
    import matplotlib.pyplot as plt

    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
