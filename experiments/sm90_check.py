"""Hopper (sm_90a) forward kernel: correctness table, short timing and a sanitizer workload, for one device call.

  python -m experiments.sm90_check errors   max rel err (max |diff| / max |ref|) and lse max abs err vs the
                                            float64 reference, per dtype / head dim / mode, for every VARIANT
                                            (the wgmma kernel with TMA or cp.async producer and each switch
                                            off, and the sm80 kernel), on the same fresh inputs
  python -m experiments.sm90_check time     Llama shape (32 q / 8 kv heads, D 128, bf16), S 4K, 8K (B 2), 32K,
                                            MSR 0 / 0.75 / 1: the timed variants vs cuDNN SDPA vs Flex; TFLOP/s
                                            counts the causal FLOPs of all heads (so at MSR > 0 it is an
                                            "effective" rate); env NO_FLEX=1 skips Flex, ROUNDS (default 3)
                                            round-robin repeats, VARIANTS=a,b picks the timed variants,
                                            TIME_CASES=SxB,... and TIME_MSRS=a,b pick the shapes
  python -m experiments.sm90_check sanitize small ragged cases on the sm90 path, for compute-sanitizer
"""
from __future__ import annotations

import os
import sys

import torch

import elastic_cuda
from elastic_cuda import FULL, STREAM
from elastic_cuda.reference import attention_reference

DEV = "cuda"


def set_path(sm90: bool):
    os.environ["ELASTIC_CUDA_SM90"] = "1" if sm90 else "0"
    elastic_cuda.ops.reload_kernel_options()  # the extension reads its switches once per process


def modes_for(pattern, B, Hkv):
    if pattern == "full":
        return torch.full((B, Hkv), FULL, dtype=torch.int32, device=DEV)
    if pattern == "stream":
        return torch.full((B, Hkv), STREAM, dtype=torch.int32, device=DEV)
    return torch.tensor([[(h + b) % 2 for h in range(Hkv)] for b in range(B)], dtype=torch.int32, device=DEV)


