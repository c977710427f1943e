"""XAttention-style block-mask estimation (elastic_cuda.attention.xattn) against a loop-by-loop reference."""
import math

import pytest
import torch

from elastic_cuda.attention.xattn import block_mass, block_visible_pairs, select_blocks, xattn_block_mask
from elastic_cuda.reference import visible_mask
from elastic_cuda.ops import BLOCK


def reference_mass(q, k, block_size, stride, scale=None):
    """Straight from the definition: antidiagonal sums, masked softmax per query group, block sums (float64)."""
    n, Hq, D = q.shape
    G_kv = Hq // k.shape[1]
    nb = -(-n // block_size)
    G = nb * block_size // stride
    sc = (1 / math.sqrt(D) if scale is None else scale) / stride
    out = torch.zeros(Hq, nb, nb, dtype=torch.float64)
    for h in range(Hq):
        kh = k[:, h // G_kv].double()
        qh = q[:, h].double()
        for m in range(G):
            if m * stride >= n:
                continue
            scores = []
            for g in range(m + 1):
                if g * stride >= n:
                    break
                s = 0.0
                for i in range(stride):
                    qi, ki = m * stride + stride - 1 - i, g * stride + i
                    if qi < n and ki < n:
                        s += float(qh[qi] @ kh[ki])
                scores.append(s * sc)
            p = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0)
            for g, pg in enumerate(p):
                out[h, m * stride // block_size, g * stride // block_size] += pg
    return out


def reference_select(mass, threshold):
    nb = mass.shape[-1]
    keep = torch.zeros(mass.shape, dtype=torch.bool)
    for idx in range(mass.shape[0]):
        for r in range(nb):
            row = [float(mass[idx, r, c]) for c in range(r + 1)]
            total = sum(row)
            order = sorted(range(r + 1), key=lambda c: (c not in (0, r), -row[c], c))
            acc = 0.0
            for c in order:
                if c in (0, r) or acc < threshold * total:
                    keep[idx, r, c] = True
                acc += row[c]
    return keep


@pytest.mark.parametrize("n,hq,hkv,bs,stride", [(70, 4, 2, 16, 4), (33, 3, 1, 8, 2), (64, 2, 2, 16, 8),
                                                 (5, 1, 1, 8, 4)])
def test_block_mass_matches_the_definition(n, hq, hkv, bs, stride):
    torch.manual_seed(n)
    q, k = torch.randn(n, hq, 8), torch.randn(n, hkv, 8)
    got = block_mass(q, k, block_size=bs, stride=stride)
    ref = reference_mass(q, k, bs, stride)
    assert got.shape == ref.shape
    assert (got.double() - ref).abs().max() / ref.abs().max() < 1e-5
    # query blocks in chunks (down to one block row at a time) give the same masses
    chunked = block_mass(q, k, block_size=bs, stride=stride, max_chunk_elems=1)
    assert torch.allclose(chunked, got, rtol=1e-6, atol=1e-7)
    # every real query group's probabilities sum to 1
    n_groups = -(-n // stride)
    assert abs(float(got.sum()) - hq * n_groups) < 1e-3 * hq * n_groups


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.8, 0.9, 1.0])
def test_select_blocks_matches_the_rule(threshold):
    torch.manual_seed(1)
    mass = torch.rand(3, 9, 9).double() ** 3
    got = select_blocks(mass, threshold)
    assert torch.equal(got, reference_select(mass, threshold))
    nb = 9
    assert got[:, torch.arange(nb), torch.arange(nb)].all() and got[:, :, 0].all()   # diagonal and sink kept
    assert not got[:, torch.triu(torch.ones(nb, nb, dtype=torch.bool), 1)].any()    # nothing in the future
    if threshold == 1.0:
        assert torch.equal(got, torch.tril(torch.ones(nb, nb, dtype=torch.bool)).expand_as(got))
    if threshold == 0.0:
        assert int(got.sum()) == 3 * (2 * nb - 1)


def test_xattn_keeps_the_block_a_query_attends_to():
    """A planted key that one late query block matches strongly is found; an unrelated middle block is not."""
    torch.manual_seed(0)
    n, bs, D = 256, 32, 16
    q, k = torch.randn(n, 1, D) * 0.1, torch.randn(n, 1, D) * 0.1
    needle = torch.randn(D)
    k[100:104, 0] = needle * 4     # block 3
    q[224:256, 0] = needle * 4     # query block 7
    mask = xattn_block_mask(q[None], k[None], block_size=bs, stride=4, threshold=0.5)[0, 0]
    assert mask[7, 3] and not mask[7, 5]


def test_varlen_equals_per_sequence_and_validates():
    torch.manual_seed(2)
    lens = [40, 17, 64]
    qs = [torch.randn(n, 4, 8) for n in lens]
    ks = [torch.randn(n, 2, 8) for n in lens]
    cu = torch.tensor([0, 40, 57, 121], dtype=torch.int32)
    packed = xattn_block_mask(torch.cat(qs), torch.cat(ks), block_size=16, stride=4, threshold=0.7, cu_seqlens=cu,
                              max_seqlen=64)
    assert packed.shape == (3, 4, 4, 4)
    for b, n in enumerate(lens):
        one = xattn_block_mask(qs[b][None], ks[b][None], block_size=16, stride=4, threshold=0.7)[0]
        nb = one.shape[-1]
        assert torch.equal(packed[b, :, :nb, :nb], one) and not packed[b, :, nb:].any()
    with pytest.raises(ValueError, match="multiple of the xattn stride"):
        xattn_block_mask(qs[0][None], ks[0][None], block_size=10, stride=4)
    with pytest.raises(ValueError, match="threshold"):
        xattn_block_mask(qs[0][None], ks[0][None], block_size=16, stride=4, threshold=1.5)
    with pytest.raises(ValueError, match="queries = keys"):
        xattn_block_mask(qs[0][None], ks[1][None], block_size=16, stride=4)


@pytest.mark.parametrize("n", [1, 16, 37, 64])
def test_block_visible_pairs_count_the_reference_mask(n):
    torch.manual_seed(n)
    nb = -(-n // 16)
    mask = torch.rand(2, nb, nb) < 0.5
    got = block_visible_pairs(mask, n, 16)
    for h in range(2):
        ref = visible_mask(BLOCK, n, n, sink=0, window=0, block_mask=mask[h], block_size=16).sum()
        assert float(got[h]) == float(ref)


# ----------------------------------------------------------------------------- head_mode on the torch path (CPU)
def test_head_mode_keeps_only_block_heads_rows_on_the_torch_path():
    torch.manual_seed(3)
    q, k = torch.randn(2, 70, 6, 8), torch.randn(2, 70, 2, 8)
    every = xattn_block_mask(q, k, block_size=16, stride=4, threshold=0.7)
    head_mode = torch.tensor([[BLOCK, 0], [1, BLOCK]], dtype=torch.int32)
    got = xattn_block_mask(q, k, block_size=16, stride=4, threshold=0.7, head_mode=head_mode)
    block_q_heads = (head_mode == BLOCK).repeat_interleave(3, dim=1)
    assert torch.equal(got[block_q_heads], every[block_q_heads])
    assert not got[~block_q_heads].any()
    with pytest.raises(ValueError, match="head_mode"):
        xattn_block_mask(q, k, block_size=16, stride=4, head_mode=head_mode[:1])


def test_op_wrapper_refuses_cpu_tensors_and_bad_arguments():
    from elastic_cuda.ops import xattn_block_mask as op
    q, k = torch.randn(1, 20, 2, 64, dtype=torch.bfloat16), torch.randn(1, 20, 1, 64, dtype=torch.bfloat16)
    hm = torch.full((1, 1), BLOCK, dtype=torch.int32)
    with pytest.raises(ValueError, match="CUDA"):
        op(q, k, hm)
    with pytest.raises(ValueError, match="same tokens"):
        op(q, k[:, :10], hm)


def test_fake_kernel_gives_the_mask_shape():
    """The fake kernel (torch.compile / FakeTensorMode) runs without a GPU: dense and packed shapes."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        q, k = torch.empty(2, 300, 8, 128, dtype=torch.bfloat16), torch.empty(2, 300, 2, 128, dtype=torch.bfloat16)
        hm = torch.empty(2, 2, dtype=torch.int32)
        out = torch.ops.elastic.xattn_block_mask(q, k, hm, None, block_size=128, stride=16, threshold=0.9)
        assert out.shape == (2, 8, 3, 3) and out.dtype == torch.bool
        qp, kp = torch.empty(500, 8, 64, dtype=torch.float16), torch.empty(500, 2, 64, dtype=torch.float16)
        cu = torch.empty(4, dtype=torch.int32)
        out = torch.ops.elastic.xattn_block_mask(qp, kp, torch.empty(3, 2, dtype=torch.int32), cu, block_size=64,
                                                 stride=16, threshold=0.5, max_seqlen=257)
        assert out.shape == (3, 8, 5, 5) and out.dtype == torch.bool

    def f(q, k, hm):
        return torch.ops.elastic.xattn_block_mask(q, k, hm, None, block_size=128, stride=16, threshold=0.9)

    q, k = torch.empty(1, 129, 4, 64, device="meta"), torch.empty(1, 129, 1, 64, device="meta")
    out = torch.compile(f, backend="eager", fullgraph=True)(q, k, torch.empty(1, 1, dtype=torch.int32, device="meta"))
    assert out.shape == (1, 4, 2, 2) and out.dtype == torch.bool and out.device.type == "meta"


# ----------------------------------------------------------------------------- the CUDA op against the torch rule
def _cuda_op_available():
    if not torch.cuda.is_available():
        return False
    from elastic_cuda.ops import has_cuda_kernels
    return has_cuda_kernels() and torch._C._dispatch_has_kernel_for_dispatch_key("elastic::xattn_block_mask", "CUDA")


_needs_cuda_op = pytest.mark.skipif(not _cuda_op_available(), reason="needs a GPU and the CUDA build of elastic_cuda")


@pytest.fixture(params=["wgmma", "wgmma_wide", "mma_sync"])
def xattn_kernel(request, monkeypatch):
    """Every CUDA test runs kernel 1 three ways: its wgmma body's wide instance (two key tiles per step, the default;
    a Hopper runs it, other GPUs fall back to mma.sync, so there the ids run the same kernel), its narrow instance
    (ELASTIC_XATTN_SM90_WIDE=0) and mma.sync (ELASTIC_XATTN_SM90=0, kernel_options.h)."""
    import elastic_cuda.ops

    wgmma, wide = request.param != "mma_sync", request.param == "wgmma_wide"
    monkeypatch.setenv("ELASTIC_XATTN_SM90", "1" if wgmma else "0")
    monkeypatch.setenv("ELASTIC_XATTN_SM90_WIDE", "1" if wide else "0")
    described = elastic_cuda.ops.reload_kernel_options()
    assert f"xattn_sm90={int(wgmma)} xattn_sm90_wide={int(wide)}" in described, described
    yield request.param
    monkeypatch.undo()
    elastic_cuda.ops.reload_kernel_options()


def cuda_only(test):
    """A GPU test (marker gpu), skipped without the CUDA op, run on both kernel-1 paths (xattn_kernel)."""
    return pytest.mark.gpu(_needs_cuda_op(pytest.mark.usefixtures("xattn_kernel")(test)))


TIE_TOL = 1e-3  # a differing block must be a tie within this fraction of its row's total mass


def reference_masses(q, k, bs, stride, scale=None, cu=None):
    """float64 masses [Hq, nb_b, nb_b] per sample, from block_mass on the exact (upcast) inputs."""
    q64, k64 = q.double().cpu(), k.double().cpu()
    if cu is None:
        return [block_mass(q64[b], k64[b], block_size=bs, stride=stride, scale=scale).double()
                for b in range(q.shape[0])]
    bounds = cu.tolist()
    return [block_mass(q64[s:e], k64[s:e], block_size=bs, stride=stride, scale=scale).double() if e > s else None
            for s, e in zip(bounds[:-1], bounds[1:])]


def check_against_rule(got, masses, head_mode, group, threshold, nb):
    """Exact structure (non-BLOCK heads, the future, rows past the end: False; blocks 0 and r kept) and the
    selection equal to the torch rule up to rounding ties. Returns the fraction of differing causal blocks."""
    got = got.cpu()
    assert got.dtype == torch.bool and got.shape == (len(masses), group * head_mode.shape[1], nb, nb)
    differ = causal_total = 0
    for b, mass in enumerate(masses):
        for h in range(got.shape[1]):
            row_mask = got[b, h]
            if int(head_mode[b, h // group]) != BLOCK or mass is None:
                assert not row_mask.any(), f"sample {b} head {h}: not BLOCK (or empty) but mask set"
                continue
            nbb = mass.shape[-1]
            assert not row_mask[nbb:].any() and not row_mask[:, nbb:].any(), "blocks past the sequence end set"
            ref = select_blocks(mass[h], threshold)
            mine = row_mask[:nbb, :nbb]
            assert not torch.triu(mine, 1).any(), "future block set"
            idx = torch.arange(nbb)
            assert mine[idx, idx].all() and mine[:, 0].all(), "diagonal or first block dropped"
            causal_total += nbb * (nbb + 1) // 2
            for r in torch.nonzero((mine != ref).any(-1)).flatten().tolist():
                differ += int((mine[r] != ref[r]).sum())
                assert threshold < 1.0, "threshold >= 1 must keep every causal block exactly"
                x = mass[h, r, : r + 1]
                total = float(x.sum())
                forced = float(x[0]) + (float(x[r]) if r > 0 else 0.0)
                free = torch.ones(r + 1, dtype=torch.bool)
                free[0] = free[r] = False
                kept, dropped = x[free & mine[r, : r + 1]], x[free & ~mine[r, : r + 1]]
                tol = TIE_TOL * total
                if len(kept) and len(dropped):  # a top set, up to ties in mass
                    assert float(kept.min()) >= float(dropped.max()) - tol, f"row {r}: kept a smaller block"
                acc = forced + float(kept.sum())
                if len(kept):  # the last kept block still started below the threshold
                    assert acc - float(kept.min()) < threshold * total + tol, f"row {r}: kept past the threshold"
                if len(dropped):  # the first dropped block started at or above it
                    assert acc >= threshold * total - tol, f"row {r}: stopped below the threshold"
    return differ / max(1, causal_total)


def poison_cuda_cache(n_bytes):
    """Fill freed allocator memory with 0xFF so that a mask byte the op does not write reads as 0xFF (bool True)."""
    for size in (n_bytes, 2 * n_bytes + 512):
        junk = torch.full((max(size, 512),), 255, dtype=torch.uint8, device="cuda")
        del junk


def run_case(B, lengths, Hq, Hkv, D, dtype, bs, stride, threshold, head_mode, varlen, kind="random", seed=0):
    g = torch.Generator().manual_seed(seed)
    S = max(lengths)
    if varlen:
        cu = torch.tensor([0] + list(lengths), dtype=torch.int64).cumsum(0).to(torch.int32)
        T = int(cu[-1])
        q, k = torch.randn(T, Hq, D, generator=g), torch.randn(T, Hkv, D, generator=g)
    else:
        cu = None
        q, k = torch.randn(B, S, Hq, D, generator=g), torch.randn(B, S, Hkv, D, generator=g)
    if kind == "needle":  # a few keys that the last query block matches strongly (token axis: dim -3)
        needle = torch.randn(D, generator=g) * 3
        k[..., S // 3: S // 3 + 4, :, :] += needle
        q[..., max(0, S - 100): S, :, :] += needle
    elif kind == "diffuse":  # nearly uniform attention: many masses tie
        q *= 1e-3
    else:
        q *= 1.5
    q, k = q.to(dtype), k.to(dtype)
    masses = reference_masses(q, k, bs, stride, cu=cu)
    qd, kd, hm = q.cuda(), k.cuda(), head_mode.to(torch.int32).cuda()
    from elastic_cuda.ops import xattn_block_mask as op
    kw = dict(block_size=bs, stride=stride, threshold=threshold)
    poison_cuda_cache(B * Hq * (-(-S // bs)) ** 2)
    if varlen:
        got = op(qd, kd, hm, cu_seqlens=cu.cuda(), max_seqlen=S, **kw)
    else:
        got = op(qd, kd, hm, **kw)
    torch.cuda.synchronize()
    assert got.device == qd.device and got.is_contiguous()
    if got.numel():
        assert int(got.view(torch.uint8).max()) <= 1, "mask bytes left unwritten (0xFF poison)"
    frac = check_against_rule(got, masses, head_mode, Hq // Hkv, threshold, -(-S // bs))
    print(f"[{kind} B={B} lengths={lengths} Hq={Hq} Hkv={Hkv} D={D} {dtype} bs={bs} s={stride} thr={threshold} "
          f"varlen={varlen}] differing blocks: {frac:.2e}")
    assert frac < 0.02
    return got


@cuda_only
@pytest.mark.parametrize("n", [1, 2, 3, 17, 127, 128, 129, 1000, 4500])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_op_matches_the_rule_at_odd_lengths(n, dtype):
    hm = torch.full((1, 2), BLOCK)
    run_case(1, [n], 8, 2, 128, dtype, 128, 16, 0.9, hm, varlen=False, seed=n)


@cuda_only
@pytest.mark.parametrize("hq,hkv", [(2, 2), (6, 2), (8, 2), (16, 2)])
@pytest.mark.parametrize("D", [64, 128])
def test_cuda_op_gqa_and_head_dims(hq, hkv, D):
    run_case(1, [1000], hq, hkv, D, torch.bfloat16, 128, 16, 0.9, torch.full((1, hkv), BLOCK), varlen=False,
             seed=hq * D)


@cuda_only
@pytest.mark.parametrize("n,hq,hkv,D", [(4500, 3, 1, 128), (4500, 2, 2, 64), (2300, 8, 1, 128), (3000, 24, 8, 64),
                                         (2049, 4, 1, 128)])
def test_cuda_op_gqa_groups_over_several_key_tiles(n, hq, hkv, D):
    """GQA 1 / 3 / 4 / 8 over 2-3 key tiles (128 key groups each): row tiles that end inside a warpgroup (rows not
    a multiple of 64), warpgroups with no live column in the CTA's last tile (their MMAs skipped)."""
    for dtype in (torch.bfloat16, torch.float16):
        run_case(1, [n], hq, hkv, D, dtype, 128, 16, 0.9, torch.full((1, hkv), BLOCK), varlen=False, seed=n + hq)


@_needs_cuda_op
@pytest.mark.gpu
def test_cuda_kernel_paths_agree_on_the_llama_shape(monkeypatch):
    """The wgmma and mma.sync bodies of kernel 1 on the Llama-3.1-8B shape (Hq 32, Hkv 8, D 128) at 8K, 6 of 8 KV
    heads BLOCK: the same selection up to fp32 summation-order ties (the float64 rule is too slow on the CPU here;
    the rule itself is checked at smaller shapes above)."""
    import elastic_cuda.ops
    from elastic_cuda.ops import xattn_block_mask as op

    g = torch.Generator().manual_seed(3)
    q = (torch.randn(1, 8192, 32, 128, generator=g) * 1.5).to(torch.bfloat16).cuda()
    k = torch.randn(1, 8192, 8, 128, generator=g).to(torch.bfloat16).cuda()
    hm = torch.tensor([[0, 1] + [BLOCK] * 6], dtype=torch.int32, device="cuda")
    masks = {}
    for path, wide in (("1", "0"), ("0", "0"), ("1", "1")):
        monkeypatch.setenv("ELASTIC_XATTN_SM90", path)
        monkeypatch.setenv("ELASTIC_XATTN_SM90_WIDE", wide)
        elastic_cuda.ops.reload_kernel_options()
        poison_cuda_cache(32 * 64 * 64)
        masks[path + wide] = op(q, k, hm, threshold=0.9)
    monkeypatch.undo()
    elastic_cuda.ops.reload_kernel_options()
    # The wide instance runs the same key tiles, accumulation order and row statistics, two tiles per step.
    assert torch.equal(masks["11"], masks["10"]), "wide wgmma instance differs from the wgmma one"
    a, b = masks["10"], masks["00"]
    assert int(a.view(torch.uint8).max()) <= 1 and int(b.view(torch.uint8).max()) <= 1, "mask bytes left unwritten"
    assert not a[:, :8].any() and not b[:, :8].any(), "FULL / STREAM heads got mask bits"
    differ = float((a != b).float().sum()) / float(b[:, 8:].sum())
    print(f"wgmma vs mma.sync, 8K Llama shape: {differ:.2e} of the kept blocks differ")
    assert differ < 1e-3


@pytest.mark.parametrize("name", ["ELASTIC_XATTN_SM90", "ELASTIC_XATTN_SM90_WIDE"])
def test_xattn_switch_default_and_bad_value(monkeypatch, name):
    """ELASTIC_XATTN_SM90 / _WIDE (kernel_options.h): wgmma, wide instance by default; 0 / 1 only, anything else an
    error naming the variable."""
    import elastic_cuda.ops

    monkeypatch.delenv("ELASTIC_XATTN_SM90", raising=False)
    monkeypatch.delenv("ELASTIC_XATTN_SM90_WIDE", raising=False)
    try:
        if "xattn_sm90_wide=" not in elastic_cuda.ops.reload_kernel_options():
            pytest.skip("extension built before the ELASTIC_XATTN_SM90_WIDE switch")
        assert "xattn_sm90=1 xattn_sm90_wide=1" in elastic_cuda.ops.reload_kernel_options()
        monkeypatch.setenv(name, "yes")
        with pytest.raises(RuntimeError, match=name + "\\b"):
            elastic_cuda.ops.reload_kernel_options()
    finally:
        monkeypatch.undo()
        elastic_cuda.ops.reload_kernel_options()


@cuda_only
@pytest.mark.parametrize("kind", ["random", "needle", "diffuse"])
@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.9, 1.0])
def test_cuda_op_structured_inputs_and_thresholds(kind, threshold):
    run_case(1, [2100], 4, 1, 128, torch.bfloat16, 128, 16, threshold, torch.full((1, 1), BLOCK), varlen=False,
             kind=kind, seed=7)


