"""Does a C++ error raised by the extension reach Python as a RuntimeError on this machine?

On the GPU machine (torch 2.11, extension built with the image's compiler) a failing TORCH_CHECK was seen to
kill the interpreter. Each case runs in a child process; rc 1 with a RuntimeError is the healthy answer,
a negative rc (signal) reproduces the crash. Run: python tests/gpu_exception_probe.py
"""
import subprocess
import sys

PRE = "import torch, elastic_cuda; op = torch.ops.elastic.attention; "
CUDA = ("q = torch.randn(1, 64, 4, 64, device='cuda', dtype=torch.bfloat16); "
        "k = torch.randn(1, 64, 2, 64, device='cuda', dtype=torch.bfloat16); "
        "hm = torch.zeros(1, 2, dtype=torch.int32, device='cuda'); ")
CASES = {
    "torch's own check (control)": "import torch; torch.ones(2).view(3)",
    "cpu boundary_pool bad rank": PRE + "torch.ops.elastic.boundary_pool(torch.randn(3), None)",
    "cpu attention bad head_mode shape": PRE + "q = torch.randn(1, 8, 2, 16); op(q, q, q, torch.zeros(3, dtype=torch.int32))",
    "cuda boundary_pool bad rank": PRE + "torch.ops.elastic.boundary_pool(torch.randn(3, device='cuda'), None)",
    "cuda attention bad strategy (no grad)": PRE + CUDA + "op(q, k, k, hm, strategy='nope')",
    "cuda attention bad block_size (no grad)": PRE + CUDA + "bm = torch.ones(1, 2, 2, 2, dtype=torch.bool, device='cuda'); op(q, k, k, hm, bm, block_size=32)",
    "cuda attention bad strategy (requires_grad)": PRE + CUDA + "q.requires_grad_(); op(q, k, k, hm, strategy='nope')",
}

if __name__ == "__main__":
    for name, code in CASES.items():
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        last = r.stderr.strip().splitlines()[-1][:160] if r.stderr.strip() else ""
        print(f"{name:45s} rc {r.returncode:4d}  {last}", flush=True)
