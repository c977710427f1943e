"""CPU forward timing of elastic attention against torch's own CPU attention (SDPA), in the same run.

For each shape (SmolLM2-135M: 9 q / 3 kv heads, D 64; Llama-ish: 32 / 8, D 128), dtype (fp32, bf16), thread
count and routing (every head FULL, STREAM, BLOCK, and a mix cycling FULL / STREAM / BLOCK over the KV heads),
the elastic op and torch.nn.functional.scaled_dot_product_attention (dense causal, enable_gqa, [B, H, S, D] views
as the transformers backend passes them) run interleaved, call for call, --repeats times after one warm-up each;
the tables give medians. SDPA is always dense causal: it is what a model runs without routing, so `ours / SDPA`
below 1 for sparse heads is the time routing saves, to be read against `kept`, the fraction of the causal
(query, key) pairs the heads see. BLOCK heads use a fixed random block mask (first and diagonal blocks plus
--block-density of the other causal blocks); the XAttention estimate that would pick the mask at prefill
(xattn_block_mask) is timed on its own in the last column.

The machine may be shared: the load average is recorded around every case, and cpu/wall (process CPU time over
wall time) says how many cores the op kept busy. Writes <out>/bench_cpu.json and <out>/bench_cpu.md (with the
command that produced them).

    python -m benchmarks.bench_cpu [--out DIR] [--seqlen 2048] [--threads 1 2] [--repeats 5]

Run from the repository root as a module, so that this checkout's elastic_cuda is the one timed (the markdown
records the package's path and commit).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import elastic_cuda
from benchmarks.harness import default_out
from elastic_cuda.attention.xattn import block_visible_pairs, xattn_block_mask

FULL, STREAM, BLOCK = elastic_cuda.FULL, elastic_cuda.STREAM, elastic_cuda.BLOCK
SHAPES = {"smollm2": {"heads_q": 9, "heads_kv": 3, "head_dim": 64},
          "llama": {"heads_q": 32, "heads_kv": 8, "head_dim": 128}}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ROUTINGS = ("FULL", "STREAM", "BLOCK", "mix")
SINK, WINDOW, BLOCK_SIZE = 64, 512, 128


def head_modes(routing: str, heads_kv: int) -> torch.Tensor:
    cycle = {"FULL": [FULL], "STREAM": [STREAM], "BLOCK": [BLOCK], "mix": [FULL, STREAM, BLOCK]}[routing]
    return torch.tensor([[cycle[h % len(cycle)] for h in range(heads_kv)]], dtype=torch.int32)


def block_mask_for(heads_kv: int, seqlen: int, density: float, gen: torch.Generator) -> torch.Tensor:
    nb = -(-seqlen // BLOCK_SIZE)
    mask = torch.rand(1, heads_kv, nb, nb, generator=gen) < density
    eye = torch.eye(nb, dtype=torch.bool)
    mask = mask | eye | (torch.arange(nb) == 0).view(1, -1)  # first (sink) and diagonal blocks, as XAttention
    return mask & torch.ones(nb, nb, dtype=torch.bool).tril()


def kept_fraction(modes: torch.Tensor, mask: torch.Tensor, seqlen: int) -> float:
    """Visible (query, key) pairs over causal pairs, averaged over the KV heads."""
    causal = seqlen * (seqlen + 1) / 2
    i = torch.arange(seqlen, dtype=torch.float64)
    # STREAM query i sees the sink keys [0, min(sink, i + 1)) and the window keys [max(sink, i - window + 1), i]
    stream = torch.clamp(i + 1, max=SINK) + torch.clamp(i - torch.clamp(i - WINDOW + 1, min=SINK) + 1, min=0)
    kept = []
    for h, mode in enumerate(modes[0].tolist()):
        if mode == FULL:
            kept.append(1.0)
        elif mode == STREAM:
            kept.append(float(stream.sum()) / causal)
        else:
            kept.append(float(block_visible_pairs(mask[0, h], seqlen, BLOCK_SIZE)) / causal)
    return sum(kept) / len(kept)


def code_commit() -> str:
    """The checkout's commit, with "+local changes" when its tracked files differ from it."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" +local changes" if dirty else "")


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def bench_case(shape: dict, dtype: torch.dtype, routing: str, seqlen: int, repeats: int, density: float) -> dict:
    gen = torch.Generator().manual_seed(seqlen)
    Hq, Hkv, D = shape["heads_q"], shape["heads_kv"], shape["head_dim"]
    q = torch.randn(1, seqlen, Hq, D, generator=gen).to(dtype)
    k = torch.randn(1, seqlen, Hkv, D, generator=gen).to(dtype)
    v = torch.randn(1, seqlen, Hkv, D, generator=gen).to(dtype)
    modes = head_modes(routing, Hkv)
    mask = block_mask_for(Hkv, seqlen, density, gen)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # views, as the transformers backend passes them

    def ours():
        elastic_cuda.ops.attention(q, k, v, modes, sink=SINK, window=WINDOW, block_mask=mask, block_size=BLOCK_SIZE)

    def sdpa():
        torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)

    def estimate():
        xattn_block_mask(q, k, block_size=BLOCK_SIZE)

    calls = {"ours": ours, "sdpa": sdpa}
    if routing in ("BLOCK", "mix"):
        calls["estimate"] = estimate
    load_before = os.getloadavg()[0]
    with torch.no_grad():
        for fn in calls.values():
            fn()  # warm-up: allocator, thread pool, GEMM kernel caches
        wall = {n: [] for n in calls}
        cpu = {n: [] for n in calls}
        for _ in range(repeats):  # interleaved: each repeat times every call once, in the same load
            for name, fn in calls.items():
                w, c = timed(fn)
                wall[name].append(w)
                cpu[name].append(c)
    row = {"kept": kept_fraction(modes, mask, seqlen), "load_before": load_before, "load_after": os.getloadavg()[0]}
    for name in calls:
        row[f"{name}_s"] = statistics.median(wall[name])
        row[f"{name}_cpu_per_wall"] = statistics.median(c / w for c, w in zip(cpu[name], wall[name]))
        row[f"{name}_all_s"] = wall[name]
    row["ours_over_sdpa"] = row["ours_s"] / row["sdpa_s"]
    return row


