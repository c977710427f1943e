"""MSR / ESR accounting of one model's elastic attention (ElasticState.metrics()).

MSR: the fraction of KV heads routed sparse (from the routing decision). ESR: the fraction of causal (query, key)
pairs the real masks skip, over all heads and every query processed since the prefill, decode steps included.
The attention function adds each call's pairs; BLOCK heads count their estimated masks at prefill and every causal
pair in decode (they run densely there). The masks' pair counts stay on the device until metrics() is asked for:
reading them per layer would cost a host sync in every BLOCK layer of a prefill.
"""
from __future__ import annotations

import torch

from ..attention import causal_pairs, visible_pairs
from ..ops import BLOCK, FULL, STREAM

__all__ = ["SparsityMeter"]


def _column(values: list, like: torch.Tensor) -> torch.Tensor:
    """Per-sample python counts as a float64 tensor on like's device: one value (unpadded batches) stays a
    broadcast scalar, so no host-to-device copy is made."""
    if len(set(values)) == 1:
        return torch.full((1,), float(values[0]), dtype=torch.float64, device=like.device)
    return torch.tensor(values, dtype=torch.float64, device=like.device)


class SparsityMeter:
    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self._pairs = [[0, 0] for _ in range(num_layers)]  # (visible, causal) pairs summed over heads since prefill
        self._block_pairs = [None] * num_layers  # BLOCK heads' visible prefill pairs per (sample, KV head), a tensor
        self._block_visible = [[] for _ in range(num_layers)]  # device scalars: visible pairs counted on the device

    def start_layer(self, layer_idx: int):
        """A new prefill of this layer: its counts restart."""
        self._pairs[layer_idx] = [0, 0]
        self._block_pairs[layer_idx] = None
        self._block_visible[layer_idx] = []

    def set_block_pairs(self, layer_idx: int, pairs: torch.Tensor):
        """Visible prefill pairs of each sample's BLOCK heads, float [B, Hkv] (any device; 0 for the other heads),
        from the layer's estimated masks."""
        self._block_pairs[layer_idx] = pairs

    def block_pairs(self, layer_idx: int):
        """What set_block_pairs stored for this layer's current prefill, else None."""
        return self._block_pairs[layer_idx]

    def count(self, layer_idx, modes, seqlen_q, seqlen_k, padding, sink, window):
        """Add this call's visible and causal (query, key) pairs, over all KV heads, to the layer's ESR counts.
        modes: the layer's head modes as lists [B][Hkv] (known on the host), or the int32 [B, Hkv] tensor of a
        router's decision, counted on its device: reading a router's modes on the host would cost a device sync
        in every layer of a prefill (measured on an H200: 30 of the 66 syncs of a SmolLM2 8K prefill)."""
        block = self._block_pairs[layer_idx] if seqlen_q == seqlen_k else None
        if block is not None:  # the BLOCK heads' pairs from the masks, summed on the device (no sync)
            self._block_visible[layer_idx].append(block.double().sum())
        n_q = padding.lengths_q if padding is not None else [seqlen_q] * len(modes)
        n_k = padding.lengths_k if padding is not None else [seqlen_k] * len(modes)
        causal = [causal_pairs(a, b) for a, b in zip(n_q, n_k)]
        stream = [visible_pairs(STREAM, a, b, sink, window) for a, b in zip(n_q, n_k)]
        Hkv = modes.shape[1] if isinstance(modes, torch.Tensor) else len(modes[0])
        self._pairs[layer_idx][1] += sum(causal) * Hkv
        if isinstance(modes, torch.Tensor):
            full = (modes == FULL) | ((modes == BLOCK) & (block is None))
            per_sample = full.sum(1, dtype=torch.float64) * _column(causal, modes) \
                + (modes == STREAM).sum(1, dtype=torch.float64) * _column(stream, modes)
            self._block_visible[layer_idx].append(per_sample.sum())
            return
        visible = 0
        for b, row in enumerate(modes):
            for mode in row:
                if mode == FULL or (mode == BLOCK and block is None):
                    visible += causal[b]
                elif mode == STREAM:
                    visible += stream[b]
                # BLOCK with a mask: counted on the device above
        self._pairs[layer_idx][0] += visible

    def metrics(self, head_mode: torch.Tensor) -> dict:
        """head_mode [B, L, Hkv] of the current sequence -> MSR per sample / per layer / overall, ESR per layer and
        overall."""
        sparse = (head_mode != FULL).to(torch.float64).cpu()
        visible = torch.tensor([p[0] + sum(float(x) for x in self._block_visible[i])
                                for i, p in enumerate(self._pairs)], dtype=torch.float64)
        total = torch.tensor([p[1] for p in self._pairs], dtype=torch.float64)
        esr_per_layer = torch.where(total > 0, 1 - visible / total.clamp_min(1), torch.zeros_like(total))
        return {
            "msr_per_sample": sparse.mean(dim=(1, 2)),
            "msr_per_layer": sparse.mean(dim=(0, 2)),
            "msr": float(sparse.mean()),
            "esr_per_layer": esr_per_layer,
            "esr": float(1 - visible.sum() / total.sum()) if float(total.sum()) > 0 else 0.0,
        }
