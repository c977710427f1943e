"""The op front: torch.compile(fullgraph=True) through forward and backward, and argument checking
of both the Python wrapper (elastic_cuda.attention, ValueError) and the raw operator
(torch.ops.elastic.attention, RuntimeError from the C++ TORCH_CHECKs)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import elastic_cuda
from conftest import BLOCK, FULL, STREAM, make_qkv, make_varlen_qkv, random_block_mask, rel_err


# ----------------------------------------------------------------------------- torch.compile
class TinyElasticAttention(nn.Module):
    """Projections around elastic attention, returning out and lse (so both gradients flow)."""

    def __init__(self, dim=32, heads_q=4, heads_kv=2, head_dim=8, block_size=4):
        super().__init__()
        self.hq, self.hkv, self.d, self.bs = heads_q, heads_kv, head_dim, block_size
        self.q_proj = nn.Linear(dim, heads_q * head_dim, dtype=torch.float64)
        self.kv_proj = nn.Linear(dim, 2 * heads_kv * head_dim, dtype=torch.float64)
        self.o_proj = nn.Linear(heads_q * head_dim, dim, dtype=torch.float64)

    def forward(self, x, head_mode, block_mask):
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.hq, self.d)
        k, v = self.kv_proj(x).view(B, S, 2, self.hkv, self.d).unbind(2)
        out, lse = elastic_cuda.ops.attention(q, k, v, head_mode, sink=2, window=5, block_mask=block_mask,
                                          block_size=self.bs, return_lse=True)
        return self.o_proj(out.flatten(2)), lse


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(backend, gen):
    torch.manual_seed(int(torch.randint(1 << 30, (1,), generator=gen)))
    model = TinyElasticAttention()
    B, S = 2, 11
    x = torch.randn(B, S, 32, generator=gen, dtype=torch.float64)
    head_mode = torch.tensor([[FULL, BLOCK], [STREAM, FULL]], dtype=torch.int32)
    block_mask = random_block_mask(B, 2, S, 4, gen)

    def loss_and_grads(fn):
        model.zero_grad()
        xx = x.clone().requires_grad_()
        out, lse = fn(xx, head_mode, block_mask)
        (out.square().sum() + lse.sum()).backward()
        return [out.detach(), lse.detach(), xx.grad] + [p.grad.clone() for p in model.parameters()]

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    eager, comp = loss_and_grads(model), loss_and_grads(compiled)
    for i, (a, b) in enumerate(zip(comp, eager)):
        err = rel_err(a, b)
        print(f"{backend} tensor {i}: rel err {err:.1e}")
        assert err < 1e-12, i


def test_fake_kernel_shapes_and_dtypes():
    """The fake kernels give the shapes and dtypes of the real kernel (dense and varlen, fp32/fp64)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    g = torch.Generator().manual_seed(0)
    cases = []
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        q, k, v = make_qkv(2, 5, 7, 6, 2, 8, g, dtype=dtype)
        cases.append(((q, k, v, torch.zeros(2, 2, dtype=torch.int32), None, None, None), {}))
        q, k, v, cu_q, cu_k, mq, mk = make_varlen_qkv([2, 3], [4, 3], 6, 2, 8, g, dtype=dtype)
        cases.append(((q, k, v, torch.zeros(2, 2, dtype=torch.int32), None, cu_q, cu_k),
                      dict(max_seqlen_q=mq, max_seqlen_k=mk)))
    for args, kw in cases:
        real = torch.ops.elastic.attention(*args, **kw)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = torch.ops.elastic.attention(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                                  for a in args), **kw)
        for r, f in zip(real, fake):
            assert r.shape == f.shape and r.dtype == f.dtype


# ----------------------------------------------------------------------------- bad arguments
def _dense_base():
    g = torch.Generator().manual_seed(1)
    q, k, v = make_qkv(2, 8, 8, 4, 2, 8, g)
    return dict(q=q, k=k, v=v, head_mode=torch.tensor([[FULL, BLOCK], [STREAM, BLOCK]], dtype=torch.int32),
                block_mask=random_block_mask(2, 2, 8, 4, g), cu_seqlens_q=None, cu_seqlens_k=None, sink=2, window=4,
                block_size=4, scale=None, max_seqlen_q=None, max_seqlen_k=None, strategy="auto")


