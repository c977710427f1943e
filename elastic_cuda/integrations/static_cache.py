"""A preallocated (static-shape) elastic KV cache for GPU serving: memory only for what each head's routing keeps.

ElasticStaticCache(model, max_batch_size=..., max_cache_len=...) is a `transformers.Cache` for a model with elastic
attention enabled. Each layer keeps two pools of rows, one row per (sample, KV head) pair:

- the whole-history pool [full_pairs, max_cache_len, D] (K and V) for FULL pairs, and for BLOCK pairs (their block
  masks cover the prompt only, so decode runs them densely, as ElasticCache does);
- the STREAM pool [stream_pairs, sink + window + max_query_len - 1, D]: the sink tokens, then a ring buffer in which
  position p >= sink lives at row sink + (p - sink) % ring. The ring holds window + max_query_len - 1 tokens: every
  key that the (up to max_query_len) queries of one step can see, and enough to crop back a rejected draft.

A table slot[b, h] (int32 [B, Hkv]) names each pair's row in its pool, head_mode[b, h] its mode, and seq_lens[b]
(int32 [B]) each sample's number of valid tokens, so samples with their own routing and their own (left-padded)
length share one batch. Decode steps write the new keys in place (index_copy_ into preallocated buffers, no host
read), and attention runs through elastic_cuda.ops.decode_attention, so torch.compile / CUDA graphs can capture a
step; transformers' generate uses its compiled path for it (every layer is_compileable).

Pool sizes (the memory trade-off):
- max_full_frac=None (default): each layer's pools are sized from the routing of the first prompt (exactly the
  pairs it routes FULL/BLOCK and STREAM); a later prompt that needs more pairs of a kind grows that pool
  (a new allocation: compiled decode graphs recompile). Least memory, no admission control.
- max_full_frac=f: allocated once for any batch of max_batch_size whose layers route at most
  ceil(f * max_batch_size * Hkv) pairs FULL/BLOCK (the STREAM pool holds every pair). Static addresses for the
  whole serving lifetime, and a known capacity for admission; a prompt routed denser raises ValueError (never
  a silent fallback). Memory: f of a dense static cache plus the STREAM pool.

Prefill runs as usual (the elastic attention function routes the prompt over the prompt's own keys) and then
commits the prompt into the pools (transformers.py calls ElasticStaticCache.stage_commit: it alone knows the routing and
padding; each layer is committed one layer later, without a stream sync, and all of them by the end of the forward).
Supported after prefill: any number of decode steps of 1..max_query_len tokens, reorder_cache / batch_select_indices /
batch_repeat_interleave (rows are copied between pool rows; refused with ValueError if the new routing needs more
pairs than a pool holds or more than max_batch_size samples), and crop of at most max_query_len tokens (a STREAM
ring keeps no more; longer crops raise ValueError). Speculative steps: every sample appends the same Sq tokens.

Metrics: decode steps over this cache bypass ElasticState's host-side pair counters (they would force a host read per
step); their (visible, causal) pairs accumulate on the device instead: decode_pair_counts(). memory_bytes() is what
the cache allocated, dense_memory_bytes() what transformers' StaticCache allocates for the same limits.
"""
from __future__ import annotations

import math

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .._decode_cpu import pool_slots, stream_ring_index
from ..ops import MAX_DECODE_QUERIES, STREAM, decode_attention, static_cache_commit

__all__ = ["ElasticStaticCache", "ElasticStaticLayer"]


def _fail(msg: str):
    raise ValueError("ElasticStaticCache: " + msg)


def _mark_static(*tensors):
    """Tag buffers whose address must not change for CUDA graphs (not allowed while dynamo traces)."""
    if not torch.compiler.is_compiling():
        for t in tensors:
            torch._dynamo.mark_static_address(t)