@cuda_only
@pytest.mark.parametrize("bs,stride", [(128, 16), (64, 16), (32, 16), (16, 16), (128, 8), (256, 8), (128, 4),
                                       (128, 1)])
def test_cuda_op_blocks_of_every_supported_width(bs, stride):
    """block_size / stride from 1 to 128 query groups per block (every branch of the block sums)."""
    run_case(1, [777], 6, 2, 64, torch.bfloat16, bs, stride, 0.8, torch.full((1, 2), BLOCK), varlen=False,
             seed=bs + stride)


@cuda_only
@pytest.mark.parametrize("varlen", [False, True])
def test_cuda_op_batch_with_per_sample_routing(varlen):
    """Different modes per (sample, KV head): only BLOCK heads are estimated, the others are all False."""
    hm = torch.tensor([[BLOCK, 0, BLOCK], [1, BLOCK, 0], [BLOCK, BLOCK, BLOCK], [0, 1, 0]])
    lengths = [1000, 129, 1, 300] if varlen else [700] * 4
    run_case(4, lengths, 12, 3, 128, torch.bfloat16, 128, 16, 0.9, hm, varlen=varlen, seed=11)


@cuda_only
def test_cuda_op_varlen_with_an_empty_sequence_and_a_long_one():
    hm = torch.full((3, 2), BLOCK)
    run_case(3, [2300, 0, 5], 8, 2, 64, torch.float16, 128, 16, 0.9, hm, varlen=True, seed=5)


