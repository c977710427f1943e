"""MSR / ESR accounting of one model's elastic attention (ElasticState.metrics()).

MSR: the fraction of KV heads routed sparse (from the routing decision). ESR: the fraction of causal (query, key)
pairs the real masks skip, over all heads and every query processed since the prefill, decode steps included.
The attention function adds each call's pairs; BLOCK heads count their estimated masks at prefill and every causal
pair in decode (they run densely there). The masks' pair counts stay on the device until metrics() is asked for:
reading them per layer would cost a host sync in every BLOCK layer of a prefill. A router's decision (a device
tensor) is not counted on the device per call either: each call stores the tensor and its per-sample pair counts
(python ints), and metrics() turns them into the same float64 sums with one read per decision. Counting on the
device cost ~13 small ops per layer (a launch each on CUDA, where the elastic prefill is launch-bound: #14 / #15;
experiments/host_overhead_per_layer.py).
"""
from __future__ import annotations

import functools

import torch

from ..attention import causal_pairs, visible_pairs
from ..attention.xattn import block_visible_pairs
from ..ops import BLOCK, FULL, STREAM

__all__ = ["SparsityMeter"]


class SparsityMeter:
    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self._pairs = [[0, 0] for _ in range(num_layers)]  # (visible, causal) pairs summed over heads since prefill
        self._block_pairs = [None] * num_layers  # BLOCK heads' visible prefill pairs per (sample, KV head), a tensor
        # Per layer, in call order, what metrics() adds to the host-counted visible pairs: a BLOCK pair tensor
        # (summed there) or a router decision's call (modes tensor, per-sample causal / STREAM pairs, BLOCK masked).
        self._deferred = [[] for _ in range(num_layers)]

    def start_layer(self, layer_idx: int):
        """A new prefill of this layer: its counts restart."""
        self._pairs[layer_idx] = [0, 0]
        self._block_pairs[layer_idx] = None
        self._deferred[layer_idx] = []

    def set_block_pairs(self, layer_idx: int, pairs: torch.Tensor, kv_heads: int | None = None,
                        block_heads: torch.Tensor | None = None):
        """Visible prefill pairs of each sample's BLOCK heads from the layer's estimated masks (any device; 0 for
        the other heads): float [B, Hkv], or, with kv_heads, per query head [B, Hq], made per KV head (the mean over
        its query heads, times block_heads == BLOCK when block_heads int32 [B, Hkv] is given) when first read
        (block_pairs, metrics): the same ops on the same values, not in every BLOCK layer of a prefill, where each
        costs a kernel launch (#15)."""
        self._block_pairs[layer_idx] = pairs if kv_heads is None else _PerQueryHead(pairs, kv_heads, block_heads)

    def set_block_mask(self, layer_idx: int, mask: torch.Tensor, n: int, block_size: int, kv_heads: int,
                       block_heads: torch.Tensor | None = None):
        """The BLOCK masks bool [B, Hq, NB, NB] of an unpadded n-token prefill: their visible pairs are counted
        (block_visible_pairs, then as set_block_pairs) when first read, if the masks are at most KEEP_MASK_BYTES;
        larger ones are counted now. Counting them is 2 kernels (mul, sum) in every BLOCK layer of a prefill
        that is launch-bound on a GPU (#15); keeping them holds <= KEEP_MASK_BYTES per layer (SmolLM2 at 8K:
        37 KB) until the layer's next prefill."""
        if mask.numel() * mask.element_size() > KEEP_MASK_BYTES:
            self.set_block_pairs(layer_idx, block_visible_pairs(mask, n, block_size), kv_heads, block_heads)
            return
        entry = _PerQueryHead(None, kv_heads, block_heads)
        entry.mask = (mask, n, block_size)
        self._block_pairs[layer_idx] = entry

    def block_pairs(self, layer_idx: int):
        """The BLOCK heads' visible pairs float [B, Hkv] of this layer's current prefill, else None."""
        return _resolved(self._block_pairs[layer_idx])

    def count(self, layer_idx, modes, seqlen_q, seqlen_k, padding, sink, window):
        """Add this call's visible and causal (query, key) pairs, over all KV heads, to the layer's ESR counts.
        modes: the layer's head modes as lists [B][Hkv] (known on the host), or the int32 [B, Hkv] tensor of a
        router's decision, kept with this call's per-sample pair counts and counted at metrics(): reading a router's
        modes on the host here would cost a device sync in every layer of a prefill (measured on an H200: 30 of the
        66 syncs of a SmolLM2 8K prefill), counting them on the device ~13 small ops per layer."""
        block = self._block_pairs[layer_idx] if seqlen_q == seqlen_k else None
        if block is not None:  # the BLOCK heads' pairs from the masks, summed at metrics() (no sync, no op here)
            self._deferred[layer_idx].append(block)
        if padding is None:  # one length for the batch: its counts once (cached), per sample by reference
            c, st = _pair_counts(seqlen_q, seqlen_k, sink, window)
            causal, stream = [c] * len(modes), [st] * len(modes)
        else:
            counts = [_pair_counts(a, b, sink, window) for a, b in zip(padding.lengths_q, padding.lengths_k)]
            causal, stream = [c for c, _ in counts], [st for _, st in counts]
        Hkv = modes.shape[1] if isinstance(modes, torch.Tensor) else len(modes[0])
        self._pairs[layer_idx][1] += sum(causal) * Hkv
        if isinstance(modes, torch.Tensor):
            self._deferred[layer_idx].append((modes, causal, stream, block is not None))
            return
        visible = 0
        for b, row in enumerate(modes):
            for mode in row:
                if mode == FULL or (mode == BLOCK and block is None):
                    visible += causal[b]
                elif mode == STREAM:
                    visible += stream[b]
                # BLOCK with a mask: its mask's pairs, deferred above
        self._pairs[layer_idx][0] += visible

    def metrics(self, head_mode: torch.Tensor) -> dict:
        """head_mode [B, L, Hkv] of the current sequence -> MSR per sample / per layer / overall, ESR per layer and
        overall."""
        sparse = (head_mode != FULL).to(torch.float64).cpu()
        visible = torch.tensor([p[0] + sum(self._deferred_values(i)) for i, p in enumerate(self._pairs)],
                               dtype=torch.float64)
        total = torch.tensor([p[1] for p in self._pairs], dtype=torch.float64)
        esr_per_layer = torch.where(total > 0, 1 - visible / total.clamp_min(1), torch.zeros_like(total))
        return {
            "msr_per_sample": sparse.mean(dim=(1, 2)),
            "msr_per_layer": sparse.mean(dim=(0, 2)),
            "msr": float(sparse.mean()),
            "esr_per_layer": esr_per_layer,
            "esr": float(1 - visible.sum() / total.sum()) if float(total.sum()) > 0 else 0.0,
        }

    def _deferred_values(self, layer_idx) -> list:
        """The layer's deferred visible-pair counts as floats, in call order: each BLOCK pair tensor's float64 sum,
        and each router call's sum over samples of (FULL heads, + BLOCK heads without a mask) x causal pairs +
        STREAM heads x STREAM pairs. The per-call values are integers below 2**53, so these are exactly the float64
        values the device used to sum per call (and they are added in the same order)."""
        values, heads = [], {}
        for entry in self._deferred[layer_idx]:
            if isinstance(entry, (torch.Tensor, _PerQueryHead)):
                values.append(float(_resolved(entry).double().sum()))
                continue
            modes, causal, stream, masked = entry
            counts = heads.get(id(modes))
            if counts is None:  # per sample: FULL, BLOCK, STREAM heads (one read per decision)
                counts = torch.stack([(modes == m).sum(1) for m in (FULL, BLOCK, STREAM)], 1).tolist()
                heads[id(modes)] = counts
            values.append(float(sum((n_full + (0 if masked else n_block)) * c + n_stream * s
                                    for (n_full, n_block, n_stream), c, s in zip(counts, causal, stream))))
        return values


