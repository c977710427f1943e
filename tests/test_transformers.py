"""transformers backend on tiny random Llama / Mistral / Qwen2 / Qwen3 models (no downloads, CPU, seconds).

Tolerances: all_full vs the model's own eager attention in fp32: max relative error (max |diff| / max |ref|)
< 1e-4. Sparse policies vs a pure-PyTorch masked reference (HF eager attention with the per-head additive
mask of elastic_cuda.reference.additive_mask) in fp64: < 1e-9; comparisons with model.generate's scores
(which transformers returns in fp32) of fp64 models: < 1e-6.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from elastic_cuda.attention import causal_pairs, visible_pairs  # noqa: E402
from elastic_cuda.integrations.transformers import disable, enable  # noqa: E402
from elastic_cuda.ops import FULL, STREAM  # noqa: E402
from elastic_cuda.reference import additive_mask, visible_mask  # noqa: E402
from elastic_cuda.router import RouterSet  # noqa: E402

KINDS = ("llama", "mistral", "qwen2", "qwen3")
SINK, WINDOW = 3, 8
REF_IMPL = "elastic_test_masked_reference"


def make_model(kind, dtype=torch.float32, seed=0, layers=2):
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
               "qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
    cfg_cls, model_cls = classes[kind]
    extra = {"sliding_window": None} if kind == "mistral" else {}
    cfg = cfg_cls(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                  attn_implementation="eager", pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)
    torch.manual_seed(seed)
    model = model_cls(cfg).to(dtype).eval()
    # Random init gives near-uniform attention; larger q/k weights make the masks matter for the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)
    return model


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _ids(B, S, seed=1):
    return torch.randint(3, 128, (B, S), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- masked reference model
_REF_TABLE = {}


def _masked_reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention (written out, softmax in the input dtype: HF's eager softmax runs in fp32) with the
    elastic semantics as an additive per-head mask [B, Hq, Sq, Skv]."""
    B, Hq, Sq, _ = query.shape
    Skv = key.shape[2]
    groups = Hq // key.shape[1]
    head_mode = _REF_TABLE["modes"][:, module.layer_idx]  # [B, Hkv]
    block_mask = _REF_TABLE.get("block_masks", {}).get(module.layer_idx)
    mask = additive_mask(head_mode, Sq, Skv, Hq, sink=_REF_TABLE["sink"], window=_REF_TABLE["window"],
                         block_mask=block_mask, block_size=_REF_TABLE.get("block_size", 128), dtype=query.dtype,
                         device=query.device)
    k = key.repeat_interleave(groups, dim=1)
    v = value.repeat_interleave(groups, dim=1)
    probs = torch.softmax(query @ k.transpose(2, 3) * scaling + mask, dim=-1)
    return (probs @ v).transpose(1, 2), None


def reference_logits(model, ids, head_modes, sink=SINK, window=WINDOW, block_masks=None, block_size=128):
    """head_modes int [B, L, Hkv]; block_masks {layer: bool [B, Hq, NB, NB]} for BLOCK heads."""
    from transformers import AttentionInterface

    AttentionInterface.register(REF_IMPL, _masked_reference_attention)
    _REF_TABLE.update(modes=head_modes, sink=sink, window=window, block_masks=block_masks or {},
                      block_size=block_size)
    previous = model.config._attn_implementation
    model.set_attn_implementation(REF_IMPL)
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        model.set_attn_implementation(previous)


