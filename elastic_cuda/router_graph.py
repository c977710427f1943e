"""CUDA graphs of the routers' eval decisions, one per router layer (and batch size), for the prefill of an elastic
model: enable(..., router_graphs=True).

Why: a small model's prefill is launch-bound on a GPU (#15: SmolLM2-135M at 8K, ~30 us of host time per op on the
H200 machine, dense sdpa ~1 attention op per layer). After its boundary pool, a router layer is ~13 small kernels
(standardisation, 5 addmm, 3 silu, head bias, comparison, where) plus their Python; replayed as one graph it is a
copy into the graph's input, one graph launch and a copy of the decision out (the graph's output is overwritten by
its next replay, and a decision is kept per layer until the next prefill).

Same bits: the graph replays the kernels the eager route() launches, on the same (copied) pooled keys and the
routers' own parameter memory (tests/test_host_overhead.py compares logits and modes bit for bit on the GPU).

What a graph is keyed on, so that it never answers for another input: the router object, the pooled keys' shape /
dtype / device, the sparse mode, the (float) sparsity shift, the data pointers of the router's parameters and
buffers (an in-place weight update is seen by the graph; new storage, e.g. param.data = ..., gets a new graph), and
the fp32 matmul precision. Everything else runs eagerly (route()): CPU tensors, routers in training mode or
calibrating, a per-request shift tensor, autocast, torch.compile, an ongoing capture, keys on a CUDA device other than
the current one. Replacing a router's submodule
(router.task_mlp[0] = ...) is not followed: call clear().

Cost: the first prefill per batch size captures one graph per layer (torch.cuda.graph synchronizes the device and
empties the allocator's cache at each capture); the graphs share one memory pool per device (their intermediates
are dead between replays, which run one at a time on the current stream; their outputs stay allocated).
"""
from __future__ import annotations

import torch

from .router import AttentionRouter, check_sparse_mode_id, full_heads_of, head_modes_of, sparsity_shift_column

__all__ = ["RouterGraphs"]


class RouterGraphs:
    """The captured eval decisions of one model's routers (ElasticState.router_graphs)."""

    def __init__(self):
        self._graphs = {}   # key -> (router, tensors, static pooled in, graph, static logits, static head_mode)
        self._pools = {}    # device -> one graph memory pool shared by the graphs (replayed one at a time, in order)
        self._tensors = {}  # id(router) -> (router, its parameters and buffers): walked once, not per layer

    def clear(self):
        self._graphs.clear()
        self._pools.clear()
        self._tensors.clear()

    def __len__(self):
        return len(self._graphs)

    def route(self, router: AttentionRouter, keys: torch.Tensor, *, cu_seqlens=None, sparse_mode: int,
              sparsity_shift=0.0):
        """router.route(...)'s (head_mode, logits dtype), from a CUDA graph where one applies."""
        if (not keys.is_cuda or router.training or router._calibration is not None
                or isinstance(sparsity_shift, torch.Tensor) or torch.is_autocast_enabled("cuda")
                or torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing()
                or keys.device.index != torch.cuda.current_device()):  # (graphs capture / replay on the current one)
            return router.route(keys, cu_seqlens=cu_seqlens, sparse_mode=sparse_mode, sparsity_shift=sparsity_shift)
        head_mode, logits = self.decide(router, keys, cu_seqlens=cu_seqlens, sparse_mode=sparse_mode,
                                        sparsity_shift=sparsity_shift)
        return head_mode, logits.dtype

    def decide(self, router, keys, *, cu_seqlens=None, sparse_mode: int, sparsity_shift=0.0):
        """(head_mode int32 [B, Hkv], logits [B, Hkv, 2]) from the graph (captured on first use); both are copies
        owned by the caller, except logits, which the next replay of this graph overwrites (tests read it)."""
        check_sparse_mode_id(sparse_mode, "RouterGraphs: ")
        pooled = router.pooled(keys, cu_seqlens)
        shift = sparsity_shift_column(sparsity_shift, pooled.shape[0], pooled.device)
        known = self._tensors.get(id(router))
        if known is None or known[0] is not router:
            known = self._tensors[id(router)] = (router, _router_tensors(router))
        tensors = known[1]
        key = (id(router), pooled.shape, pooled.dtype, pooled.device, sparse_mode, shift,
               tuple(t.data_ptr() for t in tensors), torch.get_float32_matmul_precision())
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(router, tensors, pooled, sparse_mode, shift)
            self._graphs[key] = entry
        static_in, graph, logits, head_mode = entry[2:]
        static_in.copy_(pooled)
        graph.replay()
        return head_mode.clone(), logits

    def _capture(self, router, tensors, pooled, sparse_mode, shift):
        device = pooled.device
        with torch.inference_mode(False), torch.no_grad():
            static_in = pooled.clone()  # a normal tensor: copied into under inference mode or not
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up: cuBLAS handle / workspace and the cached mode scalars exist
                _decision(router, static_in, sparse_mode, shift)
            torch.cuda.current_stream(device).wait_stream(side)
            pool = self._pools.get(device)
            if pool is None:
                pool = self._pools[device] = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits, head_mode = _decision(router, static_in, sparse_mode, shift)
        # The router is held so that its id (in the key) cannot be reused by another object while the graph lives.
        return router, tensors, static_in, graph, logits, head_mode


def _decision(router, pooled, sparse_mode, shift):
    logits = router.logits_of_pooled(pooled)
    return logits, head_modes_of(full_heads_of(logits, shift), sparse_mode)


def _router_tensors(router) -> list:
    """The parameters and buffers the graph reads (their storage is what it captured)."""
    tensors = []
    for m in router.modules():
        tensors.extend(t for t in m._parameters.values() if t is not None)
        tensors.extend(t for t in m._buffers.values() if t is not None)
    return tensors