@functools.lru_cache(maxsize=1024)
def _pair_counts(n_q: int, n_k: int, sink: int, window: int) -> tuple[int, int]:
    """(causal, STREAM-visible) (query, key) pairs of n_q queries over n_k keys: python ints, made once per
    lengths and settings (a decode step of every layer asks for the same ones)."""
    return causal_pairs(n_q, n_k), visible_pairs(STREAM, n_q, n_k, sink, window)


KEEP_MASK_BYTES = 1 << 20  # BLOCK masks up to this size per layer are kept and counted when read (set_block_mask)


class _PerQueryHead:
    """BLOCK pairs per query head [B, Hq] (or the masks they come from: mask = (masks, n, block_size)), waiting
    to be made per KV head (SparsityMeter.set_block_pairs / set_block_mask)."""
    __slots__ = ("pairs", "mask", "kv_heads", "block_heads", "per_kv_head")

    def __init__(self, pairs, kv_heads, block_heads):
        self.pairs, self.kv_heads, self.block_heads, self.per_kv_head = pairs, kv_heads, block_heads, None
        self.mask = None


def _resolved(entry):
    """A stored BLOCK pair count as float [B, Hkv] (made once from per-query-head pairs)."""
    if not isinstance(entry, _PerQueryHead):
        return entry
    if entry.per_kv_head is None:
        if entry.pairs is None:
            mask, n, block_size = entry.mask
            entry.pairs, entry.mask = block_visible_pairs(mask, n, block_size), None
        vis = entry.pairs.view(entry.pairs.shape[0], entry.kv_heads, -1).mean(-1)
        if entry.block_heads is not None:
            vis = vis * (entry.block_heads == BLOCK)
        entry.per_kv_head = vis
    return entry.per_kv_head
