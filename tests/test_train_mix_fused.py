"""The training mix's fused elementwise ops (torch.ops.elastic.train_mix_combine / train_mix_dz, csrc/train_mix/) and
the train_mix op on them (ELASTIC_TRAIN_MIX_FUSED, default on for CUDA fp16/bf16) against the torch path
(ELASTIC_TRAIN_MIX_FUSED=0) and float64 references, on fresh random inputs: dense and varlen rows (with rows in no
sequence), odd lengths, GQA 1/3/4/8, z with 0, 1 and fractional values, NaN-poisoned allocator blocks (an output
element the kernels fail to write reads NaN) and NaN operands (which must reach exactly their own outputs).

CPU: the ops' CPU kernels (their spec) against the float64 torch expressions, opcheck of the schemas / fake kernels,
argument errors, the switch. GPU (marker gpu): the CUDA kernels against the CPU spec in float64, determinism, and the
whole op fused vs torch path vs float64. Relative errors are printed (pytest -s)."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import BLOCK, STREAM, random_block_mask, rel_err
from test_attention_cuda import _grad_floors, _rel

import elastic_cuda
from elastic_cuda.attention import PaddingLayout, train_mix_attention
from elastic_cuda.ops import has_cuda_kernels, hopper_backward_serves, train_mix
from elastic_cuda.ops._options import _kernel_option

combine = torch.ops.elastic.train_mix_combine
mix_dz = torch.ops.elastic.train_mix_dz

GQA = [(4, 4), (6, 2), (8, 2), (8, 1)]
GQA_IDS = ["gqa1", "gqa3", "gqa4", "gqa8"]


def _leaves_run(fn, leaves, weight):
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    out = fn(*leaves)
    (out.to(weight.dtype) * weight).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


def _poison_allocator():
    """Leave the caching allocator's free blocks full of 0xFF bytes, NaN in every float dtype (fp16, bf16, fp32, fp64),
    so that an output element the kernels fail to write reads NaN."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    small = [torch.full((1 << 20,), 255, dtype=torch.uint8, device="cuda") for _ in range(32)]  # small pool
    large = torch.full((64 << 20,), 255, dtype=torch.uint8, device="cuda")
    del small, large


def _z_values(B, Hz, gen):
    """0, 1 and fractional values, each present when there is room."""
    z = torch.rand(B, Hz, generator=gen, dtype=torch.float64)
    flat = z.view(-1)
    flat[0] = 0.0
    if flat.numel() > 1:
        flat[-1] = 1.0
    if flat.numel() > 3:
        flat[1] = 1.0
    return z


def _rows_layout(varlen, B, S, gen):
    """(cu_seqlens or None, total rows, B). Varlen: odd lengths, an empty sequence, a row before the first sequence
    and two after the last (rows in no sequence)."""
    if not varlen:
        return None, B * S, B
    lens = [int(x) for x in torch.randint(1, 2 * S, (B,), generator=gen)]
    lens[min(1, B - 1)] = 0
    cu = torch.tensor([1] + lens, dtype=torch.int64).cumsum(0).to(torch.int32)
    return cu, int(cu[-1]) + 2, B


