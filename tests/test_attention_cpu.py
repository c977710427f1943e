"""CPU kernels of elastic.attention / attention_backward against the float64 pure-PyTorch reference.

Every test draws fresh random inputs (seeded per test, see conftest.gen) and compares every element
of out and lse (and of dq, dk, dv) with elastic_cuda.reference.attention_reference, printing the
max relative error (run with -s to see it).
"""
from __future__ import annotations

import pytest
import torch

import elastic_cuda
from conftest import (BLOCK, FULL, STREAM, make_qkv, make_varlen_qkv, random_block_mask, random_head_mode,
                      rel_err)
from elastic_cuda.reference import attention_reference

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}
# Three samples routed differently: every mode appears at every KV head position of a batch of 3.
ROUTING_B3_H2 = [[FULL, STREAM], [STREAM, BLOCK], [BLOCK, FULL]]


def reference(q, k, v, head_mode, **kw):
    kw = {n: x for n, x in kw.items() if n not in ("max_seqlen_q", "max_seqlen_k", "strategy")}
    return attention_reference(q.detach().double(), k.detach().double(), v.detach().double(), head_mode, **kw)


def check_forward(q, k, v, head_mode, label="", tol=None, **kw):
    """Op (in q's dtype) vs float64 reference on the same (rounded) inputs; returns (out, lse)."""
    out, lse = elastic_cuda.attention(q, k, v, head_mode, return_lse=True, **kw)
    ref_out, ref_lse = reference(q, k, v, head_mode, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.isfinite(out).all()
    err_out, err_lse = rel_err(out, ref_out), rel_err(lse, ref_lse)
    print(f"{label} {q.dtype}: max rel err out {err_out:.2e}, lse {err_lse:.2e}")
    tol = TOL[q.dtype] if tol is None else tol
    assert err_out < tol, f"out rel err {err_out}"
    assert err_lse < tol, f"lse rel err {err_lse}"
    return out, lse


def block_mask_for(B, H, Skv, block_size, gen, **kw):
    return random_block_mask(B, H, Skv, block_size, gen, **kw)


# ----------------------------------------------------------------------------- forward, float64
@pytest.mark.parametrize("S", [1, 7, 100, 129, 300])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("window_vs_s", ["smaller", "larger"])
def test_mixed_routing_matches_reference(S, group, window_vs_s, gen):
    B, Hkv, D, bs = 3, 2, 64, 32
    sink, window = (3, 17) if window_vs_s == "smaller" else (S + 3, S + 10)
    q, k, v = make_qkv(B, S, S, Hkv * group, Hkv, D, gen)
    head_mode = torch.tensor(ROUTING_B3_H2, dtype=torch.int32)
    mask = block_mask_for(B, Hkv, S, bs, gen)
    check_forward(q, k, v, head_mode, f"S={S} G={group} {window_vs_s}", sink=sink, window=window,
                  block_mask=mask, block_size=bs)


@pytest.mark.parametrize("mode", [FULL, STREAM, BLOCK])
@pytest.mark.parametrize("D", [64, 128])
def test_single_mode_matches_reference(mode, D, gen):
    B, S, Hq, Hkv, bs = 2, 300, 6, 2, 64
    q, k, v = make_qkv(B, S, S, Hq, Hkv, D, gen)
    head_mode = torch.full((B, Hkv), mode, dtype=torch.int32)
    mask = block_mask_for(B, Hkv, S, bs, gen) if mode == BLOCK else None
    out, _ = check_forward(q, k, v, head_mode, f"mode={mode} D={D}", sink=16, window=40, block_mask=mask,
                           block_size=bs)
    if mode != FULL:  # the sparse modes really drop keys here, so a mode mix-up would fail
        full = elastic_cuda.attention(q, k, v, torch.zeros_like(head_mode))
        assert rel_err(out, full) > 1e-3


@pytest.mark.parametrize("Sq", [1, 37, 128, 300])
def test_queries_are_last_positions(Sq, gen):
    """Sq < Skv (chunked prefill, decode with Sq=1): causal aligned bottom-right."""
    B, Skv, Hkv, group, D, bs = 3, 300, 2, 3, 64, 64
    q, k, v = make_qkv(B, Sq, Skv, Hkv * group, Hkv, D, gen)
    head_mode = torch.tensor(ROUTING_B3_H2, dtype=torch.int32)
    mask = block_mask_for(B, Hkv, Skv, bs, gen)
    check_forward(q, k, v, head_mode, f"Sq={Sq} Skv={Skv}", sink=8, window=50, block_mask=mask, block_size=bs)


def test_decode_equals_last_row_of_prefill(gen):
    B, S, Hkv, D = 3, 129, 2, 64
    q, k, v = make_qkv(B, S, S, 6, Hkv, D, gen)
    head_mode = torch.tensor(ROUTING_B3_H2, dtype=torch.int32)
    kw = dict(sink=4, window=20, block_mask=block_mask_for(B, Hkv, S, 16, gen), block_size=16)
    full = elastic_cuda.attention(q, k, v, head_mode, **kw)
    last = elastic_cuda.attention(q[:, -1:], k, v, head_mode, **kw)
    assert rel_err(last, full[:, -1:]) < 1e-13


@pytest.mark.parametrize("block_size", [1, 5, 64, 100, 128, 512])
def test_block_sizes(block_size, gen):
    """Block sizes smaller, unaligned with, equal to and larger than the kernel tiles."""
    B, S, Hkv = 2, 300, 2
    q, k, v = make_qkv(B, S, S, 4, Hkv, 64, gen)
    head_mode = torch.full((B, Hkv), BLOCK, dtype=torch.int32)
    check_forward(q, k, v, head_mode, f"bs={block_size}", block_mask=block_mask_for(B, Hkv, S, block_size, gen),
                  block_size=block_size)


def test_block_mask_per_query_head(gen):
    """block_mask [B, Hq, NB, NB]: each query head of a GQA group uses its own mask."""
    B, S, Hkv, group, bs = 2, 200, 2, 4, 32
    q, k, v = make_qkv(B, S, S, Hkv * group, Hkv, 64, gen)
    head_mode = torch.full((B, Hkv), BLOCK, dtype=torch.int32)
    mask = block_mask_for(B, Hkv * group, S, bs, gen)
    out, _ = check_forward(q, k, v, head_mode, "per-Hq mask", block_mask=mask, block_size=bs)
    shared = mask[:, ::group].repeat_interleave(group, dim=1)  # head 0 of each group for all
    assert rel_err(out, elastic_cuda.attention(q, k, v, head_mode, block_mask=shared, block_size=bs)) > 1e-3


def test_block_mask_diagonal_only(gen):
    B, S, Hkv, bs = 2, 130, 1, 16
    q, k, v = make_qkv(B, S, S, 3, Hkv, 64, gen)
    nb = -(-S // bs)
    mask = torch.eye(nb, dtype=torch.bool).expand(B, Hkv, nb, nb).contiguous()
    head_mode = torch.full((B, Hkv), BLOCK, dtype=torch.int32)
    check_forward(q, k, v, head_mode, "diagonal only", block_mask=mask, block_size=bs)


def test_block_rows_without_diagonal_see_nothing(gen):
    """Query blocks whose row of the mask is empty (no diagonal, nothing set) give out 0 and lse -inf."""
    B, S, Hkv, bs = 2, 100, 2, 16
    q, k, v = make_qkv(B, S, S, 6, Hkv, 64, gen)
    mask = block_mask_for(B, Hkv, S, bs, gen, density=0.5, diagonal=False)
    mask[:, :, 3] = False  # query block 3 of every head sees nothing
    head_mode = torch.full((B, Hkv), BLOCK, dtype=torch.int32)
    out, lse = check_forward(q, k, v, head_mode, "empty rows", block_mask=mask, block_size=bs)
    assert (out[:, 3 * bs:4 * bs] == 0).all()
    assert (lse[:, :, 3 * bs:4 * bs] == float("-inf")).all()
    assert (out[:, :bs] == 0).all()  # block 0 can only see its own (unset) diagonal block


def test_stream_without_sink_or_window_sees_nothing(gen):
    q, k, v = make_qkv(2, 50, 50, 4, 2, 64, gen)
    head_mode = torch.tensor([[STREAM, FULL], [FULL, STREAM]], dtype=torch.int32)
    out, lse = check_forward(q, k, v, head_mode, "sink=window=0", sink=0, window=0)
    assert (out[0, :, :2] == 0).all() and (out[1, :, 2:] == 0).all()
    assert (lse[0, :2] == float("-inf")).all() and torch.isfinite(lse[0, 2:]).all()


# ----------------------------------------------------------------------------- varlen
def test_varlen_matches_reference(gen):
    seqlens_q, seqlens_k = [5, 0, 130, 64, 0, 1], [5, 17, 300, 64, 0, 33]
    q, k, v, cu_q, cu_k, max_q, max_k = make_varlen_qkv(seqlens_q, seqlens_k, 6, 2, 64, gen)
    B, bs = len(seqlens_q), 32
    head_mode = random_head_mode(B, 2, gen)
    head_mode[2] = torch.tensor([STREAM, BLOCK], dtype=torch.int32)
    mask = block_mask_for(B, 2, max_k, bs, gen)
    check_forward(q, k, v, head_mode, "varlen", sink=4, window=30, block_mask=mask, block_size=bs,
                  cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k)


def test_varlen_equals_dense(gen):
    B, S, Hkv = 3, 150, 2
    q, k, v = make_qkv(B, S, S, 6, Hkv, 64, gen)
    head_mode = torch.tensor(ROUTING_B3_H2, dtype=torch.int32)
    kw = dict(sink=4, window=30, block_mask=block_mask_for(B, Hkv, S, 32, gen), block_size=32)
    out, lse = elastic_cuda.attention(q, k, v, head_mode, return_lse=True, **kw)
    cu = torch.arange(0, (B + 1) * S, S, dtype=torch.int32)
    out_v, lse_v = elastic_cuda.attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), head_mode,
                                          return_lse=True, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=S,
                                          max_seqlen_k=S, **kw)
    assert torch.equal(out_v.view_as(out), out)
    assert torch.equal(lse_v.view(6, B, S).transpose(0, 1), lse)


