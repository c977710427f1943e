"""elastic::attention: the front users call (argument checks naming the argument, cached per signature), its fake
kernels and its autograd (the backward is elastic::attention_backward)."""
from __future__ import annotations

import math

import torch

from .._ext import has_cuda_kernels
from ._checks import (_CUDA_DTYPES, _CUDA_HEAD_DIMS, _SM90_KEY_TILE, BLOCK, MODE_NAMES, STRATEGIES, _call_op,
                      _check_device_kernels, _check_one_device, _is_int, _lse_shape, _values_readable)


def _fail(msg: str):
    raise ValueError("elastic_cuda.attention: " + msg)


def hopper_backward_serves(q, *, block_size: int | None = None) -> bool:
    """Whether the attention backward of q's shape runs as the Hopper kernel (sm_90a wgmma + TMA,
    csrc/attention/sm90/attention_bwd_sm90_*) rather than the mma.sync one. block_size: the BLOCK mask's block size
    when the call has a mask (None: no mask).

    The Python statement of use_sm90_backward (csrc/attention/attention_fused_cuda.cu), for callers that choose a
    path by it: a CUDA build and a 16-bit q of head_dim 64 / 128 (the kernels' instances, ELASTIC_DTYPE_HEADDIM_SWITCH),
    block_size % 128 == 0 with a mask (its 128-wide key tiles), and a device of compute capability 9.x
    (sm90a_body_runnable; the default builds, TORCH_CUDA_ARCH_LIST "8.0;9.0a" / CMake "90a;80", carry the sm_90a body).
    Not mirrored: the timing-only switch ELASTIC_CUDA_SM90_BWD=0 (an A/B of the kernel should keep the caller's path
    fixed) and the launch's own fallbacks: a TMA tensor map that cannot be built (the C++ front copies rows that are not
    16-byte aligned, rows_aligned in attention_cuda_api.cpp, so this needs > 2^32 rows) or > 65535 batches / key
    tiles (> 8M keys)."""
    if not isinstance(q, torch.Tensor) or q.device.type != "cuda" or not has_cuda_kernels():
        return False
    if q.dtype not in _CUDA_DTYPES or q.dim() == 0 or q.shape[-1] not in _CUDA_HEAD_DIMS:
        return False
    if block_size is not None and block_size % _SM90_KEY_TILE != 0:
        return False
    return torch.cuda.get_device_capability(q.device)[0] == 9


