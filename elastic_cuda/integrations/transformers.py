"""Hugging Face transformers backend: `attn_implementation="elastic"` for Llama-family (Llama, Mistral,
SmolLM2) and Qwen2/Qwen3 models.

enable(model, ...) registers an attention function with transformers' AttentionInterface, installs a
forward hook that captures each layer's pre-RoPE keys (k_proj output, or k_norm output in Qwen3) for
the router, and keeps an ElasticState at model.elastic_state. At prefill (Sq == Skv) the routing
policy decides head_mode per (sample, KV head); decode steps of that sequence reuse the decision.
Padding masks (2D, e.g. left padding in batched generate) are handled exactly through the op's
varlen layout. Metrics (MSR, ESR from the real masks) come from state.metrics().
Sparse mode "block": at prefill every layer with BLOCK heads estimates XAttention block masks from its (post-RoPE)
queries and keys (attention.xattn); decode steps run BLOCK heads densely (their masks cover the prefill only) and
the ElasticCache keeps their whole history.
"""
from __future__ import annotations

import weakref

import torch

from ..attention import PaddingLayout, hybrid_attention, train_mix_attention
from ..attention.sparse_config import SparseConfig
from ..attention.xattn import block_visible_pairs, xattn_block_mask
from ..ops import BLOCK, FULL
from ..router import RouterSet, check_sparsity_shift, model_router_geometry
from ..router_graph import RouterGraphs
from .sparsity_meter import SparsityMeter
from .static_cache import ElasticStaticLayer
from .training_mix import TrainingMix

ATTN_IMPLEMENTATION = "elastic"
POLICIES = ("router", "fixed", "all_full", "all_sparse")

__all__ = ["ATTN_IMPLEMENTATION", "POLICIES", "ElasticState", "enable", "disable", "elastic_attention_forward",
           "elastic_padding_mask", "register_attention"]


