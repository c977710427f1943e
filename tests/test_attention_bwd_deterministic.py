"""Deterministic mode of the CUDA backward (torch.use_deterministic_algorithms, issue #17).

Under the flag the Hopper backward adds the key tiles' dQ tiles in key-tile order (turn counters, atomics path), so
two backward runs give bitwise-identical dq / dk / dv; they must still match the float64 reference. The mma.sync
backward has no such mode: under the flag it raises (or warns with warn_only=True), as PyTorch's own
nondeterministic ops do. Fresh random inputs, NaN-poisoned outputs are not needed here (run_case covers that path);
relative errors are printed."""
from __future__ import annotations

import pytest
import torch
from conftest import cuda_kernel_names

import elastic_cuda
from elastic_cuda import BLOCK, FULL, STREAM
from elastic_cuda.reference import attention_reference
from test_attention_cuda import DEV, GRAD_TOL, _rel

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not elastic_cuda.has_cuda_kernels(), reason="extension built without CUDA kernels"),
]


@pytest.fixture(autouse=True)
def _restore():
    was, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(was, warn_only=warn)
    elastic_cuda.ops.reload_kernel_options()


def _hopper():
    return torch.cuda.get_device_capability()[0] == 9


def _inputs(B, S, Hq, Hkv, D, dtype, seed):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    q, k, v, go = (torch.randn(B, S, h, D, generator=gen, device=DEV).to(dtype) for h in (Hq, Hkv, Hkv, Hq))
    return q, k, v, go


def _grads(q, k, v, go, head_mode, kw):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = elastic_cuda.ops.attention(q, k, v, head_mode, strategy="fused", **kw)
    return torch.autograd.grad(out, (q, k, v), go)


CASES = [  # (B, S, Hq, Hkv, D, modes): lengths off the 64 / 128 tiles, GQA 4 and 1, every mode and a mix
    (1, 1000, 8, 2, 128, (FULL, FULL)),
    (2, 777, 4, 1, 64, (FULL,)),
    (1, 1300, 8, 2, 128, (STREAM, FULL)),
    (1, 900, 8, 2, 64, (BLOCK, STREAM)),
    (1, 2048, 4, 4, 128, (FULL, STREAM, BLOCK, FULL)),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_deterministic_bitwise_and_reference(case, dtype):
    if not _hopper():
        pytest.skip("the deterministic backward is the Hopper one")
    B, S, Hq, Hkv, D, modes = CASES[case]
    head_mode = torch.tensor([modes] * B, dtype=torch.int32, device=DEV)
    gen = torch.Generator(device=DEV).manual_seed(100 + case)
    nb = -(-S // 128)
    bm = torch.rand(B, Hkv, nb, nb, generator=gen, device=DEV) < 0.6 if BLOCK in modes else None
    kw = dict(sink=64, window=384, block_mask=bm, block_size=128)
    q, k, v, go = _inputs(B, S, Hq, Hkv, D, dtype, seed=case)
    # float64 reference, computed with the flag off (cuBLAS would need CUBLAS_WORKSPACE_CONFIG under it)
    q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
    ref_out, _ = attention_reference(q64, k64, v64, head_mode, **kw)
    ref = torch.autograd.grad(ref_out, (q64, k64, v64), go.double())

    torch.use_deterministic_algorithms(True)
    names = cuda_kernel_names(lambda: _grads(q, k, v, go, head_mode, kw), "attention_bwd")
    if names:
        assert any("attention_bwd_sm90" in n for n in names), names
    first = _grads(q, k, v, go, head_mode, kw)
    for _ in range(2):
        again = _grads(q, k, v, go, head_mode, kw)
        for name, a, b in zip("dq dk dv".split(), first, again):
            assert torch.equal(a, b), f"{name} differs between two deterministic runs"
    errs = [_rel(g.double(), r) for g, r in zip(first, ref)]
    print(f"deterministic case {case} {dtype}: rel err dq {errs[0]:.2e} dk {errs[1]:.2e} dv {errs[2]:.2e}")
    assert all(e < GRAD_TOL[dtype] for e in errs), errs
    # and the default (nondeterministic) path agrees with it to rounding
    torch.use_deterministic_algorithms(False)
    fast = _grads(q, k, v, go, head_mode, kw)
    assert all(_rel(a.double(), b.double()) < GRAD_TOL[dtype] for a, b in zip(fast, first))


def test_sm80_backward_under_determinism_raises_or_warns(monkeypatch):
    monkeypatch.setenv("ELASTIC_CUDA_SM90_BWD", "0")  # the mma.sync backward, on any GPU
    elastic_cuda.ops.reload_kernel_options()
    head_mode = torch.tensor([[FULL, STREAM]], dtype=torch.int32, device=DEV)
    q, k, v, go = _inputs(1, 300, 4, 2, 64, torch.bfloat16, seed=5)
    kw = dict(sink=16, window=64)
    torch.use_deterministic_algorithms(True)
    with pytest.raises(RuntimeError, match="mma.sync backward"):
        _grads(q, k, v, go, head_mode, kw)
    torch.use_deterministic_algorithms(True, warn_only=True)
    with pytest.warns(UserWarning, match="mma.sync backward"):
        grads = _grads(q, k, v, go, head_mode, kw)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("D", [64, 128])
def test_unmasked_stage_same_bits(D, monkeypatch):
    # ELASTIC_SM90_BWD_UNMASKED=0 sends fully visible tiles through the masked stage: same arithmetic, so the same
    # bits (dq compared under determinism, dk / dv in the default mode too), and both against float64.
    if not _hopper():
        pytest.skip("the Hopper backward's switch")
    B, S, Hq, Hkv = 1, 1500, 8, 2
    head_mode = torch.tensor([[FULL, STREAM]], dtype=torch.int32, device=DEV)
    kw = dict(sink=64, window=512)
    q, k, v, go = _inputs(B, S, Hq, Hkv, D, torch.bfloat16, seed=11)
    q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
    ref_out, _ = attention_reference(q64, k64, v64, head_mode, **kw)
    ref = torch.autograd.grad(ref_out, (q64, k64, v64), go.double())
    got = {}
    for unmasked in ("1", "0"):
        monkeypatch.setenv("ELASTIC_SM90_BWD_UNMASKED", unmasked)
        assert f"bwd_unmasked={unmasked}" in elastic_cuda.ops.reload_kernel_options()
        for det in (False, True):
            torch.use_deterministic_algorithms(det)
            got[(unmasked, det)] = _grads(q, k, v, go, head_mode, kw)
    for det in (False, True):
        a, b = got[("1", det)], got[("0", det)]
        assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]), f"dk / dv differ (deterministic={det})"
        if det:
            assert torch.equal(a[0], b[0]), "dq differs under determinism"
        for g in a + b:
            assert torch.isfinite(g).all()
    for key, grads in got.items():
        errs = [_rel(g.double(), r) for g, r in zip(grads, ref)]
        print(f"unmasked={key[0]} deterministic={key[1]} D{D}: rel err dq {errs[0]:.2e} dk {errs[1]:.2e} "
              f"dv {errs[2]:.2e}")
        assert all(e < GRAD_TOL[torch.bfloat16] for e in errs), (key, errs)
