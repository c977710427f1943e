"""The non-finite rule of elastic attention (csrc/attention/head_mode.h, README "The op"):

an output row (and its lse) is NaN iff an element of its query row, or of a key or value row it can see, is
non-finite (NaN, +inf, -inf); keys and values it cannot see (future keys, keys outside the STREAM window, keys in
unset BLOCK blocks) never affect it. Backward: dq of a NaN row is NaN, dk / dv of a key are NaN iff a NaN row sees
it; everything else is finite and equals the float64 reference on the same inputs with the bad rows cleaned.

The CPU tests run here in every CPU dtype and mode; test_cuda_nonfinite_* check the same rule on the CUDA kernels
(the Hopper wgmma forward with its TMA and cp.async producers, the sm80 forward forced with ELASTIC_CUDA_SM90=0, the
backward, the grouped strategies and decode; csrc/attention/nonfinite.cuh says how) and skip without a CUDA device.
"""
from __future__ import annotations

import pytest
import torch
from conftest import BLOCK, FULL, STREAM, cuda_kernel_names, random_block_mask, rel_err

import elastic_cuda
from elastic_cuda.reference import attention_reference, visible_mask

B, S, HQ, HKV, D = 2, 300, 6, 2, 64
SINK, WINDOW, BLOCK_SIZE = 4, 40, 32
BAD_KEY = 100     # not a sink key; rows < 100 see it only in the future, STREAM rows >= 140 are outside the window
SINK_KEY = 2      # seen by every later row of a STREAM head
BAD_VALUES = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 4e-3}