@cuda_only
def test_cuda_op_chunked_workspace_gives_the_same_mask(monkeypatch):
    """A tiny workspace cap runs one query block per chunk; rows are computed identically, so the masks are equal."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 1500, 8, 128, generator=g).to(torch.bfloat16).cuda()
    k = torch.randn(2, 1500, 2, 128, generator=g).to(torch.bfloat16).cuda()
    hm = torch.tensor([[BLOCK, BLOCK], [0, BLOCK]], dtype=torch.int32, device="cuda")
    from elastic_cuda.ops import xattn_block_mask as op
    whole = op(q, k, hm, threshold=0.8)
    monkeypatch.setenv("ELASTIC_XATTN_WORKSPACE_BYTES", "1")
    chunked = op(q, k, hm, threshold=0.8)
    assert torch.equal(whole, chunked)


@cuda_only
def test_cuda_dispatch_of_xattn_block_mask_and_fallback():
    """xattn_block_mask uses the op on CUDA (equal to calling it) and the torch rule where the op does not apply."""
    from elastic_cuda.ops import xattn_block_mask as op
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 400, 4, 64, generator=g).to(torch.bfloat16).cuda()
    k = torch.randn(1, 400, 2, 64, generator=g).to(torch.bfloat16).cuda()
    hm = torch.tensor([[BLOCK, 1]], dtype=torch.int32, device="cuda")
    assert torch.equal(xattn_block_mask(q, k, head_mode=hm), op(q, k, hm))
    assert torch.equal(xattn_block_mask(q, k), op(q, k, torch.full_like(hm, BLOCK)))
    # fp32 is not an op dtype: the torch rule runs on the GPU, head_mode still applies
    got = xattn_block_mask(q.float(), k.float(), head_mode=hm)
    assert got.is_cuda and not got[:, 2:].any()
    with pytest.raises(ValueError, match="power of two"):
        op(q, k, hm, block_size=48, stride=16)


@cuda_only
def test_cuda_op_passes_opcheck():
    """Schema, fake kernel and real kernel agree (torch.library.opcheck), dense and packed."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 300, 4, 64, generator=g).to(torch.float16).cuda()
    k = torch.randn(2, 300, 2, 64, generator=g).to(torch.float16).cuda()
    hm = torch.tensor([[BLOCK, 0], [BLOCK, BLOCK]], dtype=torch.int32, device="cuda")
    kw = dict(block_size=128, stride=16, threshold=0.9)
    torch.library.opcheck(torch.ops.elastic.xattn_block_mask.default, (q, k, hm, None), kw)
    cu = torch.tensor([0, 300, 450], dtype=torch.int32, device="cuda")
    packed_q, packed_k = q.reshape(600, 4, 64)[:450], k.reshape(600, 2, 64)[:450]
    torch.library.opcheck(torch.ops.elastic.xattn_block_mask.default, (packed_q, packed_k, hm, cu),
                          dict(kw, max_seqlen=300))