def _varlen_base():
    g = torch.Generator().manual_seed(2)
    q, k, v, cu_q, cu_k, mq, mk = make_varlen_qkv([3, 5], [4, 6], 4, 2, 8, g)
    return dict(q=q, k=k, v=v, head_mode=torch.tensor([[FULL, STREAM], [STREAM, FULL]], dtype=torch.int32),
                block_mask=None, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, sink=2, window=4, block_size=4, scale=None,
                max_seqlen_q=mq, max_seqlen_k=mk, strategy="auto")


def call_wrapper(a):
    kw = {n: a[n] for n in ("sink", "window", "block_mask", "block_size", "scale", "cu_seqlens_q", "cu_seqlens_k",
                            "max_seqlen_q", "max_seqlen_k", "strategy")}
    return elastic_cuda.ops.attention(a["q"], a["k"], a["v"], a["head_mode"], **kw)


def call_raw(a):
    return torch.ops.elastic.attention(a["q"], a["k"], a["v"], a["head_mode"], a["block_mask"], a["cu_seqlens_q"],
                                       a["cu_seqlens_k"], sink=a["sink"], window=a["window"],
                                       block_size=a["block_size"], scale=a["scale"],
                                       max_seqlen_q=a["max_seqlen_q"] or 0, max_seqlen_k=a["max_seqlen_k"] or 0,
                                       strategy=a["strategy"])


def _set(**changes):
    return lambda a: {**a, **changes}


def _with(fn):
    """Apply fn(a) -> dict of changes."""
    return lambda a: {**a, **fn(a)}


def _cu(values):
    return torch.tensor(values, dtype=torch.int32)


