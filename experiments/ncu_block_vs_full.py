"""Driver for ncu: the fused forward at 32K, Llama-3.1-8B shape, every head FULL and then every head BLOCK (random
mask, ~31% of causal blocks kept, mask per query head). Question: why a BLOCK launch at 31% density takes ~0.44x
of the FULL launch's time instead of ~0.31x. Run from the repository root under ncu (tools/ncu_block_vs_full.sh):
`ncu --clock-control none --kernel-name regex:sm90 --section SpeedOfLight ... python -m experiments.ncu_block_vs_full`.
"""
import sys

import torch

import elastic_cuda  # noqa: F401  (registers torch.ops.elastic)
from elastic_cuda import BLOCK, FULL
from experiments.block_inputs import llama_block_inputs

S = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
q, k, v, mask = llama_block_inputs(S)
Hkv, nb, Hq = k.shape[2], mask.shape[-1], q.shape[2]
for mode, bm in ((FULL, None), (BLOCK, mask)):
    hm = torch.full((1, Hkv), mode, dtype=torch.int32, device="cuda")
    out, _ = torch.ops.elastic.attention(q, k, v, hm, bm, strategy="fused")
    torch.cuda.synchronize()
print("kept", mask.float().sum().item() / (nb * (nb + 1) / 2 * Hq))