class ElasticState:
    """One model's elastic attention: the routing configuration and each layer's routing decision for the current
    sequence (and the BLOCK masks it implies), with two parts of their own: `meter`, the MSR / ESR accounting
    (metrics()), and the training mix the trainer enters (training_mix()). Also the per-forward caches the attention
    function shares across layers (padding layout, the ElasticCache in use)."""

    def __init__(self, *, num_layers, num_kv_heads, policy, sparse: SparseConfig, fixed_table, strategy, routers):
        self.num_layers, self.num_kv_heads = num_layers, num_kv_heads
        self.policy = policy
        self.sparse = sparse                            # what sparse heads run (mode, sink/window, BLOCK estimate)
        self.sparse_mode, self.sparse_mode_id = sparse.sparse_mode, sparse.mode_id
        self.sink, self.window, self.block_size = sparse.sink, sparse.window, sparse.block_size
        self.xattn_stride, self.xattn_threshold = sparse.xattn_stride, sparse.xattn_threshold  # BLOCK mask estimate
        self.fixed_table = fixed_table                  # bool [L, Hkv] (True = sparse) or None
        self._fixed_rows = None if fixed_table is None else fixed_table.cpu().tolist()  # the same, on the host
        self.strategy = strategy
        self.routers = routers                          # RouterSet or None (also model.elastic_routers)
        self.router_graphs = None                       # RouterGraphs when enable(router_graphs=True)
        self.fused_router = True                        # enable(fused_router=...): eval decisions by route_fused
        self.meter = SparsityMeter(num_layers)
        self.mix = TrainingMix()                        # on inside training_mix()
        self.sparsity_shift = 0.0                       # inference budget knob (router.py); float or tensor [B]
        self.pre_rope_keys = [None] * num_layers        # filled by the k_proj / k_norm hooks
        self._reset_sequence()
        self._mask_cache = None
        self._cache_ref = None                          # weakref to the ElasticCache in use, if any
        self._checked_position_ids = None               # weakref to the last position_ids found unpacked
        self._fixed_cache = None                        # fixed policies: every layer's decision (_fixed_decisions)

    def _reset_sequence(self):
        L = self.num_layers
        self._head_mode = [None] * L   # int32 [B, Hkv] per layer (prefill decision)
        self._z = [None] * L           # float [B, Hkv] per layer (differentiable in training)
        self._gumbel_u = [None] * L    # training noise, reused when activations are recomputed
        self._mode_lists = [None] * L  # head_mode as python lists: known on the host (fixed tables), else made on
                                       # demand (mode_list), since reading a router's decision is a device sync

    # ------------------------------------------------------------------ results
    def _stack(self, per_layer, name):
        missing = [i for i, t in enumerate(per_layer) if t is None]
        if missing:
            raise RuntimeError(f"ElasticState.{name}: no routing decision yet for layers {missing[:8]} "
                               "(run a forward pass with the elastic attention enabled first)")
        return torch.stack(per_layer, dim=1)

    def layer_z(self, layer_idx):
        """The layer's z [B, Hkv] of the current sequence (None before its prefill). An eval router's decision
        leaves z to be made here, on first use, as (head_mode == FULL) in the router's dtype: the values
        forward() returns, without a kernel per layer in a prefill that nothing reads z of."""
        z = self._z[layer_idx]
        if isinstance(z, _ZFromModes):
            z = self._z[layer_idx] = (self._head_mode[layer_idx] == FULL).to(z.dtype)
        return z

    @property
    def last_z(self) -> torch.Tensor:
        """[B, L, Hkv] z of the current sequence (1 = FULL); differentiable when routers train."""
        return self._stack([self.layer_z(i) for i in range(self.num_layers)], "last_z")

    @property
    def z_per_layer(self) -> list:
        """Each layer's z [B, Hkv] of the current sequence, as the forward made them (the tensors autograd reaches
        the routers through: pass them to torch.autograd.grad for per-layer gradients)."""
        zs = [self.layer_z(i) for i in range(self.num_layers)]
        self._stack(zs, "z_per_layer")  # raises when a layer has no decision yet
        return zs

    @property
    def last_head_mode(self) -> torch.Tensor:
        """[B, L, Hkv] int32 head modes decided at prefill."""
        return self._stack(self._head_mode, "last_head_mode")

    def metrics(self) -> dict:
        """MSR (fraction of KV heads routed sparse) per sample / per layer / overall, and ESR (fraction of
        causal (query, key) pairs skipped by the real masks, over all heads and every query processed since
        prefill, decode steps included) per layer and overall."""
        return self.meter.metrics(self.last_head_mode)

    def training_mix(self, tau: float | None = None, full_branch: str | None = None):
        """Context manager: the forwards (and backwards) inside it compute the router-training mix at Gumbel
        temperature tau, O_FA by full_branch (training_mix.py); outside it the model runs as at inference."""
        return self.mix.entered(tau=tau, full_branch=full_branch)

    def routing_map(self, sample: int = 0) -> list[str]:
        """One string per layer, one character per KV head: F (full) or S/B (stream/block)."""
        chars = {FULL: "F", 1: "S", 2: "B"}
        modes = self.last_head_mode[sample].cpu().tolist()
        return ["".join(chars.get(m, "?") for m in row) for row in modes]

    # ------------------------------------------------------------------ internals used by the attention function
    def check_not_packed(self, position_ids):
        """Packed rows (position_ids restarting inside a row) would need per-segment attention: refuse them
        rather than attend across segments. Checked once per position_ids tensor (one device sync)."""
        if position_ids is None or position_ids.dim() != 2 or position_ids.shape[1] < 2:
            return
        ref = self._checked_position_ids
        if ref is not None and ref() is position_ids:
            return
        if bool((position_ids[:, 1:] <= position_ids[:, :-1]).any()):
            raise NotImplementedError("elastic attention: position_ids restart inside a row (packed sequences); "
                                      "pass one sequence per row, with a 2D padding mask if lengths differ")
        self._checked_position_ids = weakref.ref(position_ids)

    def register_cache(self, cache):
        """Called by ElasticCache(model): its layers get compacted after prefill."""
        self._cache_ref = weakref.ref(cache)

    def elastic_cache_layer(self, layer_idx, key):
        """The ElasticCache layer that produced `key` (identity check), else None."""
        cache = self._cache_ref() if self._cache_ref is not None else None
        if cache is None or layer_idx >= len(cache.layers):
            return None
        layer = cache.layers[layer_idx]
        return layer if getattr(layer, "keys", None) is key else None

    def padding_layout(self, attention_mask, seqlen_q, seqlen_k):
        """PaddingLayout for a 2D mask (None when unpadded); cached per mask tensor for all layers of a forward."""
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            shape = getattr(attention_mask, "shape", type(attention_mask).__name__)
            raise NotImplementedError(
                f"elastic attention takes a 2D padding mask [B, Skv] (or none); got {shape}. Custom 4D masks "
                "and packed sequences are not supported.")
        cache = self._mask_cache
        if cache is not None and cache[0]() is attention_mask and cache[1] == (seqlen_q, seqlen_k):
            return cache[2]
        layout = PaddingLayout.from_mask(attention_mask[:, -seqlen_k:] if attention_mask.shape[1] > seqlen_k
                                         else attention_mask, seqlen_q, seqlen_k)
        self._mask_cache = (weakref.ref(attention_mask), (seqlen_q, seqlen_k), layout)
        return layout

    def decide(self, layer_idx, batch, device, padding, recomputing):
        """Routing decision of one layer at prefill: stores and returns (head_mode [B, Hkv], z [B, Hkv])."""
        keys = self.pre_rope_keys[layer_idx]
        self.pre_rope_keys[layer_idx] = None
        if self.policy == "router":
            if keys is None:
                raise RuntimeError(f"elastic attention: no pre-RoPE keys captured for layer {layer_idx} (the k_proj "
                                   "/ k_norm hook did not run; is this architecture supported?)")
            router = self.routers[layer_idx]
            cu = None
            if padding is not None:
                keys, cu = padding.pack_keys(keys), padding.cu_seqlens_k
            if router.training or self.mix.active or router._forward_hooks or router._forward_pre_hooks:
                reuse = self._gumbel_u[layer_idx] if recomputing else None
                out = router(keys, tau=self.mix.tau, cu_seqlens=cu, sparse_mode=self.sparse_mode_id, gumbel_u=reuse,
                             sparsity_shift=0.0 if router.training else self.sparsity_shift)
                head_mode, z = out.head_mode, out.z
                if not recomputing:
                    self._gumbel_u[layer_idx] = out.gumbel_u
            else:  # inference: the decision alone; z (unused by the forward) is made from it when asked (layer_z)
                if self.router_graphs is not None:  # CUDA graphs of the decisions (router_graph.py), when asked
                    head_mode, z_dtype = self.router_graphs.route(router, keys, cu_seqlens=cu,
                                                                  sparse_mode=self.sparse_mode_id,
                                                                  sparsity_shift=self.sparsity_shift)
                elif self.fused_router:  # the whole decision as one op (one kernel on CUDA): AttentionRouter.route_fused
                    head_mode, z_dtype = router.route_fused(keys, cu_seqlens=cu, sparse_mode=self.sparse_mode_id,
                                                            sparsity_shift=self.sparsity_shift)
                else:
                    head_mode, z_dtype = router.route(keys, cu_seqlens=cu, sparse_mode=self.sparse_mode_id,
                                                      sparsity_shift=self.sparsity_shift)
                z = _ZFromModes(z_dtype)
                if not recomputing:
                    self._gumbel_u[layer_idx] = None
        else:
            head_modes, zs, host = self._fixed_decisions(batch, device)
            head_mode, z, host_modes = head_modes[layer_idx], zs[layer_idx], host[layer_idx]
        if not recomputing:
            self._head_mode[layer_idx], self._z[layer_idx] = head_mode, z
            self._mode_lists[layer_idx] = None if self.policy == "router" else host_modes
            self.meter.start_layer(layer_idx)
        return head_mode, z

    def _fixed_decisions(self, batch, device):
        """Every layer's (head_mode int32 [B, Hkv], z float [B, Hkv], modes as lists [B][Hkv]) under a fixed policy
        (fixed table, all_full, all_sparse), made for all layers at once and kept while the batch size, device,
        policy and table stay the same: made per layer they were ~10 ops per layer (and a host-to-device copy of
        the table's row on CUDA), in a prefill that is launch-bound on a GPU (#14 / #15). The tensors are shared
        by the forwards: nothing writes into a decision (the static cache and the meter copy or read them)."""
        key = (batch, device, self.policy, self.sparse_mode_id, id(self.fixed_table), torch.is_inference_mode_enabled())
        cache = self._fixed_cache
        if cache is not None and cache[0] == key and cache[1] is self.fixed_table:
            return cache[2]
        L, Hkv = self.num_layers, self.num_kv_heads
        if self.policy == "fixed":
            sparse = self.fixed_table.to(device).unsqueeze(1).expand(L, batch, Hkv)
            rows = self._fixed_rows
        else:
            sparse = torch.full((L, batch, Hkv), self.policy == "all_sparse", dtype=torch.bool, device=device)
            rows = [[self.policy == "all_sparse"] * Hkv] * L
        head_mode = torch.where(sparse, self.sparse_mode_id, FULL).to(torch.int32)
        z = (~sparse).to(torch.float32)
        host = [[[self.sparse_mode_id if s else FULL for s in row] for _ in range(batch)] for row in rows]
        decisions = (head_mode.unbind(0), z.unbind(0), host)
        self._fixed_cache = (key, self.fixed_table, decisions)
        return decisions

    def mode_list(self, layer_idx) -> list:
        """The layer's prefill head modes as python lists [B][Hkv] (one device sync the first time for a router's
        decision; free for fixed tables)."""
        if self._mode_lists[layer_idx] is None:
            self._mode_lists[layer_idx] = self._head_mode[layer_idx].tolist()
        return self._mode_lists[layer_idx]

    def block_mask(self, layer_idx, q, k, padding, scale):
        """XAttention block masks bool [B, Hq, NB, NB] of this layer's prefill (q [B, S, Hq, D], k [B, S, Hkv, D]);
        also keeps each sample's visible pairs per KV head (mean over its query heads) for ESR."""
        B, S = q.shape[:2]
        kw = dict(block_size=self.block_size, stride=self.xattn_stride, threshold=self.xattn_threshold, scale=scale)
        # Only BLOCK heads need a mask, except in the training mix, where every head's sparse branch uses one.
        kw["head_mode"] = None if self.mix.active else self._head_mode[layer_idx]
        if padding is None:
            mask = xattn_block_mask(q, k, **kw)
        else:
            mask = xattn_block_mask(padding.pack_queries(q), padding.pack_keys(k),
                                    cu_seqlens=padding.cu_seqlens_q, max_seqlen=padding.max_seqlen_k, **kw)
            lengths = padding.lengths_q
        # Pairs per query head [B, Hq], kept on the device; the meter makes them per KV head (the mean over its
        # query heads) when they are read, from the masks themselves when they are small (unpadded). When every
        # head was estimated (the mix) only the BLOCK heads' count; else the rows of the other heads are all False,
        # so their pairs are already exactly 0: no mask op needed.
        block_heads = self._head_mode[layer_idx] if kw["head_mode"] is None else None
        if padding is None:  # one length: the whole batch in one reduction
            self.meter.set_block_mask(layer_idx, mask, S, self.block_size, kv_heads=k.shape[2],
                                      block_heads=block_heads)
        else:
            vis = torch.stack([block_visible_pairs(mask[b], n, self.block_size) for b, n in enumerate(lengths)])
            self.meter.set_block_pairs(layer_idx, vis, kv_heads=k.shape[2], block_heads=block_heads)
        return mask


