"""Pure-PyTorch statement of the elastic attention semantics (float64-capable, O(S^2) memory).

Used by the tests as the oracle for the CPU and CUDA kernels and by the transformers tests as a
masked reference model. It is deliberately written the obvious way (dense masks, no tiling) so
that it can be read against csrc/attention/head_mode.h line by line. Not for production use.
"""
from __future__ import annotations

import math

import torch

FULL, STREAM, BLOCK = 0, 1, 2


def visible_mask(
    mode: int,
    seqlen_q: int,
    seqlen_k: int,
    *,
    sink: int,
    window: int,
    block_mask: torch.Tensor | None = None,
    block_size: int = 128,
    device=None,
) -> torch.Tensor:
    """Bool [Sq, Skv]: key j visible to query row r (absolute position i = r + Skv - Sq).

    block_mask: bool [NB, NB] of this head (rows are absolute query blocks), needed for BLOCK.
    """
    i = torch.arange(seqlen_q, device=device).view(-1, 1) + (seqlen_k - seqlen_q)
    j = torch.arange(seqlen_k, device=device).view(1, -1)
    causal = j <= i
    if mode == FULL:
        return causal
    if mode == STREAM:
        return causal & ((j < sink) | (i - j < window))
    if mode == BLOCK:
        if block_mask is None:
            raise ValueError("block_mask is required for BLOCK heads")
        bits = block_mask.to(device)[(i // block_size).expand(-1, seqlen_k), (j // block_size).expand(seqlen_q, -1)]
        return causal & bits
    raise ValueError(f"head mode must be 0, 1 or 2, got {mode}")


def _head_masks(head_mode_b, Sq, Skv, Hq, *, sink, window, block_mask_b, block_size, device):
    Hkv = head_mode_b.numel()
    G = Hq // Hkv
    masks = []
    for h in range(Hq):
        kvh = h // G
        bm = None
        if block_mask_b is not None:
            bm = block_mask_b[h if block_mask_b.shape[0] == Hq else kvh]
        masks.append(
            visible_mask(int(head_mode_b[kvh]), Sq, Skv, sink=sink, window=window, block_mask=bm,
                         block_size=block_size, device=device)
        )
    return torch.stack(masks)  # [Hq, Sq, Skv]


def _attend(q, k, v, mask, scale):
    """q [Sq, Hq, D], k/v [Skv, Hkv, D], mask [Hq, Sq, Skv] -> out [Sq, Hq, D], lse [Hq, Sq]."""
    Hq, Hkv = q.shape[1], k.shape[1]
    G = Hq // Hkv
    kk = k.repeat_interleave(G, dim=1)
    vv = v.repeat_interleave(G, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, kk) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf for rows that see nothing
    p = torch.exp(scores - lse.unsqueeze(-1).clamp_min(torch.finfo(scores.dtype).min))
    p = torch.where(mask, p, torch.zeros_like(p))
    out = torch.einsum("hqk,khd->qhd", p, vv)
    return out, lse


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    head_mode: torch.Tensor,
    *,
    sink: int = 128,
    window: int = 2048,
    block_mask: torch.Tensor | None = None,
    block_size: int = 128,
    scale: float | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
):
    """Same contract as torch.ops.elastic.attention; differentiable through autograd.

    Rows that see no key give out = 0 and lse = -inf. Computation is in q's dtype (pass float64
    inputs for an exact oracle).
    """
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if cu_seqlens_q is not None:
        outs, lses = [], []
        B = cu_seqlens_q.numel() - 1
        for b in range(B):
            qs, qe = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
            ks, ke = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
            mask = _head_masks(head_mode[b], qe - qs, ke - ks, q.shape[1], sink=sink, window=window,
                               block_mask_b=None if block_mask is None else block_mask[b],
                               block_size=block_size, device=q.device)
            o, l = _attend(q[qs:qe], k[ks:ke], v[ks:ke], mask, scale)
            outs.append(o)
            lses.append(l)
        return torch.cat(outs, 0), torch.cat(lses, 1)
    B, Sq, Hq, _ = q.shape
    Skv = k.shape[1]
    outs, lses = [], []
    for b in range(B):
        mask = _head_masks(head_mode[b], Sq, Skv, Hq, sink=sink, window=window,
                           block_mask_b=None if block_mask is None else block_mask[b],
                           block_size=block_size, device=q.device)
        o, l = _attend(q[b], k[b], v[b], mask, scale)
        outs.append(o)
        lses.append(l)
    return torch.stack(outs), torch.stack(lses)


def additive_mask(
    head_mode: torch.Tensor,
    seqlen_q: int,
    seqlen_k: int,
    heads_q: int,
    *,
    sink: int,
    window: int,
    block_mask: torch.Tensor | None = None,
    block_size: int = 128,
    dtype=torch.float32,
    device=None,
) -> torch.Tensor:
    """[B, Hq, Sq, Skv] additive mask (0 / -inf) of the elastic semantics, for eager attention."""
    masks = []
    for b in range(head_mode.shape[0]):
        masks.append(
            _head_masks(head_mode[b], seqlen_q, seqlen_k, heads_q, sink=sink, window=window,
                        block_mask_b=None if block_mask is None else block_mask[b], block_size=block_size,
                        device=device)
        )
    m = torch.stack(masks)
    return torch.zeros(m.shape, dtype=dtype, device=device).masked_fill(~m, float("-inf"))