def markdown(result: dict) -> str:
    lines = [
        "# elastic attention vs torch SDPA on CPU (forward, B = 1)",
        "",
        f"Command: `{result['command']}`",
        "",
        (f"Machine: {result['machine']['cores']} cores ({result['machine']['cpu_capability']}), torch "
        f"{result['machine']['torch']}, S = {result['seqlen']}, sink {SINK} / window {WINDOW}, block {BLOCK_SIZE} "
        f"(BLOCK mask density {result['block_density']}), median of {result['repeats']} interleaved calls. "
        f"{result['note']}"),
        "",
        f"Package measured: `{result['package']}` at commit {result.get('commit', 'unknown')}.",
        "",
        ("`kept`: visible pairs / causal pairs. `ours / SDPA` < 1: ours is faster. `est.`: the XAttention block "
        "estimate for that input (BLOCK and mix rows), separate from `ours`. `load`: 1-minute load average before / "
        "after the case."),
        "",
        ("| shape | dtype | threads | routing | kept | ours (ms) | SDPA (ms) | ours / SDPA | est. (ms) | "
        "cpu/wall ours, SDPA | load |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        est = f"{r['estimate_s'] * 1e3:.1f}" if "estimate_s" in r else ""
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {r['threads']} | {r['routing']} | {r['kept']:.2f} | "
            f"{r['ours_s'] * 1e3:.1f} | {r['sdpa_s'] * 1e3:.1f} | {r['ours_over_sdpa']:.2f} | {est} | "
            f"{r['ours_cpu_per_wall']:.2f}, {r['sdpa_cpu_per_wall']:.2f} | "
            f"{r['load_before']:.1f} / {r['load_after']:.1f} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default=None,
                    help="folder for bench_cpu.json and bench_cpu.md (default benchmarks/results/cpu/<date>_cpu/)")
    ap.add_argument("--seqlen", type=int, default=2048, help="prefill length")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to run")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timed calls per case")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--routings", nargs="+", default=list(ROUTINGS), choices=list(ROUTINGS))
    ap.add_argument("--block-density", type=float, default=0.3,
                    help="fraction of the non-forced causal blocks a BLOCK head keeps")
    ap.add_argument("--note", default="", help="free text for the markdown (e.g. that the machine was shared)")
    ap.add_argument("--markdown-from", metavar="JSON",
                    help="only rewrite <out>/bench_cpu.md from an earlier bench_cpu.json (no timing)")
    args = ap.parse_args()
    args.out = args.out or default_out("cpu")
    os.makedirs(args.out, exist_ok=True)
    if args.markdown_from:
        result = json.loads(Path(args.markdown_from).read_text())
        Path(args.out, "bench_cpu.md").write_text(markdown(result))
        return

    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for shape_name in args.shapes:
            for dtype_name in args.dtypes:
                for routing in args.routings:
                    r = bench_case(SHAPES[shape_name], DTYPES[dtype_name], routing, args.seqlen, args.repeats,
                                   args.block_density)
                    r.update(shape=shape_name, dtype=dtype_name, threads=threads, routing=routing)
                    rows.append(r)
                    print(f"{shape_name} {dtype_name} {threads}t {routing:6s} kept {r['kept']:.2f}: ours "
                          f"{r['ours_s'] * 1e3:7.1f} ms, SDPA {r['sdpa_s'] * 1e3:7.1f} ms, ratio "
                          f"{r['ours_over_sdpa']:.2f} (load {r['load_before']:.1f})", flush=True)
    result = {
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "package": str(Path(elastic_cuda.__file__).resolve().parent),
        "commit": code_commit(),
        "seqlen": args.seqlen, "repeats": args.repeats, "block_density": args.block_density, "note": args.note,
        "sink": SINK, "window": WINDOW, "block_size": BLOCK_SIZE, "shapes": SHAPES, "rows": rows,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "bench_cpu.md").write_text(markdown(result))
    print(f"\nwrote {out / 'bench_cpu.json'} and {out / 'bench_cpu.md'}")


if __name__ == "__main__":
    main()
