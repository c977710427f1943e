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

from conftest import random_router, router_edge_case  # noqa: E402
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


# ----------------------------------------------------------------------------- router layer at prefill (#15)
def _reference_eval_decision(router, keys, sparse_mode, shift):
    """forward()'s eval decision as it was written before route(): subtraction, comparison, z cast, where."""
    logits = router.logits(keys)
    shift_col = shift.to(torch.float32)[:, None] if isinstance(shift, torch.Tensor) else float(shift)
    full = logits[..., 1] - logits[..., 0] > shift_col
    z = full.to(logits.dtype)
    return torch.where(full, torch.tensor(FULL, device=full.device), sparse_mode).to(torch.int32), z


_CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                          reason="needs CUDA")])


@pytest.mark.parametrize("device", ["cpu", _CUDA])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_route_is_bitwise_the_eval_forward(dtype, device):
    """route() (the prefill's decision) and forward() give the reference decision on fresh inputs, including ties
    (equal logits), +-inf and NaN logits, -0.0 / positive / per-request shifts. On CUDA with bf16 keys (the real
    model's) for the fp32 routers: the boundary pool's kernel, then the same torch ops."""
    B = 5
    keys_dtype = torch.bfloat16 if device == "cuda" and dtype == torch.float32 else dtype
    for seed in range(6):
        r = random_router(64 if device == "cuda" else 16, seed=seed, n_first=100, n_last=100).to(device, dtype)
        keys = (torch.randn(B, 300, 3, r.head_dim, dtype=dtype) * (1 + seed)).to(device=device, dtype=keys_dtype)
        router_edge_case(r, keys, seed)  # seed 1: tied logits, seed 2: non-finite keys
        for sparse_mode in (STREAM, BLOCK):
            for shift in (0.0, -0.0, 0.25, -0.5, torch.linspace(-1, 1, B, dtype=torch.float32, device=device)):
                want_mode, want_z = _reference_eval_decision(r, keys, sparse_mode, shift)
                head_mode, z_dtype = r.route(keys, sparse_mode=sparse_mode, sparsity_shift=shift)
                assert torch.equal(head_mode, want_mode) and head_mode.dtype == torch.int32
                assert z_dtype == want_z.dtype == dtype
                out = r(keys, sparse_mode=sparse_mode, sparsity_shift=shift)
                assert torch.equal(out.head_mode, want_mode) and torch.equal(out.z, want_z)
                assert out.z.dtype == want_z.dtype
        if seed == 1:  # a tie is sparse at shift 0 (logit_full - logit_sparse > 0 is False)
            assert (r.route(keys, sparse_mode=STREAM)[0] == STREAM).all()
    with pytest.raises(RuntimeError, match="training"):
        r.train().route(keys)
    with pytest.raises(ValueError, match="sparse_mode"):
        r.eval().route(keys, sparse_mode=FULL)


@pytest.mark.parametrize("sparse_mode", ["stream", "block"])
def test_prefill_decisions_and_z_equal_the_router_forward(sparse_mode):
    """The elastic forward's per-layer decisions (route(), z made when read) equal each router's forward() on the
    layer's pre-RoPE keys; z keeps the routers' dtype."""
    model = make_model("llama", dtype=torch.float64, seed=4)
    routers = decisive(RouterSet.for_model(model, standardize_input=True, head_bias=True,
                                          sparse_mode=sparse_mode).double())
    state = enable(model, routers, policy="router", sink=SINK, window=WINDOW, block_size=16)
    keys = {}
    hooks = [m.k_proj.register_forward_hook(lambda mod, i, o, idx=idx: keys.__setitem__(idx, o))
             for idx, m in enumerate(model.model.layers[i].self_attn for i in range(2))]
    ids = _ids(3, 40, seed=4)
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in hooks:
        h.remove()
    mode_id = BLOCK if sparse_mode == "block" else STREAM
    for i in range(2):
        out = routers[i](keys[i].view(3, 40, 2, 16), sparse_mode=mode_id)
        assert torch.equal(state._head_mode[i], out.head_mode)
        assert torch.equal(state.layer_z(i), out.z) and state.layer_z(i).dtype == torch.float64
    assert torch.equal(state.last_z, torch.stack([routers[i](keys[i].view(3, 40, 2, 16)).z for i in range(2)], 1))
    assert [z.dtype for z in state.z_per_layer] == [torch.float64] * 2


