"""A/B of the sm90 work order (ELASTIC_SM90_L2_ORDER=1: items in L2-sized chunks of KV heads; =0: every head
together), Llama-3.1-8B shape, bf16, B=1: every head FULL, every head BLOCK at ~31% density (mask per query head),
and 6 of 8 KV heads BLOCK. Medians of triton.testing.do_bench, the two orders interleaved per case."""
import os
import sys

import torch
from triton.testing import do_bench

import elastic_cuda
from elastic_cuda import BLOCK, FULL
from experiments.block_inputs import HKV as Hkv
from experiments.block_inputs import llama_block_inputs

for S in [int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "8192,32768,131072").split(",")]:
    q, k, v, mask = llama_block_inputs(S, seed=S)
    cases = {"full": (torch.full((1, Hkv), FULL), None), "block": (torch.full((1, Hkv), BLOCK), mask),
             "6/8 block": (torch.tensor([[FULL, FULL] + [BLOCK] * 6]), mask)}
    for name, (hm, bm) in cases.items():
        hm = hm.to(device="cuda", dtype=torch.int32)
        res = {}
        for rep in range(2):
            for order in ("1", "0"):
                os.environ["ELASTIC_SM90_L2_ORDER"] = order
                elastic_cuda.ops.reload_kernel_options()  # the switches are read once, at load or here
                fn = lambda: torch.ops.elastic.attention(q, k, v, hm, bm, strategy="fused")  # noqa: E731
                res.setdefault(order, []).append(do_bench(fn, warmup=50, rep=300, return_mode="median"))
        on, off = min(res["1"]), min(res["0"])
        print(f"S={S:6d} {name:10s} l2_order {on:8.3f} ms  all_heads {off:8.3f} ms  ratio {off / on:5.3f}", flush=True)
