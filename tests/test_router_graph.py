"""CUDA graphs of the routers' eval decisions (elastic_cuda/router_graph.py, enable(router_graphs=True)): the same
bits as the eager route() on fresh inputs, graphs that follow in-place weight updates and never answer for another
input (new storage, batch size, shift, mode), and the same model outputs and decisions end to end."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from elastic_cuda.integrations.transformers import enable  # noqa: E402
from elastic_cuda.ops import BLOCK, FULL, STREAM  # noqa: E402
from elastic_cuda.router import RouterSet  # noqa: E402
from elastic_cuda.router_graph import RouterGraphs  # noqa: E402

from conftest import random_router  # noqa: E402


def _router(seed, device, Hkv=3, D=64):
    return random_router(D, Hkv, seed).to(device)


def _same_bits(a, b):
    """Bitwise equality of float tensors, NaN payloads included (torch.equal is False for any NaN)."""
    ints = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
            torch.float16: torch.int16}
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(ints[a.dtype]), b.view(ints[b.dtype]))


def test_cpu_inputs_run_the_eager_decision():
    r = _router(0, "cpu", D=16)
    graphs = RouterGraphs()
    keys = torch.randn(2, 30, 3, 16)
    head_mode, dtype = graphs.route(r, keys, sparse_mode=STREAM)
    assert torch.equal(head_mode, r.route(keys, sparse_mode=STREAM)[0]) and dtype == torch.float32
    assert len(graphs) == 0


def test_enable_checks_router_graphs():
    from test_transformers import make_model

    with pytest.raises(ValueError, match="router_graphs"):
        enable(make_model("llama"), policy="all_full", router_graphs="yes")


@pytest.mark.parametrize("mode_ctx", ["no_grad", "inference_mode"])
def test_graph_decision_is_bitwise_the_eager_one(mode_ctx):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    ctx = torch.inference_mode if mode_ctx == "inference_mode" else torch.no_grad
    graphs = RouterGraphs()
    routers = [_router(s, "cuda") for s in range(3)]
    checked = 0
    with ctx():
        for rep in range(4):  # fresh keys per replay: the graphs are reused
            for i, r in enumerate(routers):
                for B in (1, 2):
                    for sparse_mode in (STREAM, BLOCK):
                        for shift in (0.0, 0.3):
                            keys = torch.randn(B, 257 + 64 * rep, 3, 64, device="cuda", dtype=torch.bfloat16) * (1 + i)
                            if rep == 3:
                                keys[0, 5, 1, :] = float("nan")
                            want_logits = r.logits(keys)
                            want_mode, _ = r.route(keys, sparse_mode=sparse_mode, sparsity_shift=shift)
                            head_mode, logits = graphs.decide(r, keys, sparse_mode=sparse_mode, sparsity_shift=shift)
                            assert _same_bits(logits, want_logits), (rep, i, B, sparse_mode, shift)
                            assert torch.equal(head_mode, want_mode) and head_mode.dtype == torch.int32
                            assert torch.equal(head_mode, r(keys, sparse_mode=sparse_mode, sparsity_shift=shift)
                                               .head_mode)
                            checked += 1
    assert len(graphs) == 3 * 2 * 2 * 2 and checked == 4 * len(graphs)
    # the decisions of both kinds occur (the comparison is not vacuous)
    keys = torch.randn(4, 300, 3, 64, device="cuda", dtype=torch.bfloat16)
    modes = torch.cat([graphs.decide(r, keys, sparse_mode=STREAM)[0] for r in routers])
    assert (modes == FULL).any() and (modes == STREAM).any()


def test_graph_follows_weight_updates_and_new_storage():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    graphs = RouterGraphs()
    r = _router(0, "cuda")
    keys = torch.randn(2, 400, 3, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        graphs.decide(r, keys, sparse_mode=STREAM)
        for step in range(3):
            if step == 0:    # in place: the captured memory holds the new values
                for p in r.parameters():
                    p.mul_(-1.5)
            elif step == 1:  # new storage (as Module.to / param.data = ... make): a new graph
                last = r.router_mlp[-1]
                last.weight.data = last.weight.data.clone() * 2
            else:            # load_state_dict copies in place
                r.load_state_dict(_router(7, "cuda").state_dict())
            head_mode, logits = graphs.decide(r, keys, sparse_mode=STREAM)
            assert _same_bits(logits, r.logits(keys)) and torch.equal(head_mode, r.route(keys)[0])
    assert len(graphs) == 2


def test_graph_head_modes_are_not_overwritten_by_later_replays():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    graphs = RouterGraphs()
    r = _router(1, "cuda")
    with torch.no_grad():
        keys = [torch.randn(8, 300, 3, 64, device="cuda", dtype=torch.bfloat16) * (k + 1) for k in range(3)]
        got = [graphs.decide(r, k, sparse_mode=STREAM)[0] for k in keys]
        for k, g in zip(keys, got):
            assert torch.equal(g, r.route(k)[0])


def _cuda_model(seed=0, layers=3):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=576, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=4096,
                      attn_implementation="sdpa", pad_token_id=0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()


@pytest.mark.parametrize("sparse_mode", ["stream", "block"])
def test_model_prefill_with_router_graphs_equals_eager(sparse_mode):
    """A SmolLM2-shaped CUDA model (9 q / 3 KV heads, D 64, bf16) with standardising head-bias routers: the
    forward with router graphs gives the eager forward's decisions, z, ESR and logits to the bit, twice (capture,
    then replay) and for a second batch size."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = _cuda_model()
    routers = RouterSet.for_model(model, standardize_input=True, head_bias=True, sparse_mode=sparse_mode)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in routers.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 2.0 / m.in_features ** 0.5)
    routers = routers.eval()
    results = {}
    for graphs in (False, True):
        state = enable(model, routers, policy="router", sink=64, window=256, router_graphs=graphs,
                       fused_router=False)  # the eager route() as the reference
        outs = []
        for rep, B in enumerate((1, 1, 2)):
            ids = torch.randint(3, 256, (B, 1000 + 100 * rep), generator=torch.Generator().manual_seed(rep))
            with torch.inference_mode():
                logits = model(ids.cuda(), use_cache=False).logits
            outs.append((logits, state.last_head_mode.clone(), state.last_z.clone(), state.metrics()["esr"]))
        results[graphs] = outs
        if graphs:
            assert len(state.router_graphs) == 2 * 3  # per layer: B 1 (captured once, replayed) and B 2
    modes = torch.cat([o[1].flatten() for o in results[False]])
    assert (modes == FULL).any() and (modes != FULL).any()
    for (l0, m0, z0, e0), (l1, m1, z1, e1) in zip(results[False], results[True]):
        assert torch.equal(m0, m1) and _same_bits(z0, z1) and e0 == e1
        assert _same_bits(l0, l1)


# every test below the two CPU ones needs CUDA (each skips without it): marked gpu
for _name in [n for n in list(globals()) if n.startswith("test_") and n not in
              ("test_cpu_inputs_run_the_eager_decision", "test_enable_checks_router_graphs")]:
    globals()[_name] = pytest.mark.gpu(globals()[_name])