# (id, base, change, regex the message must match, exception of the Python wrapper).
# The wrapper also checks CPU head_mode / cu_seqlens values (free to read on the host), so every case is a
# ValueError there (README); the raw op raises RuntimeError from its C++ checks with the same message.
BAD_ARGS = [
    ("q rank", _dense_base, _with(lambda a: dict(q=a["q"][0])), r"q must have shape", ValueError),
    ("k rank", _dense_base, _with(lambda a: dict(k=a["k"][0])), r"k must have shape", ValueError),
    ("v shape", _dense_base, _with(lambda a: dict(v=a["v"][:, :-1])), r"\bv\b.*shape|shape of k", ValueError),
    ("gqa divisibility", _dense_base, _with(lambda a: dict(q=torch.randn(2, 8, 5, 8, dtype=torch.float64))),
     r"q heads \(5\) must be a multiple of k/v heads \(2\)", ValueError),
    ("head_dim", _dense_base, _with(lambda a: dict(q=torch.randn(2, 8, 4, 16, dtype=torch.float64))),
     r"head_dim", ValueError),
    ("dtype mix", _dense_base, _with(lambda a: dict(k=a["k"].float())), r"q, k, v must share one dtype", ValueError),
    ("dtype fp16", _dense_base, _with(lambda a: {n: a[n].half() for n in "qkv"}), r"dtype on CPU", ValueError),
    ("dtype int", _dense_base, _with(lambda a: {n: a[n].long() for n in "qkv"}), r"dtype on CPU", ValueError),
    ("device", _dense_base, _with(lambda a: dict(k=a["k"].to("meta"))), r"device", ValueError),
    ("last dim strided", _dense_base,
     _with(lambda a: dict(q=torch.randn(2, 8, 4, 16, dtype=torch.float64)[..., ::2])), r"contiguous in the last",
     ValueError),
    ("batch", _dense_base, _with(lambda a: dict(k=a["k"][:1], v=a["v"][:1])), r"k batch", ValueError),
    ("sq > skv", _dense_base, _with(lambda a: dict(k=a["k"][:, :5], v=a["v"][:, :5], block_mask=None,
                                                  head_mode=torch.zeros(2, 2, dtype=torch.int32))),
     r"q length \(8\) must not exceed k/v length \(5\)", ValueError),
    ("head_mode shape", _dense_base, _set(head_mode=torch.zeros(2, 3, dtype=torch.int32)),
     r"head_mode must have shape", ValueError),
    ("head_mode dtype", _dense_base, _set(head_mode=torch.zeros(2, 2, dtype=torch.int64)),
     r"head_mode must be int32", ValueError),
    ("head_mode device", _dense_base, _set(head_mode=torch.zeros(2, 2, dtype=torch.int32, device="meta")),
     r"head_mode must be on the device", ValueError),
    ("head_mode value 3", _dense_base, _set(head_mode=torch.tensor([[0, 3], [1, 2]], dtype=torch.int32)),
     r"head_mode values must be 0 \(FULL\), 1 \(STREAM\) or 2 \(BLOCK\), got 3", ValueError),
    ("head_mode value -1", _dense_base, _set(head_mode=torch.tensor([[0, 1], [-1, 2]], dtype=torch.int32)),
     r"head_mode values must be .* got -1", ValueError),
    ("block head without mask", _dense_base, _set(block_mask=None),
     r"BLOCK \(2\) head but block_mask is None", ValueError),
    ("block_mask blocks", _dense_base, _set(block_mask=torch.ones(2, 2, 3, 3, dtype=torch.bool)),
     r"block_mask must have shape", ValueError),
    ("block_mask heads", _dense_base, _set(block_mask=torch.ones(2, 3, 2, 2, dtype=torch.bool)),
     r"block_mask must have shape", ValueError),
    ("block_mask dtype", _dense_base, _set(block_mask=torch.ones(2, 2, 2, 2, dtype=torch.uint8)),
     r"block_mask must be (a )?bool", ValueError),
    ("sink", _dense_base, _set(sink=-1), r"sink must be", ValueError),
    ("window", _dense_base, _set(window=-3), r"window must be", ValueError),
    ("block_size", _dense_base, _set(block_size=0), r"block_size must be", ValueError),
    ("scale negative", _dense_base, _set(scale=-1.0), r"scale must be a positive finite", ValueError),
    ("scale nan", _dense_base, _set(scale=float("nan")), r"scale must be a positive finite", ValueError),
    ("strategy", _dense_base, _set(strategy="fastest"), r"strategy must be", ValueError),
    ("cu_seqlens alone", _varlen_base, _set(cu_seqlens_k=None),
     r"cu_seqlens_q and cu_seqlens_k must be given together", ValueError),
    ("cu_seqlens dtype", _varlen_base, _with(lambda a: dict(cu_seqlens_q=a["cu_seqlens_q"].long())),
     r"cu_seqlens_q must be", ValueError),
    ("cu_seqlens lengths", _varlen_base, _set(cu_seqlens_k=_cu([0, 4, 6, 10])),
     r"cu_seqlens_q and cu_seqlens_k must both have B\+1", ValueError),
    ("varlen q rank", _varlen_base, _with(lambda a: dict(q=a["q"][None])), r"q must have shape \[total_q", ValueError),
    ("max_seqlen missing", _varlen_base, _set(max_seqlen_q=None), r"max_seqlen_q > 0", ValueError),
    ("cu_seqlens decreasing", _varlen_base, _set(cu_seqlens_q=_cu([0, 5, 3])),
     r"cu_seqlens_q must be non-decreasing", ValueError),
    ("cu_seqlens negative start", _varlen_base, _set(cu_seqlens_k=_cu([-1, 4, 10])),
     r"cu_seqlens_q and cu_seqlens_k must start at >= 0", ValueError),
    ("cu_seqlens past the end", _varlen_base, _set(cu_seqlens_k=_cu([0, 4, 11])),
     r"cu_seqlens_k\[-1\] = 11 exceeds the 10 tokens", ValueError),
    ("sequence sq > skv", _varlen_base, _set(cu_seqlens_q=_cu([0, 5, 8]), max_seqlen_q=5),
     r"sequence 0 has 5 queries but 4 keys \(cu_seqlens_q / cu_seqlens_k\)", ValueError),
    ("max_seqlen_k too small", _varlen_base, _set(max_seqlen_k=5), r"more than max_seqlen_k = 5", ValueError),
    ("max_seqlen_q too small", _varlen_base, _set(max_seqlen_q=4), r"more than max_seqlen_q = 4", ValueError),
    ("max_seqlen negative", _varlen_base, _set(max_seqlen_k=-6), r"max_seqlen_k > 0", ValueError),
    ("cu_seqlens_q past the end", _varlen_base, _set(cu_seqlens_q=_cu([0, 3, 9])),
     r"cu_seqlens_q\[-1\] = 9 exceeds the 8 tokens", ValueError),
    ("cu_seqlens_k decreasing", _varlen_base, _set(cu_seqlens_k=_cu([0, 6, 4])),
     r"cu_seqlens_k must be non-decreasing", ValueError),
    ("cu_seqlens one entry", _varlen_base, _set(cu_seqlens_q=_cu([0]), cu_seqlens_k=_cu([0])),
     r"B\+1 >= 2 entries", ValueError),
    ("head_dim zero", _dense_base, _with(lambda a: {n: a[n][..., :0] for n in "qkv"}),
     r"head_dim \(q.shape\[-1\]\) must be > 0", ValueError),
]


