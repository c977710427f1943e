"""The per-layer host-overhead cuts of the elastic transformers path (#14 / #15) keep behaviour: the fixed-policy
decisions cached across layers and forwards, the router's functional MLP and one-where decision, the meter's
deferred counting of a router's decision, the op fronts' below-autograd call with grad off."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from elastic_cuda.integrations.transformers import enable  # noqa: E402
from elastic_cuda.ops import BLOCK, FULL, STREAM  # noqa: E402
from elastic_cuda.router import AttentionRouter, RouterSet  # noqa: E402

from test_transformers import SINK, WINDOW, _ids, decisive, make_model, mixed_table  # noqa: E402


def _expected_fixed(table, batch, sparse_mode):
    """head_mode / z of a fixed table [L, Hkv] (True = sparse) as the per-layer code built them."""
    sparse = table.unsqueeze(1).expand(table.shape[0], batch, table.shape[1])
    return torch.where(sparse, sparse_mode, FULL).to(torch.int32), (~sparse).to(torch.float32)


@pytest.mark.parametrize("policy", ["fixed", "all_full", "all_sparse"])
def test_fixed_decisions_follow_batch_and_length_changes(policy):
    model = make_model("llama")
    table = mixed_table()
    state = enable(model, policy=policy, sink=SINK, window=WINDOW,
                   fixed_table=table if policy == "fixed" else None)
    want_table = {"fixed": table, "all_full": torch.zeros_like(table), "all_sparse": torch.ones_like(table)}[policy]
    for B, S in ((1, 12), (1, 20), (3, 20), (2, 7), (1, 12)):  # lengths and batch sizes change between forwards
        with torch.no_grad():
            model(_ids(B, S, seed=S), use_cache=False)
        head_mode, z = _expected_fixed(want_table, B, STREAM)
        assert torch.equal(state.last_head_mode, head_mode.transpose(0, 1))
        assert torch.equal(state.last_z, z.transpose(0, 1))
        assert state.last_head_mode.dtype == torch.int32
        assert [state.mode_list(i) for i in range(2)] == head_mode.tolist()
        msr = want_table.double().mean().item()
        assert state.metrics()["msr"] == pytest.approx(msr)


def test_fixed_decisions_are_rebuilt_for_inference_mode_and_a_new_table():
    model = make_model("llama")
    ids = _ids(2, 16)
    state = enable(model, policy="fixed", sink=SINK, window=WINDOW, fixed_table=mixed_table())
    with torch.inference_mode():
        model(ids, use_cache=False)
    assert state._head_mode[0].is_inference()
    with torch.no_grad():  # decisions made in inference mode are not reused outside it
        model(ids, use_cache=False)
    assert not state._head_mode[0].is_inference()
    # A new enable (e.g. another table) starts from its own decisions.
    state = enable(model, policy="fixed", sink=SINK, window=WINDOW, fixed_table=~mixed_table())
    with torch.no_grad():
        model(ids, use_cache=False)
    assert torch.equal(state.last_head_mode, _expected_fixed(~mixed_table(), 2, STREAM)[0].transpose(0, 1))


def _module_logits(router, keys):
    """The routing logits through the nn.Sequential modules (the formulation before the functional MLP)."""
    from elastic_cuda.ops import boundary_pool

    pooled = boundary_pool(keys, n_first=router.n_first, n_last=router.n_last)
    if router.standardize_input:
        pooled = (pooled - router.input_mean) / router.input_std
    logits = router.router_mlp(router.task_mlp(pooled))
    return logits + router.head_bias if router.use_head_bias else logits


@pytest.mark.parametrize("standardize,head_bias", [(False, False), (True, True)])
@pytest.mark.parametrize("B", [1, 3])
def test_router_functional_mlp_is_bitwise_the_modules(standardize, head_bias, B):
    torch.manual_seed(0)
    r = AttentionRouter(16, num_kv_heads=2, standardize_input=standardize, head_bias=head_bias, n_first=4, n_last=4)
    with torch.no_grad():
        for p in r.parameters():
            p.copy_(torch.randn_like(p))
        if standardize:
            r.input_mean.normal_()
            r.input_std.uniform_(0.5, 2.0)
    keys = torch.randn(B, 11, 2, 16)
    assert torch.equal(r.logits(keys), _module_logits(r, keys))
    for sparse_mode in (STREAM, BLOCK):
        for shift in (0.0, 0.3, torch.linspace(-1, 1, B)):
            out = r.eval()(keys, sparse_mode=sparse_mode, sparsity_shift=shift)
            shift_col = shift[:, None] if isinstance(shift, torch.Tensor) else shift
            z = (out.logits[..., 1] - out.logits[..., 0] > shift_col).float()
            assert torch.equal(out.z, z)
            assert out.head_mode.dtype == torch.int32
            assert torch.equal(out.head_mode, torch.where(z > 0.5, FULL, sparse_mode).to(torch.int32))
        u = torch.rand(B, 2, 2)
        out = r.train()(keys, sparse_mode=sparse_mode, gumbel_u=u)
        assert torch.equal(out.head_mode, torch.where(out.z.detach() > 0.5, FULL, sparse_mode).to(torch.int32))


def test_router_changes_between_forwards_change_the_decision():
    """Nothing of a router's decision is cached: new weights in place, or another RouterSet, route the next forward."""
    model = make_model("llama", dtype=torch.float64, seed=4)
    ids = _ids(2, 24, seed=4)
    routers = decisive(RouterSet.for_model(model).double(), seed=0)
    state = enable(model, routers, policy="router", sink=SINK, window=WINDOW)
    decisions = []
    with torch.no_grad():
        for seed in (0, 5, 9):
            decisive(routers, seed=seed)  # new weights in place
            model(ids, use_cache=False)
            decisions.append(state.last_head_mode.clone())
    for seed, got in zip((0, 5, 9), decisions):  # each equals a fresh model's with those routers
        fresh_model = make_model("llama", dtype=torch.float64, seed=4)
        fresh = enable(fresh_model, decisive(RouterSet.for_model(fresh_model).double(), seed=seed), policy="router",
                       sink=SINK, window=WINDOW)
        with torch.no_grad():
            fresh_model(ids, use_cache=False)
        assert torch.equal(got, fresh.last_head_mode)
    assert any(not torch.equal(decisions[0], d) for d in decisions[1:])  # the weights matter


