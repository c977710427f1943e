"""Driver for ncu's per-SASS-line stall sampling (issues #13, #16, #17): one kernel launch of a representative shape,
run from the repository root under `tools/ncu_stalls.sh`, which profiles the launch after the warm-ups with
`--section SourceCounters --section WarpStateStats` and exports the source page (stall samples per SASS line).
Question: where do the warps of our three bandwidth- or tensor-bound kernels wait (Hopper forward, dense 32K; Hopper
backward, dense 32K; decode, one query, 128K batch 1), since structural A/Bs within +-1% did not find it.

  python -m experiments.ncu_stalls fwd|bwd|bwd_stream6|block|block_dense|decode|fa4_fwd|fa4_bwd [S]

bwd_stream6: the backward with 2 FULL + 6 STREAM KV heads (sink 128, window 2048), beside `bwd` (every head FULL), for
the question of benchmarks/NOTES.md "Eighth session": why it runs ~20% slower per (query tile, key tile) stage.

block / block_dense: the forward with every head BLOCK, on the random masks of benchmarks.bench_block_prefill (~31% of
causal blocks kept, per query head) or with every causal block kept (the FULL work through the BLOCK walker), for
#15's question of why a BLOCK tile costs ~1.2x a FULL one (FlashAttention-4's block-sparse tile ~1.03-1.14x its own).

fa4_fwd / fa4_bwd: the same dense 32K shape through FlashAttention-4 (flash_attn.cute, its Hopper path), the peer
#16 / #17 measure against, so that its instruction mix and stalls sit beside ours from the same ncu settings.
"""
import sys

import torch

import elastic_cuda  # noqa: F401  (registers torch.ops.elastic)
from elastic_cuda.ops import BLOCK, FULL, STREAM

WHAT = sys.argv[1]
S = int(sys.argv[2]) if len(sys.argv) > 2 else (131072 if WHAT == "decode" else 32768)
HQ, HKV, D = 32, 8, 128  # Llama-3.1-8B attention shape
g = torch.Generator(device="cuda").manual_seed(0)


def randn(*shape):
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)


if WHAT in ("fa4_fwd", "fa4_bwd"):
    from flash_attn.cute.interface import flash_attn_func

    q, k, v = randn(1, S, HQ, D), randn(1, S, HKV, D), randn(1, S, HKV, D)
    if WHAT == "fa4_bwd":
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    for _ in range(3):  # warm-ups (the first compiles); the shell script skips their launches
        out = flash_attn_func(q, k, v, causal=True)
        out = out[0] if isinstance(out, tuple) else out
        if WHAT == "fa4_bwd":
            out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
elif WHAT in ("fwd", "bwd", "bwd_stream6"):
    q, k, v = randn(1, S, HQ, D), randn(1, S, HKV, D), randn(1, S, HKV, D)
    hm = torch.full((1, HKV), FULL, dtype=torch.int32, device="cuda")
    if WHAT == "bwd_stream6":
        hm[:, 2:] = STREAM
    if WHAT != "fwd":
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    for _ in range(3):  # warm-ups; the shell script skips their launches
        out, _ = torch.ops.elastic.attention(q, k, v, hm, sink=128, window=2048)
        if WHAT != "fwd":
            out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
elif WHAT in ("block", "block_dense"):
    from experiments.block_inputs import llama_block_inputs

    q, k, v, mask = llama_block_inputs(S, density=0.3 if WHAT == "block" else 1.0)
    hm = torch.full((1, HKV), BLOCK, dtype=torch.int32, device="cuda")
    for _ in range(3):  # warm-ups; the shell script skips their launches
        out, _ = torch.ops.elastic.attention(q, k, v, hm, mask, strategy="fused")
    torch.cuda.synchronize()
elif WHAT == "decode":
    fk, fv = randn(HKV, S, D), randn(HKV, S, D)
    sk, sv = randn(1, 8, D), randn(1, 8, D)
    modes = torch.full((1, HKV), FULL, dtype=torch.int32, device="cuda")
    slot = torch.arange(HKV, dtype=torch.int32, device="cuda").view(1, HKV)
    lens = torch.full((1,), S, dtype=torch.int32, device="cuda")
    q = randn(1, 1, HQ, D)
    for _ in range(4):
        elastic_cuda.ops.decode_attention(q, fk, fv, sk, sv, modes, slot, lens, sink=4, window=4)
    torch.cuda.synchronize()
else:
    raise SystemExit(f"what must be fwd, bwd, bwd_stream6, block, block_dense, decode, fa4_fwd or fa4_bwd, "
                     f"got {WHAT!r}")
if WHAT.startswith("fa4") and len(sys.argv) > 3 and sys.argv[3] == "names":  # the kernel names, for ncu's filter
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = flash_attn_func(q, k, v, causal=True)
        out = out[0] if isinstance(out, tuple) else out
        if WHAT == "fa4_bwd":
            out.backward(torch.ones_like(out))
        torch.cuda.synchronize()
    print("\n".join(sorted({e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})))
print("done", WHAT, S)