@pytest.mark.parametrize("case", BAD_ARGS, ids=[c[0] for c in BAD_ARGS])
def test_bad_arguments_wrapper(case):
    _, base, change, pattern, exc = case
    with pytest.raises(exc, match=pattern):
        call_wrapper(change(base()))


@pytest.mark.parametrize("case", BAD_ARGS, ids=[c[0] for c in BAD_ARGS])
def test_bad_arguments_raw_op(case):
    _, base, change, pattern, _ = case
    # The C++ checks raise RuntimeError; a 'meta' tensor among real ones reaches the fake kernel,
    # which raises ValueError.
    with pytest.raises((RuntimeError, ValueError), match=pattern):
        call_raw(change(base()))


@pytest.mark.parametrize("base", [_dense_base, _varlen_base])
def test_valid_bases_run(base):
    """The bases the bad cases start from are valid, so each bad case fails for its own reason."""
    a = base()
    out_w, out_r = call_wrapper(a), call_raw(a)[0]
    assert torch.equal(out_w, out_r) and torch.isfinite(out_w).all()


def test_all_meta_tensors_give_shapes():
    """Meta tensors (shape inference, e.g. a model built on device='meta') go to the fake kernel."""
    a = _dense_base()
    meta = {n: (x.to("meta") if isinstance(x, torch.Tensor) else x) for n, x in a.items()}
    out, lse = call_raw(meta)
    assert out.device.type == "meta" and out.shape == a["q"].shape and lse.shape == (2, 4, 8)
    with pytest.raises(ValueError, match=r"q must be on CPU or CUDA"):
        call_wrapper(meta)


def _backward_args():
    a = _dense_base()
    out, lse = call_raw(a)
    return dict(grad_out=torch.ones_like(out), grad_lse=torch.ones_like(lse), out=out, lse=lse, **a)


def call_backward(b):
    return torch.ops.elastic.attention_backward(
        b["grad_out"], b["grad_lse"], b["q"], b["k"], b["v"], b["out"], b["lse"], b["head_mode"], b["block_mask"],
        None, None, sink=b["sink"], window=b["window"], block_size=b["block_size"])


