"""Host (Python / dispatcher) work per attention layer of a SmolLM2-135M-shaped prefill, measured on the CPU (one-off
study for #14 / #15: on a GPU the elastic prefill is launch-bound, ~75 kernel launches per layer against ~33 for
dense sdpa). A short prefill (S tokens, default 32) keeps the kernels' own time small, so what is left per layer is
the host cost that the GPU run pays in front of its kernels. Host times leave out the time inside the attention
kernels (elastic op, boundary pool, the fused router decision, torch SDPA) and the BLOCK estimate's torch rule; the steadiest figure is one
attention call replayed alone (layer 0's arguments), the in-forward one is noisier (cache, other processes).

Per variant: the aten ops one attention call dispatches (a TorchDispatchMode: every op below autograd that reaches
a kernel or a view, i.e. what the CUDA run launches or at least pays dispatcher time for), the same for a whole
forward divided by the layer count, the median host time of one attention call (perf_counter around the attention
function) and of one forward per layer, and the top functions of a cProfile of the attention calls.

BLOCK estimate: on CUDA the wrapper calls the fused op torch.ops.elastic.xattn_block_mask (one op); on the CPU the
torch rule runs (tens of ops), which the GPU never runs. Here the fused-op branch is taken with a stand-in that
computes the torch rule with counting paused and its time subtracted, and counts as the one op the CUDA run makes.

  python -m experiments.host_overhead_per_layer > benchmarks/results/host_overhead/<date>_cpu.txt
  S=32 REPS=30 VARIANTS=dense,all_full,stream_router,block_router python -m experiments.host_overhead_per_layer
"""
from __future__ import annotations

import collections
import cProfile
import io
import os
import pstats
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from elastic_cuda.attention import xattn
from elastic_cuda.demo import SHIPPED_ROUTER_DIRS
from elastic_cuda.integrations.transformers import disable, enable
from elastic_cuda.router import RouterSet


