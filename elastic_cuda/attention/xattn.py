"""XAttention-style block masks for BLOCK heads at prefill (method-digest section 4).

Per sequence and query head, the attention mass of every (query block, key block) tile is estimated from strided
antidiagonal scores: with stride s, query group m (tokens m*s .. m*s+s-1, taken in reverse) against key group n
(taken in order) scores A[m, n] = sum_i q[m*s + s-1-i] . k[n*s + i], i.e. one antidiagonal of the s x s tile of
QK^T. A row softmax over the causally visible key groups (scale 1 / (sqrt(D) s), as XAttention), summed into
(block/s) x (block/s) tiles, gives the block mass. Each query-block row keeps its first block (the sink) and its
diagonal block, then the other causal blocks in descending mass while the mass accumulated before a block is
below `threshold` x the row's total (XAttention's `find_blocks_chunked`).

Defaults follow the code the paper ran (block 128, stride 16; threshold 0.9 as in its training, 0.8 in its eval).
The estimate is discrete and runs under no_grad; its output is the op's BLOCK mask layout, bool
[B, Hq, NB, NB] with NB = ceil(Skv / block_size) and absolute block rows.

On CUDA (fp16/bf16, head_dim 64/128, block_size / stride a power of two <= 128) `xattn_block_mask` runs the fused op
torch.ops.elastic.xattn_block_mask (csrc/xattn/), which implements this same rule; elsewhere the torch code below
runs, and it stays the op's test reference.
"""
from __future__ import annotations

import functools
import math

import torch

from ..ops import BLOCK, check_xattn_args, has_cuda_kernels
from ..ops import xattn_block_mask as xattn_block_mask_op

__all__ = ["XATTN_STRIDE", "XATTN_THRESHOLD", "block_mass", "block_visible_pairs", "check_xattn_args",
           "select_blocks", "xattn_block_mask"]

XATTN_STRIDE = 16
XATTN_THRESHOLD = 0.9


