"""Thin Python front of the elastic:: operators: input validation, autograd and fake kernels.

`attention` is the function users call; `torch.ops.elastic.attention` is the raw operator (it
checks its arguments again in C++). Gradients flow to q, k and v in every head mode through
`torch.library.register_autograd`; fake kernels let `torch.compile(fullgraph=True)` trace it.
"""
from __future__ import annotations

import math

import torch
from torch._subclasses.fake_tensor import is_fake

from ._decode_cpu import decode_attention_cpu, static_cache_commit_cpu
from ._ext import has_cuda_kernels

FULL, STREAM, BLOCK = 0, 1, 2
MODE_NAMES = {FULL: "full", STREAM: "stream", BLOCK: "block"}
STRATEGIES = ("auto", "fused", "grouped", "grouped_cudnn")

_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_CUDA_DTYPES = (torch.float16, torch.bfloat16)
_CUDA_HEAD_DIMS = (64, 128)
_SM90_KEY_TILE = 128  # kSm90BlockN: the Hopper kernels' key tile, which a BLOCK mask's block_size must divide into

__all__ = [
    "FULL",
    "STREAM",
    "BLOCK",
    "attention",
    "boundary_pool",
    "decode_attention",
    "has_cuda_kernels",
    "hopper_backward_serves",
    "reload_kernel_options",
    "router_decision",
    "static_cache_commit",
    "train_mix",
    "validate_attention_args",
    "xattn_block_mask",
    "validate_decode_args",
]


def _fail(msg: str):
    raise ValueError("elastic_cuda.attention: " + msg)


def _check_device_kernels(q, head_dim, fail, what):
    """The dtype / head_dim / build that the kernels of q's device take (one statement for every op front)."""
    dev = q.device.type
    if dev == "cuda":
        if q.dtype not in _CUDA_DTYPES:
            fail(f"{what} on CUDA must be float16 or bfloat16, got {q.dtype}")
        if head_dim not in _CUDA_HEAD_DIMS:
            fail(f"head_dim (q.shape[-1]) on CUDA must be one of {_CUDA_HEAD_DIMS}, got {head_dim}")
        if not has_cuda_kernels():
            fail("q is on CUDA but this build of elastic_cuda has no CUDA kernels (rebuild with a CUDA toolkit)")
    elif dev == "cpu":
        if q.dtype not in _CPU_DTYPES:
            fail(f"{what} on CPU must be float32, float64 or bfloat16, got {q.dtype}")
    else:
        fail(f"q must be on CPU or CUDA, got device {q.device}")


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