@pytest.mark.parametrize("B", [1, 2])
def test_router_metrics_equal_the_host_counted_fixed_table(B):
    """The meter counts a router's decision at metrics() (deferred); the same decision as a fixed table is counted
    on the host per call: prefill plus decode steps must give the same ESR, per layer, to the last bit."""
    model = make_model("llama", dtype=torch.float64, seed=4)
    routers = decisive(RouterSet.for_model(model).double())
    ids = _ids(B, 30, seed=4)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5, do_sample=False)
    state = enable(model, routers, policy="router", sink=SINK, window=WINDOW)
    with torch.no_grad():
        model.generate(ids, **kw)
    routed = state.metrics()
    modes = state.last_head_mode
    assert (modes == FULL).any() and (modes == STREAM).any()
    if B == 2 and not torch.equal(modes[0], modes[1]):
        pytest.skip("a fixed table gives every sample one decision")
    state = enable(model, policy="fixed", sink=SINK, window=WINDOW, fixed_table=modes[0] != FULL)
    with torch.no_grad():
        model.generate(ids, **kw)
    fixed = state.metrics()
    assert torch.equal(routed["esr_per_layer"], fixed["esr_per_layer"])
    assert routed["esr"] == fixed["esr"] and routed["msr"] == fixed["msr"]


def test_op_front_without_grad_equals_the_autograd_path():
    from elastic_cuda.ops import attention, boundary_pool

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 9, 4, 16), torch.randn(2, 9, 2, 16), torch.randn(2, 9, 2, 16)
    modes = torch.tensor([[FULL, STREAM], [STREAM, FULL]], dtype=torch.int32)
    qg = q.clone().requires_grad_()
    with_grad = attention(qg, k, v, modes, sink=1, window=3)
    assert with_grad.requires_grad
    with torch.no_grad():
        no_grad = attention(qg, k, v, modes, sink=1, window=3)
        pooled = boundary_pool(k.requires_grad_(), n_first=2, n_last=2)
    assert not no_grad.requires_grad and not pooled.requires_grad
    assert torch.equal(no_grad, with_grad.detach())
    assert torch.equal(pooled, boundary_pool(k, n_first=2, n_last=2).detach())
    with torch.inference_mode():
        assert torch.equal(attention(q, k, v, modes, sink=1, window=3), no_grad)
