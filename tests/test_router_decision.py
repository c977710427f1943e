"""elastic::router_decision (ops.router_decision, AttentionRouter.route_fused, enable(fused_router=True)): an eval
router's decision in one op. CPU: route()'s bits (logits and head modes). CUDA: the fused kernel's logits against a
float64 reference of the same pooled keys, its decisions equal to route()'s away from near-ties; with
ELASTIC_ROUTER_KERNEL=0 route()'s bits."""
from __future__ import annotations

import pytest
import torch

from elastic_cuda.ops import BLOCK, FULL, STREAM, boundary_pool, reload_kernel_options, router_decision
from elastic_cuda.router import AttentionRouter

from conftest import random_router, rel_err, router_edge_case

_CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                          reason="needs CUDA")])


def _fused_logits(r, keys, cu_seqlens=None, **kw):
    """(head_mode, logits) of the op for router r."""
    return router_decision(keys, r._fused_mlp(), cu_seqlens=cu_seqlens,
                           input_mean=r.input_mean if r.standardize_input else None,
                           input_std=r.input_std if r.standardize_input else None,
                           head_bias=r.head_bias if r.use_head_bias else None, n_first=r.n_first, n_last=r.n_last,
                           **kw)


def _cases(device, dtype, D):
    """(router, keys, cu_seqlens) on fresh inputs: plain, standardised + head bias, ties, non-finite keys, varlen."""
    B = 5
    keys_dtype = torch.bfloat16 if device == "cuda" and dtype == torch.float32 else dtype
    for seed in range(5):
        r = random_router(D, seed=seed, n_first=100, n_last=100).to(device, dtype)
        if seed == 3:  # the paper's architecture: no standardisation, no head bias
            r = AttentionRouter(D, num_kv_heads=3, n_first=7, n_last=5).to(device, dtype).eval()
            with torch.no_grad():
                for p in r.parameters():
                    p.copy_(torch.randn_like(p) * 0.5)
        keys = (torch.randn(B, 300, 3, D, dtype=torch.float64) * (1 + seed)).to(device=device, dtype=keys_dtype)
        cu = None
        router_edge_case(r, keys, seed)  # seed 1: tied logits, seed 2: non-finite keys
        if seed == 4:  # packed sequences of different lengths (one shorter than the pooled windows, one empty)
            keys = keys.reshape(-1, 3, D)[:700]
            cu = torch.tensor([0, 150, 150, 190, 600, 700], dtype=torch.int32, device=device)
        yield r, keys, cu


_SHIFTS = (0.0, -0.0, 0.25, -0.5, "tensor")


def _shift(shift, B, device):
    return torch.linspace(-1, 1, B, dtype=torch.float32, device=device) if shift == "tensor" else shift


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_decision_is_bitwise_route(dtype):
    for r, keys, cu in _cases("cpu", dtype, 16):
        B = 5
        want_logits = r.logits(keys, cu)
        for sparse_mode in (STREAM, BLOCK):
            for shift in _SHIFTS:
                s = _shift(shift, B, "cpu")
                want_mode, want_dtype = r.route(keys, cu_seqlens=cu, sparse_mode=sparse_mode, sparsity_shift=s)
                head_mode, z_dtype = r.route_fused(keys, cu_seqlens=cu, sparse_mode=sparse_mode, sparsity_shift=s)
                assert torch.equal(head_mode, want_mode) and head_mode.dtype == torch.int32
                assert z_dtype == want_dtype == dtype
        _, logits = _fused_logits(r, keys, cu)
        assert logits.dtype == dtype
        assert torch.equal(logits.isnan(), want_logits.isnan())
        assert torch.equal(logits.nan_to_num(), want_logits.nan_to_num())


def test_route_fused_falls_back_where_the_op_does_not_apply():
    r = random_router(16, n_first=4, n_last=4)
    keys = torch.randn(2, 20, 3, 16)
    want = r.route(keys)[0]
    r.start_input_calibration()  # calibration accumulates pooled statistics: route() does that
    assert torch.equal(r.route_fused(keys)[0], want)
    assert r.calibration_sums()[-1].item() == 2
    r._calibration = None
    r.task_mlp[1] = torch.nn.GELU()  # a replaced submodule: not the op's MLP
    assert r._fused_mlp() is None
    assert torch.equal(r.route_fused(keys)[0], r.route(keys)[0])
    with pytest.raises(RuntimeError, match="training"):
        r.train().route_fused(keys)