def decisive(routers, seed=0):
    """Eval-mode routers with O(1) logits (the N(0, 0.02) init gives ~1e-5 logits, i.e. near ties), so that some
    heads go FULL and some STREAM and float rounding cannot flip a decision."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in routers.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 2.0 / m.in_features ** 0.5)
    return routers.eval()


def mixed_table(L=2, Hkv=2):
    t = torch.zeros(L, Hkv, dtype=torch.bool)
    t[0, 1] = True
    t[1, 0] = True
    return t


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("kind", KINDS)
def test_all_full_matches_eager(kind):
    model = make_model(kind)
    ids = _ids(2, 48)
    with torch.no_grad():
        ref = model(ids).logits
        state = enable(model, policy="all_full")
        assert model.config._attn_implementation == "elastic"
        out = model(ids).logits
    assert rel_err(out, ref) < 1e-4
    assert state.last_head_mode.shape == (2, 2, 2) and bool((state.last_head_mode == FULL).all())
    m = state.metrics()
    assert m["msr"] == 0.0 and m["esr"] == 0.0
    disable(model)
    assert model.config._attn_implementation == "eager"
    assert not hasattr(model.model.layers[0].self_attn, "_elastic_state")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("policy", ["all_sparse", "fixed"])
def test_sparse_policies_match_masked_reference(kind, policy):
    model = make_model(kind, dtype=torch.float64)
    ids = _ids(2, 40, seed=2)
    table = mixed_table()
    state = enable(model, policy=policy, sink=SINK, window=WINDOW, fixed_table=table if policy == "fixed" else None)
    with torch.no_grad():
        out = model(ids).logits
    modes = state.last_head_mode
    expect_sparse = torch.ones(2, 2, dtype=torch.bool) if policy == "all_sparse" else table
    assert torch.equal(modes, torch.where(expect_sparse, STREAM, FULL).to(torch.int32).expand(2, 2, 2))
    disable(model)
    ref = reference_logits(model, ids, modes)
    dense = model(ids).logits.detach()
    assert rel_err(out, ref) < 1e-9
    assert rel_err(out, dense) > 1e-3  # the masks really change the result (the test can fail)


BLOCK_KW = dict(sparse_mode="block", block_size=8, xattn_stride=2)


def _record_block_masks(state):
    """Wrap state.block_mask to keep each layer's estimated masks."""
    seen, estimate = {}, state.block_mask

    def recording(layer_idx, *args):
        seen[layer_idx] = estimate(layer_idx, *args)
        return seen[layer_idx]

    state.block_mask = recording
    return seen


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize("policy", ["all_sparse", "fixed"])
def test_block_mode_matches_masked_reference(kind, policy):
    """BLOCK heads run the XAttention masks estimated from each layer's own queries and keys (per query head)."""
    from elastic_cuda.ops import BLOCK

    model = make_model(kind, dtype=torch.float64, seed=12)
    ids = _ids(2, 43, seed=12)
    state = enable(model, policy=policy, fixed_table=mixed_table() if policy == "fixed" else None,
                   xattn_threshold=0.6, **BLOCK_KW)
    masks = _record_block_masks(state)
    with torch.no_grad():
        out = model(ids).logits
    modes = state.last_head_mode
    assert set(modes.unique().tolist()) == ({BLOCK} if policy == "all_sparse" else {FULL, BLOCK})
    assert sorted(masks) == [0, 1] and masks[0].shape == (2, 4, 6, 6)
    for m in masks.values():  # a real selection: more than sink + diagonal, less than every causal block
        assert 2 * 6 - 1 < int(m[0, 0].sum()) < 21 or 2 * 6 - 1 < int(m[1, 2].sum()) < 21
    m = state.metrics()
    assert 0.0 < m["esr"] < 1.0
    disable(model)
    ref = reference_logits(model, ids, modes, block_masks=masks, block_size=8)
    dense = model(ids).logits.detach()
    assert rel_err(out, ref) < 1e-9
    assert rel_err(out, dense) > 1e-4  # the masks really change the result (the test can fail)


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "left_padded"])
def test_block_mode_threshold_one_is_dense(padded):
    """threshold 1 keeps every causal block: BLOCK heads equal full attention, padded batches included."""
    model = make_model("llama", dtype=torch.float64, seed=13)
    ids = _ids(2, 37, seed=13)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :9] = 0
    with torch.no_grad():  # reference: each sample's real tokens alone, every head FULL (HF eager's softmax is
        enable(model, policy="all_full")  # fp32, too coarse for an fp64 comparison)
        dense = [model(ids[b:b + 1, mask[b].bool()]).logits[0] for b in range(2)]
        state = enable(model, policy="all_sparse", xattn_threshold=1.0, **BLOCK_KW)
        # positions over real tokens, as generate() gives them (HF's RoPE tables are fp32)
        out = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    for b in range(2):
        assert rel_err(out[b, mask[b].bool()], dense[b]) < 1e-9
    assert state.metrics()["esr"] == 0.0 and state.metrics()["msr"] == 1.0