class _Pool:
    """K and V rows of one kind of pair: [pairs, tokens, D] views of flat buffers with one extra scratch row, where
    a decode step's writes for pairs of the other kind land (static shapes: every pair writes to both pools)."""

    def __init__(self, pairs, tokens, head_dim, dtype, device):
        self.pairs, self.tokens = pairs, tokens
        n = pairs * tokens
        # Zeros, not empty: the kernel never reads a row it does not need, but a NaN left in memory would make
        # a test of that fail loudly rather than quietly; one-time cost at allocation. K and V in one allocation:
        # a fresh cache allocates its pools inside the prefill, whose every launch a small model waits on.
        store = torch.zeros(2, n + 1, head_dim, dtype=dtype, device=device)
        self.k_store, self.v_store = store[0], store[1]
        self.k = self.k_store[:n].view(pairs, tokens, head_dim)
        self.v = self.v_store[:n].view(pairs, tokens, head_dim)
        self.scratch_row = n
        _mark_static(self.k_store, self.v_store)

    def fits(self, pairs, head_dim, dtype, device):
        return (pairs <= self.pairs and self.k_store.shape[1] == head_dim and self.k_store.dtype == dtype
                and self.k_store.device == device)

    def nbytes(self):
        return 2 * self.k_store.numel() * self.k_store.element_size()

    def copy_rows(self, src, dst):
        """Pool rows dst <- rows src (int64 on the pool's device); reads all sources before writing."""
        if src.numel():
            self.k.index_copy_(0, dst, self.k.index_select(0, src))
            self.v.index_copy_(0, dst, self.v.index_select(0, src))


