"""The non-finite rule of elastic attention (csrc/attention/head_mode.h, README "The op"):

an output row (and its lse) is NaN iff an element of its query row, or of a key or value row it can see, is
non-finite (NaN, +inf, -inf); keys and values it cannot see (future keys, keys outside the STREAM window, keys in
unset BLOCK blocks) never affect it. Backward: dq of a NaN row is NaN, dk / dv of a key are NaN iff a NaN row sees
it; everything else is finite and equals the float64 reference on the same inputs with the bad rows cleaned.

The CPU tests run here in every CPU dtype and mode; test_cuda_nonfinite_rule_* state the same rule for the CUDA
kernels and skip without a CUDA device (the lead decides what the CUDA kernels do).
"""
from __future__ import annotations

import pytest
import torch
from conftest import BLOCK, FULL, STREAM, random_block_mask, rel_err

import elastic_cuda
from elastic_cuda.reference import attention_reference, visible_mask

B, S, HQ, HKV, D = 2, 300, 6, 2, 64
SINK, WINDOW, BLOCK_SIZE = 4, 40, 32
BAD_KEY = 100     # not a sink key; rows < 100 see it only in the future, STREAM rows >= 140 are outside the window
SINK_KEY = 2      # seen by every later row of a STREAM head
BAD_VALUES = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 4e-3}


def make_case(mode, dtype, device, gen):
    q = torch.randn(B, S, HQ, D, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(B, S, HKV, D, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(B, S, HKV, D, generator=gen, dtype=torch.float64).to(dtype)
    # sample 1 routes its KV heads differently from sample 0, so a batch mixes modes
    other = {FULL: STREAM, STREAM: BLOCK, BLOCK: FULL}[mode]
    head_mode = torch.tensor([[mode, mode], [mode, other]], dtype=torch.int32)
    mask = random_block_mask(B, HKV, S, BLOCK_SIZE, gen, density=0.4)
    kw = {"sink": SINK, "window": WINDOW, "block_mask": mask.to(device), "block_size": BLOCK_SIZE}
    return q.to(device), k.to(device), v.to(device), head_mode.to(device), kw


def visibility(head_mode, kw):
    """bool [B, HQ, S, S] from the reference statement of the semantics."""
    G = HQ // HKV
    out = torch.zeros(B, HQ, S, S, dtype=torch.bool)
    for b in range(B):
        for h in range(HQ):
            out[b, h] = visible_mask(int(head_mode[b, h // G]), S, S, sink=kw["sink"], window=kw["window"],
                                     block_mask=kw["block_mask"][b, h // G].cpu(), block_size=kw["block_size"])
    return out


def expected_nan(q, k, v, vis):
    """bool [B, S, HQ]: rows the rule makes NaN; bool [B, S, HKV]: keys a NaN row sees (their dk / dv are NaN)."""
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


def check_rule(q, k, v, head_mode, kw, *, backward=False, label=""):
    vis = visibility(head_mode.cpu(), kw)
    want_rows, want_keys = expected_nan(q, k, v, vis)
    assert want_rows.any() and not want_rows.all(), "case must have NaN rows and clean rows"
    qq, kk, vv = (t.detach().requires_grad_(backward) for t in (q, k, v))
    out, lse = elastic_cuda.ops.attention(qq, kk, vv, head_mode, return_lse=True, **kw)
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


# ----------------------------------------------------------------------------- CUDA (the lead runs these on a GPU)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or not elastic_cuda.has_cuda_kernels(),
                                reason="needs a CUDA device and the CUDA kernels")
# The CUDA kernels do not implement the rule yet (a non-finite V row inside a visited tile reaches the rows of that
# tile that cannot see it, through P = 0 times NaN; NaN q rows give 0 / -inf): these tests state the rule they must
# meet; which CUDA cases already pass was not measured (no device time), so the xfail is not strict (#14).
cuda_rule_pending = pytest.mark.xfail(strict=False, reason="CUDA kernels do not implement the non-finite rule yet (#14)")


@pytest.mark.gpu
@needs_cuda
@cuda_rule_pending
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("where", ["q", "k", "v", "k-sink", "v-sink"])
@pytest.mark.parametrize("bad", list(BAD_VALUES))
def test_cuda_nonfinite_rule_forward(dtype, mode, where, bad, gen):
    if where.endswith("sink") and mode != "stream":
        pytest.skip("sink keys are a STREAM case")
    q, k, v, head_mode, kw = make_case(MODES[mode], dtype, "cuda", gen)
    q, k, v = poison(q, k, v, where, BAD_VALUES[bad], MODES[mode])
    check_rule(q, k, v, head_mode, kw, label=f"cuda {dtype} {mode} {where} {bad}")


@pytest.mark.gpu
@needs_cuda
@cuda_rule_pending
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mode", list(MODES))
def test_cuda_nonfinite_rule_backward(dtype, mode, gen):
    q, k, v, head_mode, kw = make_case(MODES[mode], dtype, "cuda", gen)
    q, k, v = poison(q, k, v, "v", float("nan"), MODES[mode])
    q, k, v = poison(q, k, v, "q", float("inf"), MODES[mode])
    check_rule(q, k, v, head_mode, kw, backward=True, label=f"cuda backward {dtype} {mode}")


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_nonfinite_rule_cpu_varlen(dtype, gen):
    """Packed sequences: a bad key / query of one sequence never reaches another; each sequence equals its dense run."""
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
    nb = -(-max(lens) // BLOCK_SIZE)
    mask = torch.rand(3, HKV, nb, nb, generator=gen) < 0.5
    kw = {"sink": SINK, "window": WINDOW, "block_size": BLOCK_SIZE}
    out, lse = elastic_cuda.ops.attention(q, k, v, head_mode, block_mask=mask, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                          max_seqlen_q=max(lens), max_seqlen_k=max(lens), return_lse=True, **kw)
    for b, n in enumerate(lens):
        s = slice(int(cu[b]), int(cu[b + 1]))
        nbb = -(-n // BLOCK_SIZE)
        o1, l1 = elastic_cuda.ops.attention(q[None, s], k[None, s], v[None, s], head_mode[b:b + 1],
                                            block_mask=mask[b:b + 1, :, :nbb, :nbb], return_lse=True, **kw)
        assert torch.equal(torch.isnan(out[s]), torch.isnan(o1[0])), f"sequence {b}: NaN rows differ"
        assert torch.equal(torch.isnan(lse[:, s]), torch.isnan(l1[0])), f"sequence {b}: NaN lse differs"
        assert torch.isnan(out[s]).any(), f"sequence {b} holds a bad element: some row must be NaN"
        ok = ~torch.isnan(o1[0])
        assert torch.allclose(out[s][ok].double(), o1[0][ok].double(), rtol=TOL[dtype], atol=TOL[dtype])
