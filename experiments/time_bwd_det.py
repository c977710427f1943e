"""Interleaved A/B of the Hopper backward (issue #17): fwd+bwd and backward alone, bf16, Llama-3.1-8B attention shape
(Hq 32, Hkv 8, D 128, B 1), every head FULL and 6 of 8 KV heads STREAM (sink 128, window 2048), for
  default   the plain stage tail (ELASTIC_SM90_BWD_LEAN=0; TMA dQ, fully visible tiles through the unmasked stage: the
            shipped backward before the sixth session; masked, atomic, determ and overlap* are variants of it)
  masked    ELASTIC_SM90_BWD_UNMASKED=0 (every tile through the masked stage: the code before that change)
  atomic    ELASTIC_SM90_BWD_DQ_TMA=0 (dQ by atomics, the path the deterministic mode builds on)
  determ    torch.use_deterministic_algorithms(True): dQ tiles added in key-tile order (atomics path)
  overlap   ELASTIC_SM90_BWD_OVERLAP=1 (FlashAttention-4's stage order: dQ staged while dK's MMAs run, per-warp dQ
            reduce-add, dS by stmatrix)
  overlap2  ELASTIC_SM90_BWD_OVERLAP=2 (and each stage's dK MMA runs into the next stage; 3 Q/dO stages)
  lean      ELASTIC_SM90_BWD_LEAN=1 ELASTIC_SM90_BWD_BANKS=0 (default order; dS^T by stmatrix, the consumer loop unrolled
            over the 2 ring slots, double-buffered dQ staging without its first named barrier; the default of the sixth
            to the tenth session)
  banks     lean with ELASTIC_SM90_BWD_BANKS=1 (lse / delta rows padded, the dQ staging's column blocks rotated per
            lane: no shared-memory bank conflicts; the default since the eleventh session)
  tile_order  banks with ELASTIC_SM90_BWD_MODE_ORDER=0: every pair's CTAs handed out key tile by key tile, instead of
            the short-window STREAM pairs' pair by pair after the rest (attention_bwd_sm90_order.cuh)
Routings: every head FULL, 6 of 8 KV heads STREAM, and with BWD_ALL_STREAM=1 every head STREAM too.
Rounds interleave the variants; the median of the rounds is printed (ms). usage: [BWD_VARIANTS=default,overlap]
python -m experiments.time_bwd_det [S,S,...] [rounds]"""
from __future__ import annotations

import os
import statistics
import sys

import torch

import elastic_cuda
from benchmarks.harness import event_mean_ms
from elastic_cuda import FULL, STREAM

ALL_VARIANTS = ("default", "masked", "atomic", "determ", "overlap", "overlap2", "lean", "banks", "tile_order")
VARIANTS = tuple(os.environ.get("BWD_VARIANTS", ",".join(ALL_VARIANTS)).split(","))
assert all(v in ALL_VARIANTS for v in VARIANTS), f"BWD_VARIANTS: pick from {ALL_VARIANTS}, got {VARIANTS}"


def _set(variant):
    os.environ["ELASTIC_SM90_BWD_DQ_TMA"] = "0" if variant == "atomic" else "1"
    os.environ["ELASTIC_SM90_BWD_UNMASKED"] = "0" if variant == "masked" else "1"
    os.environ["ELASTIC_SM90_BWD_OVERLAP"] = {"overlap": "1", "overlap2": "2"}.get(variant, "0")
    os.environ["ELASTIC_SM90_BWD_LEAN"] = "1" if variant in ("lean", "banks", "tile_order") else "0"
    os.environ["ELASTIC_SM90_BWD_BANKS"] = "0" if variant == "lean" else "1"
    os.environ["ELASTIC_SM90_BWD_MODE_ORDER"] = "0" if variant == "tile_order" else "1"
    elastic_cuda.ops.reload_kernel_options()
    torch.use_deterministic_algorithms(variant == "determ")


def main():
    seqs = [int(s) for s in (sys.argv[1] if len(sys.argv) > 1 else "8192,32768").split(",")]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    for S in seqs:
        gen = torch.Generator(device="cuda").manual_seed(S)
        q = torch.randn(1, S, 32, 128, device="cuda", generator=gen).bfloat16().requires_grad_(True)
        k = torch.randn(1, S, 8, 128, device="cuda", generator=gen).bfloat16().requires_grad_(True)
        v = torch.randn(1, S, 8, 128, device="cuda", generator=gen).bfloat16().requires_grad_(True)
        do = torch.randn(1, S, 32, 128, device="cuda", generator=gen).bfloat16()
        # (32K: 10 calls per measurement; with 4, the backward-alone column of the same two kernels moved by up to 3%
        # between runs in the eleventh session)
        iters = 20 if S <= 8192 else (10 if S <= 32768 else 4)
        routings = [("all FULL", [FULL] * 8), ("6/8 STREAM", [FULL, FULL] + [STREAM] * 6)]
        if os.environ.get("BWD_ALL_STREAM") == "1":
            routings.append(("8/8 STREAM", [STREAM] * 8))
        for routing, modes in routings:
            hm = torch.tensor([modes], dtype=torch.int32, device="cuda")

            def fwd_bwd():
                out = elastic_cuda.ops.attention(q, k, v, hm, sink=128, window=2048, strategy="auto")
                torch.autograd.grad(out, (q, k, v), do)

            out = elastic_cuda.ops.attention(q, k, v, hm, sink=128, window=2048, strategy="auto")

            def bwd():
                torch.autograd.grad(out, (q, k, v), do, retain_graph=True)

            res = {(v_, w): [] for v_ in VARIANTS for w in ("fwd+bwd", "bwd")}
            for _ in range(rounds):
                for variant in VARIANTS:
                    _set(variant)
                    res[(variant, "fwd+bwd")].append(event_mean_ms(fwd_bwd, iters))
                    res[(variant, "bwd")].append(event_mean_ms(bwd, iters))
            _set("default")
            line = " | ".join(f"{v_} {statistics.median(res[(v_, 'fwd+bwd')]):.2f} / "
                              f"{statistics.median(res[(v_, 'bwd')]):.2f}" for v_ in VARIANTS)
            print(f"S {S} {routing}: fwd+bwd / bwd ms: {line}", flush=True)


if __name__ == "__main__":
    main()
