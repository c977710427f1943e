"""Tiny fwd+bwd run per head mode for `compute-sanitizer --tool memcheck python tests/gpu_sanitize.py`.

Shapes are small and deliberately ragged (lengths not multiples of any tile, GQA 3, Sq < Skv, varlen)
so that every boundary path of the kernels is exercised once under the sanitizer. Not a pytest file.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # conftest's input helpers
import torch  # noqa: E402

import elastic_cuda  # noqa: E402
from elastic_cuda import BLOCK, FULL, STREAM  # noqa: E402


def one(modes, Sq, Skv, D, dtype, varlen=False, mask_heads="kv", bs=64, poison=False, strategy="fused"):
    """bs 64: BLOCK heads on the sm80 kernel; bs 128: on the Hopper kernel (on a 9.x device). poison: a NaN query
    element, an inf key and a -inf value (the non-finite rule's rare paths, csrc/attention/nonfinite.cuh)."""
    torch.manual_seed(0)
    B, Hkv = modes.shape
    Hq = 3 * Hkv
    nb = -(-Skv // bs)
    bm = torch.rand(B, Hkv if mask_heads == "kv" else Hq, nb, nb, device="cuda") < 0.5
    kw = dict(sink=5, window=70, block_mask=bm, block_size=bs, strategy=strategy, return_lse=True)
    if varlen:
        cu_q = torch.tensor([0, Sq, 2 * Sq - 1], dtype=torch.int32, device="cuda")
        cu_k = torch.tensor([0, Skv, 2 * Skv - 3], dtype=torch.int32, device="cuda")
        q = torch.randn(int(cu_q[-1]), Hq, D, device="cuda", dtype=dtype, requires_grad=True)
        k = torch.randn(int(cu_k[-1]), Hkv, D, device="cuda", dtype=dtype, requires_grad=True)
        v = torch.randn(int(cu_k[-1]), Hkv, D, device="cuda", dtype=dtype, requires_grad=True)
        kw.update(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=Sq, max_seqlen_k=Skv)
    else:
        q = torch.randn(B, Sq, Hq, D, device="cuda", dtype=dtype, requires_grad=True)
        k = torch.randn(B, Skv, Hkv, D, device="cuda", dtype=dtype, requires_grad=True)
        v = torch.randn(B, Skv, Hkv, D, device="cuda", dtype=dtype, requires_grad=True)
    if poison:
        with torch.no_grad():
            q.view(-1, D)[5, 3] = float("nan")
            k.view(-1, D)[70, 0] = float("inf")
            v.view(-1, D)[130, 9] = float("-inf")
    out, lse = elastic_cuda.ops.attention(q, k, v, modes.to(device="cuda", dtype=torch.int32), **kw)
    (out.float().sum() + torch.nan_to_num(lse, neginf=0.0).sum()).backward()
    torch.cuda.synchronize()
    if poison:
        assert torch.isnan(out).any() and not torch.isnan(out).all(), "non-finite rule: some rows NaN, not all"
    print("ok", modes.tolist(), Sq, Skv, D, dtype, "varlen" if varlen else "dense", strategy,
          "poisoned" if poison else "", flush=True)


def decode(Sq, group, D, dtype, num_splits, poison=False, sink=3, window=37, length=263):
    """decode_attention over ragged pools: mixed modes, a wrapped ring, lengths 1 over Sq, non-identity slots."""
    torch.manual_seed(0)
    modes = torch.tensor([[FULL, STREAM, BLOCK], [STREAM, STREAM, FULL]], dtype=torch.int32, device="cuda")
    slot = torch.tensor([[1, 2, 0], [0, 1, 2]], dtype=torch.int32, device="cuda")
    lens = torch.tensor([Sq + 1, length], dtype=torch.int32, device="cuda")
    q = torch.randn(2, Sq, 3 * group, D, device="cuda", dtype=dtype)
    fk, fv = (torch.randn(3, length, D, device="cuda", dtype=dtype) for _ in range(2))
    sk, sv = (torch.randn(3, sink + window + Sq - 1, D, device="cuda", dtype=dtype) for _ in range(2))
    if poison:  # the non-finite rule in decode: a NaN key, an inf value in the ring, a -inf query element
        fk[1, 0, 5] = float("nan")
        sv[2, sink + 1, 0] = float("inf")
        q[1, 0, 2, 1] = float("-inf")
    out = elastic_cuda.ops.decode_attention(q, fk, fv, sk, sv, modes, slot, lens, sink=sink, window=window,
                                            num_splits=num_splits)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all() if not poison else (torch.isnan(out).any() and not torch.isnan(out).all())
    print("ok decode", Sq, group, D, dtype, num_splits, sink, window, length,
          os.environ.get("ELASTIC_DECODE_COPY", ""), os.environ.get("ELASTIC_DECODE_FUSED_COMBINE", ""),
          os.environ.get("ELASTIC_DECODE_COMBINE", ""), os.environ.get("ELASTIC_DECODE_PDL", ""), flush=True)


def commit(lengths, H, D, dtype, sink, ring):
    """static_cache_commit of a left-padded prompt into exactly-sized pools (mixed modes, a wrapped ring)."""
    from conftest import static_commit_case

    gen = torch.Generator().manual_seed(len(lengths) + sink)
    args, kw = static_commit_case(len(lengths), H, max(lengths), D, lengths, gen, sink=sink, ring=ring, dtype=dtype,
                                  device="cuda")
    for i in (5, 6, 7, 8):  # no spare row: a write past the routing's rows would leave the allocation
        args[i] = args[i][:-1].contiguous()
    elastic_cuda.ops.static_cache_commit(*args, **kw)
    torch.cuda.synchronize()
    print("ok commit", lengths, H, D, dtype, sink, ring, flush=True)


def commits():
    commit([201, 77, 1], 3, 128, torch.bfloat16, 4, 50)
    commit([130, 130], 8, 64, torch.float16, 128, 40)


if __name__ == "__main__":
    if sys.argv[1:] == ["commit"]:  # `python tests/gpu_sanitize.py commit`: the static-cache commit alone
        commits()
        sys.exit(0)
    only_decode = sys.argv[1:] == ["decode"]  # `python tests/gpu_sanitize.py decode`: the decode cases alone
    for mode in () if only_decode else (FULL, STREAM, BLOCK):
        one(torch.full((2, 2), mode), 77, 201, 128, torch.bfloat16)
    if not only_decode:
        one(torch.tensor([[FULL, STREAM], [BLOCK, FULL]]), 130, 130, 64, torch.float16, varlen=True, mask_heads="q")
        one(torch.tensor([[STREAM, BLOCK], [BLOCK, STREAM]]), 1, 300, 64, torch.bfloat16)
        one(torch.tensor([[FULL, BLOCK], [BLOCK, STREAM]]), 77, 201, 128, torch.bfloat16, bs=128)
        one(torch.tensor([[BLOCK, STREAM], [FULL, BLOCK]]), 130, 130, 64, torch.float16, varlen=True,
            mask_heads="q", bs=128)
        # The Hopper backward (bs 128 on a 9.x device): D 64 with Sq < Skv, D 128 varlen with tails inside the tensor.
        one(torch.tensor([[FULL, STREAM], [STREAM, BLOCK]]), 70, 333, 64, torch.bfloat16, bs=128)
        one(torch.tensor([[STREAM, FULL], [BLOCK, STREAM]]), 200, 260, 128, torch.float16, varlen=True, bs=128)
        os.environ["ELASTIC_SM90_BWD_DQ_TMA"] = "0"  # the same with dQ by vector atomics (A/B switch)
        elastic_cuda.ops.reload_kernel_options()
        one(torch.tensor([[FULL, STREAM], [STREAM, BLOCK]]), 70, 333, 64, torch.bfloat16, bs=128)
        one(torch.tensor([[STREAM, FULL], [BLOCK, STREAM]]), 200, 260, 128, torch.float16, varlen=True, bs=128)
        one(torch.tensor([[BLOCK, STREAM], [FULL, BLOCK]]), 130, 130, 128, torch.bfloat16, varlen=True, bs=128,
            poison=True)  # the Hopper backward's non-finite rare paths with atomics (the default's are below)
        del os.environ["ELASTIC_SM90_BWD_DQ_TMA"]
        for level in ("1", "2"):  # the overlapped stage orders (per-warp dQ reduce-add; 2: dK into the next stage)
            os.environ["ELASTIC_SM90_BWD_OVERLAP"] = level
            elastic_cuda.ops.reload_kernel_options()
            one(torch.tensor([[FULL, STREAM], [STREAM, BLOCK]]), 70, 333, 64, torch.bfloat16, bs=128)
            one(torch.tensor([[STREAM, FULL], [BLOCK, STREAM]]), 200, 260, 128, torch.float16, varlen=True, bs=128)
        del os.environ["ELASTIC_SM90_BWD_OVERLAP"]
        os.environ["ELASTIC_SM90_BWD_LEAN"] = "0"  # the plain tail (the default is the lean one)
        elastic_cuda.ops.reload_kernel_options()
        one(torch.tensor([[FULL, STREAM], [STREAM, BLOCK]]), 70, 333, 64, torch.bfloat16, bs=128)
        one(torch.tensor([[STREAM, FULL], [BLOCK, STREAM]]), 200, 260, 128, torch.float16, varlen=True, bs=128)
        del os.environ["ELASTIC_SM90_BWD_LEAN"]
        os.environ["ELASTIC_SM90_BWD_BANKS"] = "0"  # the first lean tail (bank-conflicted lse rows and dQ staging)
        elastic_cuda.ops.reload_kernel_options()
        one(torch.tensor([[FULL, STREAM], [STREAM, BLOCK]]), 70, 333, 64, torch.bfloat16, bs=128)
        one(torch.tensor([[STREAM, FULL], [BLOCK, STREAM]]), 200, 260, 128, torch.float16, varlen=True, bs=128)
        del os.environ["ELASTIC_SM90_BWD_BANKS"]
        elastic_cuda.ops.reload_kernel_options()
    # (Sq 1: the tensor-core kernel, Sq > 1 the FMA one; num_splits 500: more work items than keys allow, so the
    # chunk floor and the tails of every pair run; num_splits 12 = 2 x pairs: chunk total / 12 gives 16 items, so the
    # plan's second pass re-cuts with total / 6, ELASTIC_DECODE_ONE_WAVE in plan_item)
    for Sq, group, D, dtype, splits in ((1, 4, 128, torch.bfloat16, 0), (5, 3, 64, torch.float16, 3),
                                        (1, 4, 128, torch.bfloat16, 12), (5, 3, 64, torch.float16, 12),
                                        (16, 8, 128, torch.float16, 1), (1, 4, 128, torch.bfloat16, 500),
                                        (2, 1, 64, torch.bfloat16, 0), (1, 8, 64, torch.float16, 0),
                                        (1, 1, 64, torch.bfloat16, 2)):
        decode(Sq, group, D, dtype, splits)
    # The tensor-core kernel's A/B variants (kernel_options.h ELASTIC_DECODE_COPY / _FUSED_COMBINE): sink 70 and
    # 1001 tokens give TMA tiles (FULL, sink, plain ring) and cp.async ones (sink / ring boundary, ring wrap, each
    # item's partial last tile) in one pipeline; splits 1 / 3 / 0: long items, a few, the automatic plan's short
    # ones; the fused combine's tickets and last-CTA merge (serial, and v2: all threads, decode_fused_merge.cuh).
    for env in ({"ELASTIC_DECODE_COPY": "tma"}, {"ELASTIC_DECODE_COPY": "zfill"}, {"ELASTIC_DECODE_COPY": "pairs"},
                {"ELASTIC_DECODE_FUSED_COMBINE": "1"},
                {"ELASTIC_DECODE_COPY": "tma", "ELASTIC_DECODE_FUSED_COMBINE": "1"},
                {"ELASTIC_DECODE_FUSED_COMBINE": "v2"}, {"ELASTIC_DECODE_FUSED_COMBINE": "v2_keep"},
                {"ELASTIC_DECODE_LATE_Q": "1"}, {"ELASTIC_DECODE_FUSED_COMBINE": "v2", "ELASTIC_DECODE_LATE_Q": "1"}):
        os.environ.update(env)
        elastic_cuda.ops.reload_kernel_options()
        for D, dtype, splits in ((128, torch.bfloat16, 1), (64, torch.float16, 3), (128, torch.bfloat16, 0)):
            decode(1, 4, D, dtype, splits, sink=70, window=200, length=1001)
        decode(1, 3, 128, torch.bfloat16, 3, poison=True, sink=70, window=200, length=1001)
        for name in env:
            del os.environ[name]
        elastic_cuda.ops.reload_kernel_options()
    # The combine's variants (ELASTIC_DECODE_COMBINE / _PDL): round 2's combine (float4 partial reads, item rounds of
    # 128 at splits 500) behind both split kernels, launched plainly and as a programmatic dependent launch.
    for env in ({"ELASTIC_DECODE_COMBINE": "v2"}, {"ELASTIC_DECODE_COMBINE": "v2", "ELASTIC_DECODE_PDL": "1"},
                {"ELASTIC_DECODE_PDL": "early"}):
        os.environ.update(env)
        elastic_cuda.ops.reload_kernel_options()
        for Sq, group, D, dtype, splits in ((1, 4, 128, torch.bfloat16, 0), (1, 4, 128, torch.bfloat16, 500),
                                            (5, 3, 64, torch.float16, 3), (1, 8, 64, torch.float16, 0)):
            decode(Sq, group, D, dtype, splits)
        decode(1, 3, 128, torch.bfloat16, 3, poison=True, sink=70, window=200, length=1001)
        for name in env:
            del os.environ[name]
        elastic_cuda.ops.reload_kernel_options()
    # non-finite inputs: the rare paths of every kernel (sm80 and Hopper forward, backward, grouped, decode)
    one(torch.tensor([[FULL, STREAM], [BLOCK, FULL]]), 77, 201, 128, torch.bfloat16, poison=True)
    one(torch.tensor([[FULL, BLOCK], [STREAM, FULL]]), 77, 201, 64, torch.float16, bs=128, poison=True)
    one(torch.tensor([[BLOCK, STREAM], [FULL, BLOCK]]), 130, 130, 128, torch.bfloat16, varlen=True, bs=128, poison=True)
    one(torch.tensor([[FULL, FULL], [STREAM, FULL]]), 201, 201, 128, torch.bfloat16, bs=128, poison=True,
        strategy="grouped")
    decode(5, 3, 128, torch.bfloat16, 3, poison=True)
    commits()
    print("sanitize run done")