@pytest.mark.parametrize("name,change,pattern", [
    ("grad_out", lambda b: dict(grad_out=b["grad_out"][:, :-1]), r"grad_out must have the shape of q"),
    ("out", lambda b: dict(out=b["out"][:1]), r"out must have the shape of q"),
    ("lse", lambda b: dict(lse=b["lse"][:, :, :-1]), r"lse must have shape"),
    ("grad_lse", lambda b: dict(grad_lse=b["grad_lse"][0]), r"grad_lse must have the shape of lse"),
    ("head_mode", lambda b: dict(head_mode=b["head_mode"] + 5), r"head_mode values must be"),
])
def test_bad_arguments_backward_raw_op(name, change, pattern):
    b = _backward_args()
    call_backward(b)  # valid as built
    with pytest.raises(RuntimeError, match=pattern):
        call_backward({**b, **change(b)})


# ----------------------------------------------------------------------------- kernel options (A/B switches)
def test_reload_kernel_options_reads_env_and_rejects_bad_values(monkeypatch):
    # csrc/attention/kernel_options.h: read once per process, again on reload; defaults are the product.
    for name in ("ELASTIC_CUDA_SM90", "ELASTIC_SM90_STAGES", "ELASTIC_SM90_TMA", "ELASTIC_SM90_VERBOSE",
                 "ELASTIC_CUDA_SM90_BWD", "ELASTIC_SM90_BWD_DQ_TMA", "ELASTIC_SM90_BWD_EARLY_RELEASE",
                 "ELASTIC_SM90_BWD_OVERLAP", "ELASTIC_SM90_BWD_LEAN", "ELASTIC_SM90_BWD_BANKS",
                 "ELASTIC_SM90_BWD_MODE_ORDER", "ELASTIC_SM90_BWD_UNMASKED", "ELASTIC_NONFINITE_PREPASS",
                 "ELASTIC_SM90_EXACT_ALPHA", "ELASTIC_SM90_MAX_SLACK", "ELASTIC_SM90_WALK_CACHED",
                 "ELASTIC_SM90_SLOT_TILES", "ELASTIC_SM90_PV_WAIT_FIRST"):
        monkeypatch.delenv(name, raising=False)
    try:
        default = elastic_cuda.ops.reload_kernel_options()
        assert default.startswith("sm90=1 stages=3 tma=1 pingpong=1 proxy_fence=1 persistent=1 dynamic=1 "
                                  "lazy_rescale=1 exact_alpha=1 max_slack=1 walk_cached=1 slot_tiles=2 l2_order=1 verbose=0 "
                                  "experiments_built="), default
        monkeypatch.setenv("ELASTIC_CUDA_SM90", "0")
        monkeypatch.setenv("ELASTIC_SM90_TMA", "0")
        monkeypatch.setenv("ELASTIC_SM90_VERBOSE", "")  # empty: the default
        now = elastic_cuda.ops.reload_kernel_options()
        assert "sm90=0 " in now and " tma=0 " in now and " verbose=0 " in now, now
        assert " sm90_bwd=1 bwd_dq_tma=1 bwd_unmasked=1 bwd_early_release=0 bwd_overlap=0 " in default + " ", default
        monkeypatch.setenv("ELASTIC_CUDA_SM90_BWD", "0")
        monkeypatch.setenv("ELASTIC_SM90_BWD_DQ_TMA", "0")
        monkeypatch.setenv("ELASTIC_SM90_BWD_UNMASKED", "0")
        monkeypatch.setenv("ELASTIC_SM90_BWD_OVERLAP", "2")
        assert " sm90_bwd=0 bwd_dq_tma=0 bwd_unmasked=0 bwd_early_release=0 bwd_overlap=2 " in (
            elastic_cuda.ops.reload_kernel_options() + " ")
        monkeypatch.setenv("ELASTIC_SM90_BWD_OVERLAP", "3")
        with pytest.raises(RuntimeError, match="ELASTIC_SM90_BWD_OVERLAP must be 0, 1 or 2"):
            elastic_cuda.ops.reload_kernel_options()
        monkeypatch.setenv("ELASTIC_SM90_BWD_OVERLAP", "0")
        # the lean backward tail, its bank-conflict-free accesses and the CTAs handed out by mode are the defaults;
        # each switch flips, bad values raise
        assert " bwd_overlap=0 bwd_lean=1 bwd_banks=1 bwd_mode_order=1 " in default + " ", default
        for name, key in (("ELASTIC_SM90_BWD_LEAN", "bwd_lean"), ("ELASTIC_SM90_BWD_BANKS", "bwd_banks"),
                          ("ELASTIC_SM90_BWD_MODE_ORDER", "bwd_mode_order")):
            monkeypatch.setenv(name, "0")
            assert f" {key}=0 " in elastic_cuda.ops.reload_kernel_options() + " "
            monkeypatch.setenv(name, "2")
            with pytest.raises(RuntimeError, match=f"{name} must be 0 or 1"):
                elastic_cuda.ops.reload_kernel_options()
            monkeypatch.setenv(name, "1")
        monkeypatch.setenv("ELASTIC_CUDA_SM90_BWD", "no")
        with pytest.raises(RuntimeError, match="ELASTIC_CUDA_SM90_BWD must be 0 or 1"):
            elastic_cuda.ops.reload_kernel_options()
        monkeypatch.setenv("ELASTIC_CUDA_SM90_BWD", "1")
        assert " nonfinite_prepass=1 " in default + " ", default
        monkeypatch.setenv("ELASTIC_NONFINITE_PREPASS", "0")
        assert " nonfinite_prepass=0 " in elastic_cuda.ops.reload_kernel_options() + " "
        assert " pv_wait_first=0 " in default + " ", default  # the Hopper forward's key-loop order: the proven one
        monkeypatch.setenv("ELASTIC_SM90_PV_WAIT_FIRST", "1")
        assert " pv_wait_first=1 " in elastic_cuda.ops.reload_kernel_options() + " "
        monkeypatch.setenv("ELASTIC_SM90_PV_WAIT_FIRST", "yes")
        with pytest.raises(RuntimeError, match="ELASTIC_SM90_PV_WAIT_FIRST must be 0 or 1"):
            elastic_cuda.ops.reload_kernel_options()
        monkeypatch.setenv("ELASTIC_SM90_PV_WAIT_FIRST", "0")
        for value in ("0", "1"):  # the forward's key tiles from the producer: every launch (default), none, masked
            monkeypatch.setenv("ELASTIC_SM90_SLOT_TILES", value)
            assert f" slot_tiles={value} " in elastic_cuda.ops.reload_kernel_options() + " "
        monkeypatch.setenv("ELASTIC_SM90_SLOT_TILES", "3")
        with pytest.raises(RuntimeError, match="ELASTIC_SM90_SLOT_TILES must be 0, 1 or 2"):
            elastic_cuda.ops.reload_kernel_options()
        monkeypatch.setenv("ELASTIC_SM90_SLOT_TILES", "2")
        monkeypatch.setenv("ELASTIC_SM90_TMA", "off")  # a typo must not time the wrong kernel
        with pytest.raises(RuntimeError, match="ELASTIC_SM90_TMA must be 0 or 1"):
            elastic_cuda.ops.reload_kernel_options()
        monkeypatch.setenv("ELASTIC_SM90_TMA", "1")
        monkeypatch.setenv("ELASTIC_SM90_STAGES", "4")
        with pytest.raises(RuntimeError, match="ELASTIC_SM90_STAGES must be 2 or 3"):
            elastic_cuda.ops.reload_kernel_options()
        monkeypatch.setenv("ELASTIC_SM90_STAGES", "2")
        if "experiments_built=0" in default:
            with pytest.raises(RuntimeError, match="ELASTIC_BUILD_EXPERIMENTS=1"):
                elastic_cuda.ops.reload_kernel_options()
        else:
            assert " stages=2 " in elastic_cuda.ops.reload_kernel_options()
        monkeypatch.setenv("ELASTIC_SM90_STAGES", "3")
        monkeypatch.setenv("ELASTIC_SM90_BWD_EARLY_RELEASE", "1")  # the Hopper backward's experiment instance
        if "experiments_built=0" in default:
            with pytest.raises(RuntimeError, match="ELASTIC_BUILD_EXPERIMENTS=1"):
                elastic_cuda.ops.reload_kernel_options()
        else:
            assert " bwd_early_release=1 " in elastic_cuda.ops.reload_kernel_options() + " "
    finally:
        monkeypatch.undo()
        elastic_cuda.ops.reload_kernel_options()


