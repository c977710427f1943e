"""Where the time of a SmolLM2-135M-shaped prefill goes, dense HF sdpa against the elastic backend (one-off study
for #14 / #15: "on a GPU the demo shows elastic faster than dense at 8K"). Random weights, bf16, B = 1, the shipped
router sets (BLOCK and STREAM) loaded onto the random model, plus fixed all-FULL / all-sparse tables: the weights
change what the routers and the XAttention estimate decide, not the per-layer overheads this looks for.

For each variant: the prefill ms (CUDA events around one forward, median of REPS after a warm-up) in ROUNDS rounds
that interleave the variants (each round in a rotated order: the dense time moves between calls, so a variant timed
in one block against another timed minutes later compares the machine's state, not the variants), reported as the
median over the rounds (and min, and every round); the host ms of one forward (perf_counter from the call to its
return, before the sync: when it is close to the CUDA-event time the prefill is host-bound); MSR / ESR. With both
<mode>_router and <mode>_router_fused timed, how many (layer, KV head) decisions differ between them (the fused
kernel may differ from route() only at a near-tie). Then, for the variants named in PROFILE, a torch.profiler table
of the top ops by self CUDA time and by self CPU time, and the host syncs (cudaStreamSynchronize /
cudaDeviceSynchronize / DtoH copies) per prefill.

  LENGTHS=2048,8192 PROFILE=block_router,dense python -m experiments.profile_prefill_smollm2 > $OUT/profile.txt
  VARIANTS=dense,all_full,stream_router,stream_router_fused LENGTHS=8192 PROFILE= ROUNDS=5 python -m ...  (a subset)

A variant named `<name>+static` is <name> prefilling into a fresh ElasticStaticCache (made before the timed
region, sized for the prompt plus 33 tokens), as the demo's GPU runs do: its pools are allocated and the prompt
committed into them inside the forward (integrations/static_cache.py). Without the suffix the forward makes
transformers' DynamicCache (nothing to commit), as does dense always.
"""
from __future__ import annotations

import os
import time

import torch

from elastic_cuda.demo import SHIPPED_ROUTER_DIRS
from elastic_cuda.integrations.transformers import disable, enable
from elastic_cuda.router import RouterSet


def smollm2_random():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                      tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    return model.eval()


def _median(xs):
    return sorted(xs)[len(xs) // 2]


def _cache_kw(model, ids, name):
    """past_key_values for one prefill of variant `name`: a fresh ElasticStaticCache for `<name>+static`."""
    if not name.endswith("+static"):
        return {}
    from elastic_cuda.integrations.generate import static_cache_for

    cache = static_cache_for(model, ids.shape[1] + 33)
    if cache is None:
        raise RuntimeError(f"{name}: no ElasticStaticCache for this model (elastic not enabled, or not CUDA bf16)")
    return {"past_key_values": cache, "use_cache": True}


def median_prefill_ms(model, ids, reps=5, name=""):
    """(median CUDA-event ms, median host ms until the forward returned) of reps prefills after one warm-up."""
    times, host = [], []
    with torch.no_grad():
        for i in range(reps + 1):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            kw = _cache_kw(model, ids, name)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            a.record()
            model(ids, logits_to_keep=1, **kw)
            b.record()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            if i:
                times.append(a.elapsed_time(b))
                host.append(1e3 * (t1 - t0))
    return _median(times), _median(host)


def variants(model):
    L, Hkv = model.config.num_hidden_layers, model.config.num_key_value_heads
    out = {"dense": None}
    for mode in ("block", "stream"):
        routers = RouterSet.load(SHIPPED_ROUTER_DIRS[mode], model=model, map_location="cuda")
        out[f"{mode}_router"] = dict(routers=routers, policy="router", fused_router=False)  # the eager route()
        out[f"{mode}_router_graphs"] = dict(routers=routers, policy="router", router_graphs=True, fused_router=False)  # router_graph.py
        out[f"{mode}_router_fused"] = dict(routers=routers, policy="router", fused_router=True)  # route_fused
        out[f"{mode}_all_sparse"] = dict(routers=routers, policy="all_sparse")
    out["all_full"] = dict(policy="fixed", sparse_mode="stream", fixed_table=torch.zeros(L, Hkv, dtype=torch.int32))
    return out


def profile(model, ids, name):
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch.no_grad():
        model(ids, logits_to_keep=1, **_cache_kw(model, ids, name))
        torch.cuda.synchronize()
        kw = _cache_kw(model, ids, name)
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model(ids, logits_to_keep=1, **kw)
            torch.cuda.synchronize()
    events = prof.key_averages()
    syncs = sum(e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize")
                or "DtoH" in e.key or e.key == "aten::item" or e.key == "aten::_local_scalar_dense")
    print(f"\n## {name}, S = {ids.shape[1]}: host syncs / item() calls per prefill: {syncs}")
    print(events.table(sort_by="self_cuda_time_total", row_limit=22, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=60))


def sync_sites(model, ids, name):
    """Every host sync of one prefill (torch.cuda.set_sync_debug_mode), by the innermost elastic_cuda /
    transformers frame that caused it."""
    import collections
    import traceback
    import warnings

    sites = collections.Counter()

    def hook(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1]
                  if ("elastic_cuda" in f.filename or "transformers" in f.filename) and "warnings" not in f.filename]
        where = f"{frames[-1].filename.split('site-packages/')[-1]}:{frames[-1].lineno} {frames[-1].line}" \
            if frames else f"{filename}:{lineno}"
        sites[where] += 1

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = hook
        torch.cuda.set_sync_debug_mode("warn")
        try:
            model(ids, logits_to_keep=1, **_cache_kw(model, ids, name))
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    print(f"\n## {name}, S = {ids.shape[1]}: {sum(sites.values())} host syncs")
    for where, n in sites.most_common():
        print(f"  {n:4d}  {where}")


