"""A/B of the XAttention estimate's kernel 1 on Hopper (issue #15): the wgmma body (xattn_scores_sm90_kernel.cuh) in its
narrow instance (one key tile per step, ELASTIC_XATTN_SM90_WIDE=0) and its wide one (two key tiles per step, the
default since the ninth session) against the mma.sync body (ELASTIC_XATTN_SM90=0), Llama-3.1-8B shape (Hq 32, Hkv 8,
D 128), bf16, B 1, stride 16, block 128, threshold 0.9.

Cases: every KV head BLOCK, and 6 of 8 KV heads BLOCK (head_mode [FULL, STREAM, BLOCK x 6]: the estimate of the
FULL+BLOCK mix of bench_block_prefill), at the lengths given (default 8K, 32K, 128K). Interleaved rounds (every
variant once per round, per case), median over rounds of triton do_bench medians (harness.bench). Each case also
checks that the masks agree: wgmma against mma.sync (fraction of differing mask entries over kept ones) and wide
against narrow (count of differing entries; the same bits by construction).
Writes xattn_sm90_ab.json and xattn_sm90_ab.md under --out. TFLOP/s counts the causal antidiagonal GEMM of the
estimated heads: 2 * Hq_block * (G^2 / 2) * s * D (G = S / s query groups; diagonal tiles and skipped columns
ignored), so mma.sync at 32K every head is ~190 TFLOP/s (275 GFLOP in 1.43 ms).
usage: python -m experiments.time_xattn_sm90 [--out DIR]   (env LENGTHS=8192,32768,131072 ROUNDS=3)"""
import json
import os
import statistics

import torch

import elastic_cuda
from benchmarks.harness import bench, env_list, kernel_switches, out_args
from elastic_cuda import BLOCK, FULL, STREAM
from elastic_cuda.attention.xattn import xattn_block_mask

HQ, HKV, D, STRIDE, BLK = 32, 8, 128, 16, 128
VARIANTS = {"mma_sync": {"ELASTIC_XATTN_SM90": "0", "ELASTIC_XATTN_SM90_WIDE": "0"},
            "wgmma": {"ELASTIC_XATTN_SM90": "1", "ELASTIC_XATTN_SM90_WIDE": "0"},
            "wgmma_wide": {"ELASTIC_XATTN_SM90": "1", "ELASTIC_XATTN_SM90_WIDE": "1"}}
MODES = {"all_block": [BLOCK] * HKV, "6of8_block": [FULL, STREAM] + [BLOCK] * 6}


def gflop(S, n_block_kv):
    G = S // STRIDE
    return 2.0 * n_block_kv * (HQ // HKV) * (G * G / 2) * STRIDE * D / 1e9


def main():
    args = out_args("xattn", __doc__, "xattn_sm90_ab.json / .md")
    lengths = env_list("LENGTHS", "8192,32768,131072")
    rounds = int(os.environ.get("ROUNDS", "3"))
    results = []
    for S in lengths:
        g = torch.Generator(device="cuda").manual_seed(S)
        q = (torch.randn(1, S, HQ, D, device="cuda", generator=g) * 1.5).to(torch.bfloat16)
        k = torch.randn(1, S, HKV, D, device="cuda", generator=g).to(torch.bfloat16)
        for mode, modes in MODES.items():
            hm = torch.tensor([modes], dtype=torch.int32, device="cuda")
            fn = lambda: xattn_block_mask(q, k, block_size=BLK, stride=STRIDE, head_mode=hm)  # noqa: E731
            times = {v: [] for v in VARIANTS}
            masks = {}
            for r in range(rounds):
                for v, env in VARIANTS.items():
                    with kernel_switches(**env):
                        if r == 0:
                            masks[v] = fn()
                        times[v].append(bench(fn, S))
            kept = max(1, int(masks["mma_sync"].sum()))
            differ = int((masks["wgmma"] != masks["mma_sync"]).sum()) / kept
            wide_differ = int((masks["wgmma_wide"] != masks["wgmma"]).sum())  # the same bits by construction
            fl = gflop(S, sum(m == BLOCK for m in modes))
            row = {"S": S, "mode": mode, "rounds": rounds, "mask_differ_frac": differ,
                   "wide_vs_wgmma_differ_blocks": wide_differ, "gflop": round(fl, 1)}
            for v in VARIANTS:
                ms = statistics.median(times[v])
                row[f"{v}_ms"] = round(ms, 4)
                row[f"{v}_ms_rounds"] = [round(t, 4) for t in times[v]]
                row[f"{v}_tflops"] = round(fl / ms, 1)
            row["speedup"] = round(row["mma_sync_ms"] / row["wgmma_ms"], 3)
            row["wide_speedup"] = round(row["wgmma_ms"] / row["wgmma_wide_ms"], 3)
            print(json.dumps(row), flush=True)
            results.append(row)
            del masks
        del q, k
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "xattn_sm90_ab.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "options": elastic_cuda.ops.reload_kernel_options(),
                   "results": results}, f, indent=1)
    lines = ["| S | heads BLOCK | mma.sync ms | wgmma ms | wgmma wide ms | wgmma / mma.sync | wide / wgmma | "
             "wgmma TFLOP/s | wide TFLOP/s | masks differ (wgmma vs mma.sync) | wide vs wgmma blocks differ |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['S']} | {r['mode']} | {r['mma_sync_ms']:.3f} | {r['wgmma_ms']:.3f} | "
                     f"{r['wgmma_wide_ms']:.3f} | {r['speedup']:.2f}x | {r['wide_speedup']:.2f}x | "
                     f"{r['wgmma_tflops']:.0f} | {r['wgmma_wide_tflops']:.0f} | {r['mask_differ_frac']:.1e} | "
                     f"{r['wide_vs_wgmma_differ_blocks']} |")
    with open(os.path.join(args.out, "xattn_sm90_ab.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
