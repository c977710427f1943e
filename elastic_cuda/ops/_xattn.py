"""elastic::xattn_block_mask, the XAttention estimate of BLOCK heads on CUDA, and the estimate's settings checks
(shared with the torch rule in elastic_cuda/attention/xattn.py)."""
from __future__ import annotations

import math

import torch

from .._ext import has_cuda_kernels
from ._checks import _CUDA_DTYPES, _CUDA_HEAD_DIMS, _check_one_device


def check_xattn_args(block_size: int, stride: int, threshold: float, where: str = "xattn: "):
    """The XAttention estimate's settings (the torch rule in attention/xattn.py and the CUDA op both take them):
    ValueError naming the setting, prefixed by `where`."""
    if not isinstance(stride, int) or stride <= 0:
        raise ValueError(f"{where}xattn stride must be a positive int, got {stride!r}")
    if not isinstance(block_size, int) or block_size <= 0 or block_size % stride != 0:
        raise ValueError(f"{where}block_size must be a positive multiple of the xattn stride ({stride}), "
                         f"got {block_size!r}")
    if isinstance(threshold, bool) or not (isinstance(threshold, (int, float)) and 0.0 <= float(threshold) <= 1.0):
        raise ValueError(f"{where}xattn threshold must be in [0, 1], got {threshold!r}")


def xattn_block_mask(q, k, head_mode, *, cu_seqlens=None, max_seqlen: int | None = None, block_size: int = 128,
                     stride: int = 16, threshold: float = 0.9, scale: float | None = None):
    """XAttention block masks of a prefill on CUDA (the raw op; elastic_cuda.attention.xattn.xattn_block_mask is the
    user-facing function, with the torch rule on CPU).

    q [B, S, Hq, D], k [B, S, Hkv, D] (queries = keys), or packed [T, H, D] with cu_seqlens int32 [B + 1] and
    max_seqlen; head_mode int32 [B, Hkv]. Returns bool [B, Hq, NB, NB], NB = ceil((S or max_seqlen) / block_size).
    Only KV heads with head_mode == BLOCK are estimated: the rows of every other head are all False. CUDA needs
    float16/bfloat16, head_dim 64 or 128 and block_size / stride a power of two <= 128."""
    def fail(msg):
        raise ValueError("elastic_cuda.xattn_block_mask: " + msg)

    for name, t in (("q", q), ("k", k), ("head_mode", head_mode)):
        if not isinstance(t, torch.Tensor):
            fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    varlen = cu_seqlens is not None
    rank = 3 if varlen else 4
    if q.dim() != rank or k.dim() != rank:
        fail(f"q and k must have shape {'[T, H, D] (with cu_seqlens)' if varlen else '[B, S, H, D]'}, got "
             f"{tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
        fail(f"q and k must cover the same tokens with one head_dim (queries = keys), got {tuple(q.shape)} and "
             f"{tuple(k.shape)}")
    if q.device.type != "cuda" or k.device != q.device:
        fail(f"q and k must be CUDA tensors on one device (use elastic_cuda.attention.xattn.xattn_block_mask on "
             f"CPU), got {q.device} and {k.device}")
    if not has_cuda_kernels():
        fail("q is on CUDA but this build of elastic_cuda has no CUDA kernels (rebuild with a CUDA toolkit)")
    if q.dtype not in _CUDA_DTYPES or k.dtype != q.dtype:
        fail(f"q and k must both be float16 or bfloat16, got {q.dtype} and {k.dtype}")
    if q.shape[-1] not in _CUDA_HEAD_DIMS:
        fail(f"head_dim (q.shape[-1]) must be one of {_CUDA_HEAD_DIMS}, got {q.shape[-1]}")
    Hq, Hkv = q.shape[-2], k.shape[-2]
    if Hkv == 0 or Hq % Hkv != 0:
        fail(f"q heads ({Hq}) must be a multiple of k heads ({Hkv})")
    if varlen:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32 \
                or cu_seqlens.numel() < 2:
            fail("cu_seqlens must be an int32 tensor of shape [B+1]")
        if cu_seqlens.device != q.device:
            fail(f"cu_seqlens must be on the device of q ({q.device}), got {cu_seqlens.device}")
        if not isinstance(max_seqlen, int) or max_seqlen <= 0:
            fail(f"max_seqlen must be an int > 0 with cu_seqlens, got {max_seqlen!r}")
        B = cu_seqlens.numel() - 1
    else:
        B = q.shape[0]
    if tuple(head_mode.shape) != (B, Hkv) or head_mode.dtype != torch.int32 or head_mode.device != q.device:
        fail(f"head_mode must be int32 [B, Hkv] = [{B}, {Hkv}] on {q.device}, got {head_mode.dtype} "
             f"{tuple(head_mode.shape)} on {head_mode.device}")
    check_xattn_args(block_size, stride, threshold, where="elastic_cuda.xattn_block_mask: ")
    per = block_size // stride
    if per > 128 or per & (per - 1):
        fail(f"block_size / stride must be a power of two <= 128 on CUDA, got {block_size} / {stride}")
    if scale is not None and (not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0):
        fail(f"scale must be a positive finite float, got {scale!r}")
    return torch.ops.elastic.xattn_block_mask(q, k, head_mode, cu_seqlens, block_size=block_size, stride=stride,
                                              threshold=float(threshold),
                                              scale=None if scale is None else float(scale),
                                              max_seqlen=max_seqlen or 0)


@torch.library.register_fake("elastic::xattn_block_mask")
def _xattn_block_mask_fake(q, k, head_mode, cu_seqlens=None, *, block_size=128, stride=16, threshold=0.9, scale=None,
                           max_seqlen=0):
    _check_one_device("xattn_block_mask", q, k=k, head_mode=head_mode, cu_seqlens=cu_seqlens)
    if cu_seqlens is not None:
        B, S = cu_seqlens.shape[0] - 1, max_seqlen
    else:
        B, S = q.shape[0], q.shape[1]
    nb = -(-S // block_size)
    return q.new_empty((B, q.shape[-2], nb, nb), dtype=torch.bool)