def test_block_pairs_made_when_read_equal_the_eager_counts():
    """The meter's per-query-head BLOCK pairs, made per KV head when read, equal the per-layer computation they
    replaced (mean over the query heads, times the BLOCK heads in the mix), to the bit, and so do the metrics."""
    from elastic_cuda.attention.xattn import block_visible_pairs
    from elastic_cuda.integrations import sparsity_meter
    from elastic_cuda.integrations.sparsity_meter import SparsityMeter

    torch.manual_seed(0)
    B, Hkv, G, S, bs = 2, 3, 3, 100, 16
    nb = -(-S // bs)
    mask = torch.rand(B, Hkv * G, nb, nb) < 0.6
    head_mode = torch.tensor([[BLOCK, FULL, BLOCK], [FULL, BLOCK, BLOCK]], dtype=torch.int32)
    per_q = block_visible_pairs(mask, S, bs)
    for block_heads in (None, head_mode):
        eager = per_q.view(B, Hkv, -1).mean(-1)
        if block_heads is not None:
            eager = eager * (head_mode == BLOCK)
        meters = [SparsityMeter(1) for _ in range(4)]
        for m in meters:
            m.start_layer(0)
        meters[0].set_block_pairs(0, eager)
        meters[1].set_block_pairs(0, per_q, kv_heads=Hkv, block_heads=block_heads)
        meters[2].set_block_mask(0, mask, S, bs, kv_heads=Hkv, block_heads=block_heads)  # kept, counted when read
        keep = sparsity_meter.KEEP_MASK_BYTES
        sparsity_meter.KEEP_MASK_BYTES = mask.numel() - 1  # too large to keep: counted at once
        try:
            meters[3].set_block_mask(0, mask, S, bs, kv_heads=Hkv, block_heads=block_heads)
        finally:
            sparsity_meter.KEEP_MASK_BYTES = keep
        assert meters[2]._block_pairs[0].mask is not None and meters[3]._block_pairs[0].mask is None
        for m in meters:
            m.count(0, head_mode, S, S, None, SINK, WINDOW)
        want = meters[0].metrics(head_mode[:, None])
        for m in meters[1:]:
            assert torch.equal(m.block_pairs(0), eager)
            got = m.metrics(head_mode[:, None])
            assert torch.equal(want["esr_per_layer"], got["esr_per_layer"]) and want["esr"] == got["esr"]


# ----------------------------------------------------------------------------- op counts per attention layer
class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.on = [], True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.on:
            self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _attention_ops_per_layer(model, ids, monkeypatch):
    """ops dispatched by the elastic attention calls of one prefill, per layer (the BLOCK estimate counted as the
    one fused op it is on CUDA, as experiments/host_overhead_per_layer.py does)."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from elastic_cuda.attention import xattn

    counter = _OpCounter()

    def stand_in(q, k, head_mode, *, cu_seqlens=None, max_seqlen=None, block_size, stride, threshold, scale):
        counter.ops.append("elastic::xattn_block_mask")
        counter.on = False
        try:
            mask = xattn._xattn_block_mask_torch(q, k, block_size=block_size, stride=stride, threshold=threshold,
                                                 scale=scale, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
            heads = (head_mode == BLOCK).repeat_interleave(q.shape[-2] // k.shape[-2], dim=1)
            return mask & heads[:, :, None, None]
        finally:
            counter.on = True

    monkeypatch.setattr(xattn, "_fused_op_applies", lambda *a, **k: True)
    monkeypatch.setattr(xattn, "xattn_block_mask_op", stand_in)
    original = ALL_ATTENTION_FUNCTIONS["elastic"]
    per_call = []

    def counted(*args, **kwargs):
        start = len(counter.ops)
        with counter:
            out = original(*args, **kwargs)
        per_call.append(counter.ops[start:])
        return out

    AttentionInterface.register("elastic", counted)
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
            per_call.clear()
            model(ids, use_cache=False)
    finally:
        AttentionInterface.register("elastic", original)
    return per_call


# Ops one elastic attention layer dispatches at prefill (unpadded, B 1, eval routers with standardisation and head
# bias, as the shipped ones, without router graphs), measured after the #15 cuts; before them: 5, 30 and 35
# (benchmarks/results/host_overhead/2026-12-02_cpu_router_layer.md). Exact: one more op fails. Each op
# is a kernel launch or at least dispatcher time on a GPU, where the prefill of a small model is launch-bound: a
# change that adds one back fails here. Views (transpose, t, view, select) included; on CUDA the all_full call
# has no CPU value check.
# ops per attention call: the eager route() (fused_router=False) and the default, the whole decision as one op
MAX_OPS_PER_LAYER = {"all_full": 4, "stream_router": 27, "block_router": 28, "stream_router_fused": 5,
                     "block_router_fused": 6}


@pytest.mark.parametrize("variant", list(MAX_OPS_PER_LAYER))
def test_ops_per_attention_layer_stay_cut(variant, monkeypatch):
    model = make_model("llama", seed=4)
    sparse_mode = "block" if variant.startswith("block") else "stream"
    fused = variant.endswith("_fused")
    if variant == "all_full":
        enable(model, policy="all_full", sink=SINK, window=WINDOW)
    else:
        routers = decisive(RouterSet.for_model(model, standardize_input=True, head_bias=True,
                                              sparse_mode=sparse_mode))
        enable(model, routers, policy="router", sink=SINK, window=WINDOW, block_size=16, fused_router=fused)
    ids = _ids(1, 40, seed=4)
    per_call = _attention_ops_per_layer(model, ids, monkeypatch)
    assert len(per_call) == 2
    # the first layer also checks once per forward that position_ids are not packed (5 ops, one host sync)
    assert per_call[0][:5] == ["aten.slice", "aten.slice", "aten.le", "aten.any", "aten._local_scalar_dense"]
    for ops in (per_call[0][5:], per_call[1]):
        assert "elastic.attention" in ops
        if variant != "all_full" and not fused:
            assert "elastic.boundary_pool" in ops and ops.count("aten.addmm") == 5
        if fused:
            assert ops.count("elastic.router_decision") == 1 and "aten.addmm" not in ops, ops
        assert len(ops) <= MAX_OPS_PER_LAYER[variant], ops


def test_routerset_indexing_is_the_module_lists():
    routers = RouterSet({"num_layers": 4, "num_kv_heads": 2, "head_dim": 8})
    assert all(routers[i] is routers.routers[i] for i in range(4))
    assert routers[-1] is routers.routers[3] and list(routers[1:3]) == list(routers.routers[1:3])
    replacement = AttentionRouter(8)
    routers.routers[2] = replacement  # a replaced layer router is found (nothing cached)
    assert routers[2] is replacement
    with pytest.raises(IndexError):
        routers[4]
