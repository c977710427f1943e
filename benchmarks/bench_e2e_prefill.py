"""End-to-end prefill of a Llama-3.1-8B-shaped model (random weights, bf16, B=1, 32 layers): dense HF sdpa against
the elastic backend with 6 of 8 KV heads per layer sparse (a fixed table, the same heads in every layer), sparse mode
STREAM (sink 128, window 2048) and BLOCK (the XAttention estimate at threshold 0.9 per layer, then block-sparse
heads), and every head FULL through the elastic op. Each row gives the median time of `model(ids, logits_to_keep=1)`
and, for the elastic rows, ESR (fraction of causal query-key pairs skipped) and the kept fraction (1 - ESR): with
random weights attention is diffuse, so the estimate keeps most blocks; the BLOCK row then measures the estimate's
own cost more than the sparsity (the issue's bar: never slower than dense by more than the estimate).

Env: SEQS (default 32768,131072), REPS (default 3; 1 from 128K), BENCH_BUDGET_S (default 240: cases that would start
later are recorded as skipped). Writes e2e_prefill.json / e2e_prefill.md under --out (default
benchmarks/results/e2e_prefill/<date>_<gpu>/); `--from-json FILE` rewrites the markdown without a GPU.
Run from the repository root: `python -m benchmarks.bench_e2e_prefill`.
"""
from __future__ import annotations

import json
import os
import time

import torch

from benchmarks.harness import RESULTS, T0, env_list, out_args, rec, write_with_errors

SPARSE_PER_LAYER = 6  # of 8 KV heads
POLICIES = (("dense_sdpa", None), ("elastic_all_full", "stream"), ("elastic_stream", "stream"),
            ("elastic_block", "block"))


def llama8b_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def timed_prefill(model, ids, reps):
    """Median ms of `reps` prefills after one warm-up (CUDA events)."""
    times = []
    with torch.no_grad():
        for i in range(reps + 1):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(ids, logits_to_keep=1)
            end.record()
            torch.cuda.synchronize()
            if i > 0:
                times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def run_case(model, S, name, sparse_mode, reps):
    from elastic_cuda.integrations.transformers import disable, enable

    gen = torch.Generator("cuda").manual_seed(S)
    ids = torch.randint(0, model.config.vocab_size, (1, S), device="cuda", generator=gen)
    L, Hkv = model.config.num_hidden_layers, model.config.num_key_value_heads
    disable(model)
    state = None
    if sparse_mode is not None:
        table = torch.zeros(L, Hkv, dtype=torch.int32)
        if name != "elastic_all_full":
            table[:, Hkv - SPARSE_PER_LAYER:] = 1
        state = enable(model, policy="fixed", fixed_table=table, sparse_mode=sparse_mode, sink=128, window=2048)
    ms = timed_prefill(model, ids, reps)
    extra = {}
    if state is not None:
        m = state.metrics()
        esr = float(m.get("esr", float("nan")))
        extra = dict(msr=float(m.get("msr", float("nan"))), esr=round(esr, 4), kept_fraction=round(1 - esr, 4))
    rec(method=name, S=S, ms=ms, reps=reps, **extra)
    disable(model)


def write_markdown(path, torch_version, gpu):
    lines = ["# End-to-end prefill, Llama-3.1-8B-shaped model (random weights)", "",
             f"torch {torch_version}, {gpu}, bf16, B=1, 32 layers, `model(ids, logits_to_keep=1)`; median ms "
             f"(speedup vs dense sdpa). Elastic rows: {SPARSE_PER_LAYER} of 8 KV heads per layer sparse (fixed table); "
             "ESR = fraction of causal query-key pairs skipped, kept = 1 - ESR. `python -m "
             "benchmarks.bench_e2e_prefill`.", "",
             "| S | method | ms | vs dense | MSR | kept | reps |", "|---|---|---|---|---|---|---|"]
    dense = {r["S"]: r["ms"] for r in RESULTS if r["method"] == "dense_sdpa" and "ms" in r}
    for r in sorted((r for r in RESULTS if "ms" in r), key=lambda r: (r["S"], r["method"] != "dense_sdpa")):
        sp = f"{dense[r['S']] / r['ms']:.2f}x" if r["S"] in dense else "-"
        msr = f"{r['msr']:.2f}" if "msr" in r else "-"
        kept = f"{r['kept_fraction']:.3f}" if "kept_fraction" in r else "-"
        lines.append(f"| {r['S']} | {r['method']} | {r['ms']:.1f} | {sp} | {msr} | {kept} | {r['reps']} |")
    write_with_errors(path, lines)


def main():
    args = out_args("e2e_prefill", __doc__.split("\n")[0], "e2e_prefill.md")
    md = os.path.join(args.out, "e2e_prefill.md")
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        RESULTS.extend(saved["results"])
        write_markdown(md, saved["torch"], saved["gpu"])
        return
    import elastic_cuda  # noqa: F401  (registers the ops)

    budget = float(os.environ.get("BENCH_BUDGET_S", 240))
    model = llama8b_model()
    for S in env_list("SEQS", "32768,131072"):
        reps = int(os.environ.get("REPS", 3 if S < 131072 else 1))
        for name, mode in POLICIES:
            if time.time() - T0 > budget:
                rec(method=name, S=S, error="skipped: BENCH_BUDGET_S reached")
                continue
            try:
                run_case(model, S, name, mode, reps)
            except Exception as e:  # a failing case is a row with its error, the others still run
                rec(method=name, S=S, error=repr(e)[:300])
            print(RESULTS[-1], flush=True)
    with open(os.path.join(args.out, "e2e_prefill.json"), "w") as f:
        json.dump({"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "results": RESULTS}, f, indent=1)
    write_markdown(md, torch.__version__, torch.cuda.get_device_name())
    print(open(md).read())


if __name__ == "__main__":
    main()