def one_case(dtype, D, pattern, shape, seed):
    """Inputs, op keywords and the float64 reference of one case."""
    B, Sq, Skv, Hq, Hkv, sink, window, varlen = shape
    g = torch.Generator(device=DEV).manual_seed(seed)
    kw = dict(sink=sink, window=window)
    hm = modes_for(pattern, B, Hkv)
    if varlen:
        lens = [(max(1, Sq - 97 * b), Skv - 61 * b) for b in range(B)]
        cu_q = torch.tensor([0] + [a for a, _ in lens], device=DEV).cumsum(0).to(torch.int32)
        cu_k = torch.tensor([0] + [c for _, c in lens], device=DEV).cumsum(0).to(torch.int32)
        q = torch.randn(int(cu_q[-1]), Hq, D, generator=g, device=DEV).to(dtype)
        k = torch.randn(int(cu_k[-1]), Hkv, D, generator=g, device=DEV).to(dtype)
        v = torch.randn(int(cu_k[-1]), Hkv, D, generator=g, device=DEV).to(dtype)
        kw.update(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
        op_kw = dict(kw, max_seqlen_q=max(a for a, _ in lens), max_seqlen_k=max(c for _, c in lens))
    else:
        q = torch.randn(B, Sq, Hq, D, generator=g, device=DEV).to(dtype)
        k = torch.randn(B, Skv, Hkv, D, generator=g, device=DEV).to(dtype)
        v = torch.randn(B, Skv, Hkv, D, generator=g, device=DEV).to(dtype)
        op_kw = kw
    ref, ref_lse = attention_reference(q.double(), k.double(), v.double(), hm, **kw)
    return (q, k, v, hm, op_kw), ref, ref_lse


def one_error(case, ref, ref_lse):
    q, k, v, hm, op_kw = case
    torch.full((64 * 1024 * 1024,), float("nan"), device=DEV)  # poison the allocator's free memory
    out, lse = elastic_cuda.ops.attention(q, k, v, hm, strategy="fused", return_lse=True, **op_kw)
    torch.cuda.synchronize()
    if not torch.isfinite(out).all():
        return float("inf"), float("inf")
    err = ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
    fin = torch.isfinite(ref_lse)
    if not torch.equal(fin, torch.isfinite(lse)):
        return err, float("inf")
    lerr = (lse.double() - ref_lse)[fin].abs().max().item() if fin.any() else 0.0
    return err, lerr


def errors():
    shapes = [  # B, Sq, Skv, Hq, Hkv, sink, window, varlen
        (2, 1000, 1000, 8, 2, 64, 256, False),
        (1, 2500, 2500, 4, 1, 128, 2048, False),
        (2, 300, 1000, 12, 3, 16, 100, False),
        (3, 700, 900, 9, 3, 8, 200, True),
        (2, 129, 129, 8, 8, 0, 64, False),
    ]
    print(f"{'dtype':6s} {'D':>4s} {'mode':7s} {'path':14s} {'max rel err':>12s} {'lse abs err':>12s}")
    worst = 0.0
    table = {}  # (variant, dtype, D) -> (max rel err, lse abs err) over the modes
    for dtype in (torch.bfloat16, torch.float16):
        for D in (64, 128):
            for pattern in ("full", "stream", "mix"):
                cases = [one_case(dtype, D, pattern, sh, seed=i) for i, sh in enumerate(shapes)]
                for v in VARIANTS:  # every switch of the wgmma kernel, and the sm80 kernel, on the same inputs
                    set_variant(v)
                    e = le = 0.0
                    for case in cases:
                        a, b = one_error(*case)
                        e, le = max(e, a), max(le, b)
                    worst = max(worst, e)
                    key = (v[0], str(dtype)[6:], D)
                    old = table.get(key, (0.0, 0.0))
                    table[key] = (max(old[0], e), max(old[1], le))
                    print(f"{str(dtype)[6:]:6s} {D:4d} {pattern:7s} {v[0]:14s} {e:12.3e} {le:12.3e}", flush=True)
    clear_switches()
    print("\nper variant (worst over full / stream / mix): max rel err | lse abs err")
    for name in dict.fromkeys(k[0] for k in table):
        cells = [f"{dt} D{D}: {e:.2e} | {le:.1e}" for (n, dt, D), (e, le) in table.items() if n == name]
        print(f"  {name:14s} " + "   ".join(cells))
    print("worst", worst)


# name, sm90 path, then the switches below ("" = unset: the default); timed = in the timing section
SWITCHES = ("ELASTIC_SM90_PERSISTENT", "ELASTIC_SM90_PINGPONG", "ELASTIC_SM90_PROXY_FENCE", "ELASTIC_SM90_TMA",
            "ELASTIC_SM90_DYNAMIC", "ELASTIC_SM90_LAZY_RESCALE", "ELASTIC_SM90_STAGES")
VARIANTS = (  # name, sm90, PERSISTENT, PINGPONG, PROXY_FENCE, TMA, DYNAMIC, LAZY_RESCALE, STAGES, timed
    ("ours_sm90", True, "", "", "", "", "", "", "", True),
    ("sm90_cpasync", True, "", "", "", "0", "", "", "", True),
    ("sm90_s2", True, "", "", "", "", "", "", "2", True),
    ("sm90_static", True, "", "", "", "", "0", "", "", True),
    ("sm90_eager", True, "", "", "", "", "", "0", "", True),
    ("sm90_nopp", True, "", "0", "", "", "", "", "", True),
    ("sm90_cp_s2_old", True, "", "", "", "0", "0", "0", "2", False),  # the previous kernel's configuration
    ("ours_sm80", False, "", "", "", "", "", "", "", False),
)
# The 2-stage instance is an experiment, built only with ELASTIC_BUILD_EXPERIMENTS=1 (kernel_options.h).
EXPERIMENTS_BUILT = "experiments_built=1" in elastic_cuda.ops.reload_kernel_options()
if not EXPERIMENTS_BUILT:
    VARIANTS = tuple(v for v in VARIANTS if v[8] != "2")
if os.environ.get("VARIANTS"):  # e.g. VARIANTS=ours_sm90,sm90_s2: time only these
    _keep = os.environ["VARIANTS"].split(",")
    VARIANTS = tuple(v[:-1] + (v[0] in _keep,) for v in VARIANTS)


_VARIANT = None  # the variant whose switches are in effect


def set_variant(v):
    """Set v's switches and reload them (the extension reads them once per process); only when the variant
    changes, so that the timed calls of one variant pay no reload."""
    global _VARIANT
    if _VARIANT == v:
        return
    for name, val in zip(SWITCHES, v[2:-1]):
        if val:
            os.environ[name] = val
        else:
            os.environ.pop(name, None)
    set_path(v[1])
    _VARIANT = v


def clear_switches():
    global _VARIANT
    for name in SWITCHES:
        os.environ.pop(name, None)
    elastic_cuda.ops.reload_kernel_options()
    _VARIANT = None


def time_section():
    """Variants timed round-robin (ROUNDS rounds, min of the per-round medians), so that clock drift under a
    long sustained load does not favour whichever variant runs first."""
    from triton.testing import do_bench

    from benchmarks import bench_attention as ba

    rounds = int(os.environ.get("ROUNDS", "3"))
    rows = []
    cases = [tuple(int(x) for x in c.split("x")) for c in os.environ.get("TIME_CASES", "4096x1,8192x2,32768x1").split(",")]
    msrs = [float(x) for x in os.environ.get("TIME_MSRS", "0,0.75,1").split(",")]
    for S, B in cases:
        case = ba.Case("llama", B, S)
        flops = case.flops
        rep = 100 if S <= 8192 else 200
        for msr in msrs:
            hm = ba.routing(B, case.Hkv, msr, seed=11)
            fns = {}
            if msr == msrs[0]:
                fns["cudnn_dense"] = lambda: ba.sdpa(case.qt, case.kt, case.vt, ba.SDPBackend.CUDNN_ATTENTION)
            for v in (v for v in VARIANTS if v[-1]):
                def run(v=v, f=ba.ours(case, hm, "fused")):
                    set_variant(v)
                    return f()
                fns[v[0]] = run
            if os.environ.get("NO_FLEX") != "1":
                try:
                    fns["flex_hybrid"] = ba.flex_hybrid(case, hm)
                except Exception as e:  # noqa: BLE001
                    print("flex failed:", repr(e)[:200])
            best = {}
            for name, fn in list(fns.items()):
                try:
                    fn()
                    torch.cuda.synchronize()
                except Exception as e:  # noqa: BLE001
                    print(name, "failed:", repr(e)[:200])
                    del fns[name]
            for _ in range(rounds):
                for name, fn in fns.items():
                    ms = do_bench(fn, warmup=10, rep=rep, return_mode="median")
                    best.setdefault(name, []).append(ms)
            for name, mss in best.items():
                rows.append((S, B, msr, name, min(mss), max(mss), flops / min(mss) / 1e9))
                print(*rows[-1], flush=True)
        set_variant(VARIANTS[0])
        hm = ba.routing(B, case.Hkv, 0.0, seed=11)
        ours = ba.ours(case, hm, "fused")()
        ref = ba.sdpa(case.qt, case.kt, case.vt, ba.SDPBackend.CUDNN_ATTENTION).transpose(1, 2)
        print(f"S={S}: ours_sm90 vs cudnn rel (Frobenius) err {ba.rel_err(ours, ref):.2e}", flush=True)
        del case
    clear_switches()
    print(f"\n{'S':>6s} {'B':>2s} {'MSR':>5s} {'method':13s} {'ms(min)':>8s} {'ms(max)':>8s} {'TFLOP/s':>8s}")
    for S, B, msr, name, ms, ms_max, tf in rows:
        print(f"{S:6d} {B:2d} {msr:5.2f} {name:13s} {ms:8.3f} {ms_max:8.3f} {tf:8.1f}")


def sanitize():
    set_path(True)
    for tma in ("1", "0"):  # TMA producer (with its cp.async tail tiles in the varlen case), cp.async producer
        os.environ["ELASTIC_SM90_TMA"] = tma
        elastic_cuda.ops.reload_kernel_options()
        sanitize_cases()
    os.environ.pop("ELASTIC_SM90_TMA", None)
    elastic_cuda.ops.reload_kernel_options()


def sanitize_cases():
    for D in (64, 128):
        for dtype in (torch.bfloat16, torch.float16):
            for Sq, Skv in ((129, 129), (37, 300), (300, 300)):
                hm = torch.tensor([[FULL, STREAM], [STREAM, 7]], dtype=torch.int32, device=DEV)
                q = torch.randn(2, Sq, 6, D, device=DEV, dtype=dtype)
                k = torch.randn(2, Skv, 2, D, device=DEV, dtype=dtype)
                elastic_cuda.ops.attention(q, k, k, hm, sink=5, window=70, strategy="fused")
            cu_q = torch.tensor([0, 100, 229], dtype=torch.int32, device=DEV)
            cu_k = torch.tensor([0, 150, 279], dtype=torch.int32, device=DEV)
            q = torch.randn(229, 6, D, device=DEV, dtype=dtype)
            k = torch.randn(279, 2, D, device=DEV, dtype=dtype)
            hm = torch.tensor([[FULL, STREAM], [STREAM, FULL]], dtype=torch.int32, device=DEV)
            elastic_cuda.ops.attention(q, k, k, hm, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=129,
                                       max_seqlen_k=150, sink=5, window=70, strategy="fused")
            torch.cuda.synchronize()
            print("ok", D, dtype, flush=True)


if __name__ == "__main__":
    {"errors": errors, "time": time_section, "sanitize": sanitize}[sys.argv[1]]()
