"""benchmarks/bench_router_training.py runs on a CPU: the trainer's own step for every full_branch on a tiny random
model, its outputs written, and its time budget honoured.

Length 384 is the shortest the task data take with the tiny model's byte tokenizer (DataConfig needs >= 128 tokens,
and the fixed text of the four short tasks needs ~384 bytes; tests/test_training.py uses the same)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_ENV = dict(MODEL="tiny-llama", LENGTHS="384", BATCH="2", TASKS="passkey,fact_qa,code_continuation,copy_local",
                ROUTERS="block", CUDA_VISIBLE_DEVICES="")


def _run(out, **env):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_router_training", "--out", str(out)], cwd=REPO,
                          env={**os.environ, **TINY_ENV, **env}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(out, "router_training.json")) as f:
        return json.load(f)


def test_every_branch_runs_the_trainer_step_on_cpu(tmp_path):
    saved = _run(tmp_path, WARMUP="1", STEPS="1", BUDGET_S="100000")
    results = saved["results"]
    assert [r["branch"] for r in results] == ["op", "sdpa", "train_mix", "auto"]
    for r in results:
        assert "error" not in r and r["cut"] is None, r
        assert r["steps_timed"] == 1 and r["median_ms"] > 0 and r["tokens_per_s"] > 0, r
        assert r["auto_picks"] == "op"  # CPU: the composition of two op calls
        assert r["peak_gib"] is None and all(math.isfinite(x) for x in r["loss"])
    # every branch starts from the same routers, optimizer, noise and samples: the same step, the same loss (fp32;
    # the branches differ only in how O_FA is computed)
    losses = [r["loss"][0] for r in results]
    assert max(losses) - min(losses) <= 1e-4 * abs(losses[0]), losses
    assert results[0]["tokens_per_step"] == results[-1]["tokens_per_step"]
    for name in ("router_training.md", "router_training.png"):
        assert os.path.getsize(os.path.join(tmp_path, name)) > 0, name
    md = open(os.path.join(tmp_path, "router_training.md")).read()
    assert md.count("\n| 384 |") == 4


def test_budget_stops_before_a_step_would_overrun(tmp_path):
    results = _run(tmp_path, WARMUP="0", STEPS="2", BRANCHES="op,auto", BUDGET_S="0")["results"]
    assert [r["branch"] for r in results] == ["op", "auto"]
    for r in results:
        assert r["steps_timed"] == 0 and "BUDGET_S=0 reached after 0 of 2 steps" in r["cut"], r
    assert "BUDGET_S=0 reached" in open(os.path.join(tmp_path, "router_training.md")).read()
