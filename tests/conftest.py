"""Shared pytest helpers: error metric, seeded RNG per test, random attention inputs (dense and varlen).

Import the plain helpers with `from conftest import rel_err, make_qkv, ...` (pytest puts tests/ on
sys.path); use the `gen` fixture for a torch.Generator seeded from the test's id, so every test
draws fresh inputs that are still reproducible (the seed is printed; rerun with -s to see it).
"""
from __future__ import annotations

import zlib

import pytest
import torch

FULL, STREAM, BLOCK = 0, 1, 2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| in float64, b the reference.

    Infinities must sit at the same places with the same sign (an lse of -inf for a row that sees
    nothing); they are excluded from the norm. NaN anywhere in a gives inf, so it always fails."""
    a = a.detach().to(torch.float64).cpu()
    b = b.detach().to(torch.float64).cpu()
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    if torch.isnan(a).any() or torch.isnan(b).any():
        return float("inf")
    inf_a, inf_b = torch.isinf(a), torch.isinf(b)
    if not torch.equal(inf_a, inf_b) or not torch.equal(a[inf_a], b[inf_b]):
        return float("inf")
    finite = ~inf_b
    if not finite.any():
        return 0.0
    diff = (a[finite] - b[finite]).abs().max().item()
    scale = b[finite].abs().max().item()
    return diff / max(scale, 1e-300)


def cuda_kernel_names(fn, part: str) -> list[str]:
    """Names of the CUDA kernels that fn() launched whose name contains `part` (torch.profiler): which kernel a
    dispatch test reached."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if part in e.name]


def seed_for(nodeid: str) -> int:
    return zlib.crc32(nodeid.encode())


@pytest.fixture
def gen(request) -> torch.Generator:
    """torch.Generator seeded from the test id (stable across runs, different between tests)."""
    seed = seed_for(request.node.nodeid)
    print(f"[seed {seed}]")
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def randn(shape, gen, dtype=torch.float64, requires_grad=False):
    t = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    return t.requires_grad_(requires_grad)


def make_qkv(B, Sq, Skv, Hq, Hkv, D, gen, dtype=torch.float64, requires_grad=False):
    """Dense q [B, Sq, Hq, D], k/v [B, Skv, Hkv, D]."""
    return (randn((B, Sq, Hq, D), gen, dtype, requires_grad), randn((B, Skv, Hkv, D), gen, dtype, requires_grad),
            randn((B, Skv, Hkv, D), gen, dtype, requires_grad))


def make_varlen_qkv(seqlens_q, seqlens_k, Hq, Hkv, D, gen, dtype=torch.float64, requires_grad=False):
    """Packed q [Tq, Hq, D], k/v [Tk, Hkv, D] and cu_seqlens_q/k int32 [B+1], max_seqlen_q/k."""
    assert len(seqlens_q) == len(seqlens_k)
    cu_q = torch.tensor([0] + list(seqlens_q), dtype=torch.int32).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + list(seqlens_k), dtype=torch.int32).cumsum(0).to(torch.int32)
    q = randn((int(cu_q[-1]), Hq, D), gen, dtype, requires_grad)
    k = randn((int(cu_k[-1]), Hkv, D), gen, dtype, requires_grad)
    v = randn((int(cu_k[-1]), Hkv, D), gen, dtype, requires_grad)
    return q, k, v, cu_q, cu_k, max(max(seqlens_q), 1), max(max(seqlens_k), 1)


def random_head_mode(B, Hkv, gen, modes=(FULL, STREAM, BLOCK)):
    """int32 [B, Hkv] drawn from `modes`."""
    idx = torch.randint(len(modes), (B, Hkv), generator=gen)
    return torch.tensor(modes, dtype=torch.int32)[idx]