def _generate_with_both_caches(model, ids, new_tokens):
    """Greedy generation of `new_tokens` with transformers' own cache and with an ElasticCache:
    (plain, elastic, the ElasticCache), each output with its sequences and per-step logits."""
    from elastic_cuda.integrations.cache import ElasticCache

    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
              do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        plain = model.generate(ids, **kw)
        cache = ElasticCache(model)
        elastic = model.generate(ids, past_key_values=cache, **kw)
    return plain, elastic, cache


def test_block_mode_generation_decodes_block_heads_densely(monkeypatch):
    """After a BLOCK prefill, decode steps attend densely for BLOCK heads, and ElasticCache keeps their history."""
    import elastic_cuda.integrations.transformers as backend
    from elastic_cuda.ops import BLOCK

    calls = []  # (prefill?, head modes, block mask given?) of every attention call
    op = backend.hybrid_attention

    def recording(q, k, v, head_mode, **kw):
        calls.append((q.shape[1] == k.shape[1], set(head_mode.flatten().tolist()), kw["block_mask"] is not None))
        return op(q, k, v, head_mode, **kw)

    monkeypatch.setattr(backend, "hybrid_attention", recording)
    model = make_model("qwen3", dtype=torch.float64, seed=14)
    ids = _ids(1, 30, seed=14)
    enable(model, policy="fixed", fixed_table=mixed_table(), xattn_threshold=0.5, **BLOCK_KW)
    plain, elastic, cache = _generate_with_both_caches(model, ids, 6)
    prefills = [c for c in calls if c[0]]
    decodes = [c for c in calls if not c[0]]
    assert len(prefills) == 2 * 2 and len(decodes) == 2 * 2 * 5  # 2 layers; 2 generations; 5 decode steps each
    assert all(BLOCK in modes and has_mask for _, modes, has_mask in prefills)
    assert all(BLOCK not in modes and not has_mask for _, modes, has_mask in decodes)
    assert torch.equal(plain.sequences, elastic.sequences)
    for step in range(6):
        assert rel_err(elastic.logits[step], plain.logits[step]) < 1e-12
    assert all(not layer.compacted for layer in cache.layers)
    masks = _record_block_masks(model.elastic_state)
    with torch.no_grad():
        prefill = model(torch.cat([ids, plain.sequences[:, 30:31]], dim=1)).logits[0, -1]
    assert torch.isfinite(plain.logits[1]).all() and sorted(masks) == [0, 1] and torch.isfinite(prefill).all()


def test_block_mode_arguments_are_checked():
    model = make_model("llama")
    with pytest.raises(ValueError, match="multiple of the xattn stride"):
        enable(model, policy="all_sparse", sparse_mode="block", block_size=12, xattn_stride=8)
    with pytest.raises(ValueError, match="threshold"):
        enable(model, policy="all_sparse", sparse_mode="block", xattn_threshold=2.0)


@pytest.mark.parametrize("kind", KINDS)
def test_generation_with_cache_equals_recompute(kind):
    model = make_model(kind, dtype=torch.float64, seed=3)
    ids = _ids(1, 20, seed=3)
    enable(model, policy="fixed", sink=SINK, window=WINDOW, fixed_table=mixed_table())
    with torch.no_grad():
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             min_new_tokens=8, output_logits=True, return_dict_in_generate=True)
        for step in range(8):
            seq = gen.sequences[:, : ids.shape[1] + step]
            logits = model(seq, use_cache=False).logits[:, -1]
            assert rel_err(gen.logits[step], logits) < 1e-6, step  # generate returns fp32 logits
            # greedy pick (min_new_tokens bans eos = token 2 in generate)
            assert int(gen.sequences[0, ids.shape[1] + step]) == int(logits[0].index_fill(0, torch.tensor([2]),
                                                                                         float("-inf")).argmax())


