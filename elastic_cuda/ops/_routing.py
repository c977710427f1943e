"""The router's ops: elastic::boundary_pool (its input, with autograd for router training) and
elastic::router_decision (an eval router's whole decision)."""
from __future__ import annotations

import torch

from ._checks import STREAM, _call_op, _is_int, _values_readable


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
