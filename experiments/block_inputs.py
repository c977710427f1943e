"""Inputs shared by the BLOCK-head experiments: Llama-3.1-8B attention shape (Hq 32, Hkv 8, D 128), bf16, B=1, and a
random causal block mask per query head (block 128: sink and diagonal always, each other block with prob. density)."""
import torch

HQ, HKV, D, BLK = 32, 8, 128, 128


def llama_block_inputs(S, density=0.3, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, S, HQ, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, S, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, S, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g)
    nb = -(-S // BLK)
    r = torch.arange(nb, device="cuda")
    keep = torch.rand(1, HQ, nb, nb, device="cuda", generator=g) < density
    mask = (keep | (r.view(1, -1) == 0) | (r.view(1, -1) == r.view(-1, 1))) & (r.view(1, -1) <= r.view(-1, 1))
    return q, k, v, mask