def test_router_decision_is_kept_for_decode():
    model = make_model("llama", dtype=torch.float64, seed=4)
    routers = decisive(RouterSet.for_model(model).double())
    ids = _ids(1, 30, seed=4)
    state = enable(model, routers, policy="router", sink=SINK, window=WINDOW)
    with torch.no_grad():
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                             do_sample=False, output_logits=True, return_dict_in_generate=True)
    prefill_modes = state.last_head_mode.clone()
    # Recompute every step without a cache, forcing the prefill decision as a fixed table.
    enable(model, policy="fixed", sink=SINK, window=WINDOW, fixed_table=prefill_modes[0] != FULL)
    with torch.no_grad():
        for step in range(6):
            seq = gen.sequences[:, : ids.shape[1] + step]
            assert rel_err(gen.logits[step], model(seq, use_cache=False).logits[:, -1]) < 1e-6


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_router_policy_gives_one_mode_per_sample_layer_head(kind):
    model = make_model(kind, layers=3)
    routers = decisive(RouterSet.for_model(model))
    assert routers.config["model_type"] == kind
    ids = _ids(3, 33, seed=5)
    state = enable(model, routers, policy="router", sink=SINK, window=WINDOW)
    assert model.elastic_routers is routers
    assert any(p is routers.routers[0].task_mlp[0].weight for p in model.parameters())
    with torch.no_grad():
        model(ids)
    modes, z = state.last_head_mode, state.last_z
    assert modes.shape == (3, 3, 2) and modes.dtype == torch.int32 and z.shape == (3, 3, 2)
    assert set(modes.unique().tolist()) <= {FULL, STREAM}
    assert torch.equal(modes == FULL, z == 1)
    m = state.metrics()
    sparse = (modes != FULL).double()
    assert torch.allclose(m["msr_per_sample"], sparse.mean((1, 2)))
    assert torch.allclose(m["msr_per_layer"], sparse.mean((0, 2)))
    assert abs(m["msr"] - sparse.mean().item()) < 1e-12
    # ESR from the real masks: skipped causal pairs over all heads, per layer.
    full = visible_mask(FULL, 33, 33, sink=SINK, window=WINDOW).sum().item()
    stream = visible_mask(STREAM, 33, 33, sink=SINK, window=WINDOW).sum().item()
    for layer in range(3):
        n_sparse = int((modes[:, layer] != FULL).sum())
        expect = n_sparse * (full - stream) / (3 * 2 * full)
        assert abs(m["esr_per_layer"][layer].item() - expect) < 1e-12
    assert len(state.routing_map(0)) == 3 and all(len(row) == 2 for row in state.routing_map(0))
    # Each sample is routed on its own keys: same decision as running it alone.
    with torch.no_grad():
        model(ids[1:2])
    assert torch.equal(state.last_head_mode[0], modes[1])