class OpCounter(TorchDispatchMode):
    """Counts every aten / custom op dispatched while active (and on), by name."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.on = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.on:
            self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


_STATE = {"counter": None, "excluded_s": 0.0}


def _xattn_stand_in(q, k, head_mode, *, cu_seqlens=None, max_seqlen=None, block_size, stride, threshold, scale):
    """What torch.ops.elastic.xattn_block_mask returns on CUDA (only BLOCK heads' rows), computed by the torch rule
    on the CPU: one op for the count, none of its time for the host-time figures."""
    counter, t0 = _STATE["counter"], time.perf_counter()
    if counter is not None:
        counter.ops["elastic::xattn_block_mask (CUDA: 1 op)"] += 1
        counter.on = False
    try:
        mask = xattn._xattn_block_mask_torch(q, k, block_size=block_size, stride=stride, threshold=threshold,
                                             scale=scale, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        heads = (head_mode == xattn.BLOCK).repeat_interleave(q.shape[-2] // k.shape[-2], dim=1)
        return mask & heads[:, :, None, None]
    finally:
        if counter is not None:
            counter.on = True
        _STATE["excluded_s"] += time.perf_counter() - t0


def smollm2_random_cpu():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                      tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def variants(model):
    L, Hkv = model.config.num_hidden_layers, model.config.num_key_value_heads
    block = RouterSet.load(SHIPPED_ROUTER_DIRS["block"], model=model)
    stream = RouterSet.load(SHIPPED_ROUTER_DIRS["stream"], model=model)
    return {
        "dense": None,
        "all_full": dict(policy="fixed", sparse_mode="stream", fixed_table=torch.zeros(L, Hkv, dtype=torch.int32)),
        "stream_all_sparse": dict(routers=stream, policy="all_sparse"),
        "stream_router": dict(routers=stream, policy="router"),
        "stream_router_fused": dict(routers=stream, policy="router", fused_router=True),
        "block_all_sparse": dict(routers=block, policy="all_sparse"),
        "block_router": dict(routers=block, policy="router"),
        "block_router_fused": dict(routers=block, policy="router", fused_router=True),
    }


def _excluding(fn):
    """fn, with its time added to the time the attention-call figure leaves out (the CPU kernels' own time)."""
    def wrapped(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _STATE["excluded_s"] += time.perf_counter() - t0
    return wrapped


def exclude_kernel_time():
    """The attention kernels (elastic op, boundary pool, router decision, torch SDPA) run on the CPU here and take far longer than
    their launch on a GPU: leave their time out of the host-time figures (their dispatch stays in the op counts)."""
    import torch.nn.functional as F
    import transformers.integrations.sdpa_attention as hf_sdpa

    class ExcludedOp:  # the op packet, timed when called (attributes such as .default still reach the packet)
        def __init__(self, packet):
            self._packet, self._call = packet, _excluding(packet)

        def __call__(self, *args, **kwargs):
            return self._call(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self._packet, name)

    for name in ("attention", "boundary_pool", "router_decision"):
        setattr(torch.ops.elastic, name, ExcludedOp(getattr(torch.ops.elastic, name)))
    hf_sdpa.torch.nn.functional.scaled_dot_product_attention = _excluding(F.scaled_dot_product_attention)


class Timed:
    """Wraps the attention function transformers calls: per-call perf_counter (minus the stand-in's time)."""

    def __init__(self, fn):
        self.fn, self.times, self.ops = fn, [], None

    def __call__(self, *args, **kwargs):
        _STATE["excluded_s"] = 0.0
        t0 = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.times.append(time.perf_counter() - t0 - _STATE["excluded_s"])
        return out


def main():
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    S, reps = int(os.environ.get("S", "32")), int(os.environ.get("REPS", "20"))
    names = os.environ.get("VARIANTS", "dense,all_full,stream_all_sparse,stream_router,block_all_sparse,"
                                       "block_router").split(",")
    torch.set_num_threads(1)
    xattn._fused_op_applies = lambda *a, **k: True      # take the CUDA branch of the wrapper
    xattn.xattn_block_mask_op = _xattn_stand_in
    exclude_kernel_time()
    model = smollm2_random_cpu()
    L = model.config.num_hidden_layers
    ids = torch.randint(0, model.config.vocab_size, (1, S))
    print(f"# SmolLM2-135M shape (30 layers, 9 q / 3 KV heads, D 64), random weights, fp32, CPU 1 thread, B 1, "
          f"S {S}, torch {torch.__version__}")
    print("| variant | ops / attention call | ops / layer (whole forward) | attention call alone us (median / min, "
          "kernels excluded) | in a forward us (median, kernels excluded) | forward us / layer (median, kernels "
          "included) |")
    print("|---|---|---|---|---|---|")
    details = {}
    all_variants = variants(model)
    for name in names:
        kw = all_variants[name]
        if kw is not None:
            enable(model, **kw)
        impl = model.config._attn_implementation
        original = ALL_ATTENTION_FUNCTIONS[impl]
        timed = Timed(original)
        AttentionInterface.register(impl, timed)
        try:
            with torch.no_grad():
                for _ in range(3):
                    model(ids, logits_to_keep=1)
                # op counts: one forward
                counter = OpCounter()
                _STATE["counter"] = counter
                per_call = collections.Counter()
                timed.fn = _counting(original, counter, per_call)
                with counter:
                    model(ids, logits_to_keep=1)
                _STATE["counter"] = None
                timed.fn = original
                # host time of one attention call, replayed alone (layer 0's arguments, its pre-RoPE keys put back
                # before each call): in a whole forward the MLP kernels and the other helpers' load make it noisy
                captured = []
                timed.fn = _capturing(original, captured, model)
                model(ids, logits_to_keep=1)
                timed.fn = original
                args, kwargs, keys = captured[0]
                state = getattr(model, "elastic_state", None)
                alone = []
                for i in range(20 + 10 * reps):
                    if state is not None:
                        state.pre_rope_keys[0] = keys
                    _STATE["excluded_s"] = 0.0
                    t0 = time.perf_counter()
                    original(*args, **kwargs)
                    if i >= 20:
                        alone.append(time.perf_counter() - t0 - _STATE["excluded_s"])
                alone_us = 1e6 * sorted(alone)[len(alone) // 2]
                alone_min_us = 1e6 * min(alone)  # under load from other processes the least disturbed call
                # host time: median over reps
                timed.times.clear()
                fwd = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    model(ids, logits_to_keep=1)
                    fwd.append((time.perf_counter() - t0) / L)
                call_us = 1e6 * sorted(timed.times)[len(timed.times) // 2]
                fwd_us = 1e6 * sorted(fwd)[len(fwd) // 2]
                # cProfile of a few forwards
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(5):
                    model(ids, logits_to_keep=1)
                prof.disable()
        finally:
            AttentionInterface.register(impl, original)
            if kw is not None:
                disable(model)
        n_attn = sum(per_call.values()) / L
        n_all = sum(counter.ops.values()) / L
        print(f"| {name} | {n_attn:.1f} | {n_all:.1f} | {alone_us:.0f} / {alone_min_us:.0f} | {call_us:.0f} | "
              f"{fwd_us:.0f} |", flush=True)
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
        details[name] = (per_call, s.getvalue())
    for name, (per_call, prof_text) in details.items():
        print(f"\n## {name}: aten ops of the {L} attention calls of one forward (per layer)")
        for op, n in per_call.most_common():
            print(f"  {n / L:6.2f}  {op}")
        print(f"\n## {name}: cProfile of 5 forwards, by own time")
        lines = [ln for ln in prof_text.splitlines() if ln.strip()]
        start = next(i for i, ln in enumerate(lines) if "ncalls" in ln)
        print("\n".join(lines[start:start + 19]))


def _capturing(fn, captured, model):
    """The attention function, keeping the arguments of each call (and the layer's pre-RoPE keys at call time)."""
    def wrapped(*args, **kwargs):
        state = getattr(model, "elastic_state", None)
        keys = None if state is None else state.pre_rope_keys[args[0].layer_idx]
        captured.append((args, kwargs, keys))
        return fn(*args, **kwargs)
    return wrapped


def _counting(fn, counter, per_call):
    """The attention function, with the ops it dispatches also added to per_call."""
    def wrapped(*args, **kwargs):
        before = collections.Counter(counter.ops)
        out = fn(*args, **kwargs)
        per_call.update(counter.ops - before)
        return out
    return wrapped


if __name__ == "__main__":
    main()
