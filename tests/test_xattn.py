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