def test_sparsity_shift_trades_msr_per_request():
    """The inference budget knob: MSR is monotone in the shift, a per-request tensor [B] shifts each sample's
    routing as if it ran alone with that shift, and the state's value can change between requests."""
    model = make_model("llama", layers=3)
    routers = decisive(RouterSet.for_model(model))
    ids = _ids(3, 33, seed=6)
    state = enable(model, routers, policy="router", sink=SINK, window=WINDOW)
    msr = []
    with torch.no_grad():
        for shift in (-50.0, -0.5, 0.0, 0.5, 50.0):
            state.sparsity_shift = shift
            model(ids)
            msr.append(state.metrics()["msr"])
        assert msr[0] == 0.0 and msr[-1] == 1.0 and msr == sorted(msr), msr
        shifts = torch.tensor([0.5, -0.5, 0.0])
        enable(model, routers, policy="router", sink=SINK, window=WINDOW, sparsity_shift=shifts)
        model(ids)
        batched = model.elastic_state.last_head_mode.clone()
        for b in range(3):
            model.elastic_state.sparsity_shift = float(shifts[b])
            model(ids[b:b + 1])
            assert torch.equal(model.elastic_state.last_head_mode[0], batched[b]), b
    with pytest.raises(ValueError, match="sparsity_shift"):
        enable(model, routers, policy="router", sparsity_shift="more")
    disable(model)


@pytest.mark.parametrize("n_q,n_k,sink,window", [(33, 33, 3, 8), (1, 40, 3, 8), (5, 40, 0, 4), (7, 7, 10, 2),
                                                 (12, 30, 4, 0), (30, 30, 50, 50)])
def test_pair_counts_match_reference_masks(n_q, n_k, sink, window):
    assert causal_pairs(n_q, n_k) == visible_mask(FULL, n_q, n_k, sink=sink, window=window).sum().item()
    assert visible_pairs(STREAM, n_q, n_k, sink, window) == \
        visible_mask(STREAM, n_q, n_k, sink=sink, window=window).sum().item()


@pytest.mark.parametrize("policy", ["fixed", "router"])
def test_left_padded_batch_matches_single_sequences(policy):
    model = make_model("llama", dtype=torch.float64, seed=6)
    routers = None
    if policy == "router":
        routers = decisive(RouterSet.for_model(model).double())
    lengths = [30, 21]
    seqs = [_ids(1, n, seed=10 + n) for n in lengths]
    S = max(lengths)
    ids = torch.zeros(2, S, dtype=torch.long)
    mask = torch.zeros(2, S, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, S - s.shape[1]:] = s[0]
        mask[b, S - s.shape[1]:] = 1
    state = enable(model, routers, policy=policy, sink=SINK, window=WINDOW, fixed_table=mixed_table())
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                               output_logits=True, return_dict_in_generate=True)
        batch_modes = state.last_head_mode.clone()
        m = state.metrics()
        assert 0.0 < m["esr"] < 1.0 and m["msr_per_sample"].shape == (2,)
        for b, s in enumerate(seqs):
            single = model.generate(s, attention_mask=torch.ones_like(s), max_new_tokens=5, min_new_tokens=5,
                                    do_sample=False, output_logits=True, return_dict_in_generate=True)
            assert torch.equal(state.last_head_mode[0], batch_modes[b])
            assert torch.equal(batch.sequences[b, S:], single.sequences[0, s.shape[1]:])
            for step in range(5):
                assert rel_err(batch.logits[step][b], single.logits[step][0]) < 1e-6


def test_train_mix_gradients_reach_routers_only():
    torch.manual_seed(7)
    model = make_model("qwen3", seed=7)
    for p in model.parameters():
        p.requires_grad_(False)
    routers = RouterSet.for_model(model)
    state = enable(model, routers, policy="router", sink=SINK, window=WINDOW)
    routers.train()
    ids = _ids(2, 40, seed=7)
    with state.training_mix(tau=1.2):
        out = model(ids, labels=ids)
    z = state.last_z
    assert z.requires_grad and set(z.detach().unique().tolist()) <= {0.0, 1.0}
    out.loss.backward()
    router_params = set(id(p) for p in routers.parameters())
    grads = [p.grad for p in routers.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum().item() for g in grads) > 0
    for p in model.parameters():
        if id(p) not in router_params:
            assert p.grad is None
    # The mixed forward equals the hard selection it encodes (z exactly 0/1).
    sampled = state.last_head_mode.clone()
    enable(model, policy="fixed", sink=SINK, window=WINDOW, fixed_table=(sampled[0] != FULL))
    with torch.no_grad():
        hard = model(ids[:1]).logits
    assert rel_err(out.logits[:1].detach(), hard) < 1e-4


