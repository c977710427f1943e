"""The Hopper (sm_90a, wgmma + TMA) backward against the float64 reference, and the mma.sync backward on the same cases.

On a compute capability 9.x device the fused strategy's backward runs the Hopper kernel for fp16/bf16, head_dim
64/128, every head mode (BLOCK masks of 128-multiple blocks); ELASTIC_CUDA_SM90_BWD=0 (kernel_options.h) forces the
mma.sync kernel. Every case here runs on both ("bwd" parameter) and checks dq, dk, dv against the float64 reference
(relative errors gathered and printed by test_zz_print_bwd_errors; pytest -s shows them). Shapes: every mode mix
with a different routing per sample, lengths 1..3 and around the 64-query / 128-key tiles, GQA 1/3/4/8, Sq < Skv,
varlen (tails inside the packed tensor), strided inputs, grad through lse, gradient buffers handed NaN-filled
memory (every element must be written), empty rows (BLOCK rows whose bits are all 0 must give 0, not NaN).
Run: pytest -s -m gpu tests/test_attention_bwd_sm90.py
"""
from __future__ import annotations

import math

import pytest
import torch
from conftest import cuda_kernel_names

import elastic_cuda
from elastic_cuda import BLOCK, FULL, STREAM

# run_case: forward + backward of one case against the float64 reference (pytest puts tests/ on sys.path).
import test_attention_cuda as tac
from test_attention_cuda import DEV, GRAD_TOL, run_case

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not elastic_cuda.has_cuda_kernels(), reason="extension built without CUDA kernels"),
]

# sm90: the Hopper backward with its plain stage tail (ELASTIC_SM90_BWD_LEAN=0; dQ by TMA reduce-add); sm90_atomic: the
# same with ELASTIC_SM90_BWD_DQ_TMA=0 (dQ by vector atomics from registers); sm90_overlap / sm90_overlap2:
# ELASTIC_SM90_BWD_OVERLAP=1 / 2 (FlashAttention-4's stage order, per-warp dQ reduce-add; 2: dK's MMA runs into the
# next stage); sm90_lean: ELASTIC_SM90_BWD_LEAN=1 with ELASTIC_SM90_BWD_BANKS=0 (stmatrix dS^T, ring unrolled over its
# slots, double-buffered dQ staging, the first lean tail's bank conflicts); sm90_banks: the lean tail as shipped
# (BANKS=1: lse / delta rows padded, dQ staging rotated per lane); sm80: ELASTIC_CUDA_SM90_BWD=0, the mma.sync backward.
OVERLAP_LEVEL = {"sm90_overlap": "1", "sm90_overlap2": "2"}
BWD_PATHS = pytest.mark.parametrize("bwd", ["sm90", "sm90_atomic", "sm90_overlap", "sm90_overlap2", "sm90_lean",
                                             "sm90_banks", "sm80"])
GQA = ((1, 1), (3, 1), (4, 1), (8, 1), (6, 2), (12, 3), (8, 2), (4, 4))  # group sizes 1, 3, 4, 8
SINK_WINDOW = ((4, 16), (64, 256), (128, 2048), (0, 130), (1, 1), (3, 64))


@pytest.fixture(autouse=True)
def _reload_switches_after_test():
    yield
    elastic_cuda.ops.reload_kernel_options()


def _set_bwd(monkeypatch, bwd):
    monkeypatch.setenv("ELASTIC_CUDA_SM90_BWD", "0" if bwd == "sm80" else "1")
    monkeypatch.setenv("ELASTIC_SM90_BWD_DQ_TMA", "0" if bwd == "sm90_atomic" else "1")
    monkeypatch.setenv("ELASTIC_SM90_BWD_OVERLAP", OVERLAP_LEVEL.get(bwd, "0"))
    monkeypatch.setenv("ELASTIC_SM90_BWD_LEAN", "1" if bwd in ("sm90_lean", "sm90_banks") else "0")
    monkeypatch.setenv("ELASTIC_SM90_BWD_BANKS", "1" if bwd == "sm90_banks" else "0")
    desc = elastic_cuda.ops.reload_kernel_options()
    assert f"sm90_bwd={'0' if bwd == 'sm80' else '1'}" in desc, desc
    assert f" bwd_overlap={OVERLAP_LEVEL.get(bwd, '0')}" in desc, desc
    assert f" bwd_lean={'1' if bwd in ('sm90_lean', 'sm90_banks') else '0'}" in desc, desc
    assert f" bwd_banks={'1' if bwd == 'sm90_banks' else '0'}" in desc, desc