class ElasticStaticLayer(CacheLayerMixin):
    is_compileable = True
    is_sliding = False
    is_croppable = True          # up to max_query_len tokens (crop raises beyond)
    supports_early_init = False  # pools are sized at the prompt's routing, not from a shape alone

    def __init__(self, layer_idx, *, num_kv_heads, max_batch_size, max_cache_len, sink, window, max_query_len,
                 max_full_frac):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_kv_heads, self.max_batch_size, self.max_cache_len = num_kv_heads, max_batch_size, max_cache_len
        self.sink, self.window, self.max_query_len = sink, window, max_query_len
        self.max_full_frac = max_full_frac
        self.stream_len = sink + window + max_query_len - 1  # sink + ring (module docstring)
        self.prefilled = False
        self._pending = None         # the prompt's (keys, values) between update() and commit_prefill()
        self._staged = None          # its routing between stage_commit() and finish_commit()
        self.full = self.stream = None
        self.head_mode = self.slot = self.is_whole = self.seq_lens = None
        self.batch_size = 0
        # Padded width seen so far (what transformers counts as the sequence length); a tensor as in StaticLayer
        # so that compiled steps do not specialise on it.
        self.cumulative_length = torch.tensor(0, dtype=torch.int64)
        # (visible, causal) query-key pairs of the decode steps since the prompt, summed over pairs: the decode part of
        # ESR (ElasticState.metrics() counts the prompt; decode steps over this cache run outside its counters).
        self.decode_pairs = torch.zeros(2, dtype=torch.float64)

    # ------------------------------------------------------------------ transformers layer API
    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        self.head_dim = key_states.shape[-1]
        if self.cumulative_length.device != self.device:
            # Made on the device from host values, not copied: a pageable host-to-device copy syncs the stream, and
            # made per layer in the prefill those were 2 syncs a layer (SmolLM2 at 8K: 36.5 ms with the static cache
            # against 20.2 without, H200; tests/test_decode_cuda.py counts the syncs).
            if self.cumulative_length.device.type == "cpu":
                length, pairs = int(self.cumulative_length), self.decode_pairs.tolist()
                self.cumulative_length = torch.full((), length, dtype=torch.int64, device=self.device)
                self.decode_pairs = torch.zeros(2, dtype=torch.float64, device=self.device)
                if any(pairs):
                    self.decode_pairs[0].fill_(pairs[0])
                    self.decode_pairs[1].fill_(pairs[1])
            else:
                self.cumulative_length = self.cumulative_length.to(self.device)
                self.decode_pairs = self.decode_pairs.to(self.device)
            _mark_static(self.cumulative_length, self.decode_pairs)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        B, H, S, D = key_states.shape
        if self._staged is not None:  # a commit the prefill left staged (ElasticStaticCache.stage_commit)
            self.finish_commit()
        if not self.prefilled:
            return self._stage_prompt(key_states, value_states)
        if B != self.batch_size or H != self.num_kv_heads or D != self.head_dim:
            _fail(f"layer {self.layer_idx}: a decode step gave keys {tuple(key_states.shape)}; the cache holds "
                  f"batch {self.batch_size}, {self.num_kv_heads} KV heads, head_dim {self.head_dim}")
        if not 1 <= S <= self.max_query_len:
            _fail(f"layer {self.layer_idx}: a decode step takes 1..max_query_len={self.max_query_len} tokens, got {S} "
                  "(a new prompt needs reset() first)")
        # A FULL pair's row past max_cache_len would be the next pair's row: refuse on the device (no host read;
        # raises on CPU, a device-side assert on CUDA, inside captured graphs too).
        torch._assert_async(self.cumulative_length + S <= self.max_cache_len,
                            f"ElasticStaticCache: a decode step would exceed max_cache_len={self.max_cache_len}")
        pos = self.seq_lens.unsqueeze(1).to(torch.int64) + torch.arange(S, device=self.device)  # [B, S]
        slot = self.slot.to(torch.int64).unsqueeze(-1)                                           # [B, H, 1]
        whole = self.is_whole.unsqueeze(-1)                                                      # [B, H, 1]
        ring_pos = stream_ring_index(pos, self.sink, self.stream_len).unsqueeze(1)
        full_rows = torch.where(whole, slot * self.max_cache_len + pos.unsqueeze(1), self.full.scratch_row)
        stream_rows = torch.where(whole, self.stream.scratch_row, slot * self.stream_len + ring_pos)
        k_new = key_states.reshape(-1, D)
        v_new = value_states.reshape(-1, D)
        self.full.k_store.index_copy_(0, full_rows.reshape(-1), k_new)
        self.full.v_store.index_copy_(0, full_rows.reshape(-1), v_new)
        self.stream.k_store.index_copy_(0, stream_rows.reshape(-1), k_new)
        self.stream.v_store.index_copy_(0, stream_rows.reshape(-1), v_new)
        self.seq_lens.add_(S)
        self.cumulative_length.add_(S)
        self._count_pairs(S)
        return self.keys, self.values

    def _count_pairs(self, S):
        """Add this step's visible and causal (query, key) pairs over all pairs to the device counters (ESR of decode
        steps; no host read). Query r of a sample with n tokens sees keys [0, a), a = n - S + r + 1, causally; a
        STREAM pair sees min(a, window) of the recent ones plus min(sink, max(0, a - window)) sink keys."""
        a = (self.seq_lens.unsqueeze(1) - S + 1 + torch.arange(S, device=self.device)).to(torch.float64)  # [B, S]
        stream_seen = (a.clamp(max=self.window) + (a - self.window).clamp(min=0).clamp(max=self.sink)).sum(1)
        causal = a.sum(1)                                                                                 # [B]
        seen = torch.where(self.is_whole, causal.unsqueeze(1), stream_seen.unsqueeze(1))                  # [B, H]
        self.decode_pairs[0].add_(seen.sum())
        self.decode_pairs[1].add_(causal.sum() * self.num_kv_heads)

    def get_mask_sizes(self, query_length):
        # Static, as in StaticLayer: the elastic mask function only passes the 2D padding mask through.
        return self.max_cache_len, 0

    def get_seq_length(self):
        return self.cumulative_length if self.is_initialized else 0

    def get_max_length(self):
        return self.max_cache_len

    def reset(self):
        """Forget the sequence (a new prompt may follow); the pools stay allocated."""
        self.prefilled, self._pending, self._staged = False, None, None
        self.keys = self.values = None
        self.cumulative_length.zero_()
        self.decode_pairs.zero_()
        if self.seq_lens is not None:
            self.seq_lens.zero_()

    def offload(self):
        raise NotImplementedError("ElasticStaticCache does not offload layers (its pools are static buffers)")

    def crop(self, tokens_to_remove):
        """transformers' convention: a negative value removes that many tokens, a positive one keeps that many."""
        if self._staged is not None:
            self.finish_commit()
        if not self.prefilled:
            _fail("crop before a prompt was committed")
        remove = -tokens_to_remove if tokens_to_remove <= 0 else int(self.cumulative_length) - tokens_to_remove
        if remove <= 0:
            return
        if remove > self.max_query_len:
            _fail(f"crop of {remove} tokens: STREAM rings keep max_query_len={self.max_query_len} tokens beyond "
                  "their window, so at most that many can be removed")
        if int(self.seq_lens.min()) - remove < 1:
            _fail(f"crop of {remove} tokens would leave a sample with no token")
        self.seq_lens.sub_(remove)
        self.cumulative_length.sub_(remove)

    def reorder_cache(self, beam_idx):
        self._select_rows(beam_idx, "reorder_cache")

    def batch_select_indices(self, indices):
        self._select_rows(indices, "batch_select_indices")

    def batch_repeat_interleave(self, repeats):
        self._select_rows(torch.arange(self.batch_size).repeat_interleave(repeats), "batch_repeat_interleave")

    # ------------------------------------------------------------------ elastic
    def _stage_prompt(self, key_states, value_states):
        if self._pending is not None:
            _fail(f"layer {self.layer_idx}: the prompt was never committed. The model must run elastic attention "
                  "(elastic_cuda.enable(model)) and this cache must be the last one created for the model")
        B, H, S, _ = key_states.shape
        if B > self.max_batch_size:
            _fail(f"batch {B} exceeds max_batch_size={self.max_batch_size}")
        if H != self.num_kv_heads:
            _fail(f"layer {self.layer_idx}: keys have {H} KV heads, the model has {self.num_kv_heads}")
        if S + 1 > self.max_cache_len:
            _fail(f"a prompt of {S} tokens leaves no room in max_cache_len={self.max_cache_len}")
        self.lazy_initialization(key_states, value_states)
        self._pending = (key_states, value_states)
        # The attention function finds this layer by identity with the keys update() returned.
        self.keys, self.values = key_states, value_states
        return key_states, value_states

    def commit_prefill(self, head_mode, padding, *, sink, window):
        """Write the staged prompt into the pools with its routing. head_mode int32 [B, Hkv] (prefill decision);
        padding: attention.PaddingLayout of the prompt or None. stage_commit() then finish_commit()."""
        self.stage_commit(head_mode, padding, sink=sink, window=window)
        self.finish_commit()

    def stage_commit(self, head_mode, padding, *, sink, window):
        """First half of commit_prefill: checks, and the routing's copy to the host started without waiting for
        it (on CUDA into pinned memory, an event behind it). ElasticStaticCache.stage_commit finishes a layer one
        layer later, so the prefill keeps the host ahead of the GPU: a host read per layer at once (main's
        commit_prefill: head_mode.cpu() and ~13 blocking host-to-device copies per layer, each a stream sync)
        made the SmolLM2-135M 8K demo prefill ~2x dense's (53 vs 22 ms on the H200) while the same forward
        without the static cache ran 25-27 ms."""
        if self._pending is None:
            _fail(f"layer {self.layer_idx}: commit_prefill without a staged prompt")
        if self._staged is not None:
            _fail(f"layer {self.layer_idx}: the prompt's routing is already staged")
        if (sink, window) != (self.sink, self.window):
            _fail(f"the model's sink/window ({sink}, {window}) changed since the cache was built "
                  f"({self.sink}, {self.window}); build a new cache")
        head_mode = head_mode.to(self.device, torch.int32).contiguous()  # (a fixed table's rows are expanded views)
        event = None
        if head_mode.is_cuda:
            modes = torch.empty(head_mode.shape, dtype=torch.int32, pin_memory=True)
            modes.copy_(head_mode, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(head_mode.device))
        else:
            modes = head_mode
        self._staged = (head_mode, padding, modes, event)

    def finish_commit(self):
        """Second half of commit_prefill: waits for the staged routing (only up to its own event; the host needs its
        pair counts to size the pools) and writes the prompt and the tables in one op (elastic::static_cache_commit
        reads the routing on the device). The prefill of a fresh cache makes ~4 launches a layer here (two pools,
        the commit, the length). With ~25 small torch ops a layer instead, SmolLM2-135M's 8K prefill (every head
        FULL, H200) took 56.5 ms with the static cache against 32.5 without; with the op 40.7 against 25.5
        (benchmarks/results/prefill_profile/2026-12-03_h200_static_commit/)."""
        if self._staged is None:
            _fail(f"layer {self.layer_idx}: finish_commit without a staged routing")
        head_mode, padding, modes, event = self._staged
        if event is not None:
            event.synchronize()
        keys, values = self._pending
        B, H, S, D = keys.shape
        n_stream = int((modes == STREAM).sum())
        self._ensure_pools(B * H - n_stream, n_stream, D)
        self._ensure_tables(B)
        static_cache_commit(keys, values, head_mode, None if padding is None else padding.cu_seqlens_k,
                            None if padding is None else padding.k_index, self.full.k, self.full.v, self.stream.k,
                            self.stream.v, self.head_mode, self.slot, self.is_whole, self.seq_lens, sink=self.sink)
        self.cumulative_length.fill_(S)  # (decode_pairs are zero: a new prompt follows reset() or a fresh layer)
        self._pending = self._staged = None
        self.prefilled = True
        self.keys, self.values = self.full.k, self.full.v  # the identity the attention function checks at decode

    def _upload(self, host):
        """A small host tensor on the cache's device without a stream sync: a plain .to(cuda) of pageable memory
        waits for the stream (memcpy then sync); from pinned memory with non_blocking it is queued (the caching
        host allocator keeps the pinned block until the copy has run)."""
        if self.device.type != "cuda":
            return host.to(self.device)
        return host.pin_memory().to(self.device, non_blocking=True)

    def attend(self, query, scale):
        """Decode attention of this step's queries [B, Hq, Sq, D] (transformers' layout) -> [B, Sq, Hq, D]."""
        return decode_attention(query.transpose(1, 2), self.full.k, self.full.v, self.stream.k, self.stream.v,
                                self.head_mode, self.slot, self.seq_lens, sink=self.sink, window=self.window,
                                scale=scale)

    def _ensure_pools(self, n_whole, n_stream, head_dim):
        H = self.num_kv_heads
        if self.max_full_frac is not None:
            cap_whole = math.ceil(self.max_full_frac * self.max_batch_size * H)
            cap_stream = self.max_batch_size * H
            if n_whole > cap_whole:
                _fail(f"layer {self.layer_idx}: the prompt routes {n_whole} (sample, KV head) pairs FULL/BLOCK; "
                      f"max_full_frac={self.max_full_frac} holds {cap_whole}")
        else:
            cap_whole, cap_stream = n_whole, n_stream
        self.head_dim = head_dim
        if self.full is None or not self.full.fits(cap_whole, head_dim, self.dtype, self.device):
            self.full = None  # free the old pool before allocating the new one
            self.full = _Pool(cap_whole, self.max_cache_len, head_dim, self.dtype, self.device)
        if self.stream is None or not self.stream.fits(cap_stream, head_dim, self.dtype, self.device):
            self.stream = None
            self.stream = _Pool(cap_stream, self.stream_len, head_dim, self.dtype, self.device)

    def _ensure_tables(self, B):
        """head_mode / slot int32 [B, Hkv], is_whole bool [B, Hkv], seq_lens int32 [B] on the cache's device: kept
        while the batch keeps its size (static addresses for captured decode steps), else allocated anew."""
        if self.batch_size != B or self.slot is None or self.slot.device != self.device:
            H = self.num_kv_heads  # (empty: every caller writes all of them next)
            self.head_mode = torch.empty(B, H, dtype=torch.int32, device=self.device)
            self.slot = torch.empty(B, H, dtype=torch.int32, device=self.device)
            self.is_whole = torch.empty(B, H, dtype=torch.bool, device=self.device)
            self.seq_lens = torch.empty(B, dtype=torch.int32, device=self.device)
            _mark_static(self.head_mode, self.slot, self.is_whole, self.seq_lens)
            self.batch_size = B

    def _select_rows(self, indices, what):
        """The batch becomes rows `indices` of the current one (beam reorder, selection, repetition)."""
        if self._staged is not None:
            self.finish_commit()
        if not self.prefilled:
            if self._pending is not None:
                _fail(f"{what} between a prompt's update and its commit")
            return
        idx = torch.as_tensor(indices).to("cpu", torch.int64)
        if idx.dim() != 1 or idx.numel() == 0:
            _fail(f"{what}: indices must be a non-empty 1D tensor, got shape {tuple(idx.shape)}")
        if int(idx.min()) < 0 or int(idx.max()) >= self.batch_size:
            _fail(f"{what}: indices must lie in [0, {self.batch_size}), got {idx.tolist()}")
        if idx.numel() > self.max_batch_size:
            _fail(f"{what}: {idx.numel()} samples exceed max_batch_size={self.max_batch_size}")
        old_whole, old_slot = self.is_whole.cpu(), self.slot.cpu().to(torch.int64)
        whole = old_whole[idx]
        n_whole = int(whole.sum())
        n_stream = whole.numel() - n_whole
        if n_whole > self.full.pairs or n_stream > self.stream.pairs:
            _fail(f"{what}: layer {self.layer_idx} would need {n_whole} whole-history and {n_stream} STREAM pairs; its "
                  f"pools hold {self.full.pairs} and {self.stream.pairs} (give max_full_frac to size them ahead)")
        slot = pool_slots(whole)
        src, dst = old_slot[idx], slot
        for pool, kind in ((self.full, whole), (self.stream, ~whole)):
            move = kind & (src != dst)
            pool.copy_rows(src[move].to(self.device), dst[move].to(self.device))
        head_mode = self.head_mode.index_select(0, idx.to(self.device))
        seq_lens = self.seq_lens.index_select(0, idx.to(self.device))
        self._ensure_tables(idx.numel())
        self.head_mode.copy_(head_mode)
        self.slot.copy_(self._upload(slot.to(torch.int32)))
        self.is_whole.copy_(self._upload(whole))
        self.seq_lens.copy_(seq_lens)

    def memory_bytes(self):
        tables = sum(t.numel() * t.element_size() for t in (self.head_mode, self.slot, self.is_whole, self.seq_lens)
                     if t is not None)
        return sum(p.nbytes() for p in (self.full, self.stream) if p is not None) + tables

    def dense_memory_bytes(self):
        """What transformers' StaticCache allocates for the same max_batch_size, max_cache_len, heads and dtype."""
        if not self.is_initialized:
            return 0
        elem = torch.empty(0, dtype=self.dtype).element_size()
        return 2 * self.max_batch_size * self.num_kv_heads * self.max_cache_len * self.head_dim * elem


