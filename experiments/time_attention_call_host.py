"""Host and device time of ONE attention call of a SmolLM2-135M-shaped prefill on the GPU, per variant (one-off study
for #15: the prefill is host-bound there, so what counts is each layer's host time against dense sdpa's).

Layer 0's arguments are captured from a real prefill (S tokens, bf16, B 1, the shipped routers) and the attention
function transformers calls (HF's sdpa_attention_forward for dense, elastic_attention_forward otherwise) is called N
times in a row: host us = perf_counter over the N calls / N (no sync inside: what the Python thread spends per
call, launches included); device us = CUDA events around the N calls / N, with the calls queued behind a
torch.cuda._sleep so the GPU runs them back to back (the kernels' own time, not the host's pace). The router's
decision alone is timed the same way: route() (the eager kernels) against route_fused() (one op). Rounds interleave
the variants (rotated order); medians over the rounds.

  S=8192 N=50 ROUNDS=5 python -m experiments.time_attention_call_host
  VARIANTS=dense,all_full,stream_router,stream_router_fused S=8192 python -m experiments.time_attention_call_host
"""
from __future__ import annotations

import os
import time

import torch

from elastic_cuda.integrations.transformers import disable, enable
from experiments.host_overhead_per_layer import variants
from experiments.profile_prefill_smollm2 import smollm2_random


def _median(xs):
    return sorted(xs)[len(xs) // 2]


def time_calls(fn, n):
    """(host us per call, device us per call) of n calls of fn queued behind a GPU sleep."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(int(2e6 * n))  # ~1 ms of GPU time per call: longer than the host needs to queue them
    a.record()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = time.perf_counter() - t0
    b.record()
    torch.cuda.synchronize()
    return 1e6 * host / n, 1e3 * a.elapsed_time(b) / n


def captured_call(model, ids):
    """A function that calls the model's attention function with layer 0's arguments of a prefill of ids (and puts
    the layer's pre-RoPE keys back before each call, which the elastic decision consumes)."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = model.config._attn_implementation
    original = ALL_ATTENTION_FUNCTIONS[impl]
    state = getattr(model, "elastic_state", None)
    captured = []

    def capturing(*args, **kwargs):
        if not captured:
            keys = None if state is None else state.pre_rope_keys[args[0].layer_idx]
            captured.append((args, kwargs, keys))
        return original(*args, **kwargs)

    AttentionInterface.register(impl, capturing)
    try:
        with torch.no_grad():
            model(ids, logits_to_keep=1)
    finally:
        AttentionInterface.register(impl, original)
    args, kwargs, keys = captured[0]

    def call():
        if state is not None:
            state.pre_rope_keys[0] = keys
        original(*args, **kwargs)
    return call, keys


def main():
    S, n, rounds = int(os.environ.get("S", "8192")), int(os.environ.get("N", "50")), int(os.environ.get("ROUNDS", "5"))
    model = smollm2_random()
    all_variants = variants(model)
    names = os.environ.get("VARIANTS", "dense,all_full,stream_router,stream_router_fused,block_router,"
                                       "block_router_fused").split(",")
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, S), device="cuda")
    rows = {}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            kw = all_variants[name]
            state = enable(model, **kw) if kw is not None else None
            with torch.no_grad():
                call, keys = captured_call(model, ids)
                rows.setdefault(name, []).append(time_calls(call, n))
                if state is not None and state.policy == "router":
                    router, mode = state.routers[0], state.sparse_mode_id
                    fused = kw.get("fused_router", False)
                    route = router.route_fused if fused else router.route
                    label = f"  {name}: decision alone ({'route_fused' if fused else 'route'})"
                    rows.setdefault(label, []).append(time_calls(lambda: route(keys, sparse_mode=mode), n))
            if state is not None:
                disable(model)
    print(f"# One attention call of layer 0, SmolLM2-135M shape, S {S}, bf16, B 1, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}; {n} calls per timing, median of {rounds} interleaved rounds")
    print("| variant | host us / call (median, min) | device us / call (median) |")
    print("|---|---|---|")
    for name, xs in rows.items():
        hosts, devs = [h for h, _ in xs], [d for _, d in xs]
        print(f"| {name} | {_median(hosts):.1f}, {min(hosts):.1f} | {_median(devs):.1f} |")


if __name__ == "__main__":
    main()