def _is_hopper():
    return torch.cuda.get_device_capability()[0] == 9


def _mixed(B, Hkv, idx):
    """A different rotation of FULL / STREAM / BLOCK per sample."""
    base = torch.tensor([FULL, STREAM, BLOCK], dtype=torch.int32)
    return torch.stack([base[(torch.arange(Hkv) + b + idx) % 3] for b in range(B)])


def _modes(B, Hkv, pattern, idx):
    if pattern == "mix":
        return _mixed(B, Hkv, idx)
    return torch.full((B, Hkv), {"full": FULL, "stream": STREAM, "block": BLOCK}[pattern], dtype=torch.int32)


def _mask(B, Hm, Skv, gen, density=0.6):
    return torch.rand(B, Hm, max(1, -(-Skv // 128)), max(1, -(-Skv // 128)), generator=gen, device=DEV) < density


@BWD_PATHS
def test_sm90_bwd_dispatch(bwd, monkeypatch):
    # On a Hopper device the default (and =1) backward is the wgmma kernel, =0 the mma.sync kernel; a block mask of
    # 64-wide blocks (which straddle the 128-key tiles) takes the mma.sync kernel either way.
    if not _is_hopper():
        pytest.skip("not a compute capability 9.x device")
    _set_bwd(monkeypatch, bwd)
    hm = torch.tensor([[FULL, BLOCK]], dtype=torch.int32, device=DEV)

    def fwd_bwd(block_size):
        q = torch.randn(1, 256, 4, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, 256, 2, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        nb = 256 // block_size
        bm = torch.ones(1, 2, nb, nb, dtype=torch.bool, device=DEV)
        out = elastic_cuda.ops.attention(q, k, k, hm, block_mask=bm, block_size=block_size, strategy="fused")
        return lambda: out.float().sum().backward()

    names = cuda_kernel_names(fwd_bwd(128), "attention_bwd")
    if not names:
        pytest.skip("profiler recorded no kernels")
    assert any("attention_bwd_sm90" in n for n in names) == (bwd != "sm80"), names
    names = cuda_kernel_names(fwd_bwd(64), "attention_bwd")
    assert names and not any("attention_bwd_sm90" in n for n in names), names


@BWD_PATHS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("pattern", ["full", "stream", "block", "mix"])
def test_bwd_lengths_modes(bwd, dtype, D, pattern, monkeypatch):
    # Lengths around the 64-row query tiles and 128-key tiles, GQA 1/3/4/8, two samples routed differently.
    _set_bwd(monkeypatch, bwd)
    gen = torch.Generator(device=DEV).manual_seed(7 + D)
    for idx, S in enumerate((1, 2, 7, 63, 64, 65, 127, 128, 129, 255, 300, 700)):
        Hq, Hkv = GQA[idx % len(GQA)]
        B = 2
        sink, window = SINK_WINDOW[idx % len(SINK_WINDOW)]
        modes = _modes(B, Hkv, pattern, idx)
        Hm = Hq if idx % 3 == 1 else Hkv
        bm = _mask(B, Hm, S, gen) if (modes == BLOCK).any() else None
        run_case(B=B, Sq=S, Skv=S, Hq=Hq, Hkv=Hkv, D=D, dtype=dtype, modes=modes, sink=sink, window=window,
                 block_mask=bm, block_size=128, grad=True, grad_lse=idx % 3 == 2, poison=idx % 4 == 0,
                 seed=200 + idx, key=f"bwd={bwd} {pattern} D{D} S{S} G{Hq // Hkv}")


@BWD_PATHS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("D", [64, 128])
def test_bwd_sq_lt_skv_varlen_strided(bwd, dtype, D, monkeypatch):
    _set_bwd(monkeypatch, bwd)
    gen = torch.Generator(device=DEV).manual_seed(11 + D)
    # Sq < Skv (decode, chunked prefill), mixed modes and empty rows from the block mask.
    for idx, (Sq, Skv) in enumerate(((1, 700), (3, 130), (100, 777), (64, 1000), (129, 300))):
        Hq, Hkv = GQA[(idx + 2) % len(GQA)]
        modes = _mixed(2, Hkv, idx)
        run_case(B=2, Sq=Sq, Skv=Skv, Hq=Hq, Hkv=Hkv, D=D, dtype=dtype, modes=modes, sink=4, window=64,
                 block_mask=_mask(2, Hkv, Skv, gen, 0.5), block_size=128, grad=True, grad_lse=idx % 2 == 0,
                 poison=idx == 0, seed=300 + idx, key=f"bwd={bwd} Sq{Sq}<Skv{Skv} D{D}")
    # varlen: sequences whose query / key tails run into the next sequence (and one that ends the tensor),
    # per-query-head masks.
    for idx, lens in enumerate(([(1, 50), (100, 100), (260, 700)], [(65, 130), (200, 201), (7, 7), (129, 400)],
                                [(300, 300), (1, 1), (64, 128)])):
        B = len(lens)
        Hq, Hkv = ((8, 2), (6, 2), (3, 1))[idx]
        run_case(B=B, Sq=0, Skv=0, Hq=Hq, Hkv=Hkv, D=D, dtype=dtype, modes=_mixed(B, Hkv, idx), sink=8,
                 window=64, block_mask=_mask(B, Hq, max(sk for _, sk in lens), gen, 0.5), block_size=128,
                 layout="varlen", lens=lens, grad=True, grad_lse=True, poison=idx == 1, seed=400 + idx,
                 key=f"bwd={bwd} varlen D{D}")
    # strided inputs (views of a packed qkv buffer)
    run_case(B=2, Sq=200, Skv=333, Hq=4, Hkv=4, D=D, dtype=dtype, modes=_mixed(2, 4, 0), sink=8, window=64,
             block_mask=_mask(2, 4, 333, gen, 0.5), block_size=128, layout="strided", grad=True, seed=450,
             key=f"bwd={bwd} strided D{D}")


@BWD_PATHS
@pytest.mark.parametrize("layout", ["dense", "varlen"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("D", [64, 128])
def test_bwd_tiny_shapes(bwd, layout, dtype, D, monkeypatch):
    # The tiny-shape sweep of test_attention_cuda.py with 128-wide mask blocks (the Hopper backward's BLOCK case).
    _set_bwd(monkeypatch, bwd)
    gen = torch.Generator(device=DEV).manual_seed(51 + D)
    shapes = tac.TINY_SHAPES
    n = len(shapes)
    for idx, (Sq, Skv) in enumerate(shapes):
        Hq, Hkv = tac.TINY_GQA[idx % len(tac.TINY_GQA)]
        sink, window = tac.TINY_SINK_WINDOW[idx % len(tac.TINY_SINK_WINDOW)]
        if layout == "varlen":
            lens = [(Sq, Skv), shapes[(idx + 5) % n], shapes[(idx + 11) % n]]
            B, max_k = 3, max(sk for _, sk in lens)
        else:
            lens, B, max_k = None, (1, 3)[idx % 2], Skv
        modes = tac._tiny_modes(B, Hkv, idx)
        Hm = Hq if idx % 3 == 1 else Hkv
        bm = _mask(B, Hm, max_k, gen) if (modes == BLOCK).any() else None
        run_case(B=B, Sq=Sq, Skv=Skv, Hq=Hq, Hkv=Hkv, D=D, dtype=dtype, modes=modes, sink=sink, window=window,
                 block_mask=bm, block_size=128, layout=layout, lens=lens, grad=True, grad_lse=idx % 4 == 1,
                 seed=2000 + idx, poison=True,
                 key=f"bwd={bwd} tiny {layout} D{D} Sq{Sq} Skv{Skv} G{Hq // Hkv} B{B}")


@BWD_PATHS
def test_bwd_long_gqa8_stream_and_full(bwd, monkeypatch):
    # A longer case at the Llama-3.1-8B head shape (GQA 4) and GQA 8: many query tiles per key tile, STREAM key
    # tiles outside the window's reach, the sink tile seen by every query.
    _set_bwd(monkeypatch, bwd)
    for idx, (Hq, Hkv) in enumerate(((8, 2), (8, 1))):
        modes = torch.tensor([[STREAM, FULL]] if Hkv == 2 else [[STREAM]], dtype=torch.int32)
        run_case(B=1, Sq=2100, Skv=2100, Hq=Hq, Hkv=Hkv, D=128, dtype=torch.bfloat16, modes=modes, sink=64,
                 window=256, grad=True, seed=500 + idx, key=f"bwd={bwd} long G{Hq // Hkv}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_bwd_invalid_mode_nan_and_paths_agree(dtype, monkeypatch):
    # An invalid mode gives NaN dk / dv for that KV head (like its output) on both kernels, finite elsewhere; the two
    # backward kernels agree to rounding on the valid heads.
    grads = {}
    for bwd in ("sm90", "sm90_atomic", "sm90_overlap", "sm90_overlap2", "sm80"):
        _set_bwd(monkeypatch, bwd)
        torch.manual_seed(0)
        q = torch.randn(1, 200, 4, 64, device=DEV, dtype=dtype, requires_grad=True)
        k = torch.randn(1, 200, 2, 64, device=DEV, dtype=dtype, requires_grad=True)
        v = torch.randn(1, 200, 2, 64, device=DEV, dtype=dtype, requires_grad=True)
        hm = torch.tensor([[FULL, 7]], dtype=torch.int32, device=DEV)
        out = elastic_cuda.ops.attention(q, k, v, hm, strategy="fused")
        out[:, :, :2].float().sum().backward()
        assert torch.isnan(k.grad[:, :, 1]).all() and torch.isnan(v.grad[:, :, 1]).all(), bwd
        assert torch.isfinite(k.grad[:, :, 0]).all() and torch.isfinite(v.grad[:, :, 0]).all(), bwd
        assert torch.isfinite(q.grad[:, :, :2]).all(), bwd
        grads[bwd] = (q.grad[:, :, :2].float(), k.grad[:, :, 0].float(), v.grad[:, :, 0].float())
    for path in ("sm90", "sm90_atomic", "sm90_overlap", "sm90_overlap2"):
        for a, b in zip(grads[path], grads["sm80"]):
            err = tac._rel(a, b.double())
            assert err < GRAD_TOL[dtype], (path, err)


def test_bwd_early_release_experiment(monkeypatch):
    # ELASTIC_SM90_BWD_EARLY_RELEASE=1 (ELASTIC_BUILD_EXPERIMENTS=1 builds): the Q/dO slot goes back before dQ's MMA
    # completes; the gradients must equal the default instance's (dK / dV bit-identical: same MMA order; dQ to
    # rounding: atomics / reduce-add order), with either dQ path.
    if "experiments_built=1" not in elastic_cuda.ops.reload_kernel_options():
        pytest.skip("not an ELASTIC_BUILD_EXPERIMENTS=1 build")
    if not _is_hopper():
        pytest.skip("not a compute capability 9.x device")
    grads = {}
    for dq_tma in ("0", "1"):
        for early in ("0", "1"):
            monkeypatch.setenv("ELASTIC_SM90_BWD_DQ_TMA", dq_tma)
            monkeypatch.setenv("ELASTIC_SM90_BWD_EARLY_RELEASE", early)
            assert f" bwd_early_release={early} " in elastic_cuda.ops.reload_kernel_options() + " "
            torch.manual_seed(0)
            gen = torch.Generator(device=DEV).manual_seed(0)
            q = torch.randn(2, 333, 8, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True)
            k = torch.randn(2, 333, 2, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True)
            v = torch.randn(2, 333, 2, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True)
            out = elastic_cuda.ops.attention(q, k, v, _mixed(2, 2, 0).to(DEV), block_mask=_mask(2, 2, 333, gen),
                                             block_size=128, sink=4, window=64, strategy="fused")
            out.float().square().sum().backward()
            grads[dq_tma, early] = (q.grad.double(), k.grad, v.grad)
    for dq_tma in ("0", "1"):
        (dq0, dk0, dv0), (dq1, dk1, dv1) = grads[dq_tma, "0"], grads[dq_tma, "1"]
        assert torch.equal(dk0, dk1) and torch.equal(dv0, dv1), dq_tma
        assert tac._rel(dq1, dq0) < GRAD_TOL[torch.bfloat16], dq_tma


@pytest.mark.parametrize("level", ["1", "2", "lean", "banks"])
@pytest.mark.parametrize("D", [64, 128])
def test_bwd_overlap_same_dk_dv(D, level, monkeypatch):
    # ELASTIC_SM90_BWD_OVERLAP=1 / 2 reorder a stage's MMAs and reduce-add dQ per warp, but every dK / dV
    # accumulator sees the same MMAs in the same order: dV (and at level 1 dK) bit-identical to the plain tail, dQ to
    # rounding (reduce-add order). ELASTIC_SM90_BWD_LEAN=1 ("lean") keeps that order and writes the same shared-memory
    # bytes: dK and dV bit-identical, dQ to rounding; so does ELASTIC_SM90_BWD_BANKS=1 ("banks": the same values at
    # other shared addresses, the same dQ tile reduce-added). Mixed modes, BLOCK bits, a ragged tail, two samples
    # (run_case's tests compare every path with float64 on poisoned outputs).
    if not _is_hopper():
        pytest.skip("not a compute capability 9.x device")
    grads = {}
    for overlap in ("0", level):
        _set_bwd(monkeypatch, {"0": "sm90", "1": "sm90_overlap", "2": "sm90_overlap2", "lean": "sm90_lean",
                               "banks": "sm90_banks"}[overlap])
        torch.manual_seed(1)
        gen = torch.Generator(device=DEV).manual_seed(1)
        q = torch.randn(2, 777, 8, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(2, 777, 2, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(2, 777, 2, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        hm = _mixed(2, 2, 1).to(DEV)
        bm = _mask(2, 2, 777, gen)
        out = elastic_cuda.ops.attention(q, k, v, hm, block_mask=bm, block_size=128, sink=4, window=200,
                                         strategy="fused")
        go = torch.randn_like(out)
        out.backward(go)
        grads[overlap] = (q.grad.double(), k.grad, v.grad)
    (dq0, dk0, dv0), (dq1, dk1, dv1) = grads["0"], grads[level]
    assert torch.isfinite(dq1).all() and torch.isfinite(dk1).all() and torch.isfinite(dv1).all()
    assert torch.equal(dv0, dv1)
    # Level 2 reads dK's A operand (dS^T) from shared memory instead of registers: the same bf16 values and MMAs, so
    # the same bits are expected, but only closeness is asserted there (the hardware's operand path differs).
    err_dk = tac._rel(dk1.double(), dk0.double())
    assert torch.equal(dk0, dk1) if level in ("1", "lean", "banks") else err_dk < 1e-3, err_dk
    err = tac._rel(dq1, dq0)
    print(f"overlap={level} vs default D{D}: rel err dq {err:.2e}, dk {err_dk:.2e} (bit-equal dk: "
          f"{torch.equal(dk0, dk1)})")
    assert err < 1e-2, err


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
@pytest.mark.parametrize("D", [64, 128])
def test_bwd_mode_order_same_gradients(D, deterministic, monkeypatch):
    # ELASTIC_SM90_BWD_MODE_ORDER (attention_bwd_sm90_order.cuh): the CTAs of short-window STREAM pairs are handed
    # out pair by pair in a second pass, the others key tile by key tile; =0 hands every pair out key tile by key
    # tile. Each CTA does the same work either way: dK / dV bit-identical, dQ to rounding (reduce-add order) and
    # bit-identical in the deterministic mode (turns in key-tile order). Three samples with their own routing
    # (FULL / STREAM / BLOCK rotated, an all-STREAM sample), GQA 4, a window short enough for the second pass
    # (4 x 200 <= 9 key tiles x 128) and one too long for it (window 1000: STREAM walked in the first pass).
    if not _is_hopper():
        pytest.skip("not a compute capability 9.x device")
    was, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(deterministic)
        for window in (200, 1000):
            grads = {}
            for order in ("1", "0"):
                _set_bwd(monkeypatch, "sm90")
                monkeypatch.setenv("ELASTIC_SM90_BWD_MODE_ORDER", order)
                assert f" bwd_mode_order={order}" in elastic_cuda.ops.reload_kernel_options()
                torch.manual_seed(3)
                gen = torch.Generator(device=DEV).manual_seed(3)
                q = torch.randn(3, 1111, 12, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
                k = torch.randn(3, 1111, 3, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
                v = torch.randn(3, 1111, 3, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
                hm = torch.cat([_mixed(2, 3, 0), torch.full((1, 3), STREAM, dtype=torch.int32)]).to(DEV)
                out = elastic_cuda.ops.attention(q, k, v, hm, block_mask=_mask(3, 3, 1111, gen), block_size=128,
                                                 sink=64, window=window, strategy="fused")
                out.backward(torch.randn(out.shape, device=DEV, dtype=out.dtype, generator=gen))
                grads[order] = (q.grad.double(), k.grad, v.grad)
            (dq1, dk1, dv1), (dq0, dk0, dv0) = grads["1"], grads["0"]
            assert torch.isfinite(dq1).all() and torch.isfinite(dk1).all() and torch.isfinite(dv1).all()
            assert torch.equal(dk0, dk1) and torch.equal(dv0, dv1), window
            err = tac._rel(dq1, dq0)
            print(f"mode order vs key-tile order D{D} window {window} deterministic={deterministic}: rel err dq {err:.2e}")
            assert torch.equal(dq0, dq1) if deterministic else err < 1e-2, err
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn)


def test_zz_print_bwd_errors():
    """Prints the max relative errors of this file's cases (run last; pytest -s shows them)."""
    errs = {k: v for k, v in tac.MAX_ERR.items() if "bwd=" in k}
    if not errs:
        pytest.skip("no case ran")
    summary: dict[str, float] = {}
    for key, err in errs.items():
        parts = key.split()
        path = [x for x in parts if x.startswith("bwd=")][:1]
        dim = [x for x in parts if x in ("D64", "D128")][:1]
        group = " ".join(parts[:2] + path + dim + ([parts[-1]] if parts[0] == "bwd" else []))
        summary[group] = max(summary.get(group, 0.0), err)
    lines = ["max relative errors, Hopper vs mma.sync backward (lse: max abs error):"]
    lines += [f"  {key:44s} {summary[key]:.3e}" for key in sorted(summary)]
    print("\n" + "\n".join(lines))
    import os
    if os.environ.get("ELASTIC_TEST_ERRORS_OUT"):
        with open(os.environ["ELASTIC_TEST_ERRORS_OUT"], "w") as f:
            f.write("\n".join(lines) + "\n")
    assert all(math.isfinite(e) for e in errs.values())