# ----------------------------------------------------------------------------- dtypes, layouts, threads
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("S", [129, 2100])
def test_low_precision_vs_float64_reference(dtype, S, gen):
    B, Hkv, group = (3, 2, 3) if S < 1000 else (1, 2, 2)
    q, k, v = make_qkv(B, S, S, Hkv * group, Hkv, 64, gen, dtype=dtype)
    head_mode = torch.tensor(ROUTING_B3_H2[:B], dtype=torch.int32) if B == 3 else \
        torch.tensor([[FULL, STREAM]], dtype=torch.int32)
    if S > 1000 and dtype == torch.float32:
        head_mode = torch.tensor([[BLOCK, STREAM]], dtype=torch.int32)
    check_forward(q, k, v, head_mode, f"S={S}", sink=64, window=512,
                  block_mask=block_mask_for(B, Hkv, S, 100, gen), block_size=100)


def test_noncontiguous_inputs(gen):
    B, S, Hq, Hkv, D = 2, 100, 4, 2, 64
    qt, kt, vt = (torch.randn(B, H, S, D, generator=gen, dtype=torch.float64) for H in (Hq, Hkv, Hkv))
    q, k, v = qt.transpose(1, 2), kt.transpose(1, 2), vt.transpose(1, 2)  # [B, S, H, D] views
    head_mode = torch.tensor([[FULL, STREAM], [STREAM, FULL]], dtype=torch.int32)
    out = elastic_cuda.attention(q, k, v, head_mode, sink=2, window=9)
    assert torch.equal(out, elastic_cuda.attention(q.contiguous(), k.contiguous(), v.contiguous(), head_mode,
                                                   sink=2, window=9))
    check_forward(q, k, v, head_mode, "non-contiguous", sink=2, window=9)