def _combine_ref(full, sparse, z, cu):
    """float64 torch expression of train_mix_combine (rows in no sequence: 0)."""
    f, s, zz = full.double().cpu(), sparse.double().cpu(), z.double().cpu()
    H = f.shape[-2]
    zh = zz.repeat_interleave(H // zz.shape[1], dim=1)  # [B, H]
    if cu is None:
        w = zh[:, None, :, None]
        return w * f + (1 - w) * s
    out = torch.zeros_like(f)
    c = cu.tolist()
    for b in range(len(c) - 1):
        w = zh[b][None, :, None]
        out[c[b]:c[b + 1]] = w * f[c[b]:c[b + 1]] + (1 - w) * s[c[b]:c[b + 1]]
    return out


def _dz_ref(g, f, s, cu, Hkv):
    """float64 dz and the sum of |terms| per (batch, KV head) (the scale of fp32 summation error)."""
    g, f, s = g.double().cpu(), f.double().cpu(), s.double().cpu()
    prod = g * (f - s)
    rows = prod.shape[:-2]
    per = prod.reshape(*rows, Hkv, -1).sum(-1)
    mag = prod.abs().reshape(*rows, Hkv, -1).sum(-1)
    if cu is None:
        return per.sum(1), mag.sum(1)
    c = cu.tolist()
    return (torch.stack([per[c[b]:c[b + 1]].sum(0) for b in range(len(c) - 1)]),
            torch.stack([mag[c[b]:c[b + 1]].sum(0) for b in range(len(c) - 1)]))


def _operands(varlen, B, S, H, D, gen, n=3):
    cu, rows, B = _rows_layout(varlen, B, S, gen)
    shape = (rows, H, D) if varlen else (B, S, H, D)
    return cu, B, [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(n)]


# ----------------------------------------------------------------------------- CPU: the spec and the schemas
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
@pytest.mark.parametrize("h,hz", GQA, ids=GQA_IDS)
def test_cpu_kernels_match_float64_expressions(varlen, h, hz, gen):
    cu, B, (a, b, g) = _operands(varlen, 3, 13, h, 8, gen)
    z = _z_values(B, hz, gen)
    assert rel_err(combine(a, b, z, cu), _combine_ref(a, b, z, cu)) < 1e-15
    ref, _ = _dz_ref(g, a, b, cu, hz)
    got = mix_dz(g, a, b, cu, kv_heads=hz, max_seqlen_q=40)
    assert got.dtype == torch.float64 and rel_err(got, ref) < 1e-13
    got32 = mix_dz(g.float(), a.float(), b.float(), cu, kv_heads=hz)
    assert got32.dtype == torch.float32 and rel_err(got32, ref) < 1e-5
    if varlen:  # rows in no sequence: out 0
        out = combine(a, b, z, cu)
        assert not out[: int(cu[0])].any() and not out[int(cu[-1]):].any()


def test_opcheck_and_fake_kernels(gen):
    a, b, g = (torch.randn(2, 5, 4, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    z = torch.rand(2, 2, generator=gen, dtype=torch.float64)
    torch.library.opcheck(combine.default, (a, b, z, None))
    torch.library.opcheck(mix_dz.default, (g, a, b, None), {"kv_heads": 2})
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    pa, pb, pg = (t.reshape(10, 4, 8)[:7] for t in (a, b, g))
    torch.library.opcheck(combine.default, (pa.contiguous(), pb.contiguous(), z, cu))
    torch.library.opcheck(mix_dz.default, (pg.contiguous(), pa.contiguous(), pb.contiguous(), cu),
                          {"kv_heads": 1, "max_seqlen_q": 4})


def test_bad_arguments():
    a = torch.randn(1, 4, 4, 8)
    z = torch.ones(1, 2)
    with pytest.raises(RuntimeError, match="sparse must have the shape of full"):
        combine(a, torch.randn(1, 4, 4, 4), z)
    with pytest.raises(RuntimeError, match="z's heads"):
        combine(a, a, torch.ones(1, 3))
    with pytest.raises(RuntimeError, match="z must have shape"):
        combine(a, a, torch.ones(2, 2))
    with pytest.raises(RuntimeError, match="kv_heads must be > 0"):
        mix_dz(a, a, a, None, kv_heads=3)
    with pytest.raises(RuntimeError, match="cu_seqlens must be an int32"):
        combine(a[0], a[0], z, torch.tensor([0, 4]))
    with pytest.raises(RuntimeError, match="cu_seqlens must start at >= 0"):
        combine(a[0], a[0], z, torch.tensor([0, 5], dtype=torch.int32))


@pytest.mark.parametrize("sparse_mode", [STREAM, BLOCK], ids=["stream", "block"])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "varlen"])
@pytest.mark.parametrize("hard", [True, False], ids=["hard_z", "soft_z"])
def test_fused_structure_on_cpu_kernels(sparse_mode, padded, hard, gen, monkeypatch):
    """The fused path's structure (unweighted dO into both branches' backward, then train_mix_combine of the
    gradients; dz by train_mix_dz) run on the ops' float64 CPU kernels: equal to the torch path within float64
    rounding, and gradcheck passes (the linearity the fused backward relies on, checked exactly)."""
    from elastic_cuda.ops import _train_mix as ops

    B, S, Hq, Hkv, D = 3, 23, 6, 2, 8
    q = torch.randn(B, S, Hq, D, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(B, S, Hkv, D, generator=gen, dtype=torch.float64) for _ in range(2))
    z = _z_values(B, Hkv, gen) if not hard else torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]],
                                                             dtype=torch.float64)
    padding = None
    if padded:
        keep = torch.ones(B, S, dtype=torch.bool)
        keep[0, :5], keep[2, -4:] = False, False
        padding = PaddingLayout.from_mask(keep, S, S)
    mask = random_block_mask(B, Hkv, S, 4, gen, density=0.5) if sparse_mode == BLOCK else None
    kw = dict(sink=2, window=5, block_mask=mask, block_size=4, padding=padding)
    weight = torch.randn(B, S, Hq, D, generator=gen, dtype=torch.float64)

    def run(q, k, v, z):
        return train_mix_attention(q, k, v, z, sparse_mode, full_branch="train_mix", **kw)

    ref = _leaves_run(run, (q, k, v, z), weight)
    monkeypatch.setattr(ops, "_mix_fused", lambda t: True)
    got = _leaves_run(run, (q, k, v, z), weight)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dz"), got, ref):
        assert rel_err(a, b) < 1e-12, name
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, z)]
    assert torch.autograd.gradcheck(run, leaves, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_switch_is_read_from_the_extension(monkeypatch):
    monkeypatch.delenv("ELASTIC_TRAIN_MIX_FUSED", raising=False)
    assert " train_mix_fused=1 " in elastic_cuda.ops.reload_kernel_options() + " "
    assert _kernel_option("train_mix_fused") == "1"
    monkeypatch.setenv("ELASTIC_TRAIN_MIX_FUSED", "0")
    assert "train_mix_fused=0" in elastic_cuda.ops.reload_kernel_options()
    assert _kernel_option("train_mix_fused") == "0"
    monkeypatch.setenv("ELASTIC_TRAIN_MIX_FUSED", "yes")
    with pytest.raises(RuntimeError, match="ELASTIC_TRAIN_MIX_FUSED must be 0 or 1"):
        elastic_cuda.ops.reload_kernel_options()
    monkeypatch.delenv("ELASTIC_TRAIN_MIX_FUSED")
    elastic_cuda.ops.reload_kernel_options()


# ----------------------------------------------------------------------------- CUDA: the kernels
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available() or not has_cuda_kernels(),
                                reason="needs CUDA and the CUDA kernels")