@pytest.mark.parametrize("n,bs,stride", [(70, 16, 4), (256, 32, 8), (5, 8, 4)])
def test_block_mass_low_precision_inputs_and_chunk_padding(n, bs, stride):
    """bf16 / fp16 inputs are widened chunk by chunk: the masses equal those of the same values in fp32 (the rule
    does not depend on the input dtype), match the definition, and chunks holding padding tokens change nothing."""
    torch.manual_seed(n)
    q, k = torch.randn(n, 6, 16), torch.randn(n, 2, 16)
    for dtype in (torch.bfloat16, torch.float16):
        ql, kl = q.to(dtype), k.to(dtype)
        got = block_mass(ql, kl, block_size=bs, stride=stride)
        assert got.dtype == torch.float32
        assert torch.equal(got, block_mass(ql.float(), kl.float(), block_size=bs, stride=stride))
        ref = reference_mass(ql.float(), kl.float(), bs, stride)
        assert (got.double() - ref).abs().max() / ref.abs().max() < 1e-5
        for chunk in (1, 6 * (bs // stride) * (-(-n // bs) * bs // stride)):  # one block row / exactly one chunk
            assert torch.allclose(block_mass(ql, kl, block_size=bs, stride=stride, max_chunk_elems=chunk), got,
                                  rtol=1e-6, atol=1e-7)
        assert torch.equal(xattn_block_mask(ql[None], kl[None], block_size=bs, stride=stride, threshold=0.8)[0],
                           select_blocks(got, 0.8))