def _assert_sdpa_branch_equals_op(q, k, v, z, padding, **kw):
    """The training mix with O_FA from SDPA against the op branch, float64: out and the gradients of q, k, v and z
    agree to 1e-10, and the router gradient <dO, O_FA - O_SA> is not trivially 0."""
    from elastic_cuda.attention import train_mix_attention

    grads = []
    for branch in ("op", "sdpa"):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, z)]
        out = train_mix_attention(*leaves[:3], leaves[3], STREAM, padding=padding, full_branch=branch, **kw)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append([out.detach()] + [t.grad for t in leaves])
    for name, a, b in zip(("out", "dq", "dk", "dv", "dz"), grads[0], grads[1]):
        assert rel_err(b, a) < 1e-10, name
    assert grads[0][4].abs().sum() > 0


@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2), (8, 2)], ids=["mha", "gqa3", "gqa4"])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
def test_train_mix_sdpa_full_branch_equals_op(hq, hkv, padded):
    """O_FA through torch SDPA (the CUDA training default) gives the op's outputs and gradients (q, k, v and the
    router's z), dense and padded (left-padded prompts, right-padded answers: valid tokens mid-row)."""
    from elastic_cuda.attention import PaddingLayout

    torch.manual_seed(hq + hkv + padded)
    B, S, D = 3, 37, 16
    q, k, v = (torch.randn(B, S, h, D, dtype=torch.float64) for h in (hq, hkv, hkv))
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)[:, :1].repeat(1, hkv)
    z[1, 0] = 1.0 - z[1, 0]
    padding = None
    if padded:
        mask = torch.ones(B, S, dtype=torch.bool)
        mask[0, :5] = False                      # left padding
        mask[1, :3], mask[1, -4:] = False, False  # left and right padding
        padding = PaddingLayout.from_mask(mask, S, S)
    _assert_sdpa_branch_equals_op(q, k, v, z, padding, sink=2, window=5, scale=0.3)


def test_train_mix_full_branch_arguments():
    from elastic_cuda.attention import train_mix_attention

    q, k, v = torch.randn(1, 6, 2, 8), torch.randn(1, 9, 2, 8), torch.randn(1, 9, 2, 8)
    z = torch.ones(1, 2)
    with pytest.raises(ValueError, match="full_branch must be one of"):
        train_mix_attention(q, k, v, z, STREAM, sink=1, window=2, full_branch="flash")
    # auto on CPU (and for a continuation) is the op: no error
    assert train_mix_attention(q, k, v, z, STREAM, sink=1, window=2).shape == q.shape


@pytest.mark.parametrize("padded", [False, True])
def test_train_mix_sdpa_branch_on_a_continuation_equals_the_op(padded):
    # Sq < Skv (the trainer's continuation over a cache): SDPA's O_FA with the causal mask aligned to the bottom
    # right, as the op's; out and every gradient (dz too) equal the op branch's in float64, padded or not
    from elastic_cuda.attention import PaddingLayout

    g = torch.Generator().manual_seed(11)
    B, Sq, Skv, Hq, Hkv, D = 2, 5, 13, 4, 2, 8
    q, k, v = (torch.randn(B, s_, h, D, dtype=torch.float64, generator=g)
               for s_, h in ((Sq, Hq), (Skv, Hkv), (Skv, Hkv)))
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    padding = None
    if padded:
        mask = torch.ones(B, Skv, dtype=torch.bool)
        mask[1, :4] = False  # sample 1 left-padded by 4 keys, its 5 queries all real
        padding = PaddingLayout.from_mask(mask, Sq, Skv)
    _assert_sdpa_branch_equals_op(q, k, v, z, padding, sink=1, window=3, scale=0.4)


