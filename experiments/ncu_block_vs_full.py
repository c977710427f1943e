"""Driver for ncu: the fused forward at 32K, Llama-3.1-8B shape, every head FULL and then every head BLOCK (random
mask, ~31% of causal blocks kept, mask per query head). Question: why a BLOCK launch at 31% density takes ~0.44x
of the FULL launch's time instead of ~0.31x. Run under
`ncu --clock-control none --kernel-name regex:sm90 --section SpeedOfLight --section MemoryWorkloadAnalysis ...`.
"""
import sys

import torch

import elastic_cuda  # noqa: F401  (registers torch.ops.elastic)
from elastic_cuda import BLOCK, FULL

S = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
Hq, Hkv, D = 32, 8, 128
g = torch.Generator(device="cuda").manual_seed(0)
q = torch.randn(1, S, Hq, D, device="cuda", dtype=torch.bfloat16, generator=g)
k = torch.randn(1, S, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g)
v = torch.randn(1, S, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g)
nb = -(-S // 128)
r = torch.arange(nb, device="cuda")
keep = torch.rand(1, Hq, nb, nb, device="cuda", generator=g) < 0.3
mask = (keep | (r.view(1, -1) == 0) | (r.view(1, -1) == r.view(-1, 1))) & (r.view(1, -1) <= r.view(-1, 1))
for mode, bm in ((FULL, None), (BLOCK, mask)):
    hm = torch.full((1, Hkv), mode, dtype=torch.int32, device="cuda")
    out, _ = torch.ops.elastic.attention(q, k, v, hm, bm, strategy="fused")
    torch.cuda.synchronize()
print("kept", mask.float().sum().item() / (nb * (nb + 1) / 2 * Hq))
