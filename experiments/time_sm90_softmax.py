"""A/B of the sm90 forward's online-softmax rules (issue #16), Llama-3.1-8B attention shape (Hq 32, Hkv 8, D 128),
bf16, B 1, causal; cuDNN SDPA (dense, k/v expanded to 32 heads outside the timing) beside.

Variants (csrc/attention/kernel_options.h; the defaults since this study: exact alpha + max slack; all four, and the
order set's default, on the consumers' own key-tile walk, ELASTIC_SM90_SLOT_TILES=0, the kernel they were timed on):
  slack     default: alpha exactly 1 when a row's max did not move, and a row keeps its max until a tile exceeds it
            by > 8 (log2), so O is ~never rescaled
  exact     ELASTIC_SM90_MAX_SLACK=0: exact alpha only (the max moves with every rise, O rescaled then)
  previous  ELASTIC_SM90_EXACT_ALPHA=0 ELASTIC_SM90_MAX_SLACK=0: alpha = exp2(rounding error) (~never 1), O rescaled
            ~every tile (the kernel before 2026-12-02)
  uncached  ELASTIC_SM90_WALK_CACHED=0 (with slack): BLOCK heads' mask row / column recomputed per key tile in the
            consumers (divisions by the block size) as before; for FULL / STREAM the same kernel path as slack, i.e.
            a null A/B that shows the run-to-run spread
Variant set "order" (issue #16, the key-loop order after the ncu comparison with FlashAttention-4):
  default     the proven kernel (whole softmax beside P V(n-1); persistent grid, dynamic items)
  pv_first    ELASTIC_SM90_PV_WAIT_FIRST=1: FA4's order (max phase beside P V, then its wait, exp2 with the P packing)
  pv_first_eager  and ELASTIC_SM90_LAZY_RESCALE=0: the O rescale branch-free among the exp2 (FA4's choice too)
  grid        ELASTIC_SM90_PERSISTENT=0: one CTA per work item (FA4's non-persistent grid), default order
  pv_first_grid  both
Variant set "slot" (issue #15 / #16, the key tiles handed to the consumers by the producer, FwdSm90Traits::SLOT_TILES):
  walk        ELASTIC_SM90_SLOT_TILES=0: every consumer warp walks the key tiles itself (the kernel before 2026-12-03)
  slot_tiles  ELASTIC_SM90_SLOT_TILES=2: the producer writes each K slot's tile word, for every launch (the default,
              1, does so for launches with a block mask only: for all-BLOCK it is this row, for dense / STREAM walk's)
(Variant set "pack", ELASTIC_SM90_PACK_EARLY: P packed into a second buffer among the exps, measured 1-4% slower
and removed with its switch on 2026-12-03; results/sm90_kernel/2026-12-03_h200_xattn_wgmma/time_sm90_pack_early.txt.)
  with FlashAttention-4 (flash_attn.cute; dense causal, and block-sparse on the all-BLOCK case) beside when installed.
Cases: dense (every head FULL) at the lengths given (default 8K, 32K, 128K), 6/8 STREAM at 32K (2 FULL + 6 STREAM
KV heads, sink 128, window 2048), all-BLOCK at 32K (experiments/block_inputs.py, density 0.3, mask per query head).
Interleaved rounds (every variant once per round), median over rounds of do_bench medians.
usage: python -m experiments.time_sm90_softmax [dense lengths, e.g. 8192,32768,131072] [rounds] [softmax|order|slot]
       [extra case lengths for 6/8 STREAM and all-BLOCK, default 32768] [case kinds of the extra lengths, default
       stream,block]"""
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import elastic_cuda
from benchmarks.bench_block_prefill import fa4_block_tensors
from elastic_cuda import BLOCK, FULL, STREAM
from experiments.block_inputs import HKV, HQ, D
from experiments.block_inputs import llama_block_inputs

# (every variant of the softmax set on the consumers' own walk, the kernel it was timed on and the only one in which
# ELASTIC_SM90_WALK_CACHED acts)
_WALK = {"ELASTIC_SM90_SLOT_TILES": "0"}
VARIANTS = {"exact": {**_WALK, "ELASTIC_SM90_MAX_SLACK": "0"},
            "previous": {**_WALK, "ELASTIC_SM90_EXACT_ALPHA": "0", "ELASTIC_SM90_MAX_SLACK": "0"}, "slack": dict(_WALK),
            "uncached": {**_WALK, "ELASTIC_SM90_WALK_CACHED": "0"}}