def test_decode_combine_switches_default_and_reject_bad_values(monkeypatch):
    # The decode combine's A/B switches (kernel_options.h): round 2's combine (v2), launched plainly, by default;
    # COMBINE takes v1 / v2, PDL 0 / 1 / early; anything else is an error naming the variable.
    for name in ("ELASTIC_DECODE_COMBINE", "ELASTIC_DECODE_PDL", "ELASTIC_DECODE_COPY", "ELASTIC_DECODE_MMA",
                 "ELASTIC_DECODE_FUSED_COMBINE"):
        monkeypatch.delenv(name, raising=False)
    try:
        default = elastic_cuda.ops.reload_kernel_options() + " "
        assert " decode_copy=plain decode_fused_combine=0 decode_combine=v2 decode_pdl=0 " in default, default
        for combine, pdl in (("v2", "1"), ("v1", "early"), ("v2", "0"), ("", "")):
            monkeypatch.setenv("ELASTIC_DECODE_COMBINE", combine)
            monkeypatch.setenv("ELASTIC_DECODE_PDL", pdl)
            now = elastic_cuda.ops.reload_kernel_options() + " "
            assert f" decode_combine={combine or 'v2'} decode_pdl={pdl or '0'} " in now, now
        for name, bad in (("ELASTIC_DECODE_COMBINE", "2"), ("ELASTIC_DECODE_COMBINE", "V2"),
                          ("ELASTIC_DECODE_PDL", "2"), ("ELASTIC_DECODE_PDL", "late"), ("ELASTIC_DECODE_PDL", "on")):
            monkeypatch.setenv(name, bad)
            with pytest.raises(RuntimeError, match=name):
                elastic_cuda.ops.reload_kernel_options()
            monkeypatch.delenv(name)
    finally:
        monkeypatch.undo()
        elastic_cuda.ops.reload_kernel_options()


