"""What every op front shares: the head-mode ids, the dtypes and head dims the kernels of each device take, the
dispatch below autograd, and the fake kernels' device check."""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from .._ext import has_cuda_kernels

FULL, STREAM, BLOCK = 0, 1, 2
MODE_NAMES = {FULL: "full", STREAM: "stream", BLOCK: "block"}
STRATEGIES = ("auto", "fused", "grouped", "grouped_cudnn")

_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_CUDA_DTYPES = (torch.float16, torch.bfloat16)
_CUDA_HEAD_DIMS = (64, 128)
_SM90_KEY_TILE = 128  # kSm90BlockN: the Hopper kernels' key tile, which a BLOCK mask's block_size must divide into


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