# Every variant names each switch it depends on, so the set measures the same kernels whatever the defaults are.
# (the pv_first instances have no SLOT_TILES variant, so the order set's default walks its tiles in the consumers too)
_OLD_ORDER = {"ELASTIC_SM90_PV_WAIT_FIRST": "0", "ELASTIC_SM90_LAZY_RESCALE": "1", **_WALK}
ORDER_VARIANTS = {"default": dict(_OLD_ORDER),
                  "pv_first": {"ELASTIC_SM90_PV_WAIT_FIRST": "1", "ELASTIC_SM90_LAZY_RESCALE": "1"},
                  "pv_first_eager": {"ELASTIC_SM90_PV_WAIT_FIRST": "1", "ELASTIC_SM90_LAZY_RESCALE": "0"},
                  "grid": {**_OLD_ORDER, "ELASTIC_SM90_PERSISTENT": "0"},
                  "pv_first_grid": {"ELASTIC_SM90_PV_WAIT_FIRST": "1", "ELASTIC_SM90_LAZY_RESCALE": "0",
                                    "ELASTIC_SM90_PERSISTENT": "0"}}
SLOT_VARIANTS = {"walk": dict(_WALK), "slot_tiles": {"ELASTIC_SM90_SLOT_TILES": "2"}}
SWITCHES = ("ELASTIC_SM90_EXACT_ALPHA", "ELASTIC_SM90_MAX_SLACK", "ELASTIC_SM90_WALK_CACHED",
            "ELASTIC_SM90_PV_WAIT_FIRST", "ELASTIC_SM90_PERSISTENT", "ELASTIC_SM90_LAZY_RESCALE",
            "ELASTIC_SM90_SLOT_TILES")


def set_variant(env):
    for name in SWITCHES:
        os.environ.pop(name, None)
    os.environ.update(env)
    elastic_cuda.ops.reload_kernel_options()  # the switches are read once, at load or here


def causal_tflops(S, ms):
    return 4.0 * HQ * D * S * S / 2 / (ms * 1e-3) / 1e12


def bench(fn, S):
    rep = 300 if S <= 32768 else 1200
    return do_bench(fn, warmup=30, rep=rep, return_mode="median")


def case_call(S, kind):
    """The inputs of one case (kind: full, stream = 6/8 KV heads STREAM, block = every head BLOCK) and the fused op
    call that the variants time on them."""
    q, k, v, mask = llama_block_inputs(S, seed=S)
    hm = {"full": [FULL] * HKV, "stream": [FULL, FULL] + [STREAM] * 6, "block": [BLOCK] * HKV}[kind]
    hm = torch.tensor([hm], dtype=torch.int32, device="cuda")
    bm = mask if kind == "block" else None
    return q, k, v, mask, lambda: torch.ops.elastic.attention(q, k, v, hm, bm, sink=128, window=2048, strategy="fused")


def fa4_ms(q, k, v, mask, S):
    """FlashAttention-4 on the same inputs (dense causal, or block-sparse when mask is given); nan if unavailable."""
    try:
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
        from flash_attn.cute.interface import flash_attn_func
        kw = {} if mask is None else {"block_sparse_tensors": fa4_block_tensors(mask, BlockSparseTensorsTorch)}
        return bench(lambda: flash_attn_func(q, k, v, causal=True, **kw), S)
    except Exception as e:  # not installed, or this version lacks an argument
        print(f"  FA4 failed: {str(e).splitlines()[0][:200] if str(e) else repr(e)}", flush=True)
        return float("nan")


