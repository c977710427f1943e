"""Step-by-step smoke run of the CUDA attention op (prints after every step, so a crash is located).

Run from the repo root: python tests/gpu_smoke.py (or under cuda-gdb / compute-sanitizer). Not a pytest file.
"""
import faulthandler
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
faulthandler.enable()


def step(msg):
    print("step:", msg, flush=True)


step("import torch")
import torch  # noqa: E402

step(f"torch {torch.__version__} cuda {torch.cuda.is_available()}")
import elastic_cuda  # noqa: E402
from elastic_cuda.reference import attention_reference  # noqa: E402

step(f"import elastic_cuda ok, cuda kernels {elastic_cuda.has_cuda_kernels()}")


def case(name, B, Sq, Skv, Hq, Hkv, D, dtype, mode, grad=False, varlen=False, mask=False):
    step(f"{name}: alloc")
    g = torch.Generator(device="cuda").manual_seed(0)
    if varlen:
        cu_q = torch.tensor([0, Sq, 2 * Sq], dtype=torch.int32, device="cuda")
        cu_k = torch.tensor([0, Skv, 2 * Skv], dtype=torch.int32, device="cuda")
        q = torch.randn(2 * Sq, Hq, D, device="cuda", generator=g).to(dtype)
        k = torch.randn(2 * Skv, Hkv, D, device="cuda", generator=g).to(dtype)
        v = torch.randn(2 * Skv, Hkv, D, device="cuda", generator=g).to(dtype)
        kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
        okw = dict(kw, max_seqlen_q=Sq, max_seqlen_k=Skv)
        B = 2
    else:
        q = torch.randn(B, Sq, Hq, D, device="cuda", generator=g).to(dtype)
        k = torch.randn(B, Skv, Hkv, D, device="cuda", generator=g).to(dtype)
        v = torch.randn(B, Skv, Hkv, D, device="cuda", generator=g).to(dtype)
        kw, okw = {}, {}
    hm = torch.full((B, Hkv), mode, dtype=torch.int32, device="cuda")
    if mask:
        nb = -(-Skv // 64)
        bm = torch.rand(B, Hkv, nb, nb, device="cuda", generator=g) < 0.5
        kw.update(block_mask=bm, block_size=64)
        okw.update(block_mask=bm, block_size=64)
    if grad:
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    step(f"{name}: op")
    out, lse = elastic_cuda.ops.attention(q, k, v, hm, sink=4, window=40, strategy="fused", return_lse=True, **okw)
    torch.cuda.synchronize()
    step(f"{name}: op done")
    ro, rl = attention_reference(q.detach().double(), k.detach().double(), v.detach().double(), hm, sink=4,
                                 window=40, **kw)
    err = ((out.double() - ro).abs().max() / ro.abs().max().clamp_min(1e-6)).item()
    fin = torch.isfinite(rl)
    lerr = (lse.double() - rl)[fin].abs().max().item() if fin.any() else 0.0
    step(f"{name}: out rel err {err:.3e} lse abs err {lerr:.3e}")
    if grad:
        go = torch.randn_like(out)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), go)
        torch.cuda.synchronize()
        q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
        ro, _ = attention_reference(q64, k64, v64, hm, sink=4, window=40, **kw)
        rq, rk, rv = torch.autograd.grad(ro, (q64, k64, v64), go.double())
        errs = [((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()
                for a, b in ((dq, rq), (dk, rk), (dv, rv))]
        step(f"{name}: grad rel errs dq {errs[0]:.3e} dk {errs[1]:.3e} dv {errs[2]:.3e}")


case("fwd D64 bf16 full", 1, 64, 64, 2, 1, 64, torch.bfloat16, 0)
case("fwd D128 bf16 full", 1, 200, 200, 4, 2, 128, torch.bfloat16, 0)
case("fwd D128 fp16 stream", 2, 300, 300, 4, 2, 128, torch.float16, 1)
case("fwd D64 block", 2, 300, 333, 4, 2, 64, torch.bfloat16, 2, mask=True)
case("fwd varlen", 2, 100, 150, 4, 2, 128, torch.bfloat16, 1, varlen=True)
case("bwd D64 full", 1, 130, 130, 2, 1, 64, torch.bfloat16, 0, grad=True)
case("bwd D128 stream", 2, 300, 300, 4, 2, 128, torch.bfloat16, 1, grad=True)
case("bwd D128 block", 2, 200, 260, 4, 2, 128, torch.float16, 2, grad=True, mask=True)
step("smoke done")
