"""AttentionRouter / RouterSet: STE, eval argmax, pooling, parameter count, checkpoints (CPU, seconds)."""
import json
import os
import types

import pytest
import torch

from elastic_cuda.ops import FULL, STREAM
from elastic_cuda.router import CONFIG_FILE, AttentionRouter, RouterSet


def _keys(B=3, S=37, H=2, D=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, S, H, D, generator=g, dtype=dtype)


def _fake_model(layers=2, q_heads=4, kv_heads=2, head_dim=16, model_type="llama", name="tiny/llama"):
    """Just the config attributes a RouterSet reads (no transformers needed)."""
    cfg = types.SimpleNamespace(num_hidden_layers=layers, num_attention_heads=q_heads, num_key_value_heads=kv_heads,
                                head_dim=head_dim, hidden_size=q_heads * head_dim, model_type=model_type,
                                _name_or_path=name)
    return types.SimpleNamespace(config=cfg, name_or_path=name)


def _reference_pool(keys, n_first, n_last):
    """Mean over the union of the first n_first and last n_last token indices (overlap once), float64."""
    S = keys.shape[1]
    idx = sorted(set(range(min(n_first, S))) | set(range(max(S - n_last, 0), S)))
    return keys.double()[:, idx].mean(dim=1)


@pytest.mark.parametrize("S", [7, 150, 260])
def test_pooling_matches_reference(S):
    torch.manual_seed(S)
    router = AttentionRouter(16, n_first=100, n_last=100).double()
    keys = _keys(S=S, seed=S, dtype=torch.float64)
    from elastic_cuda.ops import boundary_pool
    pooled = boundary_pool(keys, n_first=100, n_last=100)
    ref = _reference_pool(keys, 100, 100)
    rel = ((pooled - ref).norm() / ref.norm()).item()
    assert rel < 1e-12, rel
    # The router's logits are exactly its MLPs applied to that pooled vector.
    expect = router.router_mlp(router.task_mlp(ref))
    got = router.eval().logits(keys)
    assert torch.allclose(got, expect, rtol=1e-10, atol=1e-12)


def test_init_gives_near_zero_logits_and_exact_parameter_count():
    router = AttentionRouter(128)
    # method-digest section 1: 131,712 (task MLP) + 131,970 (router MLP, 2-way) = 263,682 for D = 128.
    assert sum(p.numel() for p in router.task_mlp.parameters()) == 131_712
    assert sum(p.numel() for p in router.router_mlp.parameters()) == 131_970
    assert sum(p.numel() for p in router.parameters()) == 263_682
    for m in router.modules():
        if isinstance(m, torch.nn.Linear):
            assert torch.count_nonzero(m.bias) == 0
            assert abs(m.weight.std().item() - 0.02) < 0.004
    logits = router.eval().logits(_keys(D=128))
    assert logits.abs().max().item() < 0.05


def test_training_ste_is_binary_and_gives_router_gradients():
    torch.manual_seed(1)
    router = AttentionRouter(16).train()
    keys = _keys(B=4, H=3)
    out = router(keys, tau=1.3)
    assert out.z.shape == (4, 3) and out.logits.shape == (4, 3, 2)
    assert set(out.z.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(out.head_mode, torch.where(out.z.detach() > 0.5, FULL, STREAM).to(torch.int32))
    # The loss sees exactly 0/1, yet the router parameters get a non-zero gradient through p.
    w = torch.randn(4, 3)
    (out.z * w).sum().backward()
    grads = [p.grad for p in router.parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0
    # Same uniform noise -> same hard sample (what activation recomputation relies on).
    again = router(keys, tau=1.3, gumbel_u=out.gumbel_u)
    assert torch.equal(again.z.detach(), out.z.detach())


def test_training_samples_follow_logit_difference():
    # P(FA) = sigmoid(l1 - l0) whatever tau (argmax of logits + Gumbel noise).
    torch.manual_seed(2)
    router = AttentionRouter(8).train()
    with torch.no_grad():
        last = router.router_mlp[-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0, 1.0]))
    keys = _keys(B=4000, S=3, H=1, D=8)
    z = router(keys, tau=0.5).z.detach()
    expect = torch.sigmoid(torch.tensor(1.0)).item()
    assert abs(z.mean().item() - expect) < 0.03, (z.mean().item(), expect)