def main_order(dense, rounds, extra, variants=ORDER_VARIANTS, extra_kinds=("stream", "block")):
    """The variant set's timings (its first variant is the reference), FA4 beside, on dense and the extra cases."""
    ref = next(iter(variants))
    cases = [(f"dense {S // 1024}K", S, "full") for S in dense]
    if "stream" in extra_kinds:
        cases += [(f"6/8 STREAM {S // 1024}K", S, "stream") for S in extra]
    if "block" in extra_kinds:
        cases += [(f"all-BLOCK {S // 1024}K", S, "block") for S in extra]
    print("case | " + " | ".join(f"{v} ms" for v in variants) + " | FA4 ms | "
          + " | ".join(f"speed {v} vs {ref}" for v in list(variants)[1:]) + f" | {ref} / FA4 time | "
          "best / FA4 time", flush=True)
    for name, S, kind in cases:
        q, k, v, mask, fn = case_call(S, kind)
        outs, res = {}, {v_: [] for v_ in variants}
        for r in range(rounds):
            for var, env in variants.items():
                set_variant(env)
                if r == 0:
                    outs[var] = fn()
                res[var].append(bench(fn, S))
        set_variant({})
        # every variant computes the same function: the orders differ only in when O is rescaled and P packed
        same = all(torch.equal(a, b) for var in outs for a, b in zip(outs[var], outs[ref]))  # out and lse
        med = {var: statistics.median(t) for var, t in res.items()}
        fa = fa4_ms(q, k, v, None, S) if kind == "full" else fa4_ms(q, k, v, mask, S) if kind == "block" else \
            float("nan")
        best = min(med.values())
        print(f"{name} | " + " | ".join(f"{med[v_]:.3f}" for v_ in variants) + f" | {fa:.3f} | "
              + " | ".join(f"{med[ref] / med[v_]:.3f}x" for v_ in list(variants)[1:])
              + f" | {med[ref] / fa:.3f} | {best / fa:.3f}   (out and lse bit-equal to {ref}: {same}; rounds: "
              + "; ".join(f"{v_} " + " ".join(f"{t:.3f}" for t in res[v_]) for v_ in variants) + ")", flush=True)
        del q, k, v, mask, outs
        torch.cuda.empty_cache()


def main():
    dense = [int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "8192,32768,131072").split(",")]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    if len(sys.argv) > 3 and sys.argv[3] in ("order", "slot"):
        extra = [int(x) for x in (sys.argv[4] if len(sys.argv) > 4 else "32768").split(",") if x]
        kinds = tuple((sys.argv[5] if len(sys.argv) > 5 else "stream,block").split(","))
        return main_order(dense, rounds, extra, ORDER_VARIANTS if sys.argv[3] == "order" else SLOT_VARIANTS, kinds)
    cases = [(f"dense {S // 1024}K", S, "full") for S in dense]
    cases += [("6/8 STREAM 32K", 32768, "stream"), ("all-BLOCK 32K", 32768, "block")]
    print("case | " + " | ".join(f"{v} ms" for v in VARIANTS) + " | cuDNN ms | speed exact vs previous | slack vs "
          "previous | slack vs uncached | TFLOP/s slack (dense) | TFLOP/s cuDNN", flush=True)
    for name, S, kind in cases:
        q, k, v, mask, fn = case_call(S, kind)
        res = {v_: [] for v_ in VARIANTS}
        for _ in range(rounds):
            for var, env in VARIANTS.items():
                set_variant(env)
                res[var].append(bench(fn, S))
        set_variant({})
        med = {var: statistics.median(t) for var, t in res.items()}
        cudnn = float("nan")
        if kind == "full":
            qt = q.transpose(1, 2).contiguous()
            kt = k.repeat_interleave(HQ // HKV, dim=2).transpose(1, 2).contiguous()
            vt = v.repeat_interleave(HQ // HKV, dim=2).transpose(1, 2).contiguous()
            try:
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    cudnn = bench(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True), S)
            except RuntimeError as e:  # no cuDNN attention in this torch build / GPU
                print(f"  cuDNN SDPA failed: {str(e).splitlines()[0]}", flush=True)
            del qt, kt, vt
        dense_tf = f"{causal_tflops(S, med['slack']):.0f}" if kind == "full" else "-"
        cudnn_tf = f"{causal_tflops(S, cudnn):.0f}" if kind == "full" and cudnn == cudnn else "-"
        print(f"{name} | " + " | ".join(f"{med[v_]:.3f}" for v_ in VARIANTS) + f" | {cudnn:.3f} | "
              f"{med['previous'] / med['exact']:.3f}x | {med['previous'] / med['slack']:.3f}x | "
              f"{med['uncached'] / med['slack']:.3f}x | {dense_tf} | {cudnn_tf}"
              f"   (rounds: " + "; ".join(f"{v_} " + " ".join(f"{t:.3f}" for t in res[v_]) for v_ in VARIANTS)
              + ")", flush=True)
        del q, k, v, mask
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