def validate_attention_args(q, k, v, head_mode, *, sink, window, block_mask, block_size, scale,
                            cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, strategy="auto"):
    """Raise ValueError naming the offending argument, without a device sync: shapes, dtypes and devices
    always; head_mode and cu_seqlens values only when they live on the CPU (reading them there is free) and
    not while torch.compile traces (values are unknown then; the kernels check them at run time). On CUDA a
    head with an invalid mode gets NaN output instead (README), so no host sync is ever needed.

    Not cached per argument signature: measured on the CPU (SmolLM2 layer shapes), a hashable key of what these
    checks read (type, shape, dtype, device, last stride of 4-7 tensors, the settings) costs ~3.2 us to build and
    ~0.6 us to look up, the checks themselves ~4.7 us: no gain worth a cache that must never skip a new input."""
    for name, t in (("q", q), ("k", k), ("v", v), ("head_mode", head_mode)):
        if not isinstance(t, torch.Tensor):
            _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    if varlen and (cu_seqlens_q is None or cu_seqlens_k is None):
        _fail("cu_seqlens_q and cu_seqlens_k must be given together")
    rank = 3 if varlen else 4
    lq, lkv = ("[total_q, Hq, D]", "[total_k, Hkv, D]") if varlen else ("[B, Sq, Hq, D]", "[B, Skv, Hkv, D]")
    if q.dim() != rank:
        _fail(f"q must have shape {lq}, got {tuple(q.shape)}")
    if k.dim() != rank:
        _fail(f"k must have shape {lkv}, got {tuple(k.shape)}")
    if v.shape != k.shape:
        _fail(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        _fail(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device != k.device or q.device != v.device:
        _fail(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            _fail(f"{name} must be contiguous in the last (head_dim) dimension, got strides {t.stride()}")
    if q.shape[-1] == 0:
        _fail(f"head_dim (q.shape[-1]) must be > 0, got shape {tuple(q.shape)}")
    dev = q.device.type
    _check_device_kernels(q, q.shape[-1], _fail, "q/k/v dtype")
    if k.shape[-1] != q.shape[-1]:
        _fail(f"k head_dim {k.shape[-1]} != q head_dim {q.shape[-1]}")
    Hq, Hkv = q.shape[-2], k.shape[-2]
    if Hkv == 0 or Hq % Hkv != 0:
        _fail(f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv}) for GQA")
    if varlen:
        for name, c in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            if not isinstance(c, torch.Tensor) or c.dim() != 1 or c.dtype != torch.int32:
                _fail(f"{name} must be an int32 tensor of shape [B+1]")
            if c.device != q.device:
                _fail(f"{name} must be on the device of q ({q.device}), got {c.device}")
        if cu_seqlens_q.numel() != cu_seqlens_k.numel() or cu_seqlens_q.numel() < 2:
            _fail("cu_seqlens_q and cu_seqlens_k must both have B+1 >= 2 entries")
        for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
            if not _is_int(m) or m <= 0:
                _fail(f"varlen needs max_seqlen_q > 0 and max_seqlen_k > 0 (ints), got {name}={m!r}")
        B, Skv_max = cu_seqlens_q.numel() - 1, max_seqlen_k
    else:
        B, Sq, Skv = q.shape[0], q.shape[1], k.shape[1]
        if k.shape[0] != B:
            _fail(f"k batch {k.shape[0]} != q batch {B}")
        if Sq > Skv:
            _fail(f"q length ({Sq}) must not exceed k/v length ({Skv}); queries are the last Sq positions")
        Skv_max = Skv
    if tuple(head_mode.shape) != (B, Hkv):
        _fail(f"head_mode must have shape [B, Hkv] = [{B}, {Hkv}], got {tuple(head_mode.shape)}")
    if head_mode.dtype != torch.int32:
        _fail(f"head_mode must be int32, got {head_mode.dtype}")
    if head_mode.device != q.device:
        _fail(f"head_mode must be on the device of q ({q.device}), got {head_mode.device}")
    if not isinstance(sink, int) or sink < 0:
        _fail(f"sink must be an int >= 0, got {sink!r}")
    if not isinstance(window, int) or window < 0:
        _fail(f"window must be an int >= 0, got {window!r}")
    if not isinstance(block_size, int) or block_size <= 0:
        _fail(f"block_size must be an int > 0, got {block_size!r}")
    if block_mask is not None:
        nb = -(-Skv_max // block_size)
        if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool:
            _fail("block_mask must be a bool tensor")
        if block_mask.device != q.device:
            _fail(f"block_mask must be on the device of q ({q.device}), got {block_mask.device}")
        if block_mask.dim() != 4 or block_mask.shape[0] != B or block_mask.shape[1] not in (Hkv, Hq) \
                or block_mask.shape[2] != nb or block_mask.shape[3] != nb:
            _fail(f"block_mask must have shape [B, Hkv or Hq, NB, NB] = [{B}, {Hkv} or {Hq}, {nb}, {nb}] "
                  f"(NB = ceil(Skv / block_size)), got {tuple(block_mask.shape)}")
    if block_mask is not None and dev == "cuda" and block_size % 64 != 0:
        _fail(f"block_size must be a multiple of 64 on CUDA (the kernels' key tile), got {block_size}")
    if scale is not None and (not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0):
        _fail(f"scale must be a positive finite float, got {scale!r}")
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        _fail(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if dev == "cpu" and _values_readable(head_mode):
        _check_head_mode_values(head_mode, block_mask)
        if varlen and _values_readable(cu_seqlens_q) and _values_readable(cu_seqlens_k):
            _check_cu_seqlens_values(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k)


def _check_head_mode_values(head_mode, block_mask):
    """CPU head_mode: every value a mode, and a block_mask wherever a head is BLOCK (the CPU kernel's checks)."""
    # [B, Hkv] is small: a list is cheaper than tensor reductions (flattened in Python: no view op)
    modes = [m for row in head_mode.tolist() for m in row] if head_mode.dim() == 2 else head_mode.flatten().tolist()
    for i, m in enumerate(modes):
        if m not in MODE_NAMES:
            _fail(f"head_mode values must be 0 (FULL), 1 (STREAM) or 2 (BLOCK), got {m} at flat index {i}")
    if block_mask is None and BLOCK in modes:
        _fail("head_mode has a BLOCK (2) head but block_mask is None")


def _check_cu_seqlens_values(cu_q, cu_k, total_q, total_k, max_seqlen_q, max_seqlen_k):
    """CPU cu_seqlens: start >= 0, non-decreasing, within the packed tokens, and per sequence Sq <= Skv and
    within max_seqlen_q/k (which size the CUDA grid: a smaller one would silently drop rows there). Rows before
    cu_seqlens[0] or after cu_seqlens[-1] belong to no sequence (padding: out 0, lse -inf)."""
    a, c = cu_q.tolist(), cu_k.tolist()
    for name, cu, total, what in (("cu_seqlens_q", a, total_q, "q"), ("cu_seqlens_k", c, total_k, "k/v")):
        if cu[0] < 0:
            _fail(f"cu_seqlens_q and cu_seqlens_k must start at >= 0, got {name}[0] = {cu[0]}")
        for b in range(len(cu) - 1):
            if cu[b + 1] < cu[b]:
                _fail(f"{name} must be non-decreasing, got {name}[{b}] = {cu[b]} > {name}[{b + 1}] = {cu[b + 1]}")
        if cu[-1] > total:
            _fail(f"{name}[-1] = {cu[-1]} exceeds the {total} tokens of {what}")
    for b in range(len(a) - 1):
        len_q, len_k = a[b + 1] - a[b], c[b + 1] - c[b]
        if len_q > len_k:
            _fail(f"sequence {b} has {len_q} queries but {len_k} keys (cu_seqlens_q / cu_seqlens_k); queries are "
                  "the last Sq positions of their sequence, so Sq must not exceed Skv")
        if len_q > max_seqlen_q:
            _fail(f"sequence {b} has {len_q} queries, more than max_seqlen_q = {max_seqlen_q}")
        if len_k > max_seqlen_k:
            _fail(f"sequence {b} has {len_k} keys, more than max_seqlen_k = {max_seqlen_k}")


# Signatures (_attention_signature) of attention() calls whose argument checks passed: a call with one of them runs
# only the checks that read values (a CPU head_mode's). Bounded: cleared when full (shapes of a serving mix).
_VALIDATED_SIGNATURES: set = set()
_VALIDATED_SIGNATURES_MAX = 256


def _attention_signature(q, k, v, head_mode, block_mask, sink, window, block_size, scale, strategy):
    """Everything validate_attention_args reads of an unpadded call except tensor values, as a hashable key; None
    for what it does not cover (tensor subclasses such as fake tensors, a non-tensor block_mask).

    Why a cache, measured on the CPU (SmolLM2-135M layer, all_full, attention kernel stubbed): the checks are ~6 us
    of an ~18 us call replayed alone, but inside a forward, where the model's other work evicts this code from the
    CPU caches, the call costs ~150-200 us and every line of Python counts several times over; a prefill on a GPU
    is host-bound on the same code (#15). The key (~25 attribute reads and one hash) replaces ~60 lines of checks.
    Types are part of the key (sink=1.0 must not pass as a validated sink=1)."""
    T = torch.Tensor
    if type(q) is not T or type(k) is not T or type(v) is not T or type(head_mode) is not T:
        return None
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:  # (stride(-1) of a 0-d tensor raises: validate names it)
        return None
    if block_mask is None:
        mask_key = None
    elif type(block_mask) is T:
        mask_key = (block_mask.shape, block_mask.dtype, block_mask.device)
    else:
        return None
    return (q.shape, k.shape, v.shape, q.stride(-1), k.stride(-1), v.stride(-1), q.dtype, k.dtype, v.dtype,
            q.device, k.device, v.device, head_mode.shape, head_mode.dtype, head_mode.device, mask_key,
            type(sink), sink, type(window), window, type(block_size), block_size, type(scale), scale,
            type(strategy), strategy)


def attention(q, k, v, head_mode, *, sink: int = 128, window: int = 2048, block_mask=None,
              block_size: int = 128, scale: float | None = None, cu_seqlens_q=None, cu_seqlens_k=None,
              max_seqlen_q: int | None = None, max_seqlen_k: int | None = None, strategy: str = "auto",
              return_lse: bool = False):
    """Hybrid attention where each (batch element, KV head) runs in its own mode.

    q [B, Sq, Hq, D], k/v [B, Skv, Hkv, D] (or packed [T, H, D] with cu_seqlens_q/k int32 [B+1]),
    head_mode int32 [B, Hkv] with 0 FULL / 1 STREAM / 2 BLOCK. Returns out (like q), and lse
    (float32 [B, Hq, Sq] or [Hq, Tq]; float64 for float64 inputs) when return_lse=True.
    """
    signature = None
    if cu_seqlens_q is None and cu_seqlens_k is None and not torch.compiler.is_compiling():
        signature = _attention_signature(q, k, v, head_mode, block_mask, sink, window, block_size, scale, strategy)
    if signature is None or signature not in _VALIDATED_SIGNATURES:
        validate_attention_args(q, k, v, head_mode, sink=sink, window=window, block_mask=block_mask,
                                block_size=block_size, scale=scale, cu_seqlens_q=cu_seqlens_q,
                                cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                                strategy=strategy)
        if signature is not None:
            if len(_VALIDATED_SIGNATURES) >= _VALIDATED_SIGNATURES_MAX:
                _VALIDATED_SIGNATURES.clear()
            _VALIDATED_SIGNATURES.add(signature)
    elif q.device.type == "cpu":  # the values of a CPU head_mode change between calls: checked on every call
        _check_head_mode_values(head_mode, block_mask)
    out, lse = _call_op(
        torch.ops.elastic.attention, q, k, v, head_mode, block_mask, cu_seqlens_q, cu_seqlens_k, sink=sink,
        window=window,
        block_size=block_size, scale=None if scale is None else float(scale), max_seqlen_q=max_seqlen_q or 0,
        max_seqlen_k=max_seqlen_k or 0, strategy=strategy)
    return (out, lse) if return_lse else out


@torch.library.register_fake("elastic::attention")
def _attention_fake(q, k, v, head_mode, block_mask=None, cu_seqlens_q=None, cu_seqlens_k=None, *, sink=128,
                    window=2048, block_size=128, scale=None, max_seqlen_q=0, max_seqlen_k=0, strategy="auto"):
    _check_one_device("attention", q, k=k, v=v, head_mode=head_mode, block_mask=block_mask,
                      cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    # lse is fp32, except fp64 for fp64 inputs (CPU only) so that gradcheck through lse is exact.
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.empty_like(q), q.new_empty(_lse_shape(q, cu_seqlens_q), dtype=lse_dtype)


@torch.library.register_fake("elastic::attention_backward")
def _attention_backward_fake(grad_out, grad_lse, q, k, v, out, lse, head_mode, block_mask=None, cu_seqlens_q=None,
                             cu_seqlens_k=None, *, sink=128, window=2048, block_size=128, scale=None,
                             max_seqlen_q=0, max_seqlen_k=0):
    _check_one_device("attention_backward", q, grad_out=grad_out, grad_lse=grad_lse, k=k, v=v, out=out, lse=lse,
                      head_mode=head_mode, block_mask=block_mask, cu_seqlens_q=cu_seqlens_q,
                      cu_seqlens_k=cu_seqlens_k)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_KW = ("sink", "window", "block_size", "scale", "max_seqlen_q", "max_seqlen_k")


def _attention_setup_context(ctx, inputs, keyword_only_inputs, output):
    q, k, v, head_mode = inputs[:4]
    block_mask, cu_q, cu_k = (list(inputs[4:]) + [None, None, None])[:3]
    out, lse = output
    ctx.kw = {name: keyword_only_inputs[name] for name in _KW if name in keyword_only_inputs}
    ctx.save_for_backward(q, k, v, out, lse, head_mode, block_mask, cu_q, cu_k)


def _attention_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, head_mode, block_mask, cu_q, cu_k = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.elastic.attention_backward(grad_out.contiguous(), grad_lse, q, k, v, out, lse,
                                                      head_mode, block_mask, cu_q, cu_k, **ctx.kw)
    return dq, dk, dv, None, None, None, None


torch.library.register_autograd("elastic::attention", _attention_backward,
                                setup_context=_attention_setup_context)