CUDA_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DTYPE_IDS = ["bf16", "fp16", "fp32"]
# one rounding of an fp32 value to the dtype; fp32 itself: the kernel's fp32 products vs float64
ROUND = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 1e-6}


@pytest.fixture(autouse=True)
def _reload_switches_after_test():
    yield
    elastic_cuda.ops.reload_kernel_options()


def _set_fused(monkeypatch, on: bool):
    monkeypatch.setenv("ELASTIC_TRAIN_MIX_FUSED", "1" if on else "0")
    assert f"train_mix_fused={int(on)}" in elastic_cuda.ops.reload_kernel_options()


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
@pytest.mark.parametrize("h,hz", GQA, ids=GQA_IDS)
@pytest.mark.parametrize("D", [128, 64, 12], ids=["d128", "d64", "d12_scalar"])
@pytest.mark.parametrize("S", [37, 1, 300], ids=["s37", "s1", "s300"])
def test_cuda_kernels_match_float64(dtype, varlen, h, hz, D, S, gen):
    cu, B, ops = _operands(varlen, 3, S, h, D, gen)
    a, b, g = (t.to(dtype) for t in ops)   # the rounded values are the operands of both sides
    z = _z_values(B, hz, gen)
    dev = [t.cuda() for t in (a, b, g)]
    cu_d = None if cu is None else cu.cuda()
    max_len = max(1, int((cu[1:] - cu[:-1]).max())) if varlen else 0
    _poison_allocator()
    out = combine(dev[0], dev[1], z.cuda().float(), cu_d)
    _poison_allocator()
    dz = mix_dz(dev[2], dev[0], dev[1], cu_d, kv_heads=hz, max_seqlen_q=max_len)
    ref = _combine_ref(a, b, z.float(), cu)
    err_out = (out.double().cpu() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
    dz_ref, mag = _dz_ref(g, a, b, cu, hz)
    err_dz = ((dz.double().cpu() - dz_ref).abs() / (mag + 1e-30)).max().item()
    print(f"out {err_out:.2e} dz/sum|terms| {err_dz:.2e}")
    assert out.dtype == dtype and dz.dtype == torch.float32 and torch.isfinite(out).all() and torch.isfinite(dz).all()
    assert err_out <= 1.01 * ROUND[dtype]
    # fp32 accumulation: a lane adds up to 256 products in sequence (gamma_256 ~ 1.5e-5 of sum |terms| at worst; the
    # typical error is ~1e-6), then fixed trees; a lost or doubled row would be O(1)
    assert err_dz < 4e-5
    zc = z.cuda()
    hard = (zc == 0) | (zc == 1)   # hard z picks its branch bit for bit
    hz_rows = hard.repeat_interleave(h // hz, dim=1)
    pick = torch.where((zc == 1).repeat_interleave(h // hz, dim=1)[..., None], 0, 1)  # [B, H, 1]
    if not varlen:
        for bb in range(B):
            for hh in range(h):
                if hz_rows[bb, hh]:
                    assert torch.equal(out[bb, :, hh], dev[int(pick[bb, hh, 0])][bb, :, hh])
    else:
        assert not out[: int(cu[0])].any() and not out[int(cu[-1]):].any()


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cuda_kernels_nan_operands_and_bounds(dtype, gen):
    """A NaN in one row of out_sparse of batch 1 reaches dz of batch 1's head group only, and the combined rows of
    that head only where the sparse branch has weight or is NaN (0 * NaN = NaN, as the torch expression); a varlen
    sequence longer than max_seqlen_q gives NaN dz for its batch only; two runs are bitwise equal, also under
    torch.use_deterministic_algorithms."""
    B, S, H, Hkv, D = 3, 70, 8, 2, 128
    a, b, g = (torch.randn(B, S, H, D, generator=gen).to(dtype).cuda() for _ in range(3))
    z = torch.tensor([[1.0, 0.0], [1.0, 0.25], [0.0, 1.0]], device="cuda")
    b[1, 17, 5, 3] = float("nan")   # query head 5: KV head 1 of batch 1
    dz = mix_dz(g, a, b, None, kv_heads=Hkv)
    nan = torch.zeros(B, Hkv, dtype=torch.bool, device="cuda")
    nan[1, 1] = True
    assert torch.equal(torch.isnan(dz), nan)
    out = combine(a, b, z, None)
    expect = torch.zeros_like(out, dtype=torch.bool)
    expect[1, 17, 5, 3] = True
    assert torch.equal(torch.isnan(out), expect)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert torch.equal(mix_dz(g, a, b, None, kv_heads=Hkv).nan_to_num(), dz.nan_to_num())
    finally:
        torch.use_deterministic_algorithms(was)
    # varlen: sequence 1 (40 rows) is longer than max_seqlen_q = 30
    cu = torch.tensor([0, 20, 60, 70], dtype=torch.int32, device="cuda")
    pg, pa, pb = (t[0, :70].contiguous() for t in (g, a, a.flip(0)))
    dz = mix_dz(pg, pa, pb, cu, kv_heads=Hkv, max_seqlen_q=30)
    assert torch.isnan(dz[1]).all() and torch.isfinite(dz[0]).all() and torch.isfinite(dz[2]).all()


# ----------------------------------------------------------------------------- CUDA: the train_mix op, fused vs torch
@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("sparse_mode", [STREAM, BLOCK], ids=["stream", "block"])
@pytest.mark.parametrize("hq,hkv", GQA, ids=GQA_IDS)
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "varlen"])
@pytest.mark.parametrize("hard", [True, False], ids=["hard_z", "soft_z"])
def test_train_mix_fused_matches_torch_path_and_float64(dtype, sparse_mode, hq, hkv, padded, hard, gen, monkeypatch):
    """The op forward + backward with the fused kernels against the torch path (same CUDA attention calls) and the
    float64 composition of two op calls on the CPU. Hard z: out, dk, dv bit-equal to the torch path (dq too under
    deterministic mode on the Hopper backward, dense layout: the padded path's torch ops are left out of that mode);
    dz within fp32 summation error of it."""
    B, S, D = 3, 261, 128 if hq != 6 else 64
    q = torch.randn(B, S, hq, D, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(B, S, hkv, D, generator=gen, dtype=torch.float64) for _ in range(2))
    z = _z_values(B, hkv, gen) if not hard else (torch.rand(B, hkv, generator=gen) > 0.5).double()
    if hard:
        z[0, 0], z[-1, -1] = 1.0, 0.0
    mask = random_block_mask(B, hkv, S, 128, gen, density=0.4) if sparse_mode == BLOCK else None
    weight = torch.randn(B, S, hq, D, generator=gen, dtype=torch.float64)
    pad_cpu = pad_dev = None
    if padded:
        keep = torch.ones(B, S, dtype=torch.bool)
        keep[0, :50] = False     # left-padded
        keep[2, -33:] = False    # right-padded
        pad_cpu, pad_dev = PaddingLayout.from_mask(keep, S, S), PaddingLayout.from_mask(keep.cuda(), S, S)
        weight[~keep] = 0.0      # padded rows carry no upstream gradient
    kw = dict(sink=64, window=130, block_size=128)

    def mix(q, k, v, z, padding, m):
        return train_mix_attention(q, k, v, z, sparse_mode, padding=padding, block_mask=m, full_branch="train_mix",
                                   **kw)

    ref = _leaves_run(lambda q, k, v, z: train_mix_attention(q, k, v, z, sparse_mode, padding=pad_cpu, block_mask=mask,
                                                             full_branch="op", **kw), (q, k, v, z), weight.float())
    dev = [t.to("cuda", dtype) for t in (q, k, v)] + [z.cuda().float()]
    mask_d = None if mask is None else mask.cuda()
    deterministic = hopper_backward_serves(dev[0]) and not padded
    was = torch.are_deterministic_algorithms_enabled()
    runs = {}
    try:
        torch.use_deterministic_algorithms(deterministic)
        for fused in (True, False):
            _set_fused(monkeypatch, fused)
            _poison_allocator()
            runs[fused] = _leaves_run(lambda q, k, v, z: mix(q, k, v, z, pad_dev, mask_d), dev, weight.float().cuda())
    finally:
        torch.use_deterministic_algorithms(was)
    names = ("out", "dq", "dk", "dv", "dz")
    floors = _grad_floors(q, k, v, weight, None, 1.0 / math.sqrt(D))
    floors["dz"] = 1e-3 * weight.abs().sum().item() * v.abs().max().item() / hkv
    errs = {n: _rel(a.double().cpu(), r.double(), floors.get(n, 1e-6)) for n, a, r in zip(names, runs[True], ref)}
    vs_torch = {n: _rel(a.double().cpu(), r.double().cpu(), floors.get(n, 1e-6))
                for n, a, r in zip(names, runs[True], runs[False])}
    print("fused vs float64", errs, "fused vs torch path", vs_torch)
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    for n, e in errs.items():
        assert e < tol, (n, errs)
    assert vs_torch["dz"] < 1e-4, vs_torch
    if hard:
        exact = ["out", "dk", "dv"] + (["dq"] if deterministic else [])
        for n in exact:
            i = names.index(n)
            assert torch.equal(runs[True][i], runs[False][i]), (n, vs_torch)
    else:  # fractional z: the torch path rounds z and z * dO to the dtype, the fused path weighs in fp32
        for n in ("out", "dq", "dk", "dv"):
            assert vs_torch[n] < tol, vs_torch
