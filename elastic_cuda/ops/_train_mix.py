"""elastic::train_mix, the router-training mix O = z O_FA + (1 - z) O_SA as one op: its front, its composite kernel
over elastic::attention (CPU and CUDA), fake kernels, and the autograd that gives dq, dk, dv and dz with one backward
per head where z is hard."""
from __future__ import annotations

import torch

from ._attention import _fail, validate_attention_args
from ._checks import _CUDA_DTYPES, BLOCK, FULL, STREAM, _check_one_device, _lse_shape
from ._options import _kernel_option


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
