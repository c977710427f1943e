"""The training-mix op (elastic_cuda.ops.train_mix, torch.ops.elastic.train_mix): O = z O_FA + (1 - z) O_SA per
(sample, KV head) with gradients for q, k, v and z, against the composition of two elastic op calls with autograd
(attention.train_mix_attention(full_branch="op"), the reference) and against float64 gradcheck; on CUDA against
the float64 composition on the CPU. The backward runs a head only in the branch its hard z picks: with z in {0, 1}
the gradients equal those of one routed attention call (modes FULL where z = 1, sparse where z = 0)."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import BLOCK, FULL, STREAM, cuda_kernel_names, random_block_mask, rel_err
from test_attention_cuda import _grad_floors, _rel

import elastic_cuda
from elastic_cuda.attention import PaddingLayout, train_mix_attention
from elastic_cuda.attention.hybrid import _resolve_branch
from elastic_cuda.ops import attention, has_cuda_kernels, hopper_backward_serves, train_mix

SINK, WINDOW, BS = 3, 11, 16


def _inputs(B, Sq, Skv, Hq, Hkv, D, gen, dtype=torch.float64, device="cpu"):
    q = torch.randn(B, Sq, Hq, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, Skv, Hkv, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, Skv, Hkv, D, generator=gen, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def _z(B, Hkv, gen, hard, device="cpu", dtype=torch.float64):
    z = torch.rand(B, Hkv, generator=gen, dtype=torch.float64)
    if hard:
        z = (z > 0.5).double()
        z[0, 0], z[-1, -1] = 1.0, 0.0  # both branches present in every case
    return z.to(device=device, dtype=dtype)


def _run(fn, leaves, weight):
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    out = fn(*leaves)
    (out.float() * weight).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("sparse_mode", [STREAM, BLOCK], ids=["stream", "block"])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (6, 2), (8, 2), (8, 1)], ids=["gqa1", "gqa3", "gqa4", "gqa8"])
@pytest.mark.parametrize("hard", [True, False], ids=["hard_z", "soft_z"])
@pytest.mark.parametrize("sq,skv", [(37, 37), (1, 1), (2, 3), (19, 50)], ids=["s37", "s1", "sq2_skv3", "sq19_skv50"])
def test_op_equals_composition_cpu(sparse_mode, hq, hkv, hard, sq, skv, gen):
    B, D = 3, 8
    q, k, v = _inputs(B, sq, skv, hq, hkv, D, gen)
    z = _z(B, hkv, gen, hard)
    mask = random_block_mask(B, hkv, skv, BS, gen, density=0.5) if sparse_mode == BLOCK else None
    kw = dict(sink=SINK, window=WINDOW, scale=0.37, block_mask=mask, block_size=BS)
    weight = torch.randn(B, sq, hq, D, generator=gen, dtype=torch.float64).float()
    ref = _run(lambda q, k, v, z: train_mix_attention(q, k, v, z, sparse_mode, full_branch="op", **kw),
               (q, k, v, z), weight)
    got = _run(lambda q, k, v, z: train_mix(q, k, v, z, sparse_mode, **kw), (q, k, v, z), weight)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dz"), got, ref):
        assert rel_err(a, b) < 1e-12, name
    if skv > SINK + WINDOW:
        assert ref[4].abs().sum() > 0  # dz is not trivially 0 (the sparse branch differs)


@pytest.mark.parametrize("sparse_mode", [STREAM, BLOCK], ids=["stream", "block"])
def test_hard_z_gradients_are_one_routed_call(sparse_mode, gen):
    """With hard z each head's gradient comes from its routed branch only: q, k, v gradients equal those of one
    attention call whose head_mode is FULL where z = 1 and the sparse mode where z = 0 (the skipped branch adds
    exact zeros)."""
    B, S, Hq, Hkv, D = 2, 45, 6, 3, 8
    q, k, v = _inputs(B, S, S, Hq, Hkv, D, gen)
    z = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    mask = random_block_mask(B, Hkv, S, BS, gen, density=0.4) if sparse_mode == BLOCK else None
    kw = dict(sink=SINK, window=WINDOW, block_mask=mask, block_size=BS)
    weight = torch.randn(B, S, Hq, D, generator=gen, dtype=torch.float64).float()
    routed = torch.where(z == 1, FULL, sparse_mode).to(torch.int32)
    ref = _run(lambda q, k, v: attention(q, k, v, routed, **kw), (q, k, v), weight)
    got = _run(lambda q, k, v: train_mix(q, k, v, z, sparse_mode, **kw), (q, k, v), weight)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert rel_err(a, b) < 1e-12, name


def test_skipped_heads_see_no_key():
    """The skip: a head left out of a branch runs as BLOCK over an empty mask (no host sync), for FULL and STREAM
    branches; a BLOCK branch keeps its mask only for the heads it weighs."""
    from elastic_cuda.ops._train_mix import _skipping

    keep = torch.tensor([[True, False], [False, True]])
    modes, mask, bs = _skipping(STREAM, keep, None, 64, 300)
    assert modes.tolist() == [[STREAM, BLOCK], [BLOCK, STREAM]] and bs == 128
    assert tuple(mask.shape) == (2, 2, 3, 3) and not mask.any()
    block_mask = torch.ones(2, 4, 5, 5, dtype=torch.bool)  # per query head (GQA 2)
    modes, mask, bs = _skipping(BLOCK, keep, block_mask, 64, 300)
    assert (modes == BLOCK).all() and bs == 64
    assert mask[0, :2].all() and not mask[0, 2:].any() and not mask[1, :2].any() and mask[1, 2:].all()


@pytest.mark.parametrize("sparse_mode", [STREAM, BLOCK], ids=["stream", "block"])
def test_padded_batch_equals_composition(sparse_mode, gen):
    """Left- and right-padded samples (the trainer's micro-batches) through the varlen layout."""
    B, S, Hq, Hkv, D = 3, 40, 4, 2, 8
    q, k, v = _inputs(B, S, S, Hq, Hkv, D, gen)
    z = _z(B, Hkv, gen, hard=True)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[0, :7] = False
    mask[1, :2], mask[1, -5:] = False, False
    padding = PaddingLayout.from_mask(mask, S, S)
    bm = random_block_mask(B, Hkv, padding.max_seqlen_k, BS, gen, density=0.5) if sparse_mode == BLOCK else None
    kw = dict(sink=SINK, window=WINDOW, padding=padding, block_mask=bm, block_size=BS)
    weight = torch.randn(B, S, Hq, D, generator=gen, dtype=torch.float64).float()
    ref = _run(lambda q, k, v, z: train_mix_attention(q, k, v, z, sparse_mode, full_branch="op", **kw),
               (q, k, v, z), weight)
    got = _run(lambda q, k, v, z: train_mix_attention(q, k, v, z, sparse_mode, full_branch="train_mix", **kw),
               (q, k, v, z), weight)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dz"), got, ref):
        assert rel_err(a, b) < 1e-12, name


@pytest.mark.parametrize("hard", [True, False], ids=["hard_z", "soft_z"])
@pytest.mark.parametrize("sparse_mode", [STREAM, BLOCK], ids=["stream", "block"])
def test_gradcheck_cpu(sparse_mode, hard, gen):
    B, S, Hq, Hkv, D = 2, 9, 4, 2, 4
    q, k, v = _inputs(B, S, S, Hq, Hkv, D, gen)
    z = _z(B, Hkv, gen, hard)
    mask = random_block_mask(B, Hkv, S, 4, gen, density=0.5) if sparse_mode == BLOCK else None
    leaves = [t.requires_grad_(True) for t in (q, k, v, z)]
    assert torch.autograd.gradcheck(
        lambda q, k, v, z: train_mix(q, k, v, z, sparse_mode, sink=2, window=3, block_mask=mask, block_size=4),
        leaves, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_branches_and_opcheck(gen):
    """return_branches gives O_FA / O_SA and their lse (those of the two attention calls); schema, fake kernel and
    autograd registration agree (torch.library.opcheck)."""
    B, S, Hq, Hkv, D = 2, 21, 4, 2, 8
    q, k, v = _inputs(B, S, S, Hq, Hkv, D, gen)
    z = _z(B, Hkv, gen, hard=False)
    out, of, lf, os_, ls = train_mix(q, k, v, z, STREAM, sink=SINK, window=WINDOW, return_branches=True)
    rf, rlf = attention(q, k, v, torch.zeros(B, Hkv, dtype=torch.int32), return_lse=True)
    rs, rls = attention(q, k, v, torch.ones(B, Hkv, dtype=torch.int32), sink=SINK, window=WINDOW, return_lse=True)
    for a, b in ((of, rf), (lf, rlf), (os_, rs), (ls, rls)):
        assert rel_err(a, b) < 1e-14
    leaves = [t.requires_grad_(True) for t in (q, k, v, z)]
    torch.library.opcheck(torch.ops.elastic.train_mix.default, (*leaves, None, None, None),
                          {"sparse_mode": STREAM, "sink": SINK, "window": WINDOW})


def test_bad_arguments():
    q, k, v = torch.randn(1, 6, 4, 8), torch.randn(1, 6, 2, 8), torch.randn(1, 6, 2, 8)
    z = torch.ones(1, 2)
    with pytest.raises(ValueError, match="z must have shape"):
        train_mix(q, k, v, torch.ones(2, 2), STREAM)
    with pytest.raises(ValueError, match="z must be a floating-point"):
        train_mix(q, k, v, torch.ones(1, 2, dtype=torch.int32), STREAM)
    with pytest.raises(ValueError, match="sparse_mode must be"):
        train_mix(q, k, v, z, FULL)
    with pytest.raises(ValueError, match="sparse_mode BLOCK needs a block_mask"):
        train_mix(q, k, v, z, BLOCK)
    with pytest.raises(ValueError, match="z must be a torch.Tensor"):
        train_mix(q, k, v, [1.0, 0.0], STREAM)
    with pytest.raises(ValueError, match="window must be an int"):
        train_mix(q, k, v, z, STREAM, window=-1)


# ----------------------------------------------------------------------------- CUDA
def _cuda_case(sparse_mode, hq, hkv, s, gen, dtype):
    B, D = 3, 128 if hq != 3 else 64
    q, k, v = _inputs(B, s, s, hq, hkv, D, gen)
    z = _z(B, hkv, gen, hard=True)
    mask = random_block_mask(B, hkv, s, 128, gen, density=0.4) if sparse_mode == BLOCK else None
    return q, k, v, z, mask, D


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("sparse_mode", [STREAM, BLOCK], ids=["stream", "block"])
@pytest.mark.parametrize("hq,hkv,s", [(4, 4, 1), (6, 2, 3), (8, 2, 129), (8, 1, 300), (12, 4, 517), (3, 3, 255)],
                         ids=["gqa1_s1", "gqa3_s3", "gqa4_s129", "gqa8_s300", "gqa3_s517", "d64_s255"])
def test_cuda_matches_float64_composition(dtype, sparse_mode, hq, hkv, s, gen):
    q, k, v, z, mask, D = _cuda_case(sparse_mode, hq, hkv, s, gen, dtype)
    kw = dict(sink=64, window=130, block_size=128)
    weight = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    ref = _run(lambda q, k, v, z: train_mix_attention(q, k, v, z, sparse_mode, full_branch="op", block_mask=mask,
                                                      **kw), (q, k, v, z), weight.float())
    dev = [t.to("cuda", dtype) for t in (q, k, v)] + [z.cuda().float()]
    got = _run(lambda q, k, v, z: train_mix(q, k, v, z, sparse_mode, block_mask=None if mask is None else mask.cuda(),
                                            **kw), dev, weight.float().cuda())
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    # Gradients whose float64 reference is ~0 (a query that sees one key: Sq = Skv = 1) are measured against a floor
    # of 1e-3 of the terms that cancel (test_attention_cuda._grad_floors); dz against 1e-3 of sum |dO| max |v|.
    floors = _grad_floors(q, k, v, weight, None, 1.0 / math.sqrt(D))
    floors["dz"] = 1e-3 * weight.abs().sum().item() * v.abs().max().item() / z.shape[1]
    errs = {name: _rel(a.double().cpu(), b.double(), floors.get(name, 1e-6))
            for name, a, b in zip(("out", "dq", "dk", "dv", "dz"), got, ref)}
    print(errs)
    for name, e in errs.items():
        assert e < tol, (name, errs)


# ----------------------------------------------------------------------------- auto: which branch, by the backward
def test_hopper_backward_serves_is_false_off_cuda():
    q = torch.randn(1, 4, 2, 64, dtype=torch.bfloat16)
    assert not hopper_backward_serves(q) and not hopper_backward_serves(None)
    assert _resolve_branch("auto", q, q, None) == "op"


NEEDS_CUDA_KERNELS = pytest.mark.skipif(not torch.cuda.is_available() or not has_cuda_kernels(),
                                        reason="needs CUDA and the CUDA kernels")


@pytest.mark.parametrize("dtype,D,block_size", [(torch.bfloat16, 128, None), (torch.float16, 64, None),
                                                (torch.bfloat16, 64, 128), (torch.float16, 128, 256),
                                                (torch.bfloat16, 128, 64), (torch.bfloat16, 64, 192)],
                         ids=["bf16_d128", "fp16_d64", "block128", "block256", "block64", "block192"])
@pytest.mark.gpu
@NEEDS_CUDA_KERNELS
def test_hopper_backward_serves_matches_the_dispatch(dtype, D, block_size):
    """ops.hopper_backward_serves (the Python statement of use_sm90_backward, which `auto` decides by) names the
    kernel the backward launches: the profiler's kernel names agree, on any CUDA device (true only on 9.x)."""
    if "sm90_bwd=0" in elastic_cuda.ops.reload_kernel_options():
        pytest.skip("ELASTIC_CUDA_SM90_BWD=0 is set (a timing switch the helper does not read)")
    S, Hkv = 384, 2
    q = torch.randn(1, S, 4, D, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(1, S, Hkv, D, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(1, S, Hkv, D, device="cuda", dtype=dtype, requires_grad=True)
    if block_size is None:
        modes, mask, bs = torch.full((1, Hkv), FULL, dtype=torch.int32, device="cuda"), None, 128
    else:
        nb = -(-S // block_size)
        modes = torch.full((1, Hkv), BLOCK, dtype=torch.int32, device="cuda")
        mask, bs = torch.ones(1, Hkv, nb, nb, dtype=torch.bool, device="cuda"), block_size
    out = attention(q, k, v, modes, block_mask=mask, block_size=bs, strategy="fused")
    names = cuda_kernel_names(lambda: out.float().sum().backward(), "attention_bwd")
    if not names:
        pytest.skip("profiler recorded no kernels")
    serves = hopper_backward_serves(q, block_size=block_size)
    assert any("attention_bwd_sm90" in n for n in names) == serves, (serves, names)
    assert serves == (torch.cuda.get_device_capability()[0] == 9 and (block_size or 128) % 128 == 0)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.gpu
@NEEDS_CUDA_KERNELS
def test_auto_branch_on_cuda_matches_float64(padded, gen):
    """full_branch "auto" on CUDA: the train_mix op where the Hopper backward serves the call (and for padded
    batches), SDPA's O_FA for an unpadded prefill elsewhere; its outputs and q / k / v / z gradients match the float64
    composition of two op calls on the CPU (bf16 tolerance)."""
    B, S, Hq, Hkv, D = 2, 300, 6, 2, 64
    q, k, v = _inputs(B, S, S, Hq, Hkv, D, gen)
    z = _z(B, Hkv, gen, hard=True)
    weight = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    pad_cpu = pad_dev = None
    if padded:
        mask = torch.ones(B, S, dtype=torch.bool)
        mask[1, :40] = False  # sample 1 left-padded
        pad_cpu, pad_dev = PaddingLayout.from_mask(mask, S, S), PaddingLayout.from_mask(mask.cuda(), S, S)
        weight[1, :40] = 0.0   # padded rows carry no upstream gradient
    dev = [t.to("cuda", torch.bfloat16) for t in (q, k, v)] + [z.cuda().float()]
    expect = "train_mix" if padded or hopper_backward_serves(dev[0]) else "sdpa"
    assert _resolve_branch("auto", dev[0], dev[1], pad_dev) == expect
    kw = dict(sink=64, window=130)
    ref = _run(lambda q, k, v, z: train_mix_attention(q, k, v, z, STREAM, full_branch="op", padding=pad_cpu, **kw),
               (q, k, v, z), weight.float())
    got = _run(lambda q, k, v, z: train_mix_attention(q, k, v, z, STREAM, full_branch="auto", padding=pad_dev, **kw),
               dev, weight.float().cuda())
    floors = _grad_floors(q, k, v, weight, None, 1.0 / math.sqrt(D))
    floors["dz"] = 1e-3 * weight.abs().sum().item() * v.abs().max().item() / Hkv
    errs = {name: _rel(a.double().cpu(), b.double(), floors.get(name, 1e-6))
            for name, a, b in zip(("out", "dq", "dk", "dv", "dz"), got, ref)}
    print(expect, errs)
    for name, e in errs.items():
        assert e < 2e-2, (name, errs)