def make_case(mode, dtype, device, gen, *, block_size=BLOCK_SIZE, d=D, sq=S):
    """q [B, sq, HQ, d] (the last sq positions of S keys), k / v [B, S, HKV, d], mixed modes, a random block mask."""
    q = torch.randn(B, sq, HQ, d, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(B, S, HKV, d, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(B, S, HKV, d, generator=gen, dtype=torch.float64).to(dtype)
    # sample 1 routes its KV heads differently from sample 0, so a batch mixes modes
    other = {FULL: STREAM, STREAM: BLOCK, BLOCK: FULL}[mode]
    head_mode = torch.tensor([[mode, mode], [mode, other]], dtype=torch.int32)
    mask = random_block_mask(B, HKV, S, block_size, gen, density=0.4)
    kw = {"sink": SINK, "window": WINDOW, "block_mask": mask.to(device), "block_size": block_size}
    return q.to(device), k.to(device), v.to(device), head_mode.to(device), kw


def visibility(head_mode, kw, sq=S):
    """bool [B, HQ, sq, S] from the reference statement of the semantics."""
    G = HQ // HKV
    out = torch.zeros(B, HQ, sq, S, dtype=torch.bool)
    for b in range(B):
        for h in range(HQ):
            out[b, h] = visible_mask(int(head_mode[b, h // G]), sq, S, sink=kw["sink"], window=kw["window"],
                                     block_mask=kw["block_mask"][b, h // G].cpu(), block_size=kw["block_size"])
    return out


def expected_nan(q, k, v, vis):
    """bool [B, Sq, HQ]: rows the rule makes NaN; bool [B, S, HKV]: keys a NaN row sees (their dk / dv are NaN)."""
    G = HQ // HKV
    q_bad = ~torch.isfinite(q.cpu().double()).all(-1)                                    # [B, S, HQ]
    kv_bad = ~(torch.isfinite(k.cpu().double()).all(-1) & torch.isfinite(v.cpu().double()).all(-1))  # [B, S, HKV]
    kv_bad_per_q_head = kv_bad.repeat_interleave(G, dim=2).permute(0, 2, 1)             # [B, HQ, S]
    sees_bad = (vis & kv_bad_per_q_head[:, :, None, :]).any(-1)                          # [B, HQ, S]
    rows = q_bad | sees_bad.permute(0, 2, 1)
    seen_by_nan_row = (vis & rows.permute(0, 2, 1)[:, :, :, None]).any(2)                # [B, HQ, S keys]
    keys = seen_by_nan_row.view(B, HKV, G, S).any(2).permute(0, 2, 1)
    return rows, keys


def cleaned(x):
    """x with every row (last dim) holding a non-finite element set to 0, in float64 on the CPU."""
    x = x.detach().cpu().double()
    return x.masked_fill(~torch.isfinite(x).all(-1, keepdim=True), 0.0)


def check_rule(q, k, v, head_mode, kw, *, backward=False, label="", strategy="auto"):
    vis = visibility(head_mode.cpu(), kw, sq=q.shape[1])
    want_rows, want_keys = expected_nan(q, k, v, vis)
    assert want_rows.any() and not want_rows.all(), "case must have NaN rows and clean rows"
    qq, kk, vv = (t.detach().requires_grad_(backward) for t in (q, k, v))
    out, lse = elastic_cuda.ops.attention(qq, kk, vv, head_mode, return_lse=True, strategy=strategy, **kw)
    got_rows = torch.isnan(out.detach()).cpu()
    # a row is all NaN or has no NaN; lse is NaN exactly there
    assert torch.equal(got_rows.any(-1), got_rows.all(-1)), f"{label}: partially NaN rows"
    assert torch.equal(got_rows.any(-1), want_rows), f"{label}: NaN rows differ from the rule"
    assert torch.equal(torch.isnan(lse.detach()).cpu().permute(0, 2, 1), want_rows), f"{label}: NaN lse differs"
    assert not torch.isinf(out.detach()).any(), f"{label}: inf in out"
    ref_kw = {n: (x.cpu() if torch.is_tensor(x) else x) for n, x in kw.items()}
    cq, ck, cv = (cleaned(t).requires_grad_(backward) for t in (q, k, v))
    ref_out, ref_lse = attention_reference(cq, ck, cv, head_mode.cpu(), **ref_kw)
    keep = ~want_rows
    err = rel_err(out.detach().cpu()[keep], ref_out.detach()[keep])
    err_lse = rel_err(lse.detach().cpu().permute(0, 2, 1)[keep], ref_lse.detach().permute(0, 2, 1)[keep])
    print(f"{label}: {int(want_rows.sum())} NaN rows, clean rows rel err out {err:.2e} lse {err_lse:.2e}")
    assert err < TOL[q.dtype] and err_lse < TOL[q.dtype], label
    if not backward:
        return
    grad = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    dq, dk, dv = torch.autograd.grad(out, (qq, kk, vv), grad.to(out.dtype).to(out.device))
    rq, rk, rv = torch.autograd.grad(ref_out, (cq, ck, cv), grad)
    for name, got, ref, want in (("dq", dq, rq, want_rows), ("dk", dk, rk, want_keys), ("dv", dv, rv, want_keys)):
        got = got.cpu()
        nan_rows = torch.isnan(got)
        assert torch.equal(nan_rows.any(-1), want), f"{label}: NaN rows of {name} differ from the rule"
        assert torch.equal(nan_rows.any(-1), nan_rows.all(-1)), f"{label}: partially NaN rows of {name}"
        e = rel_err(got[~want], ref[~want])
        print(f"{label}: {name} {int(want.sum())} NaN rows, clean rows rel err {e:.2e}")
        assert e < TOL[q.dtype] * (10 if q.dtype != torch.float64 else 1e3), f"{label}: {name} rel err {e}"


def poison(q, k, v, where, value, mode):
    """Writes `value` into one element: a query row, or the key/value row BAD_KEY (SINK_KEY for STREAM sinks)."""
    q, k, v = q.clone(), k.clone(), v.clone()
    if where == "q":
        q[0, 150, 1, 7] = value
        q[1, 3, 4, 0] = value
    else:
        t = {"k": k, "v": v}[where[0]]
        j = SINK_KEY if where.endswith("sink") else BAD_KEY
        t[0, j, 0, 5] = value
        t[1, j, 1, 63] = value
    return q, k, v


CPU_DTYPES = [torch.float64, torch.float32, torch.bfloat16]
MODES = {"full": FULL, "stream": STREAM, "block": BLOCK}


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("where", ["q", "k", "v", "k-sink", "v-sink"])
@pytest.mark.parametrize("bad", list(BAD_VALUES))
def test_nonfinite_rule_cpu(dtype, mode, where, bad, gen):
    if where.endswith("sink") and mode != "stream":
        pytest.skip("sink keys are a STREAM case")
    q, k, v, head_mode, kw = make_case(MODES[mode], dtype, "cpu", gen)
    q, k, v = poison(q, k, v, where, BAD_VALUES[bad], MODES[mode])
    check_rule(q, k, v, head_mode, kw, label=f"cpu {dtype} {mode} {where} {bad}")


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("mode", list(MODES))
def test_nonfinite_rule_cpu_backward(dtype, mode, gen):
    q, k, v, head_mode, kw = make_case(MODES[mode], dtype, "cpu", gen)
    q, k, v = poison(q, k, v, "v", float("nan"), MODES[mode])
    q, k, v = poison(q, k, v, "q", float("inf"), MODES[mode])
    check_rule(q, k, v, head_mode, kw, backward=True, label=f"cpu backward {dtype} {mode}")


def test_nonfinite_invisible_keys_never_matter_cpu(gen):
    """Every key a row cannot see is NaN: rows seeing none of them are bit-identical to the clean run."""
    q, k, v, head_mode, kw = make_case(STREAM, torch.float32, "cpu", gen)
    clean = elastic_cuda.ops.attention(q, k, v, head_mode, return_lse=True, **kw)
    k2, v2 = k.clone(), v.clone()
    k2[:, S - 1] = float("nan")  # the last key: in the future of every other row
    v2[:, 150:200] = float("inf")  # outside the window of rows >= 240 (and in the future of rows < 150)
    dirty = elastic_cuda.ops.attention(q, k2, v2, head_mode, return_lse=True, **kw)
    vis = visibility(head_mode, kw)
    sees = (vis[..., 150:200].any(-1) | vis[..., S - 1:].any(-1)).permute(0, 2, 1)  # [B, S, HQ]
    assert (~sees).any() and sees.any()
    assert torch.equal(dirty[0][~sees], clean[0][~sees])
    assert torch.isnan(dirty[0][sees]).all()


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_nonfinite_rule_cpu_varlen(dtype, gen):
    """Packed sequences: a bad key / query of one sequence never reaches another; each sequence equals its dense run."""
    check_varlen(dtype, "cpu", BLOCK_SIZE, gen)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_nonfinite_rule_cpu_varlen_backward(dtype, gen):
    check_varlen_backward(dtype, "cpu", BLOCK_SIZE, gen)


def varlen_case(dtype, device, block_size, gen):
    """Three packed sequences (37, 300, 5 tokens) with a bad key, value and query element in different sequences."""
    lens = [37, 300, 5]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    T = int(cu[-1])
    q = torch.randn(T, HQ, D, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(T, HKV, D, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(T, HKV, D, generator=gen, dtype=torch.float64).to(dtype)
    k[37 + BAD_KEY, 0, 3] = float("nan")   # sequence 1, KV head 0
    v[10, 1, 0] = float("inf")             # sequence 0, KV head 1
    q[37 + 300 + 2, 4, 1] = float("-inf")  # sequence 2, query head 4
    head_mode = torch.tensor([[FULL, STREAM], [STREAM, BLOCK], [BLOCK, FULL]], dtype=torch.int32)
    nb = -(-max(lens) // block_size)
    mask = torch.rand(3, HKV, nb, nb, generator=gen) < 0.5
    kw = {"sink": SINK, "window": WINDOW, "block_size": block_size}
    q, k, v, cu, head_mode, mask = (t.to(device) for t in (q, k, v, cu, head_mode, mask))
    return lens, cu, q, k, v, head_mode, mask, kw


def check_varlen_backward(dtype, device, block_size, gen):
    """Packed sequences, backward: each sequence's dq / dk / dv equal its dense run's (NaN pattern and values); the
    Hopper backward's zero-filled copies of bad query rows and of tails inside the packed tensor meet here."""
    lens, cu, q, k, v, head_mode, mask, kw = varlen_case(dtype, device, block_size, gen)
    qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = elastic_cuda.ops.attention(qq, kk, vv, head_mode, block_mask=mask, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                     max_seqlen_q=max(lens), max_seqlen_k=max(lens), **kw)
    grad = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(dtype)
    grad = grad.to(device)
    grads = torch.autograd.grad(out, (qq, kk, vv), grad)
    for b, n in enumerate(lens):
        s = slice(int(cu[b]), int(cu[b + 1]))
        nbb = -(-n // block_size)
        q1, k1, v1 = (t[None, s].detach().requires_grad_(True) for t in (q, k, v))
        o1 = elastic_cuda.ops.attention(q1, k1, v1, head_mode[b:b + 1], block_mask=mask[b:b + 1, :, :nbb, :nbb],
                                        **kw)
        ref = torch.autograd.grad(o1, (q1, k1, v1), grad[None, s])
        for name, got, want in zip(("dq", "dk", "dv"), grads, ref):
            got, want = got[s].cpu().double(), want[0].cpu().double()
            assert torch.equal(torch.isnan(got), torch.isnan(want)), f"sequence {b}: NaN pattern of {name} differs"
            assert torch.isnan(got).any() and not torch.isnan(got).all(), f"sequence {b}: {name} must mix NaN rows"
            ok = ~torch.isnan(want)
            e = rel_err(got[ok], want[ok])
            assert e < TOL[dtype] * (10 if dtype != torch.float64 else 1e3), f"sequence {b}: {name} rel err {e}"


def check_varlen(dtype, device, block_size, gen):
    lens, cu, q, k, v, head_mode, mask, kw = varlen_case(dtype, device, block_size, gen)
    out, lse = elastic_cuda.ops.attention(q, k, v, head_mode, block_mask=mask, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                          max_seqlen_q=max(lens), max_seqlen_k=max(lens), return_lse=True, **kw)
    for b, n in enumerate(lens):
        s = slice(int(cu[b]), int(cu[b + 1]))
        nbb = -(-n // block_size)
        o1, l1 = elastic_cuda.ops.attention(q[None, s], k[None, s], v[None, s], head_mode[b:b + 1],
                                            block_mask=mask[b:b + 1, :, :nbb, :nbb], return_lse=True, **kw)
        nan_rows = torch.isnan(out[s]).any(-1)
        assert torch.equal(nan_rows, torch.isnan(out[s]).all(-1)), f"sequence {b}: partially NaN rows"
        assert torch.equal(torch.isnan(out[s]), torch.isnan(o1[0])), f"sequence {b}: NaN rows differ"
        assert torch.equal(torch.isnan(lse[:, s]), torch.isnan(l1[0])), f"sequence {b}: NaN lse differs"
        assert torch.isnan(out[s]).any(), f"sequence {b} holds a bad element: some row must be NaN"
        ok = ~torch.isnan(o1[0])
        assert torch.allclose(out[s][ok].double(), o1[0][ok].double(), rtol=TOL[dtype], atol=TOL[dtype])


# ----------------------------------------------------------------------------- CUDA (the lead runs these on a GPU)
# The rule on every CUDA path (nonfinite.cuh): the Hopper wgmma forward with its TMA producer and with its cp.async
# producer (ELASTIC_SM90_TMA=0), and the sm80 forward (ELASTIC_CUDA_SM90=0: what other GPUs, and 64-wide BLOCK masks,
# run). Block masks of 128-key blocks reach the wgmma kernel; 64-key blocks always run sm80. The backward runs after
# each forward path (its lse marks the forward's NaN rows): on a 9.x device the Hopper backward (dQ by TMA reduce-add,
# the default), and after the sm90 forward also its vector-atomic dQ (ELASTIC_SM90_BWD_DQ_TMA=0) and the mma.sync
# backward (ELASTIC_CUDA_SM90_BWD=0, what other GPUs and 64-key blocks run): both backward kernels implement the rule.
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or not elastic_cuda.has_cuda_kernels(),
                                reason="needs a CUDA device and the CUDA kernels")
CUDA_DTYPES = [torch.bfloat16, torch.float16]
PATHS = {"sm90": {"ELASTIC_CUDA_SM90": "1", "ELASTIC_SM90_TMA": "1"},
         "sm90cp": {"ELASTIC_CUDA_SM90": "1", "ELASTIC_SM90_TMA": "0"},
         "sm80": {"ELASTIC_CUDA_SM90": "0", "ELASTIC_SM90_TMA": "1"},
         # the Hopper forward's key loop in FlashAttention-4's order (ELASTIC_SM90_PV_WAIT_FIRST, its own instance)
         "sm90pvfirst": {"ELASTIC_CUDA_SM90": "1", "ELASTIC_SM90_TMA": "1", "ELASTIC_SM90_PV_WAIT_FIRST": "1"}}
FWD_DEFAULTS = {"ELASTIC_SM90_PV_WAIT_FIRST": "0"}
BWD_PATHS = {"sm90_bwd_atomic": {"ELASTIC_CUDA_SM90": "1", "ELASTIC_SM90_TMA": "1", "ELASTIC_SM90_BWD_DQ_TMA": "0"},
             "sm90_bwd_sm80": {"ELASTIC_CUDA_SM90": "1", "ELASTIC_SM90_TMA": "1", "ELASTIC_CUDA_SM90_BWD": "0"}}
BWD_DEFAULTS = {"ELASTIC_CUDA_SM90_BWD": "1", "ELASTIC_SM90_BWD_DQ_TMA": "1"}
CUDA_BLOCK = 128


@pytest.fixture
def kernel_path(request, monkeypatch):
    """Parametrised by name (PATHS, BWD_PATHS); the extension reads the switches again, and again after the test."""
    for name, value in {**FWD_DEFAULTS, **BWD_DEFAULTS, **{**PATHS, **BWD_PATHS}[request.param]}.items():
        monkeypatch.setenv(name, value)
    elastic_cuda.ops.reload_kernel_options()
    yield request.param
    monkeypatch.undo()
    elastic_cuda.ops.reload_kernel_options()


two_paths = pytest.mark.parametrize("kernel_path", ["sm90", "sm80"], indirect=True)
# backward cases: every forward path (each followed by the default backward) and both backward alternatives
bwd_paths = pytest.mark.parametrize("kernel_path", list(PATHS) + list(BWD_PATHS), indirect=True)
bwd_two_paths = pytest.mark.parametrize("kernel_path", ["sm90", "sm80"] + list(BWD_PATHS), indirect=True)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kernel_path", ["sm90", "sm90pvfirst", "sm80"], indirect=True)
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("where", ["q", "k", "v", "k-sink", "v-sink"])
@pytest.mark.parametrize("bad", list(BAD_VALUES))
def test_cuda_nonfinite_rule_forward(kernel_path, dtype, mode, where, bad, gen):
    if where.endswith("sink") and mode != "stream":
        pytest.skip("sink keys are a STREAM case")
    q, k, v, head_mode, kw = make_case(MODES[mode], dtype, "cuda", gen, block_size=CUDA_BLOCK)
    q, k, v = poison(q, k, v, where, BAD_VALUES[bad], MODES[mode])
    check_rule(q, k, v, head_mode, kw, label=f"cuda {kernel_path} {dtype} {mode} {where} {bad}")


@pytest.mark.gpu
@needs_cuda
@bwd_paths
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("mode", list(MODES))
def test_cuda_nonfinite_rule_backward(kernel_path, d, mode, gen):
    """Backward after each forward path: bf16 at head_dim 64 and fp16 at 128 (both dtypes, both widths)."""
    dtype = torch.bfloat16 if d == 64 else torch.float16
    q, k, v, head_mode, kw = make_case(MODES[mode], dtype, "cuda", gen, block_size=CUDA_BLOCK, d=d)
    q, k, v = poison(q, k, v, "v", float("nan"), MODES[mode])
    q, k, v = poison(q, k, v, "q", float("inf"), MODES[mode])
    check_rule(q, k, v, head_mode, kw, backward=True, label=f"cuda backward {kernel_path} D{d} {dtype} {mode}")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kernel_path", ["sm90", "sm90_bwd_sm80"], indirect=True)
def test_cuda_nonfinite_backward_kernel_taken(kernel_path, gen):
    """The backward cases above reach the kernel they name: on a 9.x device the Hopper backward by default (head_dim
    64 / 128, 128-key blocks), the mma.sync one with ELASTIC_CUDA_SM90_BWD=0."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("not a compute capability 9.x device")
    q, k, v, head_mode, kw = make_case(STREAM, torch.bfloat16, "cuda", gen, block_size=CUDA_BLOCK)
    q, k, v = poison(q, k, v, "v", float("nan"), STREAM)
    qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = elastic_cuda.ops.attention(qq, kk, vv, head_mode, **kw)
    names = cuda_kernel_names(lambda: out.float().sum().backward(), "attention_bwd")
    if not names:
        pytest.skip("profiler recorded no kernels")
    assert any("attention_bwd_sm90" in n for n in names) == (kernel_path == "sm90"), names


@pytest.mark.gpu
@needs_cuda
@two_paths
@pytest.mark.parametrize("key", [63, 64, 127, 128, 255, 256, 299])
@pytest.mark.parametrize("which", ["k", "v"])
def test_cuda_nonfinite_tile_edges(kernel_path, key, which, gen):
    """A bad key at either side of a 64- and 128-key tile edge, and the last key; STREAM rows whose window left it
    behind and FULL / BLOCK rows before it stay finite (sample 1 mixes modes). 64-key blocks: BLOCK runs sm80."""
    for block_size in (64, 128):
        q, k, v, head_mode, kw = make_case(STREAM, torch.bfloat16, "cuda", gen, block_size=block_size, d=128)
        t = {"k": k, "v": v}[which]
        t[0, key, 0, 17] = float("nan")
        t[1, key, 1, 3] = float("-inf")
        t[1, key, 0, 100] = float("inf")
        check_rule(q, k, v, head_mode, kw, label=f"cuda tile edge {kernel_path} {which}[{key}] block {block_size}")


@pytest.mark.gpu
@needs_cuda
@bwd_paths
@pytest.mark.parametrize("mode", list(MODES))
def test_cuda_nonfinite_rule_sq_lt_skv(kernel_path, mode, gen):
    """200 queries over 300 keys (queries are the last 200 positions), bad q, k and v at once, forward and backward."""
    q, k, v, head_mode, kw = make_case(MODES[mode], torch.float16, "cuda", gen, block_size=CUDA_BLOCK, sq=200)
    q[0, 120, 2, 9] = float("nan")
    k[1, 40, 0, 1] = float("inf")
    v[0, 250, 1, 60] = float("-inf")
    check_rule(q, k, v, head_mode, kw, backward=True, label=f"cuda Sq<Skv {kernel_path} {mode}")


@pytest.mark.gpu
@needs_cuda
@two_paths
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
def test_cuda_nonfinite_rule_varlen(kernel_path, dtype, gen):
    check_varlen(dtype, "cuda", CUDA_BLOCK, gen)


@pytest.mark.gpu
@needs_cuda
@bwd_two_paths
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
def test_cuda_nonfinite_rule_varlen_backward(kernel_path, dtype, gen):
    check_varlen_backward(dtype, "cuda", CUDA_BLOCK, gen)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("strategy", ["grouped", "grouped_cudnn"])
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_cuda_nonfinite_rule_grouped(strategy, where, gen):
    """The grouped strategies run FULL heads through FlashAttention-2 / cuDNN: a FULL pair with a non-finite K / V row
    runs in the fused kernel instead, and a non-finite query row of a library pair is written NaN."""
    q, k, v, head_mode, kw = make_case(FULL, torch.bfloat16, "cuda", gen, block_size=CUDA_BLOCK, d=128)
    q, k, v = poison(q, k, v, where, float("nan"), FULL)
    q[1, 200, 0, 4] = float("inf")  # sample 1, KV head 0 (FULL): a library pair, unless its keys are flagged too
    check_rule(q, k, v, head_mode, kw, strategy=strategy, label=f"cuda {strategy} {where}")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kernel_path", ["sm90"], indirect=True)
def test_cuda_nonfinite_invisible_keys_never_matter(kernel_path, gen):
    """Every key a row cannot see is non-finite: rows seeing none of them are bit-identical to the clean run."""
    q, k, v, head_mode, kw = make_case(STREAM, torch.bfloat16, "cuda", gen, block_size=CUDA_BLOCK)
    clean = elastic_cuda.ops.attention(q, k, v, head_mode, return_lse=True, **kw)
    k2, v2 = k.clone(), v.clone()
    k2[:, S - 1] = float("nan")
    v2[:, 150:200] = float("inf")
    dirty = elastic_cuda.ops.attention(q, k2, v2, head_mode, return_lse=True, **kw)
    vis = visibility(head_mode.cpu(), kw)
    sees = (vis[..., 150:200].any(-1) | vis[..., S - 1:].any(-1)).permute(0, 2, 1).cuda()
    assert (~sees).any() and sees.any()
    assert torch.equal(dirty[0][~sees], clean[0][~sees])
    assert torch.isnan(dirty[0][sees]).all()


# ----------------------------------------------------------------------------- decode (CUDA)
def _decode_case(gen, dtype, d):
    """Decode step over a static cache: B 2, Hkv 2 (group 2), Sq 4; sample 0 routes (FULL, STREAM), sample 1
    (BLOCK, STREAM). Returns the tensors, the expected NaN rows [B, Sq, Hq] and a cleaned float64 copy."""
    Bd, Hkv, G, Sq, sink, window = 2, 2, 2, 4, 4, 16
    lens = [50, 300]
    L, ring = 320, sink + window + Sq - 1
    rnd = lambda *sh: torch.randn(*sh, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    full_k, full_v = rnd(3, L, d), rnd(3, L, d)      # pool rows: (0, 0) -> 1, (1, 0) -> 0; row 2 unused
    stream_k, stream_v = rnd(3, ring, d), rnd(3, ring, d)  # (0, 1) -> 2, (1, 1) -> 0; row 1 unused
    modes = torch.tensor([[FULL, STREAM], [BLOCK, STREAM]], dtype=torch.int32)
    slot = torch.tensor([[1, 2], [0, 0]], dtype=torch.int32)
    q = rnd(Bd, Sq, Hkv * G, d)
    want = torch.zeros(Bd, Sq, Hkv * G, dtype=torch.bool)
    # sample 0, FULL pair: key n - Sq + 1 is seen by query rows 1.. only
    full_k[1, lens[0] - Sq + 1, 3] = float("nan")
    want[0, 1:, 0:2] = True
    # sample 0, STREAM pair: the oldest recent key rlo = n - Sq - window + 1 is seen by query row 0 only
    rlo = lens[0] - Sq - window + 1
    stream_v[2, sink + (rlo - sink) % (ring - sink), 5] = float("inf")
    want[0, 0, 2:4] = True
    # sample 1, STREAM pair: sink key 0 is seen by every row
    stream_k[0, 0, 0] = float("-inf")
    want[1, :, 2:4] = True
    # sample 1, BLOCK (whole) pair: one bad query row
    q[1, 2, 0, 7] = float("inf")
    want[1, 2, 0] = True
    # never visible: unused pool rows and positions past a sequence's length
    full_k[2], full_v[2], stream_k[1], stream_v[1] = (float("nan"),) * 4
    full_v[1, lens[0]:] = float("nan")
    full_k[0, lens[1]:] = float("inf")
    tensors = [q, full_k, full_v, stream_k, stream_v, modes, slot, torch.tensor(lens, dtype=torch.int32)]
    return tensors, want, dict(sink=sink, window=window)


def check_decode(device, dtype, d, num_splits, gen):
    from elastic_cuda._decode_cpu import decode_attention_cpu
    tensors, want, kw = _decode_case(gen, dtype, d)
    out, lse = elastic_cuda.ops.decode_attention(*(t.to(device) for t in tensors), num_splits=num_splits,
                                                 return_lse=True, **kw)
    got = torch.isnan(out).cpu()
    assert torch.equal(got.any(-1), got.all(-1)), "partially NaN rows"
    assert torch.equal(got.any(-1), want), "NaN rows differ from the rule"
    assert torch.equal(torch.isnan(lse).cpu().permute(0, 2, 1), want), "NaN lse differs from the rule"
    assert not torch.isinf(out).any()
    ref_out, ref_lse = decode_attention_cpu(*(cleaned(t) if t.is_floating_point() else t for t in tensors), **kw)
    keep = ~want
    err = rel_err(out.cpu()[keep], ref_out[keep])
    lerr = (lse.cpu().double().permute(0, 2, 1)[keep] - ref_lse.permute(0, 2, 1)[keep]).abs().max().item()
    print(f"decode {device} {dtype} D{d} splits {num_splits}: {int(want.sum())} NaN rows, clean rows rel err "
          f"{err:.2e}, lse abs err {lerr:.2e}")
    assert err < TOL[dtype] * 2 and lerr < 1e-3


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_nonfinite_rule_decode_cpu(dtype, gen):
    check_decode("cpu", dtype, 64, 0, gen)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_cuda_nonfinite_rule_decode(dtype, d, num_splits, gen):
    check_decode("cuda", dtype, d, num_splits, gen)


# ----------------------------------------------------------------------------- XAttention estimate
def check_xattn(device, dtype):
    """The estimate's documented behaviour (xattn.py select_blocks, csrc/xattn/xattn_select_kernel.cuh): a mask row
    whose block masses meet a NaN keeps every causal block; every other row is the clean run's row. An inf gives a
    NaN estimate or a score of -inf (that key group weighs 0): either way the mask stays causal with blocks 0 and r."""
    from elastic_cuda.attention.xattn import xattn_block_mask
    n, hq, hkv, d, bs, stride = 1000, 4, 2, 64, 128, 16
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, n, hq, d, generator=g, dtype=torch.float64).to(dtype).to(device)
    k = torch.randn(1, n, hkv, d, generator=g, dtype=torch.float64).to(dtype).to(device)
    kw = dict(block_size=bs, stride=stride, threshold=0.5)
    clean = xattn_block_mask(q, k, **kw).cpu()
    nb = clean.shape[-1]
    causal = torch.ones(nb, nb, dtype=torch.bool).tril()
    q2, k2 = q.clone(), k.clone()
    q2[0, 300, 1, 5] = float("nan")   # query group 18 -> block row 2 of head 1
    k2[0, 700, 0, 3] = float("nan")   # key group 43: seen by the query groups >= 43 (block rows >= 5) of heads 0, 1
    dirty = xattn_block_mask(q2, k2, **kw).cpu()
    want = clean.clone()
    want[0, 1, 2] = causal[2]
    want[0, 0:2, 5:] = causal[5:]
    assert not torch.equal(want, clean), "the case must change some rows"
    assert torch.equal(dirty, want), "rows meeting a NaN keep every causal block, other rows are unchanged"
    k3 = k.clone()
    k3[0, 450, 1, 0] = float("inf")
    k3[0, 460, 1, 1] = float("-inf")
    inf_mask = xattn_block_mask(q, k3, **kw).cpu()
    eye = torch.eye(nb, dtype=torch.bool)
    assert not (inf_mask & ~causal).any() and inf_mask[..., 0].all() and (inf_mask | ~eye).all()
    assert torch.equal(inf_mask[0, 0:2], clean[0, 0:2]), "KV head 0's rows never see KV head 1's keys"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nonfinite_xattn_cpu(dtype):
    check_xattn("cpu", dtype)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
def test_cuda_nonfinite_xattn(dtype):
    check_xattn("cuda", dtype)


# ----------------------------------------------------------------------------- non-finite grad_out
def check_bad_grad_out(device, dtype, gen):
    """A non-finite grad_out row: its dq is NaN, dk / dv of the keys it sees are NaN, the rest equals the float64
    gradient with that grad_out row zeroed."""
    block_size = CUDA_BLOCK if device == "cuda" else BLOCK_SIZE
    q, k, v, head_mode, kw = make_case(STREAM, dtype, device, gen, block_size=block_size)
    qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = elastic_cuda.ops.attention(qq, kk, vv, head_mode, **kw)
    grad = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grad[0, 200, 1, 3] = float("inf")   # KV head 0 (STREAM): sees the sink and keys 161..200
    grad[1, 50, 5, 0] = float("nan")    # sample 1, KV head 1 (BLOCK)
    dq, dk, dv = torch.autograd.grad(out, (qq, kk, vv), grad.to(dtype).to(device))
    vis = visibility(head_mode.cpu(), kw)
    bad = torch.zeros(B, S, HQ, dtype=torch.bool)
    bad[0, 200, 1] = bad[1, 50, 5] = True
    G = HQ // HKV
    want_keys = (vis & bad.permute(0, 2, 1)[..., None]).any(2).view(B, HKV, G, S).any(2).permute(0, 2, 1)
    ref_kw = {n: (x.cpu() if torch.is_tensor(x) else x) for n, x in kw.items()}
    cq, ck, cv = (t.detach().cpu().double().requires_grad_(True) for t in (q, k, v))
    ref_out, _ = attention_reference(cq, ck, cv, head_mode.cpu(), **ref_kw)
    rq, rk, rv = torch.autograd.grad(ref_out, (cq, ck, cv), grad.masked_fill(bad[..., None], 0.0))
    for name, got, ref, want in (("dq", dq, rq, bad), ("dk", dk, rk, want_keys), ("dv", dv, rv, want_keys)):
        got = got.cpu()
        nan_rows = torch.isnan(got)
        assert torch.equal(nan_rows.any(-1), want), f"{device}: NaN rows of {name} differ from the rule"
        assert torch.equal(nan_rows.any(-1), nan_rows.all(-1)), f"{device}: partially NaN rows of {name}"
        e = rel_err(got[~want], ref[~want])
        print(f"bad grad_out {device} {dtype}: {name} {int(want.sum())} NaN rows, clean rows rel err {e:.2e}")
        assert e < TOL[dtype] * (10 if dtype != torch.float64 else 1e3), f"{name} rel err {e}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_nonfinite_bad_grad_out_cpu(dtype, gen):
    check_bad_grad_out("cpu", dtype, gen)


@pytest.mark.gpu
@needs_cuda
@bwd_two_paths
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
def test_cuda_nonfinite_bad_grad_out(kernel_path, dtype, gen):
    check_bad_grad_out("cuda", dtype, gen)
