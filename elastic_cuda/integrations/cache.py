"""A transformers KV cache that frees the memory of STREAM heads after prefill.

ElasticCache(model) is a `transformers.Cache` whose layers behave like DynamicLayer until the elastic
attention function has routed the prompt. Right after prefill the function calls `compact()`: FULL
KV heads keep their whole history; STREAM heads keep only what their rule can still see, the sink
tokens and the most recent `window` tokens (memory is really released). At each decode step (one new
token) the STREAM part is trimmed again after the append, so it holds exactly the keys visible to the
current query, {j < sink} U {j > i - window}: running FULL attention over it equals STREAM attention
over the whole history (RoPE was applied before caching, so dropping positions changes nothing).

Limits: compaction needs the same routing for every sample of the batch and no padding (otherwise the
layer silently stays a plain dynamic layer); compacted layers accept one new token per step and do
not support beam-search reordering or cropping (they raise NotImplementedError).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..ops import FULL

__all__ = ["ElasticCache", "ElasticKVLayer"]


class ElasticKVLayer(DynamicLayer):
    def __init__(self, layer_idx: int, **kwargs):
        super().__init__(**kwargs)
        self.layer_idx = layer_idx
        self.compacted = False
        self.seen_tokens = 0          # logical sequence length (what masks and positions see)
        self.full_heads: list = []    # KV head indices kept whole
        self.stream_heads: list = []  # KV head indices kept as sink + window
        self.stream_keys = self.stream_values = None
        self.sink = self.window = 0

    # ------------------------------------------------------------------ transformers layer API
    def update(self, key_states, value_states, *args, **kwargs):
        if not self.compacted:
            keys, values = super().update(key_states, value_states, *args, **kwargs)
            self.seen_tokens = keys.shape[-2]
            return keys, values
        if key_states.shape[-2] != 1:
            raise NotImplementedError("ElasticCache: after prefill a compacted layer takes one new token per step, "
                                      f"got {key_states.shape[-2]}")
        full = torch.tensor(self.full_heads, device=key_states.device, dtype=torch.long)
        stream = torch.tensor(self.stream_heads, device=key_states.device, dtype=torch.long)
        self.keys = torch.cat([self.keys, key_states.index_select(1, full)], dim=-2)
        self.values = torch.cat([self.values, value_states.index_select(1, full)], dim=-2)
        self.stream_keys = torch.cat([self.stream_keys, key_states.index_select(1, stream)], dim=-2)
        self.stream_values = torch.cat([self.stream_values, value_states.index_select(1, stream)], dim=-2)
        self.seen_tokens += 1
        self._trim_stream()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.seen_tokens if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int):
        return self.get_seq_length() + query_length, 0

    def reset(self) -> None:
        super().reset()
        self.compacted, self.seen_tokens = False, 0
        self.stream_keys = self.stream_values = None

    def _refuse(self, what):
        if self.compacted:
            raise NotImplementedError(f"ElasticCache: {what} is not supported once STREAM heads are compacted")

    def crop(self, *args, **kwargs):
        self._refuse("crop")
        return super().crop(*args, **kwargs)

    def reorder_cache(self, beam_idx):
        self._refuse("reorder_cache (beam search)")
        return super().reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats):
        self._refuse("batch_repeat_interleave")
        return super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices):
        self._refuse("batch_select_indices")
        return super().batch_select_indices(indices)

    # ------------------------------------------------------------------ elastic
    def compact(self, head_modes: list, sink: int, window: int):
        """Keep whole history for FULL heads, sink + window for the others. head_modes: one mode per KV head."""
        if self.compacted or not self.is_initialized:
            return
        self.full_heads = [h for h, m in enumerate(head_modes) if m == FULL]
        self.stream_heads = [h for h, m in enumerate(head_modes) if m != FULL]
        if not self.stream_heads:
            return  # nothing to free: stay a plain dynamic layer
        self.sink, self.window = sink, window
        full = torch.tensor(self.full_heads, device=self.keys.device, dtype=torch.long)
        stream = torch.tensor(self.stream_heads, device=self.keys.device, dtype=torch.long)
        self.stream_keys = self.keys.index_select(1, stream)
        self.stream_values = self.values.index_select(1, stream)
        self.keys = self.keys.index_select(1, full)      # new, smaller tensors: the old ones are freed
        self.values = self.values.index_select(1, full)
        self.compacted = True
        self._trim_stream()

    def _trim_stream(self):
        """Keep {j < sink} U {j >= L - window} of the L tokens seen: everything the next query (or the current
        one, after the append) can see."""
        L, kept = self.seen_tokens, self.stream_keys.shape[-2]
        n_sink = min(self.sink, L)
        keep_recent = min(self.window, L - n_sink)
        if kept > n_sink + keep_recent:
            def trim(t):
                return torch.cat([t[..., :n_sink, :], t[..., kept - keep_recent:, :]], dim=-2)
            self.stream_keys, self.stream_values = trim(self.stream_keys), trim(self.stream_values)

    def memory_bytes(self) -> int:
        total = 0
        for t in (self.keys, self.values, self.stream_keys, self.stream_values):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
        return total

    def dense_memory_bytes(self) -> int:
        """What a plain DynamicLayer would hold for the same tokens."""
        if not self.is_initialized or self.keys is None:
            return 0
        heads = len(self.full_heads) + len(self.stream_heads) if self.compacted else self.keys.shape[1]
        B, _, _, D = self.keys.shape
        return 2 * B * heads * self.seen_tokens * D * self.keys.element_size()


class ElasticCache(Cache):
    """KV cache for a model with elastic attention enabled: pass it as `past_key_values` (generate or forward)."""

    def __init__(self, model):
        state = getattr(model, "elastic_state", None)
        if state is None:
            raise ValueError("ElasticCache: call elastic_cuda.enable(model, ...) before creating the cache")
        super().__init__(layers=[ElasticKVLayer(i) for i in range(state.num_layers)])
        state.register_cache(self)

    def memory_bytes(self) -> int:
        return sum(layer.memory_bytes() for layer in self.layers)

    def dense_memory_bytes(self) -> int:
        return sum(layer.dense_memory_bytes() for layer in self.layers)