def block_mass(q: torch.Tensor, k: torch.Tensor, *, block_size: int = 128, stride: int = XATTN_STRIDE,
               scale: float | None = None, max_chunk_elems: int = 1 << 23) -> torch.Tensor:
    """Estimated attention mass per (query block, key block) of one sequence: q [n, Hq, D], k [n, Hkv, D]
    (queries = keys, a prefill; GQA: Hq a multiple of Hkv) -> float32 [Hq, NB, NB], NB = ceil(n / block_size).
    Each row of key groups is a softmax, so a block row sums to the number of valid query groups in it.

    Rows are independent softmaxes, so query blocks go in chunks of at most `max_chunk_elems` scores (32 MB of
    fp32 by default, so the working set stays in cache-sized pieces; one [Hq, n/s, n/s] matrix would be 8.6 GB for
    32 heads at 128K), each against its causal key columns only. The G query heads of a KV head are stacked as
    rows of one GEMM per KV head, so K is neither repeated nor broadcast. Scores are fp32 GEMMs (fp64 for fp64
    inputs): a bf16/fp16 operand is widened chunk by chunk, which keeps its products exact; torch's CPU bf16
    matmul would round every score to bf16 and could change which blocks the threshold keeps."""
    n, Hq, D = q.shape
    Hkv = k.shape[1]
    if k.shape[0] != n or Hq % Hkv != 0 or k.shape[2] != D:
        raise ValueError(f"xattn: q [n, Hq, D] and k [n, Hkv, D] with Hq a multiple of Hkv, got {tuple(q.shape)} "
                         f"and {tuple(k.shape)}")
    nb = -(-n // block_size)
    n_pad, per = nb * block_size, block_size // stride
    G, group = n_pad // stride, Hq // Hkv
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    # Query tokens reversed inside each stride group (gathered per chunk as whole token rows: cheaper than flip, and
    # no full padded copy of q), key tokens in order -> the dot product of a query group with a key group is one
    # antidiagonal of their tile. Padding tokens (n..n_pad) are zero rows.
    t = torch.arange(n_pad, device=q.device).view(G, stride)
    reversed_tokens = (t.flip(1) if stride > 1 else t).reshape(-1)
    kg = torch.nn.functional.pad(k, (0, 0, 0, 0, 0, n_pad - n)).to(dtype).view(G, stride, Hkv, D).permute(2, 0, 1, 3)
    kg_t = kg.reshape(Hkv, G, stride * D).transpose(1, 2)                  # [Hkv, s*D, G]
    sc = (1.0 / math.sqrt(D) if scale is None else float(scale)) / stride
    g = torch.arange(G, device=q.device)
    real = g * stride < n                                   # stride groups holding at least one real token
    all_real = bool(real.all())
    out = torch.zeros(Hq, nb, nb, dtype=torch.float32, device=q.device)
    rows = max(1, max_chunk_elems // max(1, Hq * per * G))  # query blocks per chunk
    for r0 in range(0, nb, rows):
        r1 = min(nb, r0 + rows)
        g0, g1 = r0 * per, r1 * per                         # query groups of the chunk; keys up to g1 are causal
        tokens = reversed_tokens[g0 * stride:g1 * stride]
        q_chunk = q.index_select(0, tokens.clamp(max=n - 1)).to(dtype)
        if g1 * stride > n:
            q_chunk[tokens >= n] = 0.0
        q_chunk = q_chunk.view(g1 - g0, stride, Hkv, group, D).permute(2, 3, 0, 1, 4)
        q_chunk = q_chunk.reshape(Hkv, group * (g1 - g0), stride * D)  # [Hkv, group x query groups, s*D]
        scores = torch.bmm(q_chunk, kg_t[:, :, :g1]).view(Hkv, group, g1 - g0, g1)
        invisible = g[:g1].view(1, -1) > g[g0:g1].view(-1, 1)
        if not all_real:
            invisible = invisible | ~real[:g1].view(1, -1)
        scores.mul_(sc).masked_fill_(invisible, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if not all_real:
            probs.mul_(real[g0:g1].view(-1, 1))             # padding query groups carry no mass
        out[:, r0:r1, :r1] = probs.view(Hq, r1 - r0, per, r1, per).sum(dim=(2, 4)).float()
    return out


def select_blocks(mass: torch.Tensor, threshold: float = XATTN_THRESHOLD) -> torch.Tensor:
    """[..., NB, NB] block mass -> bool [..., NB, NB]: per row r, blocks 0 and r always, then the causal blocks
    (c <= r) in descending mass while the mass accumulated before each is < threshold x the row total.
    A row whose causal masses are not all finite (an inf / NaN of q or k reached its estimate) keeps every causal
    block: the estimate says nothing there, and the attention itself then applies the non-finite rule to the data."""
    nb = mass.shape[-1]
    r = torch.arange(nb, device=mass.device)
    causal = r.view(1, -1) <= r.view(-1, 1)
    if threshold >= 1.0:  # every causal block (the rule's limit; rounding of the running sum would drop tiny ones)
        return causal.expand(mass.shape).clone()
    forced = (r.view(1, -1) == 0) | (r.view(1, -1) == r.view(-1, 1))
    m = mass.double().masked_fill(~causal, 0.0)
    total = m.sum(-1, keepdim=True)
    key = m.masked_fill(~causal, -1.0).masked_fill(forced.expand_as(m), float("inf"))
    order = key.argsort(dim=-1, descending=True, stable=True)
    sorted_mass = m.gather(-1, order)
    before = sorted_mass.cumsum(-1) - sorted_mass
    keep_sorted = before < threshold * total
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    unknown = ~torch.isfinite(total)  # a non-finite mass makes the row total non-finite
    return (keep | forced | unknown) & causal


def _fused_op_applies(q, k, block_size: int, stride: int) -> bool:
    """Whether torch.ops.elastic.xattn_block_mask can run this call (its CUDA limits); otherwise the torch rule runs."""
    per = block_size // stride
    return (q.is_cuda and has_cuda_kernels() and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype
            and q.shape[-1] in (64, 128) and per <= 128 and per & (per - 1) == 0)


@torch.no_grad()
def xattn_block_mask(q: torch.Tensor, k: torch.Tensor, *, block_size: int = 128, stride: int = XATTN_STRIDE,
                     threshold: float = XATTN_THRESHOLD, scale: float | None = None, cu_seqlens=None,
                     max_seqlen: int | None = None, head_mode: torch.Tensor | None = None) -> torch.Tensor:
    """Block masks of a prefill for the op's BLOCK heads.

    q [B, S, Hq, D], k [B, S, Hkv, D] (or packed [T, H, D] with cu_seqlens [B + 1] and max_seqlen) ->
    bool [B, Hq, NB, NB], NB = ceil(S or max_seqlen / block_size). Rows past a sequence's end are False.
    head_mode int32 [B, Hkv] (optional): only KV heads routed BLOCK are estimated (on CUDA the others cost
    nothing); the rows of every other head are all False. None estimates every head."""
    check_xattn_args(block_size, stride, threshold)
    if cu_seqlens is None:
        if q.dim() != 4 or k.dim() != 4 or q.shape[1] != k.shape[1]:
            raise ValueError(f"xattn_block_mask: q [B, S, Hq, D] and k [B, S, Hkv, D] (queries = keys), got "
                             f"{tuple(q.shape)} and {tuple(k.shape)}")
        B = q.shape[0]
    else:
        if q.dim() != 3 or k.dim() != 3 or max_seqlen is None:
            raise ValueError("xattn_block_mask: packed q [T, Hq, D] / k [T, Hkv, D] need cu_seqlens and max_seqlen")
        B = cu_seqlens.numel() - 1
    Hq, Hkv = q.shape[-2], k.shape[-2]
    if head_mode is not None and (not isinstance(head_mode, torch.Tensor) or tuple(head_mode.shape) != (B, Hkv)):
        raise ValueError(f"xattn_block_mask: head_mode must be a tensor of shape [B, Hkv] = [{B}, {Hkv}], got "
                         f"{tuple(head_mode.shape) if isinstance(head_mode, torch.Tensor) else type(head_mode)}")
    if _fused_op_applies(q, k, block_size, stride):
        if head_mode is None:
            head_mode = torch.full((B, Hkv), BLOCK, dtype=torch.int32, device=q.device)
        return xattn_block_mask_op(q, k, head_mode.to(device=q.device, dtype=torch.int32), cu_seqlens=cu_seqlens,
                                   max_seqlen=None if max_seqlen is None else int(max_seqlen), block_size=block_size,
                                   stride=stride, threshold=threshold, scale=scale)
    mask = _xattn_block_mask_torch(q, k, block_size=block_size, stride=stride, threshold=threshold, scale=scale,
                                   cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    if head_mode is not None:  # the torch rule estimates every head; keep only the BLOCK heads' rows
        block_heads = (head_mode.to(mask.device) == BLOCK).repeat_interleave(Hq // Hkv, dim=1)
        mask &= block_heads[:, :, None, None]
    return mask


def _xattn_block_mask_torch(q, k, *, block_size, stride, threshold, scale, cu_seqlens, max_seqlen):
    """The rule in torch, sequence by sequence (the CPU path and the reference of the fused op)."""
    if cu_seqlens is None:
        return torch.stack([select_blocks(block_mass(q[b], k[b], block_size=block_size, stride=stride,
                                                     scale=scale), threshold) for b in range(q.shape[0])])
    cu = [int(x) for x in cu_seqlens.tolist()]
    nb = -(-int(max_seqlen) // block_size)
    out = torch.zeros(len(cu) - 1, q.shape[1], nb, nb, dtype=torch.bool, device=q.device)
    for b in range(len(cu) - 1):
        n = cu[b + 1] - cu[b]
        if n == 0:
            continue
        sel = select_blocks(block_mass(q[cu[b]:cu[b + 1]], k[cu[b]:cu[b + 1]], block_size=block_size,
                                       stride=stride, scale=scale), threshold)
        out[b, :, : sel.shape[-1], : sel.shape[-1]] = sel
    return out


def block_visible_pairs(mask: torch.Tensor, n: int, block_size: int) -> torch.Tensor:
    """Causal (query, key) pairs a BLOCK head sees in a prefill of n tokens: mask [..., NB, NB] -> float [...]."""
    nb = -(-n // block_size)
    if mask.shape[-1] != nb or mask.shape[-2] != nb:  # (an unpadded prefill's mask is already nb x nb: no slices)
        mask = mask[..., :nb, :nb]
    # bool x float64 promotes to float64 in the one mul (0 or the block's count, as .double() * counts gave).
    return torch.mul(mask, _block_pair_counts(n, block_size, mask.device)).sum(dim=(-1, -2))


@functools.lru_cache(maxsize=16)
def _block_pair_counts(n: int, block_size: int, device: torch.device) -> torch.Tensor:
    """float64 [NB, NB]: causal pairs inside each block pair of an n-token prefill. Made once per (n, block_size,
    device): built per call it was ~10 small kernel launches per sample in every BLOCK layer of a prefill."""
    nb = -(-n // block_size)
    sizes = torch.clamp(n - torch.arange(nb, device=device) * block_size, max=block_size).double()
    pairs = sizes.view(-1, 1) * sizes.view(1, -1)
    return torch.tril(pairs, diagonal=-1) + torch.diag(sizes * (sizes + 1) / 2)