def _call_op(op, *args, **kwargs):
    """op(*args, **kwargs); with grad mode off, dispatched below autograd directly. An op with a Python autograd
    registration (torch.library.register_autograd) otherwise runs a Python autograd kernel on every call that, with
    grad off, only does this same redispatch below autograd: ~15 us of host time per call measured on the CPU, twice
    per layer of an elastic prefill (the attention and the router's boundary pool), where a GPU prefill is
    launch-bound (#14 / #15). Not while torch.compile traces (it sees the plain call)."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return op(*args, **kwargs)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args, **kwargs)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _values_readable(t) -> bool:
    """Whether a CPU tensor's values exist now: not while torch.compile traces, not for fake tensors (shape
    propagation), where reading them would fail; the kernels check them when the call really runs."""
    return not torch.compiler.is_compiling() and not is_fake(t)


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


def train_mix(q, k, v, z, sparse_mode: int, *, sink: int = 128, window: int = 2048, block_mask=None,
              block_size: int = 128, scale: float | None = None, cu_seqlens_q=None, cu_seqlens_k=None,
              max_seqlen_q: int | None = None, max_seqlen_k: int | None = None, strategy: str = "auto",
              return_branches: bool = False):
    """The router-training mix O = z * O_FA + (1 - z) * O_SA per (sample, KV head) as one op (method-digest
    section 2): O_FA runs every head FULL, O_SA every head in `sparse_mode` (STREAM, or BLOCK with block_mask).

    z: float [B, Hkv], the routing of each KV head (1 = FULL), normally the hard 0/1 of a straight-through router.
    Gradients reach q, k, v and z (dz = sum(dO * (O_FA - O_SA)) over the head's rows); where z is exactly 0 or 1
    the backward runs that head only in the branch z weighs, so a routed batch pays one backward per head (FULL
    or sparse), not two. Layouts as `attention`. Returns out, and with return_branches=True also
    (out_full, lse_full, out_sparse, lse_sparse), which carry no gradient."""
    if not isinstance(z, torch.Tensor):
        _fail(f"z must be a torch.Tensor, got {type(z).__name__}")
    if not isinstance(sparse_mode, int) or sparse_mode not in (STREAM, BLOCK):
        _fail(f"sparse_mode must be {STREAM} (STREAM) or {BLOCK} (BLOCK), got {sparse_mode!r}")
    if sparse_mode == BLOCK and block_mask is None:
        _fail("sparse_mode BLOCK needs a block_mask")
    B = (cu_seqlens_q.numel() - 1) if isinstance(cu_seqlens_q, torch.Tensor) else (q.shape[0] if q.dim() else 0)
    Hkv = k.shape[-2] if isinstance(k, torch.Tensor) and k.dim() >= 2 else 0
    if z.dim() != 2 or tuple(z.shape) != (B, Hkv):
        _fail(f"z must have shape [B, Hkv] = [{B}, {Hkv}], got {tuple(z.shape)}")
    if not z.is_floating_point():
        _fail(f"z must be a floating-point tensor, got {z.dtype}")
    if isinstance(q, torch.Tensor) and z.device != q.device:
        _fail(f"z must be on the device of q ({q.device}), got {z.device}")
    sparse_modes = torch.full((B, Hkv), sparse_mode, dtype=torch.int32, device=z.device)
    validate_attention_args(q, k, v, sparse_modes, sink=sink, window=window, block_mask=block_mask,
                            block_size=block_size, scale=scale, cu_seqlens_q=cu_seqlens_q,
                            cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                            strategy=strategy)
    outs = torch.ops.elastic.train_mix(
        q, k, v, z, block_mask, cu_seqlens_q, cu_seqlens_k, sparse_mode=sparse_mode, sink=sink, window=window,
        block_size=block_size, scale=None if scale is None else float(scale), max_seqlen_q=max_seqlen_q or 0,
        max_seqlen_k=max_seqlen_k or 0, strategy=strategy)
    return outs if return_branches else outs[0]


def reload_kernel_options() -> str:
    """Read the A/B-timing switches of the CUDA kernels (ELASTIC_CUDA_SM90, ELASTIC_SM90_*: README, "Tuning
    switches") from the environment again and return the options now in effect, e.g. "sm90=1 stages=3 tma=0 ...".

    The extension reads them once per process, at its first CUDA attention call; tests and benchmarks that
    change them call this afterwards. A value other than the documented ones raises RuntimeError naming the
    variable. Not needed (and not meant) for normal use: the defaults are the product."""
    global _KERNEL_OPTIONS
    described = torch.ops.elastic.reload_kernel_options()
    _KERNEL_OPTIONS = _parse_options(described)
    return described


_KERNEL_OPTIONS: dict | None = None  # the switches in effect as Python reads them (_kernel_option)


def _parse_options(described: str) -> dict:
    return dict(item.split("=", 1) for item in described.split())


def _kernel_option(name: str) -> str:
    """The value of one switch of csrc/attention/kernel_options.h as the extension holds it ("0" / "1" ...), read
    from the extension once per process (the C++ side reads the environment once, too) and again by
    reload_kernel_options()."""
    global _KERNEL_OPTIONS
    if _KERNEL_OPTIONS is None:
        _KERNEL_OPTIONS = _parse_options(torch.ops.elastic.kernel_options())
    return _KERNEL_OPTIONS[name]


def boundary_pool(keys, *, n_first: int = 100, n_last: int = 100, cu_seqlens=None):
    """Mean of the first n_first and last n_last tokens per sequence and KV head (overlap counted once).

    keys [B, S, Hkv, D] (or [T, Hkv, D] with cu_seqlens) -> float32 [B, Hkv, D] (float64 for float64 keys)."""
    if not isinstance(keys, torch.Tensor):
        raise ValueError(f"elastic_cuda.boundary_pool: keys must be a torch.Tensor, got {type(keys).__name__}")
    if keys.dim() != (3 if cu_seqlens is not None else 4):
        raise ValueError("elastic_cuda.boundary_pool: keys must have shape [B, S, Hkv, D] "
                         f"(or [T, Hkv, D] with cu_seqlens), got {tuple(keys.shape)}")
    if not _is_int(n_first) or not _is_int(n_last) or n_first < 0 or n_last < 0 or n_first + n_last == 0:
        raise ValueError(f"elastic_cuda.boundary_pool: n_first/n_last must be ints >= 0 and not both 0, got "
                         f"{n_first!r}, {n_last!r}")
    if not keys.is_floating_point():
        raise ValueError(f"elastic_cuda.boundary_pool: keys must be floating point, got {keys.dtype}")
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32 \
                or cu_seqlens.numel() < 2:
            raise ValueError("elastic_cuda.boundary_pool: cu_seqlens must be an int32 tensor of shape [B+1], B >= 1")
        if cu_seqlens.device != keys.device:
            raise ValueError(f"elastic_cuda.boundary_pool: cu_seqlens must be on the device of keys ({keys.device}), "
                             f"got {cu_seqlens.device}")
        if cu_seqlens.device.type == "cpu" and _values_readable(cu_seqlens):
            cu = cu_seqlens.tolist()
            if cu[0] < 0 or any(b < a for a, b in zip(cu, cu[1:])) or cu[-1] > keys.shape[0]:
                raise ValueError(f"elastic_cuda.boundary_pool: cu_seqlens must start at >= 0, be non-decreasing and "
                                 f"stay within the {keys.shape[0]} tokens of keys, got {cu}")
    return _call_op(torch.ops.elastic.boundary_pool, keys, cu_seqlens, n_first=n_first, n_last=n_last)


def router_decision(keys, mlp, *, cu_seqlens=None, input_mean=None, input_std=None, head_bias=None, shift=None,
                    n_first: int = 100, n_last: int = 100, shift_value: float = 0.0, sparse_mode: int = STREAM):
    """An eval router's whole decision in one op (schema: csrc/ops.cpp; AttentionRouter.route_fused builds the
    arguments): boundary pool of keys [B, S, Hkv, D] (or [T, Hkv, D] with cu_seqlens), optional standardisation,
    the five Linear layers in mlp (weight, bias of each), optional head_bias, then FULL where
    logit_full - logit_sparse > shift ([B] float32) or shift_value, else sparse_mode. Returns (head_mode int32
    [B, Hkv], logits [B, Hkv, 2]).

    A decision, not differentiable: dispatched below autograd whatever the grad mode (the router's parameters may
    require grad; the outputs never do). Arguments are checked in C++ (RuntimeError naming the argument): this
    front stays a dispatch, for the prefill of a small model, which is host-bound on a GPU (#15)."""
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.elastic.router_decision(keys, cu_seqlens, mlp, input_mean, input_std, head_bias, shift,
                                                 n_first=n_first, n_last=n_last, shift_value=shift_value,
                                                 sparse_mode=sparse_mode)


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


# ----------------------------------------------------------------------------- fake kernels
def _lse_shape(q, cu_seqlens_q):
    if cu_seqlens_q is not None:
        return (q.shape[1], q.shape[0])
    return (q.shape[0], q.shape[2], q.shape[1])


def _check_one_device(op, q, **tensors):
    """A call mixing 'meta' with real tensors dispatches here (Meta wins) instead of a real kernel,
    which would silently return an empty tensor on q's device: refuse it, naming the argument."""
    for name, t in tensors.items():
        if t is not None and t.device != q.device:
            raise ValueError(f"elastic_cuda.{op}: {name} must be on the device of q ({q.device}), got {t.device}")


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


@torch.library.register_fake("elastic::boundary_pool")
def _boundary_pool_fake(keys, cu_seqlens=None, *, n_first=100, n_last=100):
    B = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else keys.shape[0]
    dtype = torch.float64 if keys.dtype == torch.float64 else torch.float32
    return keys.new_empty((B, keys.shape[-2], keys.shape[-1]), dtype=dtype)


@torch.library.register_fake("elastic::router_decision")
def _router_decision_fake(keys, cu_seqlens, mlp, input_mean=None, input_std=None, head_bias=None, shift=None, *,
                          n_first=100, n_last=100, shift_value=0.0, sparse_mode=STREAM):
    B = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else keys.shape[0]
    H = keys.shape[-2]
    return keys.new_empty((B, H), dtype=torch.int32), keys.new_empty((B, H, 2), dtype=mlp[0].dtype)


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


# ----------------------------------------------------------------------------- autograd
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


def _boundary_pool_setup_context(ctx, inputs, keyword_only_inputs, output):
    keys = inputs[0]
    cu_seqlens = inputs[1] if len(inputs) > 1 else None
    ctx.kw = dict(keyword_only_inputs)
    ctx.keys_meta = (keys.shape, keys.dtype)
    ctx.save_for_backward(cu_seqlens)


def _boundary_pool_backward(ctx, grad_pooled):
    # pooled = sum_{t in W} k_t / |W|, so dk_t = grad / |W| for t in W. Pooling a tensor of ones
    # gives |W|-normalised weights per token without re-deriving the window rule here.
    shape, dtype = ctx.keys_meta
    (cu_seqlens,) = ctx.saved_tensors
    n_first, n_last = ctx.kw.get("n_first", 100), ctx.kw.get("n_last", 100)
    weights = _boundary_weights(shape, cu_seqlens, n_first, n_last, grad_pooled.device)  # [.., S or T] fp32
    if cu_seqlens is None:
        g = weights[:, :, None, None] * grad_pooled[:, None, :, :]
    else:
        seq_of_token = torch.bucketize(torch.arange(shape[0], device=grad_pooled.device), cu_seqlens[1:].long(),
                                       right=True)
        g = weights[:, None, None] * grad_pooled[seq_of_token]
    return g.to(dtype), None


def _boundary_weights(shape, cu_seqlens, n_first, n_last, device):
    """Per-token weight 1/|W| inside the boundary window W of its sequence, 0 elsewhere."""
    if cu_seqlens is None:
        S = shape[1]
        t = torch.arange(S, device=device)
        inside = (t < n_first) | (t >= S - n_last)
        w = inside.float() / inside.sum().clamp_min(1).float()
        return w.unsqueeze(0).expand(shape[0], S)
    starts, ends = cu_seqlens[:-1].long(), cu_seqlens[1:].long()
    t = torch.arange(shape[0], device=device)
    seq = torch.bucketize(t, ends, right=True)
    pos = t - starts[seq]
    length = (ends - starts)[seq]
    inside = (pos < n_first) | (pos >= length - n_last)
    count = torch.minimum(ends - starts, torch.full_like(ends, n_first + n_last))
    return inside.float() / count[seq].clamp_min(1).float()


torch.library.register_autograd("elastic::boundary_pool", _boundary_pool_backward,
                                setup_context=_boundary_pool_setup_context)


# ----------------------------------------------------------------------------- the training mix (composite)
def _token_batch(cu_seqlens, total, device):
    """int64 [total]: the sample of each packed token (no host sync)."""
    return torch.bucketize(torch.arange(total, device=device), cu_seqlens[1:].long(), right=True)


def _z_rows(z, like, cu_seqlens_q):
    """z [B, Hkv] broadcast against an output `like` ([B, Sq, Hq, D] or packed [Tq, Hq, D]); query heads of a GQA
    group follow their KV head (contiguous groups, as HF repeat_kv)."""
    group = like.shape[-2] // z.shape[1]
    zh = z.to(like.dtype).repeat_interleave(group, dim=1)            # [B, Hq]
    if cu_seqlens_q is None:
        return zh[:, None, :, None]
    return zh[_token_batch(cu_seqlens_q, like.shape[0], like.device)][:, :, None]


def _train_mix_impl(q, k, v, z, block_mask=None, cu_seqlens_q=None, cu_seqlens_k=None, *, sparse_mode, sink=128,
                    window=2048, block_size=128, scale=None, max_seqlen_q=0, max_seqlen_k=0, strategy="auto"):
    B, Hkv = z.shape
    kw = dict(sink=sink, window=window, scale=scale, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
              strategy=strategy)
    full = torch.full((B, Hkv), FULL, dtype=torch.int32, device=q.device)
    sparse = torch.full((B, Hkv), sparse_mode, dtype=torch.int32, device=q.device)
    out_full, lse_full = torch.ops.elastic.attention(q, k, v, full, None, cu_seqlens_q, cu_seqlens_k,
                                                     block_size=block_size, **kw)
    out_sparse, lse_sparse = torch.ops.elastic.attention(q, k, v, sparse, block_mask, cu_seqlens_q, cu_seqlens_k,
                                                         block_size=block_size, **kw)
    if _mix_fused(out_full):  # one pass: reads both branches once, z in fp32
        out = torch.ops.elastic.train_mix_combine(out_full, out_sparse, z, cu_seqlens_q)
    else:
        zr = _z_rows(z, out_full, cu_seqlens_q)
        out = zr * out_full + (1 - zr) * out_sparse
    return out, out_full, lse_full, out_sparse, lse_sparse


for _device in ("cpu", "cuda"):
    torch.library.register_kernel("elastic::train_mix", _device, _train_mix_impl)


@torch.library.register_fake("elastic::train_mix")
def _train_mix_fake(q, k, v, z, block_mask=None, cu_seqlens_q=None, cu_seqlens_k=None, *, sparse_mode, sink=128,
                    window=2048, block_size=128, scale=None, max_seqlen_q=0, max_seqlen_k=0, strategy="auto"):
    _check_one_device("train_mix", q, k=k, v=v, z=z, block_mask=block_mask, cu_seqlens_q=cu_seqlens_q,
                      cu_seqlens_k=cu_seqlens_k)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse_shape = _lse_shape(q, cu_seqlens_q)
    return (torch.empty_like(q), torch.empty_like(q), q.new_empty(lse_shape, dtype=lse_dtype), torch.empty_like(q),
            q.new_empty(lse_shape, dtype=lse_dtype))


@torch.library.register_fake("elastic::train_mix_combine")
def _train_mix_combine_fake(full, sparse, z, cu_seqlens=None):
    _check_one_device("train_mix_combine", full, sparse=sparse, z=z, cu_seqlens=cu_seqlens)
    return torch.empty_like(full, memory_format=torch.contiguous_format)


@torch.library.register_fake("elastic::train_mix_dz")
def _train_mix_dz_fake(grad_out, out_full, out_sparse, cu_seqlens_q=None, *, kv_heads, max_seqlen_q=0):
    _check_one_device("train_mix_dz", grad_out, out_full=out_full, out_sparse=out_sparse, cu_seqlens_q=cu_seqlens_q)
    B = cu_seqlens_q.shape[0] - 1 if cu_seqlens_q is not None else grad_out.shape[0]
    dtype = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    return grad_out.new_empty((B, kv_heads), dtype=dtype)


def _mix_fused(t) -> bool:
    """Whether the training mix's elementwise work on t's device and dtype runs as the fused kernels
    (elastic::train_mix_combine / train_mix_dz, csrc/train_mix/): CUDA fp16/bf16 unless ELASTIC_TRAIN_MIX_FUSED=0
    (kernel_options.h). CPU and float64 keep the torch expressions (the fused ops' CPU kernels are their spec)."""
    return t.device.type == "cuda" and t.dtype in _CUDA_DTYPES and _kernel_option("train_mix_fused") == "1"


_MIX_KW = ("sink", "window", "block_size", "scale", "max_seqlen_q", "max_seqlen_k")


def _train_mix_setup_context(ctx, inputs, keyword_only_inputs, output):
    q, k, v, z = inputs[:4]
    block_mask, cu_q, cu_k = (list(inputs[4:]) + [None, None, None])[:3]
    _, out_full, lse_full, out_sparse, lse_sparse = output
    ctx.sparse_mode = keyword_only_inputs["sparse_mode"]
    ctx.kw = {name: keyword_only_inputs[name] for name in _MIX_KW if name in keyword_only_inputs}
    ctx.mark_non_differentiable(out_full, lse_full, out_sparse, lse_sparse)
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None, so its branch may be skipped
    ctx.save_for_backward(q, k, v, z, block_mask, cu_q, cu_k, out_full, lse_full, out_sparse, lse_sparse)


def _skipping(mode, keep, block_mask, block_size, skv):
    """The head modes and block mask under which a branch's backward sees exactly the heads `keep` [B, Hkv]
    (bool, on the device): a head left out runs as BLOCK with an empty mask row set, so it sees no key and every
    kernel skips all its tiles and writes zero gradients, with no host sync. `mode` is the branch's mode."""
    B, Hkv = keep.shape
    if mode == BLOCK:
        group = block_mask.shape[1] // Hkv
        mask = block_mask & keep.repeat_interleave(group, dim=1)[:, :, None, None]
        return torch.full((B, Hkv), BLOCK, dtype=torch.int32, device=keep.device), mask, block_size
    modes = torch.where(keep, mode, BLOCK).to(torch.int32)
    # The empty masks' blocks are the kernels' key tile (128), whatever block_size the caller's BLOCK mode uses.
    nb = -(-skv // 128)
    return modes, torch.zeros((B, Hkv, nb, nb), dtype=torch.bool, device=keep.device), 128


def _train_mix_backward(ctx, grad_out, _g_out_full, _g_lse_full, _g_out_sparse, _g_lse_sparse):
    q, k, v, z, block_mask, cu_q, cu_k, out_full, lse_full, out_sparse, lse_sparse = ctx.saved_tensors
    needs_qkv = any(ctx.needs_input_grad[:3])
    if grad_out is None or not (needs_qkv or ctx.needs_input_grad[3]):
        return None, None, None, None, None, None, None
    grad_out = grad_out.contiguous()
    B, Hkv = z.shape
    fused = _mix_fused(grad_out)
    dz = None
    if ctx.needs_input_grad[3] and fused:  # one read of dO, O_FA and O_SA; per-tile partials, no atomics
        dz = torch.ops.elastic.train_mix_dz(grad_out, out_full, out_sparse, cu_q, kv_heads=Hkv,
                                            max_seqlen_q=ctx.kw.get("max_seqlen_q", 0)).to(z.dtype)
    elif ctx.needs_input_grad[3]:
        # dz[b, h] = sum over the rows, query heads of h's group and head dims of dO * (O_FA - O_SA)
        acc = torch.promote_types(grad_out.dtype, torch.float32)  # fp32 for 16-bit outputs, fp64 stays fp64
        prod = (grad_out.to(acc) * (out_full.to(acc) - out_sparse.to(acc))).sum(-1)  # [B, Sq, Hq] / [Tq, Hq]
        if cu_q is None:
            dz = prod.view(B, prod.shape[1], Hkv, -1).sum((1, 3))
        else:
            per_token = prod.view(prod.shape[0], Hkv, -1).sum(-1)                     # [Tq, Hkv]
            dz = per_token.new_zeros(B, Hkv).index_add_(0, _token_batch(cu_q, prod.shape[0], z.device), per_token)
        dz = dz.to(z.dtype)
    dq = dk = dv = None
    if needs_qkv:
        # Fused: each branch's backward takes dO unweighted and train_mix_combine weighs the two branches' gradients
        # (z * g_FA + (1 - z) * g_SA per (sample, KV head), one pass per gradient). The backward is linear in dO (with
        # O and lse fixed), and z is constant over a KV head's query heads, rows and keys, so this is the gradient of
        # the weighted dO; a head a branch skips has exact zero gradients there, weighed by its z of 0 or 1.
        zr = None if fused else _z_rows(z, grad_out, cu_q)
        kw = dict(ctx.kw)
        block_size = kw.pop("block_size", 128)
        skv = k.shape[1] if cu_q is None else kw.get("max_seqlen_k", 0)
        grads = []
        for mode, weight, keep, out, lse in ((FULL, zr, z != 0, out_full, lse_full),
                                             (ctx.sparse_mode, None if fused else 1 - zr, z != 1, out_sparse,
                                              lse_sparse)):
            modes, mask, bs = _skipping(mode, keep, block_mask, block_size, skv)
            g_out = grad_out if fused else (weight * grad_out).contiguous()
            grads.append(torch.ops.elastic.attention_backward(g_out, None, q, k, v, out, lse, modes, mask, cu_q, cu_k,
                                                              block_size=bs, **kw))
        (dq_f, dk_f, dv_f), (dq_s, dk_s, dv_s) = grads
        if fused:
            combine = torch.ops.elastic.train_mix_combine
            dq, dk, dv = (combine(dq_f, dq_s, z, cu_q), combine(dk_f, dk_s, z, cu_k), combine(dv_f, dv_s, z, cu_k))
        else:
            dq, dk, dv = dq_f + dq_s, dk_f + dk_s, dv_f + dv_s
    return dq, dk, dv, dz, None, None, None


torch.library.register_autograd("elastic::train_mix", _train_mix_backward, setup_context=_train_mix_setup_context)
