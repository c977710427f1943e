"""How good can a static head split be on the sparsity-sensitive tasks? (issue 5's accuracy target, probed)

The evaluation's ``static`` policy ranks heads by how often the trained router keeps them FULL. This probe ranks
them instead by a measured importance, DuoAttention-style: for every KV head alone switched to STREAM (all others
FULL), the rise of the teacher-forced answer cross-entropy on sensitive training prompts. It then measures greedy
accuracy on the held-out eval prompts (the eval's own grid) of:
  * dense;
  * ``importance@m``: the round(m * L * Hkv) least important heads STREAM, for every input;
  * ``frequency@m``: the eval's static table (router FULL frequency) at the same MSR m.
If even ``importance@0.4`` loses more than 3 points to dense, head-level STREAM routing with this sink/window cannot
meet "accuracy >= dense - 3 at MSR >= 0.4" on this model, however well a router picks heads.

  torchrun --nproc-per-node 8 -m experiments.head_importance_probe --out /tmp/probe   (GPU; one H200: ~3 min)

Writes head_importance.json (per-head CE rise, the tables, per-sample records) and head_importance.md.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from elastic_cuda.integrations.transformers import enable
from elastic_cuda.router import RouterSet
from elastic_cuda.training.data import TASKS, DataConfig, TaskDataset
from elastic_cuda.training.distributed import DistEnv, gather_records, resolve_device_dtype, shard
from elastic_cuda.integrations.generate import stop_token_ids
from elastic_cuda.training.evaluate import (EvalConfig, answer_loss, router_full_frequency, run_sample,
                                            static_table_from_frequency)
from elastic_cuda.training.models import load_model_and_tokenizer

# STREAM routers: this probe streams heads, so their routing frequencies are the ones to rank by
SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "elastic_cuda", "routers",
                       "smollm2-135m-instruct-stream")


def capable_cells(lengths) -> list[tuple[str, int]]:
    """The sensitive cells dense SmolLM2 can do (eval_report.md drops variable_tracking, and fact_qa at 8K)."""
    return [(t, n) for t in ("passkey", "kv_retrieval", "fact_qa") for n in lengths if t != "fact_qa" or n < 8192]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--routers", default=SHIPPED, help="routers for the frequency tables (the eval's static)")
    p.add_argument("--out", required=True)
    p.add_argument("--calib-per-cell", type=int, default=4, help="training prompts per cell for the importance")
    p.add_argument("--eval-samples", type=int, default=16, help="held-out prompts per cell (the eval's grid)")
    p.add_argument("--msrs", default="0.4,0.5,0.6")
    p.add_argument("--lengths", default="2048,4096,8192")
    p.add_argument("--heads", type=int, default=None, help="measure only the first N heads (smoke runs)")
    args = p.parse_args()
    msrs = [float(x) for x in args.msrs.split(",")]
    lengths = sorted(int(x) for x in args.lengths.split(","))
    args.cells = cells = capable_cells(lengths)

    env = DistEnv("cuda" if torch.cuda.is_available() else "cpu")
    device, dtype = resolve_device_dtype("auto", "auto", env.local_rank)
    model, tokenizer = load_model_and_tokenizer("smollm2", device, dtype)
    routers = RouterSet.load(args.routers, model=model).to(device).eval()
    sink, window = routers.config["sink"], routers.config["window"]
    data_cfg = DataConfig(lengths=tuple(lengths), tasks=TASKS, local_window=window, sink=sink)
    t0 = time.time()

    # 1. importance of every head: answer-CE rise when it alone streams (heads sharded over ranks)
    calib_data = TaskDataset(tokenizer, split="train", seed=11, config=data_cfg)
    calib = [calib_data.sample(t, n, key=f"probe:{j}") for t, n in cells for j in range(args.calib_per_cell)]
    L, H = routers.config["num_layers"], routers.config["num_kv_heads"]
    enable(model, None, policy="all_full", sink=sink, window=window)
    dense_ce = torch.tensor([answer_loss(model, s, device)[0] for s in calib], dtype=torch.float64)
    rise = torch.zeros(L * H, dtype=torch.float64, device=device)
    for head, _ in shard(list(range(L * H))[:args.heads], env):
        table = torch.zeros(L * H, dtype=torch.bool)
        table[head] = True
        enable(model, None, policy="fixed", fixed_table=table.view(L, H), sink=sink, window=window)
        ce = torch.tensor([answer_loss(model, s, device)[0] for s in calib], dtype=torch.float64)
        rise[head] = float((ce - dense_ce).mean())
    rise = env.all_reduce_(rise).cpu()
    if env.main:
        print(f"importance of {L * H} heads on {len(calib)} prompts in {time.time() - t0:.0f}s; "
              f"dense answer CE {float(dense_ce.mean()):.3f}; largest rises "
              f"{sorted(rise.tolist(), reverse=True)[:5]}")

    # 2. tables: importance-ranked, and the eval's router-frequency ranking (train-split calibration prompts)
    freq_data = TaskDataset(tokenizer, split="train", seed=2, config=data_cfg)
    freq_calib = shard(freq_data.eval_samples(lengths, 2), env)
    enable(model, routers, policy="router", sink=sink, window=window)
    frequency = router_full_frequency(model, freq_calib, device, env)
    tables = {}
    for m in msrs:
        # static_table_from_frequency keeps the highest scores FULL: importance is the score here
        tables[f"importance@{m:g}"] = static_table_from_frequency(rise.view(L, H), m)
        tables[f"frequency@{m:g}"] = static_table_from_frequency(frequency, m)

    # 3. greedy accuracy on the eval's held-out grid
    eval_data = TaskDataset(tokenizer, split="eval", seed=1, config=data_cfg)
    grid = [s for s in eval_data.eval_samples(lengths, args.eval_samples, tasks=("passkey", "kv_retrieval",
                                                                                  "fact_qa"))
            if (s.task, s.target_tokens) in cells]
    mine = shard(grid, env)
    cfg, stop_ids = EvalConfig(), stop_token_ids(tokenizer)
    records = []
    for pi, (name, table) in enumerate([("dense", None)] + list(tables.items())):
        if table is None:
            enable(model, None, policy="all_full", sink=sink, window=window)
        else:
            enable(model, None, policy="fixed", fixed_table=table, sink=sink, window=window)
        for i, s in mine:
            rec = run_sample(model, tokenizer, s, cfg, device, stop_ids)
            records.append({"policy": name, "task": s.task, "length": s.target_tokens, "correct": rec["correct"],
                            "msr": rec.get("msr", 0.0), "_order": pi, "_index": i})
    records = gather_records(records, env)
    if env.main:
        write(args, records, rise, dense_ce, tables, len(calib), time.time() - t0, L, H)
    env.barrier()
    env.close()


def write(args, records, rise, dense_ce, tables, n_calib, seconds, L, H):
    os.makedirs(args.out, exist_ok=True)
    policies = list(dict.fromkeys(r["policy"] for r in records))
    acc = {p: sum(r["correct"] for r in records if r["policy"] == p) / max(1, sum(r["policy"] == p for r in records))
           for p in policies}
    cell = {p: {f"{t} {n}": sum(r["correct"] for r in records if r["policy"] == p and r["task"] == t
                                 and r["length"] == n) / args.eval_samples for t, n in args.cells}
           for p in policies}
    msr = {p: sum(r["msr"] for r in records if r["policy"] == p) / max(1, sum(r["policy"] == p for r in records))
           for p in policies}
    lines = [f"# Static head splits on the sensitive tasks (SmolLM2-135M-Instruct, {args.eval_samples} held-out "
             f"prompts per cell, {len(args.cells)} cells)", "",
             f"Importance: answer-CE rise with one KV head streaming, on {n_calib} training prompts "
             f"(dense CE {float(dense_ce.mean()):.3f}). Run in {seconds:.0f}s.", "",
             "| policy | MSR | accuracy | vs dense | " + " | ".join(f"{t} {n}" for t, n in args.cells) + " |",
             "|---|---|---|---|" + "---|" * len(args.cells)]
    for p in policies:
        lines.append(f"| {p} | {msr[p]:.3f} | {acc[p]:.3f} | {100 * (acc[p] - acc['dense']):+.1f} pts | " +
                     " | ".join(f"{cell[p][f'{t} {n}']:.2f}" for t, n in args.cells) + " |")
    order = sorted(range(L * H), key=lambda i: -float(rise[i]))
    lines += ["", "Most important heads (layer.head: CE rise): " +
              ", ".join(f"{i // H}.{i % H}: {float(rise[i]):+.3f}" for i in order[:12])]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "head_importance.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "head_importance.json"), "w") as f:
        json.dump({"rise": rise.view(L, H).tolist(), "dense_ce": dense_ce.tolist(), "accuracy": acc, "msr": msr,
                   "cells": cell, "tables": {k: v.int().tolist() for k, v in tables.items()},
                   "records": records}, f, indent=1)
    print(text)


if __name__ == "__main__":
    main()
