"""Calls of the elastic op in the layouts models use: padded batches and the training-time FA/SA mix.

Padding (e.g. left padding in batched generate) is handled exactly by packing the valid tokens of
every sample into the op's varlen layout: each sample's valid queries are the last valid keys of that
sample, so the op's bottom-right causal rule and the STREAM sink/window apply to the real tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops import FULL, attention, hopper_backward_serves, train_mix

__all__ = ["FULL_BRANCHES", "PaddingLayout", "dense_causal_sdpa", "hybrid_attention", "train_mix_attention"]


@dataclass
class PaddingLayout:
    """Where the valid tokens of a padded batch are, for queries (last Sq columns) and keys."""
    q_index: torch.Tensor      # int64 [Tq] flat indices into [B * Sq]
    k_index: torch.Tensor      # int64 [Tk] flat indices into [B * Skv]
    cu_seqlens_q: torch.Tensor  # int32 [B + 1]
    cu_seqlens_k: torch.Tensor  # int32 [B + 1]
    max_seqlen_q: int
    max_seqlen_k: int
    lengths_q: list            # valid queries per sample (python ints, for metrics)
    lengths_k: list            # valid keys per sample

    @classmethod
    def from_mask(cls, mask: torch.Tensor, seqlen_q: int, seqlen_k: int) -> "PaddingLayout | None":
        """mask: [B, Skv] (1/True = real token). None when nothing is padded (the dense path is used)."""
        if mask.dim() != 2 or mask.shape[1] != seqlen_k:
            raise ValueError(f"attention_mask must be a 2D padding mask [B, Skv={seqlen_k}], got {tuple(mask.shape)}")
        valid_k = mask.to(torch.bool)
        if bool(valid_k.all()):
            return None
        valid_q = valid_k[:, seqlen_k - seqlen_q:]
        len_k = valid_k.sum(1)
        len_q = valid_q.sum(1)
        if bool((len_k == 0).any()):
            raise ValueError("attention_mask: every sample needs at least one real (unmasked) token")
        zero = torch.zeros(1, dtype=torch.int64, device=mask.device)
        return cls(
            q_index=valid_q.reshape(-1).nonzero().squeeze(1),
            k_index=valid_k.reshape(-1).nonzero().squeeze(1),
            cu_seqlens_q=torch.cat([zero, len_q.cumsum(0)]).to(torch.int32),
            cu_seqlens_k=torch.cat([zero, len_k.cumsum(0)]).to(torch.int32),
            max_seqlen_q=max(int(len_q.max()), 1),
            max_seqlen_k=int(len_k.max()),
            lengths_q=[int(x) for x in len_q.tolist()],
            lengths_k=[int(x) for x in len_k.tolist()],
        )

    def pack_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """[B, S, H, D] -> [Tk, H, D] (valid tokens only)."""
        return keys.reshape(-1, *keys.shape[2:])[self.k_index]

    def pack_queries(self, q: torch.Tensor) -> torch.Tensor:
        """[B, Sq, H, D] -> [Tq, H, D] (valid query rows only)."""
        return q.reshape(-1, *q.shape[2:])[self.q_index]

    def unpack_queries(self, packed: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """[Tq, H, D] -> the shape of `like` [B, Sq, H, D], padded rows 0."""
        out = packed.new_zeros(like.shape[0] * like.shape[1], *packed.shape[1:]).index_copy(0, self.q_index, packed)
        return out.view(*like.shape[:2], *packed.shape[1:])


def hybrid_attention(q, k, v, head_mode, *, sink: int, window: int, scale: float | None = None,
                     strategy: str = "auto", padding: PaddingLayout | None = None, block_mask=None,
                     block_size: int = 128):
    """elastic op on q [B, Sq, Hq, D], k/v [B, Skv, Hkv, D] -> out [B, Sq, Hq, D]; padded query rows get 0.
    block_mask: bool [B, Hkv or Hq, NB, NB] for BLOCK heads (NB over the longest valid sequence when padded)."""
    if padding is None:
        return attention(q, k, v, head_mode, sink=sink, window=window, scale=scale, strategy=strategy,
                         block_mask=block_mask, block_size=block_size)
    q_packed, k_packed, v_packed = padding.pack_queries(q), padding.pack_keys(k), padding.pack_keys(v)
    out_packed = attention(q_packed, k_packed, v_packed, head_mode, sink=sink, window=window, scale=scale,
                           cu_seqlens_q=padding.cu_seqlens_q, cu_seqlens_k=padding.cu_seqlens_k,
                           max_seqlen_q=padding.max_seqlen_q, max_seqlen_k=padding.max_seqlen_k, strategy=strategy,
                           block_mask=block_mask, block_size=block_size)
    return padding.unpack_queries(out_packed, q)


FULL_BRANCHES = ("auto", "op", "sdpa", "train_mix")


def dense_causal_sdpa(q, k, v, *, scale: float | None = None, padding: PaddingLayout | None = None):
    """Causal attention of every head through torch SDPA, in the op's layout and semantics (q [B, Sq, Hq, D],
    k/v [B, Skv, Hkv, D], Sq <= Skv: the queries are the last Sq positions, so the causal mask is aligned to the
    bottom right; padded batches per sample over their valid tokens, padded rows 0).

    The training mix needs O_FA of every head with its backward; on CUDA SDPA runs it on cuDNN / FlashAttention,
    whose backward is faster than the elastic op's at long lengths (the op's grouped strategy makes the same
    choice for its FULL group). A padded batch runs one SDPA call per sample. A continuation (Sq < Skv, the
    trainer's second forward over a cache) passes torch's lower-right CausalBias, which SDPA dispatches itself."""
    from torch.nn.attention.bias import causal_lower_right
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    gqa = q.shape[2] != k.shape[2]

    def causal(qh, kh, vh):  # [B, H, S, D]
        sq, skv = qh.shape[-2], kh.shape[-2]
        if sq == skv:
            return sdpa(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=gqa)
        return sdpa(qh, kh, vh, attn_mask=causal_lower_right(sq, skv), scale=scale, enable_gqa=gqa)

    if padding is None:
        return causal(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    q_packed, k_packed, v_packed = padding.pack_queries(q), padding.pack_keys(k), padding.pack_keys(v)
    outs = []
    for b in range(q.shape[0]):
        sq = slice(int(padding.cu_seqlens_q[b]), int(padding.cu_seqlens_q[b + 1]))
        sk = slice(int(padding.cu_seqlens_k[b]), int(padding.cu_seqlens_k[b + 1]))
        qb = q_packed[sq].transpose(0, 1).unsqueeze(0)
        kb, vb = (t[sk].transpose(0, 1).unsqueeze(0) for t in (k_packed, v_packed))
        outs.append(causal(qb, kb, vb)[0].transpose(0, 1))
    return padding.unpack_queries(torch.cat(outs), q)


def _resolve_branch(full_branch: str, q, k, padding: PaddingLayout | None, block_size: int | None = None) -> str:
    """The way the training mix runs: "op", "sdpa" or "train_mix" (full_branch, with "auto" resolved).
    block_size: the sparse branch's BLOCK block size when it has a mask (None: no mask)."""
    if full_branch not in FULL_BRANCHES:
        raise ValueError(f"train_mix_attention: full_branch must be one of {FULL_BRANCHES}, got {full_branch!r}")
    same_len = q.shape[1] == k.shape[1] and (padding is None or padding.lengths_q == padding.lengths_k)
    if full_branch != "auto":
        return full_branch
    if not q.is_cuda:
        return "op"  # the CPU path and the reference
    # CUDA, where the Hopper backward serves the call (ops.hopper_backward_serves: sm90, 16-bit, head_dim 64/128):
    # the train_mix op. Its backward runs each head only in the branch its hard z picks, on the wgmma kernel. One mix
    # layer fwd+bwd, Llama-3.1-8B shape, B 1 unpadded, MSR 0.75, one H200
    # (benchmarks/results/train_mix/2026-12-02_h200_new_backward/train_mix.md), ms: 8K train_mix 5.67 vs SDPA's
    # O_FA 6.49 vs two op calls 6.92; 32K 40.0 vs 64.9 vs 72.3. Padded micro-batches (B 2) already ran train_mix
    # (SmolLM2 shape, MSR 0.5, mma.sync backward: 2.69-4.81 ms at 1K-8K vs SDPA's 3.68-5.76). The MSR 0.25 / 0.5 /
    # 0.75 sweep of both shapes (`python -m benchmarks.bench_train_mix`, MSRS default) is the check of this rule.
    if hopper_backward_serves(q, block_size=block_size):
        return "train_mix"
    # Elsewhere (sm80 mma.sync backward, about 3x cuDNN's time on FULL heads): SDPA's O_FA (cuDNN's backward) for
    # an unpadded 16-bit prefill, train_mix otherwise. SmolLM2 shape, MSR 0.5, H200 with the mma.sync backward
    # (benchmarks/results/train_mix/2026-12-02_h200/train_mix.md): unpadded SDPA wins from 4K (1.80 vs 1.88 ms,
    # 2.74 vs 4.12 at 8K); padded train_mix wins at every length (above).
    if same_len and padding is None and q.dtype in (torch.float16, torch.bfloat16):
        return "sdpa"
    return "train_mix"


def train_mix_attention(q, k, v, z, sparse_mode: int, *, sink: int, window: int, scale: float | None = None,
                        strategy: str = "auto", padding: PaddingLayout | None = None, full_branch: str = "auto",
                        block_mask=None, block_size: int = 128):
    """Training-time combination O = z * O_FA + (1 - z) * O_SA per KV head (method-digest section 2).

    z [B, Hkv] (hard 0/1 with a straight-through gradient from the router); the router gradient is
    <dO, O_FA - O_SA>. full_branch: "train_mix" runs the elastic train_mix op (both branches in one op whose
    backward runs each head only in the branch its hard z picks); "op" composes two elastic op calls with autograd
    (the CPU path and the test reference); "sdpa" takes O_FA from torch SDPA (dense_causal_sdpa); "auto" picks
    the train_mix op where the Hopper backward serves the call (sm90, 16-bit, head_dim 64/128), else SDPA for an
    unpadded CUDA fp16/bf16 prefill and the train_mix op for other CUDA calls; "op" on CPU.
    block_mask/block_size: for a BLOCK sparse mode."""
    B, Hkv = z.shape
    Hq = q.shape[2]
    if Hq % Hkv != 0:
        raise ValueError(f"train_mix_attention: q heads ({Hq}) must be a multiple of z heads ({Hkv})")
    branch = _resolve_branch(full_branch, q, k, padding, block_size if block_mask is not None else None)
    if branch == "train_mix":
        if padding is None:
            return train_mix(q, k, v, z, sparse_mode, sink=sink, window=window, scale=scale, strategy=strategy,
                             block_mask=block_mask, block_size=block_size)
        out = train_mix(padding.pack_queries(q), padding.pack_keys(k), padding.pack_keys(v), z, sparse_mode,
                        sink=sink, window=window, scale=scale, strategy=strategy, block_mask=block_mask,
                        block_size=block_size, cu_seqlens_q=padding.cu_seqlens_q, cu_seqlens_k=padding.cu_seqlens_k,
                        max_seqlen_q=padding.max_seqlen_q, max_seqlen_k=padding.max_seqlen_k)
        return padding.unpack_queries(out, q)
    full_mode = torch.full((B, Hkv), FULL, dtype=torch.int32, device=q.device)
    sparse_modes = torch.full((B, Hkv), sparse_mode, dtype=torch.int32, device=q.device)
    kw = dict(sink=sink, window=window, scale=scale, strategy=strategy, padding=padding)
    if branch == "sdpa":
        out_full = dense_causal_sdpa(q, k, v, scale=scale, padding=padding)
    else:
        out_full = hybrid_attention(q, k, v, full_mode, **kw)
    kw.update(block_mask=block_mask, block_size=block_size)
    out_sparse = hybrid_attention(q, k, v, sparse_modes, **kw)
    # Query heads of a GQA group follow their KV head (contiguous groups, as HF repeat_kv).
    z_q = z.to(out_full.dtype).repeat_interleave(Hq // Hkv, dim=1)[:, None, :, None]
    return z_q * out_full + (1 - z_q) * out_sparse