def test_train_mix_with_gradient_checkpointing_reuses_noise():
    model = make_model("llama", seed=8)
    for p in model.parameters():
        p.requires_grad_(False)
    ids = _ids(2, 36, seed=8)
    grads = []
    for checkpointing in (False, True):
        routers = RouterSet.for_model(model)
        torch.manual_seed(8)
        routers.routers.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
        state = enable(model, routers, policy="router", sink=SINK, window=WINDOW)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(9)
        with state.training_mix():
            model(ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in routers.parameters()]))
        model.gradient_checkpointing_disable()
        disable(model)
    model.eval()
    assert rel_err(grads[1], grads[0]) < 1e-5


def test_enable_validates_arguments():
    model = make_model("llama")
    with pytest.raises(ValueError, match="needs routers"):
        enable(model, policy="router")
    with pytest.raises(ValueError, match="policy must be one of"):
        enable(model, policy="sometimes")
    with pytest.raises(ValueError, match="fixed_table"):
        enable(model, policy="fixed")
    with pytest.raises(ValueError, match=r"\[2, 2\]"):
        enable(model, policy="fixed", fixed_table=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="sparse_mode"):
        enable(model, policy="all_sparse", sparse_mode="dense")
    with pytest.raises(ValueError, match="does not match this model"):
        enable(model, RouterSet.for_model(make_model("llama", layers=3)), policy="router")
    with pytest.raises(NotImplementedError, match="packed"):
        enable(model, policy="all_full")
        model(_ids(1, 8), position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]]))
    with pytest.raises(NotImplementedError, match="4D|2D"):
        enable(model, policy="all_full")
        model(_ids(1, 8), attention_mask=torch.zeros(1, 1, 8, 8))
    disable(model)
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("kind,policy", [("llama", "fixed"), ("qwen3", "fixed"), ("llama", "all_sparse")])
def test_elastic_cache_frees_stream_heads_and_matches_dynamic_cache(kind, policy):
    model = make_model(kind, dtype=torch.float64, seed=11)
    ids = _ids(1, 25, seed=11)
    table = mixed_table() if policy == "fixed" else torch.ones(2, 2, dtype=torch.bool)
    enable(model, policy=policy, sink=SINK, window=WINDOW, fixed_table=table)
    plain, elastic, cache = _generate_with_both_caches(model, ids, 10)
    assert torch.equal(plain.sequences, elastic.sequences)
    for step in range(10):
        assert rel_err(elastic.logits[step], plain.logits[step]) < 1e-6
    total = ids.shape[1] + 10 - 1  # tokens cached after the last step (its own token included)
    for layer_idx, layer in enumerate(cache.layers):
        assert layer.compacted and layer.get_seq_length() == total
        n_stream = int(table[layer_idx].sum())
        assert layer.keys.shape == (1, 2 - n_stream, total, 16)                 # FULL heads keep everything
        assert layer.stream_keys.shape == (1, n_stream, SINK + WINDOW, 16)      # STREAM heads: sink + window only
        assert layer.stream_heads == table[layer_idx].nonzero().flatten().tolist()
    assert cache.memory_bytes() < (0.7 if policy == "fixed" else 0.4) * cache.dense_memory_bytes()
    # Compacted layers refuse what they cannot do.
    with pytest.raises(NotImplementedError, match="beam"):
        cache.layers[0].reorder_cache(torch.tensor([0]))


def test_elastic_cache_all_full_keeps_everything():
    from elastic_cuda.integrations.cache import ElasticCache

    model = make_model("llama", dtype=torch.float64, seed=12)
    ids = _ids(1, 20, seed=12)
    enable(model, policy="all_full")
    with torch.no_grad():
        cache = ElasticCache(model)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=4,
                             min_new_tokens=4, do_sample=False)
    assert out.shape[1] == 24
    assert all(not layer.compacted for layer in cache.layers)
    assert cache.memory_bytes() == cache.dense_memory_bytes()


def _shipped_router_dirs():
    import glob
    import os

    from elastic_cuda.demo import SHIPPED_ROUTERS
    root = os.path.dirname(SHIPPED_ROUTERS)  # elastic_cuda/routers/, beside the default set
    return sorted(os.path.dirname(p) for p in glob.glob(os.path.join(root, "*", "router_config.json")))