def random_block_mask(B, H, seqlen_k, block_size, gen, density=0.4, diagonal=True):
    """bool [B, H, NB, NB], NB = ceil(seqlen_k / block_size); diagonal blocks forced on (or off)."""
    nb = -(-seqlen_k // block_size)
    mask = torch.rand((B, H, nb, nb), generator=gen) < density
    eye = torch.eye(nb, dtype=torch.bool).expand(B, H, nb, nb)
    return mask | eye if diagonal else mask & ~eye


def random_router(D, Hkv=3, seed=0, **router_kwargs):
    """An eval AttentionRouter (fp32, CPU) with input standardisation and a head bias, every weight random (x 0.5)
    and a random standardisation (mean ~ N(0, 1), std in [0.5, 2]): decisions that are neither all FULL nor all
    sparse, for the routers' bit-equality tests. router_kwargs go to AttentionRouter (e.g. n_first / n_last)."""
    from elastic_cuda.router import AttentionRouter

    torch.manual_seed(seed)
    r = AttentionRouter(D, num_kv_heads=Hkv, standardize_input=True, head_bias=True, **router_kwargs)
    with torch.no_grad():
        for p in r.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        r.input_mean.normal_()
        r.input_std.uniform_(0.5, 2.0)
    return r.eval()


def router_edge_case(r, keys, seed):
    """The routers' decision tests' edge cases, by seed, in place: 1 makes the last layer give equal logits for both
    classes (ties); 2 puts NaN / +inf / -inf into keys [B >= 3, S, Hkv >= 3, D] (non-finite logits)."""
    if seed == 1:  # ties: the last layer gives equal logits for both classes
        with torch.no_grad():
            last = r.router_mlp[-1]
            last.weight[1].copy_(last.weight[0])
            last.bias[1] = last.bias[0]
            r.head_bias[:, 1] = r.head_bias[:, 0]
    if seed == 2:  # non-finite keys: NaN / inf logits
        keys[0, 0, 0, 0] = float("nan")
        keys[1, 0, 1, 0] = float("inf")
        keys[2, 0, 2, :] = float("-inf")


def static_commit_case(B, H, S, D, lengths, gen, *, sink, ring, dtype=torch.float64, device="cpu", modes=None):
    """Arguments of elastic::static_cache_commit for a random prompt: keys/values in transformers' [B, H, S, D] view
    of a [B, S, H, D] buffer (non-contiguous, as the model hands them), random per-pair modes, left padding to
    `lengths` when they are not all S, NaN-poisoned pools sized from the routing with one spare row each (rows the
    commit must not touch stay NaN) and poisoned tables. Returns (args, kwargs) of the op; its outputs are
    args[5:13]: full_k, full_v, stream_k, stream_v, mode_table, slot, is_whole, seq_lens."""
    from elastic_cuda.attention import PaddingLayout

    if modes is None:
        modes = random_head_mode(B, H, gen)
    keys = randn((B, S, H, D), gen).to(dtype).transpose(1, 2)
    values = randn((B, S, H, D), gen).to(dtype).transpose(1, 2)
    n_whole = int((modes != STREAM).sum())
    nan = float("nan")
    full_k = torch.full((n_whole + 1, S + 3, D), nan, dtype=dtype)
    stream_k = torch.full((B * H - n_whole + 1, sink + ring, D), nan, dtype=dtype)
    mask = torch.zeros(B, S, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, S - n:] = True
    padding = PaddingLayout.from_mask(mask, S, S)
    cu, index = (None, None) if padding is None else (padding.cu_seqlens_k, padding.k_index)
    tables = [torch.full((B, H), -7, dtype=torch.int32), torch.full((B, H), -7, dtype=torch.int32),
              torch.zeros(B, H, dtype=torch.bool), torch.full((B,), -7, dtype=torch.int32)]
    args = [keys, values, modes.to(torch.int32), cu, index, full_k, full_k.clone(), stream_k, stream_k.clone(), *tables]
    args = [None if a is None else a.to(device) for a in args]
    return args, {"sink": sink}