def test_validated_signature_still_checks_what_differs():
    """attention() skips the argument checks for a signature it has validated (ops._attention_signature): a call
    that differs in anything a check reads must still fail with the argument's name, and a CPU head_mode's values
    are checked on every call."""
    from elastic_cuda.ops import _attention as ops

    q, k, v = make_qkv(1, 16, 16, 4, 2, 32, torch.Generator().manual_seed(3), torch.float32)
    good = torch.full((1, 2), FULL, dtype=torch.int32)
    kw = dict(sink=2, window=4)
    ops._VALIDATED_SIGNATURES.clear()
    ops.attention(q, k, v, good, **kw)
    assert len(ops._VALIDATED_SIGNATURES) == 1
    ops.attention(q, k, v, good, **kw)  # cached: no second entry
    assert len(ops._VALIDATED_SIGNATURES) == 1
    with pytest.raises(ValueError, match="head_mode values"):
        ops.attention(q, k, v, torch.tensor([[FULL, 7]], dtype=torch.int32), **kw)
    with pytest.raises(ValueError, match="block_mask is None"):
        ops.attention(q, k, v, torch.tensor([[FULL, BLOCK]], dtype=torch.int32), **kw)
    with pytest.raises(ValueError, match="sink must be an int"):
        ops.attention(q, k, v, good, sink=2.0, window=4)
    with pytest.raises(ValueError, match="head_mode must be int32"):
        ops.attention(q, k, v, good.long(), **kw)
    strided = torch.empty(*q.shape[:-1], 2 * q.shape[-1])[..., ::2]
    strided.copy_(q)
    with pytest.raises(ValueError, match="q must be contiguous in the last"):
        ops.attention(strided, k, v, good, **kw)
    with pytest.raises(ValueError, match="scale must be"):
        ops.attention(q, k, v, good, scale=float("nan"), **kw)
    assert len(ops._VALIDATED_SIGNATURES) == 1
