"""The static elastic KV cache's ops (elastic_cuda/integrations/static_cache.py): elastic::decode_attention (one decode
step) and elastic::static_cache_commit (a prefill into the pools), with their fake kernels and CPU kernels
(elastic_cuda/_decode_cpu.py)."""
from __future__ import annotations

import math

import torch

from .._decode_cpu import decode_attention_cpu, static_cache_commit_cpu
from ._checks import _check_device_kernels, _check_one_device

MAX_DECODE_QUERIES = 16  # queries per step the decode op takes (one token, or a speculative draft)


def _fail_decode(msg: str):
    raise ValueError("elastic_cuda.decode_attention: " + msg)


def validate_decode_args(q, full_k, full_v, stream_k, stream_v, head_mode, slot, seq_lens, *, sink, window, scale,
                         num_splits=0):
    """Shape/dtype/device checks of decode_attention (no device sync, so it also runs in fake kernels). Values
    (modes, slots, lengths) are checked by the kernels: the CPU one raises, the CUDA one writes NaN for a pair
    whose mode, slot or length is out of range."""
    named = (("q", q), ("full_k", full_k), ("full_v", full_v), ("stream_k", stream_k), ("stream_v", stream_v),
             ("head_mode", head_mode), ("slot", slot), ("seq_lens", seq_lens))
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            _fail_decode(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != q.device:
            _fail_decode(f"{name} must be on the device of q ({q.device}), got {t.device}")
    if q.dim() != 4:
        _fail_decode(f"q must have shape [B, Sq, Hq, D], got {tuple(q.shape)}")
    B, Sq, Hq, D = q.shape
    if not 1 <= Sq <= MAX_DECODE_QUERIES:
        _fail_decode(f"q must hold 1..{MAX_DECODE_QUERIES} queries per sample (q.shape[1]), got {Sq}")
    for name, t in (("full_k", full_k), ("full_v", full_v), ("stream_k", stream_k), ("stream_v", stream_v)):
        if t.dim() != 3 or t.shape[2] != D:
            _fail_decode(f"{name} must have shape [pairs, tokens, D={D}], got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            _fail_decode(f"{name} dtype {t.dtype} != q dtype {q.dtype}")
        if t.numel() and (t.stride(2) != 1 or t.stride(1) != D):
            _fail_decode(f"{name} must have contiguous [tokens, D] rows, got strides {t.stride()}")
    if full_v.shape != full_k.shape:
        _fail_decode(f"full_v must have the shape of full_k {tuple(full_k.shape)}, got {tuple(full_v.shape)}")
    if stream_v.shape != stream_k.shape:
        _fail_decode(f"stream_v must have the shape of stream_k {tuple(stream_k.shape)}, got {tuple(stream_v.shape)}")
    if q.stride(3) != 1:
        _fail_decode(f"q must be contiguous in its last dimension (D), got strides {q.stride()}")
    if head_mode.dim() != 2 or head_mode.shape[0] != B or head_mode.dtype != torch.int32:
        _fail_decode(f"head_mode must be int32 [B={B}, Hkv], got {head_mode.dtype} {tuple(head_mode.shape)}")
    Hkv = head_mode.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        _fail_decode(f"q heads ({Hq}) must be a multiple of the KV heads of head_mode ({Hkv})")
    if tuple(slot.shape) != (B, Hkv) or slot.dtype != torch.int32:
        _fail_decode(f"slot must be int32 [B, Hkv] = [{B}, {Hkv}], got {slot.dtype} {tuple(slot.shape)}")
    if tuple(seq_lens.shape) != (B,) or seq_lens.dtype != torch.int32:
        _fail_decode(f"seq_lens must be int32 [B] = [{B}], got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    if not isinstance(sink, int) or sink < 0:
        _fail_decode(f"sink must be an int >= 0, got {sink!r}")
    if not isinstance(window, int) or window < 1:
        _fail_decode(f"window must be an int >= 1, got {window!r}")
    if stream_k.shape[0] > 0 and stream_k.shape[1] < sink + window + Sq - 1:
        _fail_decode(f"stream_k holds {stream_k.shape[1]} tokens per pair; STREAM needs sink + window + Sq - 1 = "
                     f"{sink + window + Sq - 1} (sink plus a ring that keeps every key the Sq queries can see)")
    if scale is not None and (not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0):
        _fail_decode(f"scale must be a positive finite float, got {scale!r}")
    if not isinstance(num_splits, int) or num_splits < 0:
        _fail_decode(f"num_splits must be an int >= 0 (0 = automatic), got {num_splits!r}")
    dev = q.device.type
    if dev != "meta":
        _check_device_kernels(q, D, _fail_decode, "dtype")


def decode_attention(q, full_k, full_v, stream_k, stream_v, head_mode, slot, seq_lens, *, sink: int, window: int,
                     scale: float | None = None, num_splits: int = 0, return_lse: bool = False):
    """One decode step of elastic attention over a static elastic KV cache (schema and layout: csrc/ops.cpp).

    q [B, Sq, Hq, D] (Sq 1..16), whole-history pool full_k/v [Pf, L, D] (FULL and BLOCK pairs), STREAM pool
    stream_k/v [Ps, sink + ring, D], head_mode / slot int32 [B, Hkv], seq_lens int32 [B] (valid tokens including
    the Sq new ones). Returns out [B, Sq, Hq, D] (and lse [B, Hq, Sq], fp32 or fp64 for fp64 q, when return_lse).
    num_splits (CUDA only; the CPU kernel ignores it): the number of equal key chunks the launch spreads the real
    keys of all pairs over (a pair gets as many chunks as its length needs); 0 picks one wave of the GPU's SMs."""
    validate_decode_args(q, full_k, full_v, stream_k, stream_v, head_mode, slot, seq_lens, sink=sink, window=window,
                         scale=scale, num_splits=num_splits)
    out, lse = torch.ops.elastic.decode_attention(q, full_k, full_v, stream_k, stream_v, head_mode, slot, seq_lens,
                                                  sink=sink, window=window,
                                                  scale=None if scale is None else float(scale),
                                                  num_splits=num_splits)
    return (out, lse) if return_lse else out


def static_cache_commit(keys, values, head_mode, cu_seqlens, token_index, full_k, full_v, stream_k, stream_v,
                        mode_table, slot, is_whole, seq_lens, *, sink: int) -> None:
    """A prefill's keys/values [B, Hkv, S, D] into the pools of a static elastic KV cache (semantics: csrc/ops.cpp;
    elastic_cuda/integrations/static_cache.py sizes the pools and calls it): writes the pools and the tables
    mode_table / slot (int32 [B, Hkv]), is_whole (bool [B, Hkv]), seq_lens (int32 [B]) in place. cu_seqlens int32
    [B+1] and token_index int64 [T] give a padded prompt's valid tokens."""
    def fail(msg):
        raise ValueError("elastic_cuda.static_cache_commit: " + msg)

    named = (("keys", keys), ("values", values), ("head_mode", head_mode), ("full_k", full_k), ("full_v", full_v),
             ("stream_k", stream_k), ("stream_v", stream_v), ("mode_table", mode_table), ("slot", slot),
             ("is_whole", is_whole), ("seq_lens", seq_lens), ("cu_seqlens", cu_seqlens), ("token_index", token_index))
    for name, t in named:
        if t is None and name in ("cu_seqlens", "token_index"):
            continue
        if not isinstance(t, torch.Tensor):
            fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != keys.device:
            fail(f"{name} must be on the device of keys ({keys.device}), got {t.device}")
    if keys.dim() != 4 or values.shape != keys.shape or values.dtype != keys.dtype:
        fail(f"keys and values must have one shape [B, Hkv, S, D] and dtype, got {tuple(keys.shape)} "
             f"{keys.dtype} and {tuple(values.shape)} {values.dtype}")
    B, H, S, D = keys.shape
    for name, t in (("full_k", full_k), ("full_v", full_v), ("stream_k", stream_k), ("stream_v", stream_v)):
        if t.dim() != 3 or t.shape[2] != D or t.dtype != keys.dtype:
            fail(f"{name} must be a [pairs, tokens, D={D}] pool of {keys.dtype}, got {t.dtype} {tuple(t.shape)}")
    for name, t, shape, dtype in (("head_mode", head_mode, (B, H), torch.int32),
                                  ("mode_table", mode_table, (B, H), torch.int32), ("slot", slot, (B, H), torch.int32),
                                  ("is_whole", is_whole, (B, H), torch.bool), ("seq_lens", seq_lens, (B,), torch.int32)):
        if tuple(t.shape) != shape or t.dtype != dtype:
            fail(f"{name} must be {str(dtype)[6:]} {list(shape)}, got {t.dtype} {tuple(t.shape)}")
    if (cu_seqlens is None) != (token_index is None):
        fail("cu_seqlens and token_index come together (a padded prompt) or not at all")
    if not isinstance(sink, int) or not 0 <= sink < stream_k.shape[1]:
        fail(f"sink must be an int in [0, stream_k.shape[1]={stream_k.shape[1]}), got {sink!r}")
    torch.ops.elastic.static_cache_commit(keys, values, head_mode, cu_seqlens, token_index, full_k, full_v,
                                          stream_k, stream_v, mode_table, slot, is_whole, seq_lens, sink=sink)


@torch.library.register_fake("elastic::decode_attention")
def _decode_attention_fake(q, full_k, full_v, stream_k, stream_v, head_mode, slot, seq_lens, *, sink, window,
                           scale=None, num_splits=0):
    _check_one_device("decode_attention", q, full_k=full_k, full_v=full_v, stream_k=stream_k, stream_v=stream_v,
                      head_mode=head_mode, slot=slot, seq_lens=seq_lens)
    B, Sq, Hq, _ = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, Hq, Sq), dtype=lse_dtype)


torch.library.register_kernel("elastic::decode_attention", "cpu", decode_attention_cpu)


@torch.library.register_fake("elastic::static_cache_commit")
def _static_cache_commit_fake(keys, values, head_mode, cu_seqlens, token_index, full_k, full_v, stream_k, stream_v,
                              mode_table, slot, is_whole, seq_lens, *, sink):
    _check_one_device("static_cache_commit", keys, values=values, head_mode=head_mode, full_k=full_k,
                      stream_k=stream_k, mode_table=mode_table, slot=slot, is_whole=is_whole, seq_lens=seq_lens)


torch.library.register_kernel("elastic::static_cache_commit", "cpu", static_cache_commit_cpu)