@pytest.mark.parametrize("routers_dir", _shipped_router_dirs(), ids=lambda p: p.rsplit("/", 1)[-1])
def test_shipped_routers_drive_a_smollm2_shaped_model_in_their_sparse_mode(routers_dir):
    """Every RouterSet shipped in the package loads into a model of SmolLM2-135M's attention geometry (random
    weights: 30 layers, 9 query / 3 KV heads of dim 64), routes each (layer, KV head) to FULL or to its own sparse
    mode, and carries the lambdas a fine-tune continues from."""
    import json
    import os

    from transformers import LlamaConfig, LlamaForCausalLM

    from elastic_cuda.integrations.cache import ElasticCache
    from elastic_cuda.ops import BLOCK
    cfg = LlamaConfig(vocab_size=128, hidden_size=576, intermediate_size=64, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=1024,
                      attn_implementation="eager", pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with pytest.warns(UserWarning, match="geometry matches"):  # the shipped name is SmolLM2's, not this model's
        model.config._name_or_path = "random-smollm2-shape"
        routers = RouterSet.load(routers_dir, model=model)
        state = enable(model, routers)
    mode = routers.config["sparse_mode"]
    sparse_id = {"stream": STREAM, "block": BLOCK}[mode]
    with open(os.path.join(routers_dir, "training_lambdas.json")) as f:
        lam = json.load(f)
    assert 0.0 < lam["t_sen"] < 1.0 and set(lam["lambda1"]) == set(lam["lambda2"]) == set(lam["tasks"])
    try:
        assert state.sparse_mode == mode
        ids = _ids(2, 300, seed=5)
        with torch.no_grad():
            cache = ElasticCache(model)
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
            step = model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True).logits
        modes = state.last_head_mode
        assert modes.shape == (2, 30, 3)
        assert set(modes.unique().tolist()) <= {FULL, sparse_id}
        assert bool((modes == sparse_id).any())  # not a FULL-only routing (a trained router set)
        assert torch.isfinite(logits).all() and torch.isfinite(step).all()
        m = state.metrics()
        assert 0.0 < m["msr"] <= 1.0 and 0.0 <= m["esr"] < 1.0
    finally:
        disable(model)


# ----------------------------------------------------------------------------- greedy_generate
def _greedy_without_cache(model, prompt, n):
    """Reference: argmax of a full recompute per token (no KV cache)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_generate_matches_recompute_and_stops_as_asked():
    from elastic_cuda.integrations.cache import ElasticCache
    from elastic_cuda.integrations.generate import greedy_generate

    model = make_model("llama", dtype=torch.float64, seed=11)
    prompt = _ids(1, 23, seed=11)[0].tolist()
    state = enable(model, policy="all_sparse", sink=SINK, window=WINDOW)
    ref = _greedy_without_cache(model, prompt, 9)
    gen = greedy_generate(model, prompt, 9, stop_ids=set())
    assert gen.tokens == ref and gen.prefill_s > 0 and gen.decode_s > 0
    # metrics are the prefill's: its ESR, before the decode steps add theirs
    model(torch.tensor([prompt]))
    assert gen.prefill_metrics["esr"] == pytest.approx(state.metrics()["esr"], abs=1e-12)
    # a stop token ends the answer, kept only with keep_stop; an ElasticCache (the demo's) gives the same tokens
    stop = ref[4]
    first = ref.index(stop)
    assert greedy_generate(model, prompt, 9, stop).tokens == ref[:first]
    kept = greedy_generate(model, torch.tensor([prompt]), 9, [stop], cache=ElasticCache(model), keep_stop=True)
    assert kept.tokens == ref[:first + 1]
    assert greedy_generate(model, prompt, 3, set()).tokens == ref[:3]
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(model, prompt, 0, set())
    disable(model)
