"""Python time of ONE elastic attention call on the CPU, the attention kernel stubbed out (one-off study for #15:
on a GPU the SmolLM2-135M prefill is host-bound, and this is the part of the elastic layer's host work that is
ours). Layer 0's arguments are captured from a real S=32 forward; elastic.attention then returns a precomputed
output, so what is left is the integration (transformers.py), the attention front (hybrid_attention, ops.attention
and its checks), the sparsity meter, and the op dispatch of the router (not stubbed: the fused decision's CPU kernel
stays in). Times are thread CPU time (time.thread_time) over N calls, min and median of 9 rounds: steadier than wall
time on a shared machine. PROF=1 adds a cProfile by own time.

  V=all_full N=3000 python -m experiments.host_python_per_call
"""
import cProfile
import io
import os
import pstats
import time

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from elastic_cuda.integrations.transformers import enable
from experiments.host_overhead_per_layer import smollm2_random_cpu, variants

torch.set_num_threads(1)


class _StubbedOp:
    """Stands in torch.ops.elastic.attention: returns a precomputed output (attribute reads reach the real op)."""

    def __init__(self, op, out):
        self._op, self._out = op, out

    def __call__(self, *args, **kwargs):
        return self._out, None  # (out, lse)

    def __getattr__(self, name):
        return getattr(self._op, name)


def main():
    name = os.environ.get("V", "all_full")
    n = int(os.environ.get("N", "3000"))
    model = smollm2_random_cpu()
    ids = torch.randint(0, model.config.vocab_size, (1, 32))
    state = enable(model, **variants(model)[name])
    original = ALL_ATTENTION_FUNCTIONS["elastic"]
    captured = []

    def capture(*args, **kwargs):
        if not captured:
            captured.append((args, kwargs, state.pre_rope_keys[args[0].layer_idx]))
        return original(*args, **kwargs)

    AttentionInterface.register("elastic", capture)
    try:
        with torch.no_grad():
            model(ids, logits_to_keep=1)
    finally:
        AttentionInterface.register("elastic", original)
    args, kwargs, keys = captured[0]
    with torch.no_grad():
        state.pre_rope_keys[0] = keys
        out = original(*args, **kwargs)[0].contiguous()
    real = torch.ops.elastic.attention
    torch.ops.elastic.attention = _StubbedOp(real, out)

    def run():
        with torch.no_grad():
            for _ in range(n):
                state.pre_rope_keys[0] = keys
                original(*args, **kwargs)

    try:
        run()
        times = []
        for _ in range(9):
            t0 = time.thread_time()
            run()
            times.append((time.thread_time() - t0) / n * 1e6)
        print(f"{name}: us per call (thread time) min {min(times):.1f} median {sorted(times)[4]:.1f}")
        if os.environ.get("PROF"):
            prof = cProfile.Profile()
            prof.enable()
            run()
            prof.disable()
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
            print(text.getvalue())
    finally:
        torch.ops.elastic.attention = real


if __name__ == "__main__":
    main()