def test_eval_is_deterministic_argmax():
    torch.manual_seed(3)
    router = AttentionRouter(16).eval()
    with torch.no_grad():
        router.router_mlp[-1].bias.copy_(torch.tensor([0.0, 0.003]))
    keys = _keys(B=5, H=4)
    a, b = router(keys), router(keys, tau=0.1)
    assert torch.equal(a.z, b.z) and torch.equal(a.head_mode, b.head_mode)
    expect = (a.logits[..., 1] > a.logits[..., 0])
    assert torch.equal(a.z.bool(), expect)
    assert torch.equal(a.head_mode, torch.where(expect, FULL, STREAM).to(torch.int32))
    assert a.gumbel_u is None


def test_sparsity_shift_moves_the_threshold_per_request():
    """FULL iff logit_full - logit_sparse > shift: 0 is the trained argmax, +inf-like all sparse, -inf-like all FULL,
    a tensor [B] applies to its row only; training (Gumbel) ignores it."""
    torch.manual_seed(5)
    router = AttentionRouter(16).eval()
    with torch.no_grad():
        for m in router.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, 0.5)
    keys = _keys(B=4, H=8)
    base = router(keys)
    margin = (base.logits[..., 1] - base.logits[..., 0]).detach()
    assert torch.equal(router(keys, sparsity_shift=0.0).z, base.z)
    assert not bool(router(keys, sparsity_shift=float(margin.max()) + 1).z.any())
    assert bool(router(keys, sparsity_shift=float(margin.min()) - 1).z.all())
    mid = float(margin.median())
    assert torch.equal(router(keys, sparsity_shift=mid).z.bool(), margin > mid)
    per_row = torch.tensor([0.0, 1e4, -1e4, mid])
    z = router(keys, sparsity_shift=per_row).z
    assert torch.equal(z[0], base.z[0]) and not bool(z[1].any()) and bool(z[2].all())
    assert torch.equal(z[3].bool(), margin[3] > mid)
    assert float(z.mean()) != float(base.z.mean())  # the shift changed the budget
    for bad in (torch.zeros(3), torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), "0.5", float("nan")):
        with pytest.raises(ValueError, match="sparsity_shift"):
            router(keys, sparsity_shift=bad)