class _ZFromModes:
    """Stands in ElasticState._z for an eval router's decision: z is (head_mode == FULL) in `dtype`, made by
    ElasticState.layer_z when something reads it."""
    __slots__ = ("dtype",)

    def __init__(self, dtype):
        self.dtype = dtype


def _in_backward() -> bool:
    """True while autograd runs a backward pass (activation checkpointing recomputes the forward then)."""
    return torch._C._current_graph_task_id() != -1


def elastic_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query [B, Hq, Sq, D], key/value [B, Hkv, Skv, D] (post-RoPE, with the
    cache) -> (out [B, Sq, Hq, D], None)."""
    state = getattr(module, "_elastic_state", None)
    if state is None:
        raise RuntimeError("attn_implementation 'elastic' is set but elastic_cuda.integrations.transformers.enable() "
                           "was not called on this model")
    if dropout:
        raise NotImplementedError(f"elastic attention does not implement attention dropout (got {dropout})")
    layer_idx = module.layer_idx
    # The cache layer that returned `key`, looked up once: an ElasticStaticCache layer or an ElasticCache one.
    # (The hot path of a prefill without one, e.g. transformers' DynamicCache, skips the calls: this function's
    # host time is what a small model's GPU prefill waits on, #15.)
    mix_active = state.mix.active
    layer = None if mix_active or state._cache_ref is None else state.elastic_cache_layer(layer_idx, key)
    static_layer = cache_layer = None
    if layer is not None:
        if isinstance(layer, ElasticStaticLayer):
            static_layer = layer
            if static_layer.prefilled:  # decode step over an ElasticStaticCache
                state.pre_rope_keys[layer_idx] = None
                return static_layer.attend(query, scaling), None
        else:
            cache_layer = layer
    B, Hq, Sq, D = query.shape
    Skv = key.shape[2]
    if kwargs:
        sliding = kwargs.get("sliding_window")
        if sliding is not None and Skv > sliding:
            raise NotImplementedError(f"layer {layer_idx} uses the model's own sliding window ({sliding}) and the "
                                      f"sequence ({Skv}) is longer; elastic attention does not combine with it")
    padding = None if attention_mask is None else state.padding_layout(attention_mask, Sq, Skv)
    recomputing = _in_backward()
    if Sq == Skv:  # prefill of a new sequence (no cache, or an empty one)
        if attention_mask is None:
            state.check_not_packed(kwargs.get("position_ids"))
        head_mode, z = state.decide(layer_idx, B, query.device, padding, recomputing)
    else:          # decode / chunked continuation: reuse the prefill decision
        state.pre_rope_keys[layer_idx] = None
        head_mode, z = state._head_mode[layer_idx], state.layer_z(layer_idx)
        if head_mode is None or head_mode.shape[0] != B:
            raise RuntimeError(f"elastic attention: layer {layer_idx} got {Sq} new queries over {Skv} cached keys "
                               "but no prefill routing decision for this batch (run the prompt first)")
    q = query.transpose(1, 2)
    k = key.transpose(1, 2)
    v = value.transpose(1, 2)
    block_sparse = state.sparse_mode_id == BLOCK
    block_mask = None
    if block_sparse and Sq == Skv:
        # A router's modes stay on the device: its layers always run the estimate, which skips the heads that are
        # not BLOCK on the device; a fixed table's layers without a BLOCK head skip it on the host.
        modes = state._mode_lists[layer_idx]
        if mix_active or modes is None or any(BLOCK in row for row in modes):
            block_mask = state.block_mask(layer_idx, q, k, padding, scaling)
    elif block_sparse:  # the prefill's block masks do not cover new queries: BLOCK heads attend densely
        head_mode = torch.where(head_mode == BLOCK, FULL, head_mode)
    if cache_layer is not None and cache_layer.compacted:
        out = _attention_over_compacted_cache(q, k, v, cache_layer, scaling, state.strategy)
    elif mix_active and not (block_sparse and Sq != Skv):  # (a BLOCK continuation is dense, as at inference)
        out = train_mix_attention(q, k, v, z, state.sparse_mode_id, full_branch=state.mix.full_branch,
                                  block_mask=block_mask, block_size=state.block_size, sink=state.sink,
                                  window=state.window, scale=scaling, strategy=state.strategy, padding=padding)
    else:
        out = hybrid_attention(q, k, v, head_mode, block_mask=block_mask, block_size=state.block_size,
                               sink=state.sink, window=state.window, scale=scaling, strategy=state.strategy,
                               padding=padding)
    if not recomputing:
        if static_layer is not None:  # the prompt of an ElasticStaticCache goes into its pools with its routing,
            # pipelined one layer behind (no host read of this layer's routing now: ElasticStaticCache.stage_commit)
            state._cache_ref().stage_commit(static_layer, head_mode, padding, sink=state.sink, window=state.window)
        modes = state._mode_lists[layer_idx]
        state.meter.count(layer_idx, state._head_mode[layer_idx] if modes is None else modes, Sq, Skv, padding,
                          state.sink, state.window)
        if cache_layer is not None and Sq == Skv and padding is None and not block_sparse:
            modes = state.mode_list(layer_idx)  # an ElasticCache compacts on the host: one sync per layer
            if all(row == modes[0] for row in modes):
                cache_layer.compact(modes[0], state.sink, state.window)
    return out, None


def elastic_padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                         attention_mask=None, **kwargs):
    """transformers mask function for "elastic": the causal/stream rules live in the op, so the layers only need
    the 2D padding mask [B, kv_length] (None when nothing is padded). Without this registration transformers
    passes no mask at all to a custom attention implementation, and padding would be silently attended."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise NotImplementedError(f"elastic attention takes a 2D padding mask, got shape {tuple(attention_mask.shape)}")
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


