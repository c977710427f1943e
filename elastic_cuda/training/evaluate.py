"""Task-suite evaluation of routing policies on held-out prompts (split "eval": other source documents, other seed).

Policies (all with the same sparse mode / sink / window):
  * ``dense``       every KV head FULL (policy all_full).
  * ``elastic``     the trained routers (deterministic argmax at prefill, kept while decoding).
  * ``static``      a DuoAttention-style fixed [L, Hkv] table with the same average MSR as ``elastic`` on this
                    suite: heads are ranked by how often the trained router keeps them FULL on calibration
                    prompts from the TRAIN split (``calibration_per_task`` per task and length); the most often full
                    round((1 - MSR_elastic) * L * Hkv) heads stay FULL for every input, the rest stream.
                    It answers "does input-adaptive routing beat the best static split of the same budget?".
  * ``all_sparse``  every KV head sparse (policy all_sparse).
Metrics per task and length: sensitive tasks, accuracy of greedy generation (``max_new_tokens``; correct iff
the expected key/value/city string occurs in the generated text, RULER's string match); robust tasks, mean LM
cross-entropy of the answer tokens under teacher forcing; MSR (fraction of KV heads routed sparse at prefill)
and ESR (fraction of causal (query, key) pairs skipped) for every sample.
Writes ``eval_results.json`` (config, per-sample records, aggregates, target checks), ``eval_report.md``,
``eval_summary.png`` and ``eval_data_manifest.json`` (the held-out documents) under the output directory.
Targets checked (issue 5): sensitive accuracy >= dense - 3 points with sensitive MSR >= 0.4; robust MSR >= 0.8
with robust loss <= dense x 1.03; robust MSR - sensitive MSR >= 0.25.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import asdict, dataclass

import torch

from ..attention.sparse_config import SparseConfig
from ..integrations.generate import greedy_generate, static_cache_for, stop_token_ids
from ..ops import FULL
from .data import ROBUST_TASKS, SENSITIVE_TASKS, TASK_CATEGORY, TASKS, DataConfig, Sample, TaskDataset
from .distributed import DistEnv, gather_records, global_mean, resolve_device_dtype, shard
from .losses import masked_lm_loss
from .models import load_model_and_tokenizer
from .trainer import prompt_then_answer_logits

POLICIES = ("dense", "elastic", "static", "all_sparse")


@dataclass
class EvalConfig:
    out: str = "runs/router/eval"
    model: str = "smollm2"
    routers: str | None = None
    lengths: tuple[int, ...] = (2048, 4096, 8192)
    tasks: tuple[str, ...] = TASKS
    samples_per_task: int = 8
    calibration_per_task: int = 2
    max_new_tokens: int = 32  # SmolLM2 answers in a sentence ("The pass key is 1234567."), digits one token each
    policies: tuple[str, ...] = POLICIES
    sink: int | None = None      # default: the routers' config, else SparseConfig's
    sparse_mode: str | None = None  # router-free policies: default the routers' sparse mode, else SparseConfig's
    window: int | None = None    # default: the routers' config, else SparseConfig's
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    progress: bool = True
    sparsity_shift: float = 0.0  # the elastic policy's inference budget knob (router.py); static follows its MSR


@torch.no_grad()
def answer_loss(model, sample: Sample, device) -> tuple[float, dict]:
    """Mean CE of the answer tokens (teacher forcing over the prompt's KV cache, routing decided on the prompt
    alone as at inference) and the prefill metrics (ESR includes the answer tokens' queries)."""
    ids = torch.tensor(sample.input_ids, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    mask[sample.prompt_len:] = 1
    logits = prompt_then_answer_logits(model, ids, sample.prompt_len, len(ids) - sample.prompt_len + 1)
    loss = masked_lm_loss(logits, ids, mask)
    state = getattr(model, "elastic_state", None)
    return float(loss), (state.metrics() if state is not None else {})


def run_sample(model, tokenizer, sample: Sample, cfg: EvalConfig, device, stop_ids) -> dict:
    rec = {"task": sample.task, "category": sample.category, "length": sample.target_tokens,
           "tokens": sample.num_tokens}
    if sample.category == "sensitive":
        # (On a GPU, elastic policies decode over ElasticStaticCache and the decode op; elsewhere the model's own.)
        cache = static_cache_for(model, len(sample.prompt_ids) + cfg.max_new_tokens + 1)
        gen = greedy_generate(model, sample.prompt_ids, cfg.max_new_tokens, stop_ids, cache=cache)
        text, metrics = tokenizer.decode(gen.tokens, skip_special_tokens=True), gen.prefill_metrics
        rec.update(correct=float(sample.answer.strip() in text), generated=text, answer=sample.answer)
    else:
        loss, metrics = answer_loss(model, sample, device)
        rec.update(loss=loss)
    if metrics:
        rec.update(msr=float(metrics["msr"]), esr=float(metrics["esr"]))
    return rec


def aggregate(records: list[dict]) -> dict:
    """{policy: {"by_task_length": {task: {length: {...}}}, "summary": {...}}}."""
    result = {}
    by_policy = defaultdict(list)
    for r in records:
        by_policy[r["policy"]].append(r)
    for policy, recs in by_policy.items():
        cells = defaultdict(list)
        for r in recs:
            cells[(r["task"], r["length"])].append(r)
        table = defaultdict(dict)
        for (task, length), rs in sorted(cells.items()):
            key = "correct" if TASK_CATEGORY[task] == "sensitive" else "loss"
            cell = {"n": len(rs), ("accuracy" if key == "correct" else "loss"): sum(r[key] for r in rs) / len(rs)}
            for m in ("msr", "esr"):
                if all(m in r for r in rs):
                    cell[m] = sum(r[m] for r in rs) / len(rs)
            table[task][str(length)] = cell
        summary = {}
        for cat, key in (("sensitive", "correct"), ("robust", "loss")):
            rs = [r for r in recs if r["category"] == cat]
            if rs:
                summary["accuracy_sensitive" if cat == "sensitive" else "loss_robust"] = \
                    sum(r[key] for r in rs) / len(rs)
                if all("msr" in r for r in rs):
                    summary[f"msr_{cat}"] = sum(r["msr"] for r in rs) / len(rs)
                    summary[f"esr_{cat}"] = sum(r["esr"] for r in rs) / len(rs)
        if all("msr" in r for r in recs):
            summary["msr"] = sum(r["msr"] for r in recs) / len(recs)
        result[policy] = {"by_task_length": table, "summary": summary}
    return result


MIN_DENSE_ACCURACY = 0.25  # a sensitive (task, length) cell enters the accuracy targets only if dense reaches this


def capable_cells(agg: dict, min_dense_accuracy: float = MIN_DENSE_ACCURACY) -> tuple[list, list]:
    """Sensitive (task, length) cells the dense model can do (accuracy >= min_dense_accuracy), and the dropped ones
    with their dense accuracy. Issue 5: a task the model cannot do densely measures the model, not the routing."""
    dense = agg.get("dense", {}).get("by_task_length", {})
    keep, drop = [], []
    for task in SENSITIVE_TASKS:
        for length, cell in sorted(dense.get(task, {}).items(), key=lambda kv: int(kv[0])):
            (keep if cell["accuracy"] >= min_dense_accuracy else drop).append((task, length, cell["accuracy"]))
    return [(t, n) for t, n, _ in keep], drop


def cell_accuracy(agg: dict, policy: str, cells: list) -> float | None:
    """Sample-weighted sensitive accuracy of `policy` over the given (task, length) cells (None if none present)."""
    table = agg.get(policy, {}).get("by_task_length", {})
    got = [table[t][n] for t, n in cells if t in table and n in table[t]]
    total = sum(c["n"] for c in got)
    return sum(c["accuracy"] * c["n"] for c in got) / total if total else None


def check_targets(agg: dict, min_dense_accuracy: float = MIN_DENSE_ACCURACY) -> dict:
    """Issue-5 targets for the elastic policy against dense and static (None when a needed number is missing).
    Accuracy targets use only the sensitive cells dense can do (capable_cells)."""
    el, de = agg.get("elastic", {}).get("summary", {}), agg.get("dense", {}).get("summary", {})
    st = agg.get("static", {}).get("summary", {})
    cells, _ = capable_cells(agg, min_dense_accuracy)
    acc = {p: cell_accuracy(agg, p, cells) for p in ("elastic", "dense", "static")}

    def check(fn):
        try:
            return bool(fn())
        except (KeyError, TypeError):
            return None

    return {
        "sensitive_accuracy_ge_dense_minus_3pts": check(lambda: acc["elastic"] >= acc["dense"] - 0.03),
        "sensitive_msr_ge_0.4": check(lambda: el["msr_sensitive"] >= 0.4),
        "robust_msr_ge_0.8": check(lambda: el["msr_robust"] >= 0.8),
        "robust_loss_le_dense_x1.03": check(lambda: el["loss_robust"] <= de["loss_robust"] * 1.03),
        "msr_gap_ge_0.25": check(lambda: el["msr_robust"] - el["msr_sensitive"] >= 0.25),
        "elastic_beats_static_sensitive_accuracy_at_ge_msr": check(
            lambda: acc["elastic"] > acc["static"] and el["msr"] >= st["msr"] - 1e-9),
    }


def wilson_interval(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k / n (sound at small n and near 0 or 1)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _hits_by_cell(records: list[dict], policy: str, cells: list) -> dict:
    """{(task, length str): [1.0 / 0.0 per prompt, in run order]} of `policy` on the given sensitive cells."""
    keep = {(t, str(n)) for t, n in cells}
    out = defaultdict(list)
    for r in records:
        key = (r["task"], str(r["length"]))
        if r["policy"] == policy and key in keep and "correct" in r:
            out[key].append(float(r["correct"]))
    return out


def paired_accuracy_difference(records: list[dict], a: str, b: str, cells: list) -> dict | None:
    """Accuracy of policy a minus policy b on the same prompts of the given sensitive (task, length) cells.

    Every policy runs the same prompts in the same order, so the k-th record of a cell pairs across policies.
    Returns n, diff, a 95% interval (normal approximation of the paired differences) and the discordant counts
    (prompts only a gets right, only b gets right): a difference of a few discordant prompts is noise."""
    ra, rb = _hits_by_cell(records, a, cells), _hits_by_cell(records, b, cells)
    diffs = [x - y for key in sorted(ra) for x, y in zip(ra[key], rb.get(key, []))]
    n = len(diffs)
    if n == 0:
        return None
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    half = 1.96 * (var / n) ** 0.5
    return {"n": n, "diff": mean, "ci95": [mean - half, mean + half],
            "only_" + a: sum(d > 0 for d in diffs), "only_" + b: sum(d < 0 for d in diffs)}


def accuracy_uncertainty(records: list[dict], agg: dict) -> dict:
    """Per-policy sensitive accuracy on the capable cells with its 95% Wilson interval, and the paired differences
    elastic - dense and elastic - static (the two accuracy targets), from the per-sample records."""
    cells, _ = capable_cells(agg)
    out = {"policies": {}, "paired": {}}
    for policy in agg:
        hits = [h for cell in _hits_by_cell(records, policy, cells).values() for h in cell]
        if hits:
            out["policies"][policy] = {"n": len(hits), "accuracy": sum(hits) / len(hits),
                                       "ci95": list(wilson_interval(sum(hits), len(hits)))}
    for other in ("dense", "static"):
        if "elastic" in agg and other in agg:
            d = paired_accuracy_difference(records, "elastic", other, cells)
            if d is not None:
                out["paired"][f"elastic-{other}"] = d
    return out


@torch.no_grad()
def router_full_frequency(model, sharded_samples, device, env, bar=None) -> torch.Tensor:
    """float64 [L, Hkv]: how often the routers enabled on `model` keep each head FULL at prefill over the prompts
    of (index, sample) pairs sharded over ranks (all-reduced: every rank gets the same table)."""
    state = model.elastic_state
    full = torch.zeros(state.num_layers * state.num_kv_heads + 1, dtype=torch.float64, device=device)  # + count
    for _, s in sharded_samples:
        model(input_ids=torch.tensor([s.prompt_ids], device=device), use_cache=False, logits_to_keep=1)
        full[:-1] += (state.last_head_mode[0] == FULL).to(torch.float64).flatten()
        full[-1] += 1
        if bar is not None:
            bar.update(1)
    full = env.all_reduce_(full).cpu()
    return (full[:-1] / full[-1]).view(state.num_layers, state.num_kv_heads)


def static_table_from_frequency(full_freq: torch.Tensor, msr: float) -> torch.Tensor:
    """bool [L, Hkv] (True = sparse): the round(msr * L * Hkv) heads least often kept FULL become sparse."""
    L, H = full_freq.shape
    n_sparse = int(round(msr * L * H))
    order = sorted(range(L * H), key=lambda i: (float(full_freq.view(-1)[i]), i))
    table = torch.zeros(L * H, dtype=torch.bool)
    table[order[:n_sparse]] = True
    return table.view(L, H)


def write_report(path_md: str, agg: dict, targets: dict, cfg: EvalConfig, uncertainty: dict | None = None):
    shift = f", router sparsity shift {cfg.sparsity_shift:+g}" if cfg.sparsity_shift else ""
    shift += f", sparse mode {cfg.sparse_mode}" if cfg.sparse_mode else ""
    lines = [f"# Router evaluation ({cfg.model}, lengths {list(cfg.lengths)}, {cfg.samples_per_task} samples "
             f"per task and length{shift})", "", "## Summary", "",
             "| policy | sensitive acc | robust loss | MSR sensitive | MSR robust | ESR sensitive | ESR robust |",
             "|---|---|---|---|---|---|---|"]
    fmt = lambda d, k: f"{d[k]:.3f}" if k in d else "-"  # noqa: E731
    for policy in cfg.policies:
        s = agg.get(policy, {}).get("summary", {})
        lines.append(f"| {policy} | {fmt(s, 'accuracy_sensitive')} | {fmt(s, 'loss_robust')} | "
                     f"{fmt(s, 'msr_sensitive')} | {fmt(s, 'msr_robust')} | {fmt(s, 'esr_sensitive')} | "
                     f"{fmt(s, 'esr_robust')} |")
    cells, dropped = capable_cells(agg)
    lines += ["", f"## Targets (elastic vs dense and static; accuracy over the {len(cells)} sensitive task/length "
              f"cells where dense accuracy >= {MIN_DENSE_ACCURACY})", ""]
    accs = {p: cell_accuracy(agg, p, cells) for p in cfg.policies}
    lines.append("Sensitive accuracy on those cells: " + ", ".join(
        f"{p} {a:.3f}" for p, a in accs.items() if a is not None))
    if dropped:
        lines.append("Dropped (dense cannot do them): " + ", ".join(f"{t} {n} (dense {a:.3f})" for t, n, a in dropped))
    lines.append("")
    lines += [f"- {k}: {'PASS' if v else ('FAIL' if v is not None else 'n/a')}" for k, v in targets.items()]
    if uncertainty and uncertainty.get("policies"):
        lines += ["", "Sampling uncertainty (95%; accuracy: Wilson interval; differences: paired over the same "
                  "prompts, with the prompts only one policy gets right):", ""]
        for p, u in uncertainty["policies"].items():
            lines.append(f"- {p}: {u['accuracy']:.3f} [{u['ci95'][0]:.3f}, {u['ci95'][1]:.3f}] (n={u['n']})")
        for name, d in uncertainty["paired"].items():
            a, b = name.split("-")
            lines.append(f"- {a} - {b}: {100 * d['diff']:+.1f} pts [{100 * d['ci95'][0]:+.1f}, "
                         f"{100 * d['ci95'][1]:+.1f}]; only {a} right: {d['only_' + a]}, only {b} right: "
                         f"{d['only_' + b]} (n={d['n']})")
    lines += ["", "## Per task and length (accuracy or answer loss / MSR)", ""]
    header = "| task | length | " + " | ".join(cfg.policies) + " |"
    lines += [header, "|" + "---|" * (2 + len(cfg.policies))]
    for task in cfg.tasks:
        for length in cfg.lengths:
            cells = []
            for policy in cfg.policies:
                c = agg.get(policy, {}).get("by_task_length", {}).get(task, {}).get(str(length))
                if not c:
                    cells.append("-")
                    continue
                val = c.get("accuracy", c.get("loss"))
                cells.append(f"{val:.3f} / {c['msr']:.2f}" if "msr" in c else f"{val:.3f}")
            lines.append(f"| {task} | {length} | " + " | ".join(cells) + " |")
    with open(path_md, "w") as f:
        f.write("\n".join(lines) + "\n")
    return "\n".join(lines)


def plot_summary(path_png: str, agg: dict, cfg: EvalConfig):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    width = 0.8 / max(1, len(cfg.policies))
    for ax, tasks, metric, title in ((axes[0], SENSITIVE_TASKS, "accuracy", "sensitive accuracy"),
                                     (axes[1], ROBUST_TASKS, "loss", "robust answer loss")):
        for pi, policy in enumerate(cfg.policies):
            vals = []
            for length in cfg.lengths:
                cells = [agg.get(policy, {}).get("by_task_length", {}).get(t, {}).get(str(length)) for t in tasks]
                cells = [c[metric] for c in cells if c and metric in c]
                vals.append(sum(cells) / len(cells) if cells else float("nan"))
            ax.bar([i + pi * width for i in range(len(cfg.lengths))], vals, width, label=policy)
        ax.set_xticks([i + width * (len(cfg.policies) - 1) / 2 for i in range(len(cfg.lengths))])
        ax.set_xticklabels([str(n) for n in cfg.lengths])
        ax.set_xlabel("prompt length (tokens)")
        ax.set_title(title)
        ax.legend(fontsize=8)
    ax = axes[2]
    for pi, policy in enumerate(cfg.policies):
        s = agg.get(policy, {}).get("summary", {})
        ax.bar([0 + pi * width, 1 + pi * width], [s.get("msr_sensitive", 0), s.get("msr_robust", 0)], width,
               label=policy)
    ax.set_xticks([width * (len(cfg.policies) - 1) / 2, 1 + width * (len(cfg.policies) - 1) / 2])
    ax.set_xticklabels(["sensitive", "robust"])
    ax.set_title("MSR")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path_png, dpi=100)
    plt.close(fig)


def evaluate(cfg: EvalConfig, model=None, tokenizer=None, routers=None) -> dict:
    """Run the suite; under torchrun every rank takes samples rank, rank + W, ... of each policy (the elastic MSR
    that sizes the static split and the static calibration are reduced over ranks), and rank 0 writes the files.
    The result does not depend on the number of ranks."""
    bad = [p for p in cfg.policies if p not in POLICIES]
    if bad or not cfg.policies:
        raise ValueError(f"policies must be a non-empty subset of {POLICIES}, got {cfg.policies!r}")
    needs_routers = any(p in ("elastic", "static") for p in cfg.policies)
    probe_device, _ = resolve_device_dtype(cfg.device, cfg.dtype)
    env = DistEnv(probe_device.type)
    try:
        return _evaluate(cfg, model, tokenizer, routers, env, needs_routers)
    finally:
        env.close()


def _evaluate(cfg: EvalConfig, model, tokenizer, routers, env, needs_routers: bool) -> dict:
    from tqdm.auto import tqdm

    from ..integrations.transformers import disable, enable
    from ..router import RouterSet

    device, dtype = resolve_device_dtype(cfg.device, cfg.dtype, env.local_rank)
    if model is None:
        model, tokenizer = load_model_and_tokenizer(cfg.model, device, dtype, cfg.seed)
    model = model.to(device).eval()
    if routers is None and needs_routers:
        if not cfg.routers:
            raise ValueError("routers: the elastic and static policies need trained routers (--routers DIR)")
        routers = RouterSet.load(cfg.routers, model=model)
    if routers is not None:
        routers = routers.to(device).eval()
    routed = (routers.sparse_config if routers is not None else SparseConfig()).replace(
        where="eval: ", sink=cfg.sink, window=cfg.window)
    sink, window = routed.sink, routed.window
    # the policies without routers run the routers' sparse mode (a BLOCK router's static / all_sparse are BLOCK)
    if cfg.sparse_mode is not None and ("elastic" in cfg.policies or "static" in cfg.policies):
        if cfg.sparse_mode != routed.sparse_mode:
            raise ValueError(f"sparse_mode {cfg.sparse_mode!r}: the routers were trained for "
                             f"{routed.sparse_mode!r} (elastic and static follow them)")
    mode_kw = routed.replace(where="eval: ", sparse_mode=cfg.sparse_mode).to_dict()  # with sink and window
    data_cfg = DataConfig(lengths=tuple(cfg.lengths), tasks=tuple(cfg.tasks), local_window=window, sink=sink)
    eval_data = TaskDataset(tokenizer, split="eval", seed=cfg.seed + 1, config=data_cfg)
    samples = eval_data.eval_samples(cfg.lengths, cfg.samples_per_task)
    mine = shard(samples, env)
    if env.main:
        os.makedirs(cfg.out, exist_ok=True)
        eval_data.write_manifest(os.path.join(cfg.out, "eval_data_manifest.json"))
    stop_ids = stop_token_ids(tokenizer)
    order = [p for p in ("elastic", "static", "dense", "all_sparse") if p in cfg.policies]  # static needs elastic
    calib = []
    if "static" in order:
        calib = shard(TaskDataset(tokenizer, split="train", seed=cfg.seed + 2, config=data_cfg).eval_samples(
            cfg.lengths, cfg.calibration_per_task), env)
    bar = tqdm(total=len(mine) * len(order) + len(calib), desc=f"eval (rank {env.rank}/{env.world})",
               disable=not (cfg.progress and env.main), dynamic_ncols=True)
    records, static_table, elastic_msr = [], None, None
    for pi, policy in enumerate(order):
        if policy == "elastic" or (policy == "static" and "elastic" not in order and elastic_msr is None):
            enable(model, routers, policy="router", sink=sink, window=window, sparsity_shift=cfg.sparsity_shift)
            if policy == "static":  # no elastic pass requested: measure its MSR anyway for the budget
                total = sum(run_sample(model, tokenizer, s, cfg, device, stop_ids)["msr"] for _, s in mine)
                elastic_msr = global_mean(total, len(mine), env, device)
        if policy == "static":
            enable(model, routers, policy="router", sink=sink, window=window, sparsity_shift=cfg.sparsity_shift)
            static_table = static_table_from_frequency(router_full_frequency(model, calib, device, env, bar),
                                                       elastic_msr)
            enable(model, None, policy="fixed", fixed_table=static_table, **mode_kw)
        elif policy == "dense":
            enable(model, None, policy="all_full", **mode_kw)
        elif policy == "all_sparse":
            enable(model, None, policy="all_sparse", **mode_kw)
        policy_recs = []
        for i, s in mine:
            rec = run_sample(model, tokenizer, s, cfg, device, stop_ids)
            rec.update(policy=policy, _order=pi, _index=i)
            policy_recs.append(rec)
            bar.update(1)
        if policy == "elastic":
            elastic_msr = global_mean(sum(r["msr"] for r in policy_recs), len(policy_recs), env, device)
        records += policy_recs
    bar.close()
    disable(model)
    records = gather_records(records, env)
    agg = aggregate(records)
    targets = check_targets(agg)
    result = {"config": asdict(cfg), "sink": sink, "window": window, "device": str(device), "dtype": str(dtype),
              "world_size": env.world, "aggregate": agg, "targets": targets,
              "uncertainty": accuracy_uncertainty(records, agg), "records": records,
              "static_table": static_table.int().tolist() if static_table is not None else None}
    if env.main:
        print(_write_outputs(cfg.out, result, cfg))
    env.barrier()
    return result


def _write_outputs(out: str, result: dict, cfg: EvalConfig) -> str:
    """eval_results.json, eval_report.md and eval_summary.png under `out`; returns the report text."""
    with open(os.path.join(out, "eval_results.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot_summary(os.path.join(out, "eval_summary.png"), result["aggregate"], cfg)
    return write_report(os.path.join(out, "eval_report.md"), result["aggregate"], result["targets"], cfg,
                        result.get("uncertainty"))


def rewrite_report(results_path: str) -> str:
    """Re-aggregate the per-sample records of an eval_results.json (no model needed) and rewrite its targets,
    eval_report.md and eval_summary.png next to it, e.g. after the target definitions change."""
    with open(results_path) as f:
        result = json.load(f)
    fields = set(EvalConfig.__dataclass_fields__)
    cfg = EvalConfig(**{k: (tuple(v) if isinstance(v, list) else v)
                        for k, v in result["config"].items() if k in fields})
    agg = aggregate([dict(r) for r in result["records"]])
    result["aggregate"], result["targets"] = agg, check_targets(agg)
    result["uncertainty"] = accuracy_uncertainty(result["records"], agg)
    return _write_outputs(os.path.dirname(os.path.abspath(results_path)), result, cfg)