def test_bad_arguments_name_the_argument():
    r = random_router(16, n_first=4, n_last=4)
    keys = torch.randn(2, 20, 3, 16)
    with pytest.raises(ValueError, match="head_dim=16"):
        r.route_fused(torch.randn(2, 20, 3, 8))
    with pytest.raises(ValueError, match="3 KV heads"):
        r.route_fused(torch.randn(2, 20, 2, 16))
    with pytest.raises(ValueError, match="sparse_mode"):
        r.route_fused(keys, sparse_mode=FULL)
    with pytest.raises(ValueError, match="sparsity_shift"):
        r.route_fused(keys, sparsity_shift=torch.zeros(3))
    mlp = r._fused_mlp()
    with pytest.raises(RuntimeError, match="mlp must hold"):
        router_decision(keys, mlp[:8])
    with pytest.raises(RuntimeError, match=r"mlp\[2\]"):
        router_decision(keys, [mlp[0], mlp[1], mlp[2][:, :5]] + mlp[3:])
    with pytest.raises(RuntimeError, match="input_mean and input_std"):
        router_decision(keys, mlp, input_mean=r.input_mean)
    with pytest.raises(RuntimeError, match="head_bias must have shape"):
        router_decision(keys, mlp, head_bias=torch.zeros(3, 3))
    with pytest.raises(RuntimeError, match="shift must be a float32 tensor"):
        router_decision(keys, mlp, shift=torch.zeros(2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="sparse_mode"):
        router_decision(keys, mlp, sparse_mode=0)


def test_op_has_no_autograd_and_fake_shapes():
    r = random_router(16, n_first=4, n_last=4)
    keys = torch.randn(2, 20, 3, 16, requires_grad=True)
    with torch.enable_grad():
        head_mode, logits = _fused_logits(r, keys)
    assert not logits.requires_grad and logits.grad_fn is None
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    fk = mode.from_tensor(keys.detach())
    fmlp = [mode.from_tensor(t.detach()) for t in r._fused_mlp()]
    with mode:
        fm, fl = router_decision(fk, fmlp)
    assert fm.shape == (2, 3) and fm.dtype == torch.int32 and fl.shape == (2, 3, 2)


@pytest.mark.parametrize("sparse_mode", ["stream", "block"])
def test_model_prefill_with_fused_router_equals_eager(sparse_mode):
    pytest.importorskip("transformers")
    from elastic_cuda.integrations.transformers import enable
    from elastic_cuda.router import RouterSet

    from test_transformers import SINK, WINDOW, _ids, decisive, make_model

    ids = _ids(2, 40, seed=3)
    outs, modes = [], []
    for fused in (False, True):
        model = make_model("llama", seed=4)
        routers = decisive(RouterSet.for_model(model, standardize_input=True, head_bias=True,
                                              sparse_mode=sparse_mode))
        state = enable(model, routers, policy="router", sink=SINK, window=WINDOW, block_size=16, fused_router=fused)
        with torch.no_grad():
            outs.append(model(ids, use_cache=False).logits)
        modes.append(state.last_head_mode)
        assert state.last_z.dtype == torch.float32
    assert torch.equal(modes[0], modes[1]) and torch.equal(outs[0], outs[1])
    assert 0 < (modes[0] == FULL).sum() < modes[0].numel()  # a mix, so the test can fail
    with pytest.raises(ValueError, match="fused_router"):
        enable(make_model("llama"), policy="all_full", fused_router="yes")


def test_ops_per_attention_layer_with_fused_router(monkeypatch):
    """With fused_router the router's ~23 ops become the one elastic.router_decision."""
    pytest.importorskip("transformers")
    from elastic_cuda.integrations.transformers import enable
    from elastic_cuda.router import RouterSet

    from test_host_overhead import _attention_ops_per_layer
    from test_transformers import SINK, WINDOW, _ids, decisive, make_model

    model = make_model("llama", seed=4)
    routers = decisive(RouterSet.for_model(model, standardize_input=True, head_bias=True))
    enable(model, routers, policy="router", sink=SINK, window=WINDOW, fused_router=True)
    per_call = _attention_ops_per_layer(model, _ids(1, 40, seed=4), monkeypatch)
    for ops in (per_call[0][5:], per_call[1]):
        assert ops.count("elastic.router_decision") == 1 and "aten.addmm" not in ops
        assert len(ops) <= 5, ops  # 3 transposes, the decision, the attention


# ----------------------------------------------------------------------------- CUDA
def _reference_logits64(r, keys, cu):
    """float64 logits from the pooled keys (boundary_pool's bits, which the kernel shares)."""
    x = boundary_pool(keys, n_first=r.n_first, n_last=r.n_last, cu_seqlens=cu).double()
    if r.standardize_input:
        x = (x - r.input_mean.double()) / r.input_std.double()
    mlp = [t.double() for t in r._fused_mlp()]
    for i in range(5):
        x = torch.nn.functional.linear(x, mlp[2 * i], mlp[2 * i + 1])
        if i in (0, 2, 3):
            x = torch.nn.functional.silu(x)
    return x + r.head_bias.double() if r.use_head_bias else x


# Kernel logits vs the float64 reference of the same pooled keys: fp32 FMA sums over <= 256 terms and the fast exp
# of SiLU. Decisions are compared with route() (cuBLAS) where |margin - shift| exceeds this times max |logit|.
_LOGIT_TOL = 1e-5


@pytest.mark.parametrize("device", [_CUDA])
@pytest.mark.parametrize("keys_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_kernel_against_float64_and_route(device, keys_dtype):
    worst = 0.0
    for r, keys, cu in _cases(device, torch.float32, 64):
        keys = keys.to(keys_dtype)
        B = 5
        ref = _reference_logits64(r, keys, cu)
        head_mode, logits = _fused_logits(r, keys, cu)
        finite = torch.isfinite(ref).all(-1)
        assert torch.equal(torch.isfinite(logits).all(-1), finite)
        err = rel_err(logits[finite], ref[finite])
        worst = max(worst, err)
        assert err < _LOGIT_TOL, err
        scale = ref[finite].abs().max().item()
        margin = ref[..., 1] - ref[..., 0]
        for sparse_mode in (STREAM, BLOCK):
            for shift in _SHIFTS:
                s = _shift(shift, B, device)
                want = r.route(keys, cu_seqlens=cu, sparse_mode=sparse_mode, sparsity_shift=s)[0]
                got = r.route_fused(keys, cu_seqlens=cu, sparse_mode=sparse_mode, sparsity_shift=s)[0]
                col = s[:, None] if isinstance(s, torch.Tensor) else s
                clear = ((margin - col).abs() > 4 * _LOGIT_TOL * scale) | ~finite
                assert torch.equal(got[clear], want[clear]), (shift, got, want)
                assert got.dtype == torch.int32 and set(got.unique().tolist()) <= {FULL, sparse_mode}
    print(f"router_decision kernel, keys {keys_dtype}: worst logit rel err vs float64 {worst:.2e}")


@pytest.mark.parametrize("device", [_CUDA])
def test_cuda_without_the_kernel_is_bitwise_route(device, monkeypatch):
    monkeypatch.setenv("ELASTIC_ROUTER_KERNEL", "0")
    assert "router_kernel=0" in reload_kernel_options()
    try:
        for r, keys, cu in _cases(device, torch.float32, 64):
            want_logits = r.logits(keys, cu)
            _, logits = _fused_logits(r, keys, cu)
            assert torch.equal(logits.nan_to_num(), want_logits.nan_to_num())
            for shift in _SHIFTS:
                s = _shift(shift, 5, device)
                assert torch.equal(r.route_fused(keys, cu_seqlens=cu, sparsity_shift=s)[0],
                                   r.route(keys, cu_seqlens=cu, sparsity_shift=s)[0])
    finally:
        monkeypatch.delenv("ELASTIC_ROUTER_KERNEL")
        reload_kernel_options()