def _attention_over_compacted_cache(q, k_full, v_full, layer, scale, strategy):
    """Decode over an ElasticCache layer: FULL heads attend over their whole history, STREAM heads (FULL mode)
    over their kept sink + window keys, which are exactly the keys STREAM lets the current query see."""
    B, Sq, Hq, D = q.shape
    Hkv = len(layer.full_heads) + len(layer.stream_heads)
    groups = Hq // Hkv
    out = q.new_empty(B, Sq, Hq, D)
    parts = ((layer.full_heads, k_full, v_full),
             (layer.stream_heads, layer.stream_keys.transpose(1, 2), layer.stream_values.transpose(1, 2)))
    for heads, k, v in parts:
        if not heads:
            continue
        q_idx = torch.tensor([h * groups + g for h in heads for g in range(groups)], device=q.device,
                             dtype=torch.long)
        modes = torch.full((B, len(heads)), FULL, dtype=torch.int32, device=q.device)
        part = hybrid_attention(q.index_select(2, q_idx), k, v, modes, sink=0, window=0, scale=scale,
                                strategy=strategy)
        out.index_copy_(2, q_idx, part)
    return out


def register_attention():
    """Register "elastic" with transformers' AttentionInterface and AttentionMaskInterface (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, elastic_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, elastic_padding_mask)


def _attention_modules(model):
    mods = [m for m in model.modules() if hasattr(m, "k_proj") and isinstance(getattr(m, "layer_idx", None), int)]
    return sorted(mods, key=lambda m: m.layer_idx)


def _make_key_hook(state, layer_idx, num_kv_heads, head_dim):
    def hook(_module, _inputs, output):
        # k_proj gives [B, S, Hkv * D]; Qwen3's k_norm already works on [B, S, Hkv, D].
        state.pre_rope_keys[layer_idx] = output.reshape(*output.shape[:2], num_kv_heads, head_dim)
    return hook


def enable(model, routers: RouterSet | None = None, policy: str = "router", sparse_mode: str | None = None,
           sink: int | None = None, window: int | None = None, block_size: int | None = None, fixed_table=None,
           strategy: str = "auto", sparsity_shift: float | torch.Tensor = 0.0, xattn_stride: int | None = None,
           xattn_threshold: float | None = None, router_graphs: bool = False,
           fused_router: bool = True) -> ElasticState:
    """Switch `model` to elastic attention. sparse_mode/sink/window (and the BLOCK settings) default to the routers'
    config when routers are given, else to SparseConfig's (attention/sparse_config.py: "stream", 64, 512).
    fixed_table: int/bool [L, Hkv], 1 = sparse.
    sparsity_shift: the routers' inference budget knob (> 0 more heads sparse, < 0 fewer; a tensor [B] gives each
    request its own); also settable later as state.sparsity_shift, between requests.
    sparse_mode "block": BLOCK heads with XAttention masks estimated at prefill (block_size, xattn_stride,
    xattn_threshold; attention.xattn).
    router_graphs: on CUDA, run each eval router's decision (after its boundary pool) as a CUDA graph, captured per
    layer and batch size on first use (router_graph.py): the same bits with ~10 fewer launches per layer, for a
    small model's prefill, which is launch-bound (#15). Off by default; when on, it takes precedence over fused_router.
    fused_router: each eval router's decision as one operator (AttentionRouter.route_fused, ops.router_decision):
    one dispatch instead of ~23 ops and their Python per layer, one kernel on CUDA for fp32 routers, for the same
    small-model prefill (#15). Same bits on the CPU; on CUDA the kernel's logits differ from the eager ones by
    rounding, so a head can route differently only at a near-tie (ELASTIC_ROUTER_KERNEL=0: the eager kernels, same
    bits). On by default: SmolLM2-135M shape, 8K prefill, H200, medians of 3 interleaved rounds
    (experiments/profile_prefill_smollm2.py, benchmarks/results/prefill_profile/2026-12-02_h200_session4/), ms eager ->
    fused: STREAM router 34.8 -> 27.0, BLOCK router 36.9 -> 31.5, with 0 of 90 (layer, KV head) decisions different.
    fused_router=False: the eager route().
    The routers become model.elastic_routers, moved to the model's device and put in its train/eval mode."""
    if policy not in POLICIES:
        raise ValueError(f"enable: policy must be one of {POLICIES}, got {policy!r}")
    if getattr(model, "elastic_state", None) is not None:
        disable(model)
    geo = model_router_geometry(model)
    L, Hkv, D = geo["num_layers"], geo["num_kv_heads"], geo["head_dim"]
    if routers is not None:
        if not isinstance(routers, RouterSet):
            raise ValueError(f"enable: routers must be a RouterSet, got {type(routers).__name__}")
        routers.check_model(model)
    elif policy == "router":
        raise ValueError("enable: policy 'router' needs routers (a RouterSet: RouterSet.load(dir, model) or "
                         "RouterSet.for_model(model) for freshly initialised ones)")
    base = routers.sparse_config if routers is not None else SparseConfig()
    sparse = base.replace(where="enable: ", sparse_mode=sparse_mode, sink=sink, window=window, block_size=block_size,
                          xattn_stride=xattn_stride, xattn_threshold=xattn_threshold)
    table = None
    if policy == "fixed":
        if fixed_table is None:
            raise ValueError("enable: policy 'fixed' needs fixed_table, an int/bool tensor [num_layers, num_kv_heads] "
                             "(1 = sparse)")
        table = torch.as_tensor(fixed_table)
        if tuple(table.shape) != (L, Hkv):
            raise ValueError(f"enable: fixed_table must have shape [num_layers, num_kv_heads] = [{L}, {Hkv}], "
                             f"got {tuple(table.shape)}")
        if table.dtype != torch.bool:
            if bool(((table != 0) & (table != 1)).any()):
                raise ValueError("enable: fixed_table entries must be 0 (full) or 1 (sparse)")
            table = table != 0
    modules = _attention_modules(model)
    if [m.layer_idx for m in modules] != list(range(L)):
        raise ValueError(f"enable: expected {L} attention modules with k_proj and layer_idx 0..{L - 1}, found "
                         f"{[m.layer_idx for m in modules]}; this architecture is not supported")
    register_attention()
    state = ElasticState(num_layers=L, num_kv_heads=Hkv, policy=policy, sparse=sparse, fixed_table=table,
                         strategy=strategy, routers=routers)
    check_sparsity_shift(sparsity_shift, where="enable: ")
    if not isinstance(router_graphs, bool):
        raise ValueError(f"enable: router_graphs must be True or False, got {router_graphs!r}")
    if router_graphs:
        state.router_graphs = RouterGraphs()
    if not isinstance(fused_router, bool):
        raise ValueError(f"enable: fused_router must be True or False, got {fused_router!r}")
    state.fused_router = fused_router
    state.sparsity_shift = sparsity_shift
    state._hooks = []
    for m in modules:
        target = m.k_norm if hasattr(m, "k_norm") else m.k_proj
        state._hooks.append(target.register_forward_hook(_make_key_hook(state, m.layer_idx, Hkv, D)))
        m._elastic_state = state
    if routers is not None:
        param = next(model.parameters(), None)
        if param is not None:
            routers.to(param.device)
        # Follow the model's mode (eval: deterministic argmax; train: Gumbel sampling); later model.train() /
        # model.eval() calls reach the routers as a submodule.
        routers.train(model.training)
        model.add_module("elastic_routers", routers)
    state._previous_attn_implementation = model.config._attn_implementation
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = ATTN_IMPLEMENTATION
    model.elastic_state = state
    return state


def disable(model):
    """Undo enable(): remove hooks and routers, restore the previous attention implementation."""
    state = getattr(model, "elastic_state", None)
    if state is None:
        return
    for h in state._hooks:
        h.remove()
    for m in _attention_modules(model):
        if getattr(m, "_elastic_state", None) is state:
            del m._elastic_state
    if "elastic_routers" in model._modules:
        del model._modules["elastic_routers"]
    previous = state._previous_attn_implementation or "sdpa"
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(previous)
    else:  # pragma: no cover
        model.config._attn_implementation = previous
    model.elastic_state = None
