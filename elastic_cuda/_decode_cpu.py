"""CPU kernel of elastic::decode_attention, written plainly in torch: the reference the CUDA kernel is tested against.

Semantics (csrc/ops.cpp, csrc/attention/head_mode.h): query row r of sample b sits at position i = n - Sq + r
(n = seq_lens[b]); key j < n is visible iff j <= i and, for a STREAM pair, j < sink or i - j < window. A FULL or
BLOCK pair reads position j at full_k[slot, j]; a STREAM pair reads it at stream_k[slot, ring_index(j)]. Values out
of range (mode, slot, length) raise ValueError here; the CUDA kernel writes NaN for such a pair instead (no sync).
"""
from __future__ import annotations

import math

import torch

_FULL, _STREAM, _BLOCK = 0, 1, 2


def stream_ring_index(positions: torch.Tensor, sink: int, stream_len: int) -> torch.Tensor:
    """Row of each logical position in a STREAM pair's buffer of stream_len rows: the sink at 0..sink-1, then a
    ring of stream_len - sink rows for every later position."""
    ring = max(stream_len - sink, 1)
    return torch.where(positions < sink, positions, sink + (positions - sink) % ring)


def pool_slots(whole: torch.Tensor) -> torch.Tensor:
    """Pool row (slot, int64) of each (sample, KV head) pair: its rank among the pairs of its kind (whole history,
    or STREAM) in (sample, head) order. whole: bool [B, H]. The CUDA commit kernel counts the same ranks on the
    device (csrc/decode/static_cache_commit.cu)."""
    flat = whole.reshape(-1)
    rank_whole = torch.cumsum(flat.to(torch.int64), 0) - 1
    rank_stream = torch.cumsum((~flat).to(torch.int64), 0) - 1
    return torch.where(flat, rank_whole, rank_stream).view(whole.shape)


def decode_attention_cpu(q, full_k, full_v, stream_k, stream_v, head_mode, slot, seq_lens, *, sink, window,
                         scale=None, num_splits=0):
    B, Sq, Hq, D = q.shape
    Hkv = head_mode.shape[1]
    groups = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty(B, Sq, Hq, D, dtype=q.dtype)
    lse = torch.empty(B, Hq, Sq, dtype=acc)
    modes, slots, lengths = head_mode.tolist(), slot.tolist(), seq_lens.tolist()
    stream_len = stream_k.shape[1]
    for b in range(B):
        n = lengths[b]
        if n < Sq:
            raise ValueError(f"elastic_cuda.decode_attention: seq_lens[{b}] = {n} is smaller than the {Sq} queries")
        i = torch.arange(n - Sq, n).unsqueeze(1)  # [Sq, 1] query positions
        j = torch.arange(n).unsqueeze(0)          # [1, n] key positions
        for h in range(Hkv):
            mode, s = modes[b][h], slots[b][h]
            if mode in (_FULL, _BLOCK):
                pool_k, pool_v, rows, visible = full_k, full_v, j[0], j <= i
                if n > full_k.shape[1]:
                    raise ValueError(f"elastic_cuda.decode_attention: seq_lens[{b}] = {n} exceeds the {full_k.shape[1]} "
                                     "tokens of the whole-history pool")
            elif mode == _STREAM:
                visible = (j <= i) & ((j < sink) | (i - j < window))
                pool_k, pool_v, rows = stream_k, stream_v, stream_ring_index(j[0], sink, stream_len)
            else:
                raise ValueError(f"elastic_cuda.decode_attention: head_mode[{b}, {h}] = {mode} is not 0, 1 or 2")
            if not 0 <= s < pool_k.shape[0]:
                raise ValueError(f"elastic_cuda.decode_attention: slot[{b}, {h}] = {s} is outside the "
                                 f"{pool_k.shape[0]} rows of its pool")
            # Positions no query sees may have been overwritten in the ring: they are gathered but masked out.
            k = pool_k[s, rows].to(acc)                                   # [n, D]
            v = pool_v[s, rows].to(acc)
            qh = q[b, :, h * groups:(h + 1) * groups].to(acc)             # [Sq, G, D]
            # Non-finite rule (csrc/attention/head_mode.h): non-finite q / k / v rows are computed as zeros (so that a
            # masked 0 * NaN never reaches another row), then a row holding one, or seeing such a key, is NaN.
            kv_bad = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))  # [n]
            q_bad = ~torch.isfinite(qh).all(-1)                                # [Sq, G]
            k, v = k.masked_fill(kv_bad[:, None], 0.0), v.masked_fill(kv_bad[:, None], 0.0)
            qh = qh.masked_fill(q_bad[..., None], 0.0)
            nan_rows = q_bad.t() | (visible & kv_bad[None, :]).any(-1)[None, :]  # [G, Sq]
            logits = torch.einsum("rgd,nd->grn", qh, k) * scale           # [G, Sq, n]
            logits = logits.masked_fill(~visible, float("-inf"))
            row_lse = torch.logsumexp(logits, dim=-1)                     # [G, Sq]; every row sees its own key
            probs = torch.exp(logits - row_lse.unsqueeze(-1))
            o = torch.einsum("grn,nd->rgd", probs, v).masked_fill(nan_rows.t()[..., None], float("nan"))
            out[b, :, h * groups:(h + 1) * groups] = o.to(q.dtype)
            lse[b, h * groups:(h + 1) * groups] = row_lse.masked_fill(nan_rows, float("nan"))
    return out, lse