def main():
    lengths = [int(x) for x in os.environ.get("LENGTHS", "2048,8192").split(",")]
    to_profile = os.environ.get("PROFILE", "block_router,dense").split(",")
    rounds, reps = int(os.environ.get("ROUNDS", "3")), int(os.environ.get("REPS", "5"))
    model = smollm2_random()
    all_variants = variants(model)
    names = os.environ.get("VARIANTS")
    if names:
        names = names.split(",")
        unknown = [n for n in names if n.removesuffix("+static") not in all_variants or n == "dense+static"]
        if unknown:
            raise ValueError(f"VARIANTS: unknown {unknown}; known: {list(all_variants)} (elastic ones also "
                             "as <name>+static)")
    else:
        names = list(all_variants)
    print(f"# SmolLM2-135M shape, random weights, bf16, B 1, {torch.cuda.get_device_name()}, torch {torch.__version__}; "
          f"{rounds} interleaved rounds (rotated order) of {reps} prefills each")
    torch.manual_seed(1)
    ids_of = {S: torch.randint(0, model.config.vocab_size, (1, S), device="cuda") for S in lengths}
    ms = {(n, S): [] for n in names for S in lengths}
    host = {(n, S): [] for n in names for S in lengths}
    meters, modes = {}, {}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            kw = all_variants[name.removesuffix("+static")]
            state = enable(model, **kw) if kw is not None else None
            for S in lengths:
                t, h = median_prefill_ms(model, ids_of[S], reps, name)
                ms[name, S].append(t)
                host[name, S].append(h)
            if state is not None:
                meters[name] = state.metrics()
                modes[name] = state.last_head_mode.clone()  # of the last length's prefill
                disable(model)
    print("| variant | " + " | ".join(f"{S} ms (median / min) | {S} host ms | {S} rounds" for S in lengths)
          + " | MSR | ESR |")
    print("|---|" + "---|" * (3 * len(lengths) + 2))
    for name in names:
        cells = []
        for S in lengths:
            t = ms[name, S]
            cells.append(f"{_median(t):.1f} / {min(t):.1f} | {_median(host[name, S]):.1f} | "
                         + " ".join(f"{x:.1f}" for x in t))
        m = meters.get(name, {})
        meter = " | ".join(f"{m[k]:.2f}" if isinstance(m.get(k), float) else "-" for k in ("msr", "esr"))
        print(f"| {name} | " + " | ".join(cells) + f" | {meter} |", flush=True)
    for mode in ("block", "stream"):
        a, b = modes.get(f"{mode}_router"), modes.get(f"{mode}_router_fused")
        if a is not None and b is not None:
            print(f"{mode}: (layer, KV head) decisions that differ between {mode}_router and {mode}_router_fused "
                  f"at S = {lengths[-1]}: {int((a != b).sum())} of {a.numel()}")
    for name in names:
        kw = all_variants[name.removesuffix("+static")]
        state = enable(model, **kw) if kw is not None else None
        ids = ids_of[lengths[-1]]
        sync_sites(model, ids, name)
        if name in to_profile:
            profile(model, ids, name)
        if state is not None:
            disable(model)


if __name__ == "__main__":
    main()