def test_varlen_pooling_matches_padded_per_sample():
    torch.manual_seed(4)
    router = AttentionRouter(16).eval()
    lengths = [5, 230, 120]
    seqs = [_keys(B=1, S=n, seed=n)[0] for n in lengths]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    packed = router.logits(torch.cat(seqs), cu_seqlens=cu)
    single = torch.cat([router.logits(s[None]) for s in seqs])
    assert torch.allclose(packed, single, rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    router = AttentionRouter(16)
    with pytest.raises(ValueError, match="head_dim"):
        router(_keys(D=8))
    with pytest.raises(ValueError, match="sparse_mode"):
        router(_keys(), sparse_mode=0)
    with pytest.raises(ValueError, match="tau"):
        router.train()(_keys(), tau=0.0)
    with pytest.raises(ValueError, match="head_dim"):
        AttentionRouter(0)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(5)
    model = _fake_model()
    routers = RouterSet.for_model(model, sink=32, window=256)
    assert len(routers) == 2 and routers.config["num_kv_heads"] == 2 and routers.config["head_dim"] == 16
    with torch.no_grad():
        for p in routers.parameters():
            p.add_(torch.randn_like(p))
    routers.save(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["router_config.json", "routers.safetensors"]
    cfg = json.loads((tmp_path / CONFIG_FILE).read_text())
    for key in ("model_name", "num_layers", "num_kv_heads", "head_dim", "sink", "window", "sparse_mode", "version"):
        assert key in cfg
    assert cfg["sink"] == 32 and cfg["window"] == 256 and cfg["model_name"] == "tiny/llama"
    loaded = RouterSet.load(str(tmp_path), model=model)
    for (ka, a), (kb, b) in zip(routers.state_dict().items(), loaded.state_dict().items()):
        assert ka == kb and torch.equal(a, b)
    keys = _keys()
    assert torch.equal(routers.eval()[1](keys).logits, loaded.eval()[1](keys).logits)


@pytest.mark.parametrize("change", [dict(layers=3), dict(head_dim=32), dict(kv_heads=4, q_heads=8)])
def test_loading_into_wrong_model_fails(tmp_path, change):
    RouterSet.for_model(_fake_model()).save(str(tmp_path))
    with pytest.raises(ValueError, match="does not match this model"):
        RouterSet.load(str(tmp_path), model=_fake_model(**change))


def test_loading_checks_files_and_version(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        RouterSet.load(str(tmp_path))
    RouterSet.for_model(_fake_model()).save(str(tmp_path))
    cfg = json.loads((tmp_path / CONFIG_FILE).read_text())
    cfg["version"] = 99
    (tmp_path / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="version"):
        RouterSet.load(str(tmp_path))
    cfg["version"] = 1
    cfg["num_layers"] = 3  # config and weights disagree
    (tmp_path / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match"):
        RouterSet.load(str(tmp_path))


# ---------------------------------------------------------------------------------------------- standardisation
def test_input_calibration_measures_pooled_mean_and_std():
    router = AttentionRouter(16, num_kv_heads=2, standardize_input=True)
    batches = [_keys(B=4, S=230, seed=s) * 3.0 + 5.0 for s in range(3)]
    router.start_input_calibration()
    for k in batches:
        router.logits(k)
    assert router.finish_input_calibration() == 12
    pooled = torch.cat([_reference_pool(k, 100, 100) for k in batches])  # [12, H, D] float64
    torch.testing.assert_close(router.input_mean.double(), pooled.mean(0), rtol=1e-5, atol=1e-5)
    std = pooled.std(0)
    floor = 0.1 * std.mean(-1, keepdim=True)
    torch.testing.assert_close(router.input_std.double(), torch.maximum(std, floor), rtol=1e-4, atol=1e-6)


def test_standardised_router_is_the_paper_router_on_standardised_input():
    """logits(keys) == MLP((pool(keys) - mean) / std) + head_bias: checked against a paper router with the same
    weights fed keys that pool to the standardised value (pooling is linear: shift and scale the keys)."""
    torch.manual_seed(1)
    std_router = AttentionRouter(16, num_kv_heads=2, standardize_input=True, head_bias=True)
    paper = AttentionRouter(16)
    with torch.no_grad():
        for p in std_router.parameters():
            p.normal_()
        std_router.input_mean.copy_(torch.randn(2, 16))
        std_router.input_std.copy_(torch.rand(2, 16) + 0.5)
    paper.task_mlp.load_state_dict(std_router.task_mlp.state_dict())
    paper.router_mlp.load_state_dict(std_router.router_mlp.state_dict())
    keys = _keys(B=3, S=150)
    expected = paper.logits((keys - std_router.input_mean) / std_router.input_std) + std_router.head_bias
    torch.testing.assert_close(std_router.logits(keys), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="KV heads"):
        std_router.logits(_keys(H=3))
    with pytest.raises(ValueError, match="num_kv_heads"):
        AttentionRouter(16, standardize_input=True)
    with pytest.raises(ValueError, match="start_input_calibration"):
        std_router.finish_input_calibration()


def test_head_bias_routes_a_head_whatever_the_input():
    router = AttentionRouter(16, num_kv_heads=2, head_bias=True).eval()
    with torch.no_grad():
        router.head_bias.copy_(torch.tensor([[0.0, 50.0], [50.0, 0.0]]))  # head 0 FULL, head 1 sparse
    for seed in range(4):
        out = router(_keys(seed=seed) * 10)
        assert out.head_mode[:, 0].eq(FULL).all() and out.head_mode[:, 1].eq(STREAM).all()


def test_standardised_routers_round_trip_and_old_configs_load(tmp_path):
    model = _fake_model()
    routers = RouterSet.for_model(model, standardize_input=True, head_bias=True)
    with torch.no_grad():
        for r in routers.routers:
            r.input_mean.normal_()
            r.head_bias.normal_()
    routers.save(str(tmp_path / "new"))
    loaded = RouterSet.load(str(tmp_path / "new"), model=model)
    assert loaded.config["standardize_input"] and loaded.config["head_bias"]
    for k, v in routers.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    # a config written before these options existed loads as the paper's router
    old = RouterSet.for_model(model)
    old.save(str(tmp_path / "old"))
    cfg = json.loads((tmp_path / "old" / CONFIG_FILE).read_text())
    del cfg["standardize_input"], cfg["head_bias"]
    (tmp_path / "old" / CONFIG_FILE).write_text(json.dumps(cfg))
    again = RouterSet.load(str(tmp_path / "old"), model=model)
    assert not again[0].standardize_input and not again[0].use_head_bias


# ----------------------------------------------------------------------------- SparseConfig
SHIPPED_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "elastic_cuda", "routers")
SHIPPED_DIRS = sorted(os.path.join(SHIPPED_ROOT, d) for d in os.listdir(SHIPPED_ROOT)
                      if os.path.isfile(os.path.join(SHIPPED_ROOT, d, CONFIG_FILE)))


def test_sparse_config_defaults_overrides_and_errors():
    from elastic_cuda.attention import SparseConfig
    from elastic_cuda.ops import BLOCK

    d = SparseConfig()
    assert (d.sparse_mode, d.sink, d.window, d.block_size, d.xattn_stride, d.xattn_threshold) == \
        ("stream", 64, 512, 128, 16, 0.9)
    assert d.mode_id == STREAM and SparseConfig(sparse_mode="block").mode_id == BLOCK
    # None keeps the value (enable's and eval's "default: the routers'"), anything else replaces it
    assert d.replace(sink=None, window=100) == SparseConfig(window=100)
    assert SparseConfig.from_dict({"sink": 8, "num_layers": 30}) == SparseConfig(sink=8)  # other keys ignored
    # the BLOCK estimate's settings are checked in BLOCK mode only
    assert SparseConfig(block_size=12, xattn_stride=8).block_size == 12
    with pytest.raises(ValueError, match=r"^enable: block_size must be a positive multiple of the xattn stride"):
        d.replace(where="enable: ", sparse_mode="block", block_size=12, xattn_stride=8)
    for bad, match in ((dict(sparse_mode="dense"), "sparse_mode must be one of"), (dict(sink=-1), "sink must be"),
                       (dict(window=0), "window must be"), (dict(sink=2.5), "sink must be"),
                       (dict(sparse_mode="block", xattn_threshold=1.5), "xattn threshold must be in")):
        with pytest.raises(ValueError, match=match):
            SparseConfig(**bad)
        with pytest.raises(ValueError, match="^RouterSet: " + match):
            RouterSet({"num_layers": 2, "num_kv_heads": 2, "head_dim": 16, **bad})
    with pytest.raises(ValueError, match="unknown sparse settings"):
        d.replace(stride=4)


@pytest.mark.parametrize("routers_dir", SHIPPED_DIRS, ids=os.path.basename)
def test_shipped_router_configs_load_and_save_identically(routers_dir, tmp_path):
    """The shipped router_config.json files read back as they always did: the file's values over the format's
    defaults (written out here, as the format fixed them before SparseConfig existed; the STREAM set predates the
    BLOCK keys), RouterSet's sparse settings are SparseConfig's under the same key names, and a save writes it back."""
    from elastic_cuda.attention import SparseConfig

    format_defaults = {"sink": 64, "window": 512, "sparse_mode": "stream", "hidden_mult": 4, "n_first": 100,
                       "n_last": 100, "standardize_input": False, "head_bias": False, "block_size": 128,
                       "xattn_stride": 16, "xattn_threshold": 0.9}
    with open(os.path.join(routers_dir, CONFIG_FILE)) as f:
        raw = json.load(f)
    expected = {**format_defaults, **raw}
    routers = RouterSet.load(routers_dir)
    assert routers.config == expected
    assert routers.sparse_config == SparseConfig(**{k: expected[k] for k in SparseConfig.keys()})
    assert routers.sparse_mode_id == routers.sparse_config.mode_id
    routers.save(str(tmp_path))
    with open(os.path.join(tmp_path, CONFIG_FILE)) as f:
        assert json.load(f) == expected