def test_explicit_scale(gen):
    q, k, v = make_qkv(2, 64, 64, 4, 2, 64, gen)
    head_mode = torch.tensor([[FULL, STREAM], [STREAM, FULL]], dtype=torch.int32)
    check_forward(q, k, v, head_mode, "scale=0.3", sink=2, window=9, scale=0.3)


def test_threads_give_identical_results(gen):
    q, k, v = make_qkv(2, 300, 300, 6, 2, 64, gen, dtype=torch.float32)
    head_mode = torch.tensor([[FULL, STREAM], [STREAM, FULL]], dtype=torch.int32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = elastic_cuda.attention(q, k, v, head_mode, sink=4, window=64, return_lse=True)
        torch.set_num_threads(2)
        two = elastic_cuda.attention(q, k, v, head_mode, sink=4, window=64, return_lse=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


# ----------------------------------------------------------------------------- backward
def _grad_case(kind, gen):
    """Small float64 problems for gradcheck: (q, k, v, head_mode, kwargs)."""
    bs = 4
    if kind == "varlen":
        q, k, v, cu_q, cu_k, mq, mk = make_varlen_qkv([3, 0, 9], [7, 2, 9], 6, 2, 4, gen, requires_grad=True)
        head_mode = torch.tensor([[FULL, BLOCK], [STREAM, FULL], [BLOCK, STREAM]], dtype=torch.int32)
        mask = block_mask_for(3, 2, mk, bs, gen, density=0.5)
        return q, k, v, head_mode, dict(sink=1, window=3, block_mask=mask, block_size=bs, cu_seqlens_q=cu_q,
                                        cu_seqlens_k=cu_k, max_seqlen_q=mq, max_seqlen_k=mk)
    Sq, Skv = (5, 11) if kind == "sq<skv" else (9, 9)
    group = 3
    q, k, v = make_qkv(2, Sq, Skv, 2 * group, 2, 4, gen, requires_grad=True)
    modes = {"full": [[FULL] * 2] * 2, "stream": [[STREAM] * 2] * 2, "block": [[BLOCK] * 2] * 2}
    head_mode = torch.tensor(modes.get(kind, [[FULL, BLOCK], [STREAM, BLOCK]]), dtype=torch.int32)
    mask_heads = 2 * group if kind == "block" else 2  # per-query-head masks in the pure BLOCK case
    mask = block_mask_for(2, mask_heads, Skv, bs, gen, density=0.5)
    mask[0, 0, 1] = False  # query block 1 of the first head: empty rows (zero gradient, lse -inf)
    return q, k, v, head_mode, dict(sink=1, window=3, block_mask=mask, block_size=bs)


@pytest.mark.parametrize("kind", ["full", "stream", "block", "mixed", "sq<skv", "varlen"])
def test_gradcheck_float64(kind, gen):
    q, k, v, head_mode, kw = _grad_case(kind, gen)

    def fn(q, k, v):
        out, lse = elastic_cuda.attention(q, k, v, head_mode, return_lse=True, **kw)
        return out, lse.masked_fill(torch.isinf(lse), 0.0)  # the gradient through lse is checked too

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("Sq", [300, 77])
def test_backward_vs_reference_autograd(dtype, Sq, gen):
    B, Skv, Hkv, group = 3, 300, 2, 3
    q, k, v = make_qkv(B, Sq, Skv, Hkv * group, Hkv, 64, gen, dtype=dtype, requires_grad=True)
    head_mode = torch.tensor(ROUTING_B3_H2, dtype=torch.int32)
    kw = dict(sink=8, window=64, block_mask=block_mask_for(B, Hkv, Skv, 32, gen), block_size=32)
    grad_out = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    grad_lse = torch.randn((B, Hkv * group, Sq), generator=gen, dtype=torch.float64)

    out, lse = elastic_cuda.attention(q, k, v, head_mode, return_lse=True, **kw)
    torch.autograd.backward((out, lse), (grad_out.to(dtype), grad_lse.to(lse.dtype)))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = attention_reference(q64, k64, v64, head_mode, **kw)
    torch.autograd.backward((ref_out, ref_lse), (grad_out, grad_lse))
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for name, got, want in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
        assert got.dtype == dtype and not torch.isnan(got).any()
        err = rel_err(got, want)
        print(f"Sq={Sq} {dtype} {name}: max rel err {err:.2e}")
        assert err < tol, name


def test_backward_bfloat16(gen):
    B, S, Hkv = 2, 129, 2
    q, k, v = make_qkv(B, S, S, 6, Hkv, 64, gen, dtype=torch.bfloat16, requires_grad=True)
    head_mode = torch.tensor([[FULL, STREAM], [BLOCK, FULL]], dtype=torch.int32)
    kw = dict(sink=4, window=32, block_mask=block_mask_for(B, Hkv, S, 32, gen), block_size=32)
    elastic_cuda.attention(q, k, v, head_mode, **kw).float().square().sum().backward()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    attention_reference(q64, k64, v64, head_mode, **kw)[0].square().sum().backward()
    for name, got, want in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
        err = rel_err(got, want)
        print(f"bf16 {name}: max rel err {err:.2e}")
        assert got.dtype == torch.bfloat16 and err < 3e-2, name


def test_rows_seeing_nothing_have_zero_gradients(gen):
    q, k, v = make_qkv(1, 40, 40, 4, 2, 8, gen, requires_grad=True)
    head_mode = torch.tensor([[STREAM, STREAM]], dtype=torch.int32)
    out, lse = elastic_cuda.attention(q, k, v, head_mode, sink=0, window=0, return_lse=True)
    (out.sum() + lse.masked_fill(torch.isinf(lse), 0).sum()).backward()
    for t in (q, k, v):
        assert torch.equal(t.grad, torch.zeros_like(t))
    # Part of the queries blind: their dq rows are 0, the rest match the reference.
    q.grad = k.grad = v.grad = None
    mask = torch.ones(1, 2, 5, 5, dtype=torch.bool)
    mask[:, :, 2] = False  # query block 2 (rows 16..23) sees nothing
    out = elastic_cuda.attention(q, k, v, torch.full((1, 2), BLOCK, dtype=torch.int32), block_mask=mask,
                                 block_size=8)
    out.sum().backward()
    assert (q.grad[:, 16:24] == 0).all() and (q.grad[:, :16] != 0).any() and torch.isfinite(k.grad).all()