def static_cache_commit_cpu(keys, values, head_mode, cu_seqlens, token_index, full_k, full_v, stream_k, stream_v,
                            mode_table, slot, is_whole, seq_lens, *, sink):
    """CPU kernel of elastic::static_cache_commit (schema: csrc/ops.cpp), the reference of the CUDA one: a prefill's
    keys/values [B, H, S, D] into the pools of a static elastic cache. Pair (b, h) takes slot = its rank among the
    pairs of its kind (STREAM, or FULL/BLOCK: whole history) in (b, h) order; a whole pair's n tokens go to
    full[slot, :n], a STREAM pair's sink tokens and last stream_len - sink tokens to their ring rows. Tables:
    mode_table = head_mode, slot, is_whole, seq_lens (n per sample)."""
    B, H, S, _ = keys.shape
    whole = head_mode != _STREAM
    slots = pool_slots(whole)
    n_whole = int(whole.sum())
    if n_whole > full_k.shape[0] or B * H - n_whole > stream_k.shape[0]:
        raise ValueError(f"elastic_cuda.static_cache_commit: the routing has {n_whole} whole-history and "
                         f"{B * H - n_whole} STREAM pairs; the pools hold {full_k.shape[0]} and {stream_k.shape[0]}")
    if cu_seqlens is None:
        starts, lengths = [0] * B, [S] * B
    else:
        cu = cu_seqlens.tolist()
        starts, lengths = cu[:-1], [cu[b + 1] - cu[b] for b in range(B)]
    stream_len = stream_k.shape[1]
    ring = stream_len - sink
    for b in range(B):
        n = lengths[b]
        if not 0 <= n <= S:
            raise ValueError(f"elastic_cuda.static_cache_commit: sample {b} has {n} tokens; keys hold {S}")
        if cu_seqlens is None:
            kb, vb = keys[b, :, :n], values[b, :, :n]                        # [H, n, D]
        else:  # this sample's valid tokens, in order (left or right padding alike)
            rows = token_index[starts[b]:starts[b] + n] - b * S
            if n and not (0 <= int(rows.min()) and int(rows.max()) < S):
                raise ValueError(f"elastic_cuda.static_cache_commit: token_index of sample {b} leaves its {S} rows")
            kb, vb = keys[b].index_select(1, rows), values[b].index_select(1, rows)
        heads_w = whole[b].nonzero().squeeze(1)
        heads_s = (~whole[b]).nonzero().squeeze(1)
        if heads_w.numel():
            if n > full_k.shape[1]:
                raise ValueError(f"elastic_cuda.static_cache_commit: sample {b} has {n} tokens; the whole-history "
                                 f"pool holds {full_k.shape[1]}")
            dst = slots[b, heads_w]
            full_k[dst, :n] = kb[heads_w]
            full_v[dst, :n] = vb[heads_w]
        if heads_s.numel():
            keep = torch.cat([torch.arange(min(sink, n)), torch.arange(min(max(sink, n - ring), n), n)])  # (n < sink too)
            at = stream_ring_index(keep, sink, stream_len)
            dst = slots[b, heads_s]
            stream_k[dst[:, None], at[None, :]] = kb[heads_s][:, keep]
            stream_v[dst[:, None], at[None, :]] = vb[heads_s][:, keep]
    mode_table.copy_(head_mode)
    slot.copy_(slots)
    is_whole.copy_(whole)
    seq_lens.copy_(torch.tensor(lengths, dtype=torch.int32))