class ElasticStaticCache(Cache):
    """Static elastic KV cache (module docstring). Pass it as `past_key_values` to generate or forward."""

    def __init__(self, model, *, max_batch_size: int, max_cache_len: int, max_full_frac: float | None = None,
                 max_query_len: int = MAX_DECODE_QUERIES):
        state = getattr(model, "elastic_state", None)
        if state is None:
            _fail("call elastic_cuda.enable(model, ...) before creating the cache")
        for name, val in (("max_batch_size", max_batch_size), ("max_cache_len", max_cache_len)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                _fail(f"{name} must be an int >= 1, got {val!r}")
        if not isinstance(max_query_len, int) or not 1 <= max_query_len <= MAX_DECODE_QUERIES:
            _fail(f"max_query_len must be an int in 1..{MAX_DECODE_QUERIES}, got {max_query_len!r}")
        if max_full_frac is not None and (not isinstance(max_full_frac, (int, float)) or not 0 <= max_full_frac <= 1):
            _fail(f"max_full_frac must be None or a number in [0, 1], got {max_full_frac!r}")
        if state.window < 1:
            _fail(f"the model's STREAM window must be >= 1, got {state.window}")
        layers = [ElasticStaticLayer(i, num_kv_heads=state.num_kv_heads, max_batch_size=max_batch_size,
                                     max_cache_len=max_cache_len, sink=state.sink, window=state.window,
                                     max_query_len=max_query_len, max_full_frac=max_full_frac)
                  for i in range(state.num_layers)]
        super().__init__(layers=layers)
        self._staged_layers = []  # layers whose commit is staged (stage_commit)
        state.register_cache(self)

    def stage_commit(self, layer, head_mode, padding, *, sink, window):
        """The prefill's commit of `layer` (one of self.layers; ElasticStaticLayer.commit_prefill's arguments),
        pipelined: this layer's routing starts its way to the host, the layers staged before it are finished (by
        then the GPU has usually run their decision: the wait is short and the GPU keeps the work queued behind
        it), and the last layer finishes at once, so the prompt is committed when the forward returns. A layer left
        staged (a forward that stopped early) finishes at its next update / crop / reorder."""
        layer.stage_commit(head_mode, padding, sink=sink, window=window)
        for other in self._staged_layers:
            if other._staged is not None:
                other.finish_commit()
        self._staged_layers = [layer]
        if layer is self.layers[-1]:
            layer.finish_commit()
            self._staged_layers = []

    def memory_bytes(self) -> int:
        """Bytes this cache has allocated (pools, scratch rows, tables)."""
        return sum(layer.memory_bytes() for layer in self.layers)

    def dense_memory_bytes(self) -> int:
        """Bytes transformers' StaticCache would allocate for the same limits."""
        return sum(layer.dense_memory_bytes() for layer in self.layers)

    def decode_pair_counts(self) -> torch.Tensor:
        """float64 [num_layers, 2]: (visible, causal) query-key pairs of the decode steps since the prompt, over every
        (sample, KV head); ESR of decode = 1 - visible / causal. ElasticState.metrics() covers the prompt only when
        decoding over this cache. Reads the device (one sync)."""
        return torch.stack([layer.decode_pairs for layer in self.layers]).cpu()
