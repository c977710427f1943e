"""CPU timing of elastic attention at SmolLM2-135M's attention shape (9 query heads, 3 KV heads, D=64).

Prints a markdown table (forward and forward+backward, fp32, S = 2K and 8K; all heads FULL, all
STREAM with sink 64 / window 512, and a 50/50 mix) and writes benchmarks/results/cpu/<date>_op_timings/cpu_timings.json.
Wall time is the median of --repeats runs after one warm-up; cpu/wall (process CPU time over wall
time) shows how many cores the op kept busy, and CPU seconds (the work, summed over threads) is the
figure to compare when other processes share the machine (the load average is recorded). The 50/50 mix needs an even number of (sample, KV head)
pairs, so it runs 2 sequences routed [F S F] and [S F S] and reports time per sequence.

    python -m benchmarks.bench_cpu [--seqlens 2048 8192] [--repeats 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import elastic_cuda
from benchmarks.harness import default_out

FULL, STREAM = elastic_cuda.FULL, elastic_cuda.STREAM
HEADS_Q, HEADS_KV, HEAD_DIM, SINK, WINDOW = 9, 3, 64, 64, 512
ROUTINGS = {
    "all FULL": [[FULL] * 3],
    "all STREAM": [[STREAM] * 3],
    "50/50 mix": [[FULL, STREAM, FULL], [STREAM, FULL, STREAM]],
}


def time_call(fn, repeats):
    fn()  # warm-up (allocator, thread pool)
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    wall = statistics.median(walls)
    return wall, statistics.median(cpus) / wall


def bench_case(seqlen, routing, repeats):
    g = torch.Generator().manual_seed(seqlen)
    head_mode = torch.tensor(routing, dtype=torch.int32)
    B = head_mode.shape[0]
    q = torch.randn(B, seqlen, HEADS_Q, HEAD_DIM, generator=g)
    k = torch.randn(B, seqlen, HEADS_KV, HEAD_DIM, generator=g)
    v = torch.randn(B, seqlen, HEADS_KV, HEAD_DIM, generator=g)
    grad = torch.randn(q.shape, generator=g)

    def forward():
        with torch.no_grad():
            elastic_cuda.ops.attention(q, k, v, head_mode, sink=SINK, window=WINDOW)

    def forward_backward():
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        out = elastic_cuda.ops.attention(qq, kk, vv, head_mode, sink=SINK, window=WINDOW)
        torch.autograd.grad(out, (qq, kk, vv), grad)

    fwd, fwd_util = time_call(forward, repeats)
    fb, fb_util = time_call(forward_backward, max(1, repeats - 1))
    return dict(batch=B, forward_s=fwd / B, forward_cpu_per_wall=fwd_util, forward_cpu_s=fwd * fwd_util / B,
                forward_backward_s=fb / B, forward_backward_cpu_per_wall=fb_util,
                forward_backward_cpu_s=fb * fb_util / B)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default=os.path.join(default_out("cpu", "op_timings"), "cpu_timings.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()

    rows = []
    for seqlen in args.seqlens:
        for name, routing in ROUTINGS.items():
            r = bench_case(seqlen, routing, args.repeats)
            rows.append(dict(seqlen=seqlen, routing=name, **r))
            print(f"S={seqlen} {name}: fwd {r['forward_s']:.3f}s fwd+bwd {r['forward_backward_s']:.3f}s", flush=True)
    # Thread scaling of the heaviest forward, so the table shows whether the threads are used.
    seqlen = max(args.seqlens)
    scaling = {}
    for threads in sorted({1, args.threads}):
        torch.set_num_threads(threads)
        scaling[threads] = bench_case(seqlen, ROUTINGS["all FULL"], 1)["forward_s"]
    torch.set_num_threads(args.threads)

    print(f"\nelastic attention, CPU fp32, B=1 Hq={HEADS_Q} Hkv={HEADS_KV} D={HEAD_DIM}, sink {SINK} window {WINDOW}, "
          f"{args.threads} threads, load average {load_at_start[0]:.1f} at start (seconds per sequence; "
          "cpu/wall = cores kept busy; CPU s = work summed over threads)\n")
    print("| S | routing | forward wall (s) | forward CPU (s) | cpu/wall | fwd+bwd wall (s) | fwd+bwd CPU (s) | cpu/wall |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seqlen']} | {r['routing']} | {r['forward_s']:.3f} | {r['forward_cpu_s']:.3f} | "
              f"{r['forward_cpu_per_wall']:.2f} | {r['forward_backward_s']:.3f} | {r['forward_backward_cpu_s']:.3f} | "
              f"{r['forward_backward_cpu_per_wall']:.2f} |")
    print(f"\nthread scaling, S={seqlen} all FULL forward: " +
          ", ".join(f"{t} thread(s) {s:.3f}s" for t, s in scaling.items()))

    result = dict(
        shape=dict(heads_q=HEADS_Q, heads_kv=HEADS_KV, head_dim=HEAD_DIM, dtype="float32", sink=SINK, window=WINDOW),
        threads=args.threads, repeats=args.repeats, rows=rows,
        thread_scaling_forward_full={str(t): s for t, s in scaling.items()}, seqlen_for_scaling=seqlen,
        machine=dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
                     load_average_at_start=load_at_start, load_average_at_end=os.getloadavg(), torch=torch.__version__,
                     cpu_capability=torch.backends.cpu.get_cpu_capability()),
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
