"""elastic.boundary_pool: CPU op vs a pure-PyTorch reference (float64), gradients, and CUDA vs CPU.

The reference below restates the rule independently of the kernel: the pooled set is the union of the
token positions {0..n_first-1} and {S-n_last..S-1} inside a sequence of length S (so overlapping windows
count a token once), and the output is the float64 mean of those keys."""
import pytest
import torch

import elastic_cuda
from elastic_cuda import boundary_pool


def reference_pool(keys, n_first, n_last, cu_seqlens=None):
    """float64 mean over the union of the boundary windows, one python set per sequence."""
    seqs = []
    if cu_seqlens is None:
        seqs = [keys[b] for b in range(keys.shape[0])]
    else:
        c = cu_seqlens.tolist()
        seqs = [keys[c[b]:c[b + 1]] for b in range(len(c) - 1)]
    out = []
    for seq in seqs:
        S = seq.shape[0]
        picked = sorted(set(range(min(n_first, S))) | set(range(max(0, S - n_last), S)))
        if not picked:
            out.append(torch.zeros(seq.shape[1:], dtype=torch.float64))
        else:
            out.append(seq[picked].double().mean(0))
    return torch.stack(out)


def rel_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("S", [1, 7, 150, 199, 200, 201, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dense_matches_reference(S, dtype):
    torch.manual_seed(S)
    keys = torch.randn(2, S, 3, 16, dtype=dtype)
    got = boundary_pool(keys, n_first=100, n_last=100)
    want = reference_pool(keys, 100, 100)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got.shape == (2, 3, 16)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-6}[dtype]  # bf16 inputs are exact in fp32
    err = rel_err(got, want)
    assert err < tol, f"S={S} {dtype}: rel err {err:.3e}"


def test_overlap_counts_once_exactly():
    # S=5 with windows of 4 and 4: union is all 5 tokens, so the mean is the plain mean (a double count would
    # weight tokens 1..3 twice).
    keys = torch.arange(5, dtype=torch.float64).view(1, 5, 1, 1).expand(1, 5, 1, 2).contiguous()
    got = boundary_pool(keys, n_first=4, n_last=4)
    assert torch.equal(got, torch.full((1, 1, 2), 2.0, dtype=torch.float64))


@pytest.mark.parametrize("n_first,n_last", [(100, 100), (3, 0), (0, 5), (1, 1)])
def test_varlen_matches_reference(n_first, n_last):
    torch.manual_seed(1)
    lens = [1, 0, 57, 250, 199]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    keys = torch.randn(int(cu[-1]), 2, 8, dtype=torch.float32)
    got = boundary_pool(keys, n_first=n_first, n_last=n_last, cu_seqlens=cu)
    want = reference_pool(keys, n_first, n_last, cu)
    assert got.shape == (len(lens), 2, 8)
    assert torch.equal(got[1], torch.zeros(2, 8)), "an empty sequence pools to zeros"
    err = rel_err(got, want)
    assert err < 1e-6, f"varlen rel err {err:.3e}"


def test_varlen_equals_dense_per_sequence():
    torch.manual_seed(2)
    keys = torch.randn(3, 300, 2, 8, dtype=torch.float64)
    cu = torch.tensor([0, 300, 600, 900], dtype=torch.int32)
    dense = boundary_pool(keys)
    varlen = boundary_pool(keys.reshape(900, 2, 8), cu_seqlens=cu)
    assert rel_err(varlen, dense) < 1e-14


def test_gradcheck_float64():
    torch.manual_seed(3)
    keys = torch.randn(2, 9, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda k: boundary_pool(k, n_first=4, n_last=3), (keys,))
    keys_v = torch.randn(12, 2, 3, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 5, 5, 12], dtype=torch.int32)
    assert torch.autograd.gradcheck(lambda k: boundary_pool(k, n_first=2, n_last=2, cu_seqlens=cu), (keys_v,))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="keys must have shape"):
        boundary_pool(torch.randn(4, 3, 2))
    with pytest.raises(ValueError, match="n_first/n_last"):
        boundary_pool(torch.randn(1, 4, 3, 2), n_first=0, n_last=0)
    with pytest.raises(RuntimeError, match="cu_seqlens"):
        torch.ops.elastic.boundary_pool(torch.randn(4, 3, 2), torch.tensor([0, 4], dtype=torch.int64))


# ----------------------------------------------------------------------------- CUDA vs CPU
needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and elastic_cuda.has_cuda_kernels()),
                                reason="needs a CUDA device and the CUDA kernels")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("S", [1, 150, 200, 4096])
def test_cuda_matches_cpu_dense(dtype, S):
    torch.manual_seed(S)
    keys = torch.randn(2, S, 3, 72, dtype=dtype)  # D=72: a partial block of head_dim lanes
    cpu = boundary_pool(keys)
    gpu = boundary_pool(keys.cuda())
    assert gpu.dtype == cpu.dtype
    err = rel_err(gpu, cpu)
    assert err < (1e-12 if dtype == torch.float64 else 1e-6), f"{dtype} S={S}: rel err {err:.3e}"


@pytest.mark.gpu
@needs_cuda
def test_cuda_matches_cpu_varlen_and_strided():
    torch.manual_seed(5)
    lens = [3, 0, 190, 420]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    keys = torch.randn(int(cu[-1]), 4, 64)
    cpu = boundary_pool(keys, cu_seqlens=cu)
    gpu = boundary_pool(keys.cuda(), cu_seqlens=cu.cuda())
    assert rel_err(gpu, cpu) < 1e-6
    # non-contiguous keys (a slice of a fused kv projection)
    big = torch.randn(2, 333, 4, 128, device="cuda")
    view = big[..., ::2]
    assert rel_err(boundary_pool(view), boundary_pool(view.cpu())) < 1e-6


@pytest.mark.gpu
@needs_cuda
def test_cuda_invalid_cu_seqlens_gives_nan():
    keys = torch.randn(10, 2, 8, device="cuda")
    cu = torch.tensor([0, 6, 4, 12], dtype=torch.int32, device="cuda")  # decreasing, then past the end
    out = boundary_pool(keys, cu_seqlens=cu)
    assert torch.isfinite(out[0]).all()
    assert torch.isnan(out[1]).all() and torch.isnan(out[2]).all()


@pytest.mark.gpu
@needs_cuda
def test_cuda_gradient_matches_cpu():
    torch.manual_seed(6)
    keys = torch.randn(2, 300, 2, 16, dtype=torch.float64)
    g = torch.randn(2, 2, 16, dtype=torch.float64)
    kc = keys.clone().requires_grad_(True)
    kg = keys.cuda().requires_grad_(True)
    boundary_pool(kc).backward(g)
    boundary_pool(kg).backward(g.cuda())
    assert rel_err(kg.grad, kc.grad) < 1e-6
