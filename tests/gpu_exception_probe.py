"""Does a C++ error raised by the extension reach Python as a RuntimeError on this machine?

On the GPU machine (torch 2.11, extension built with the image's compiler) a failing TORCH_CHECK was seen to
kill the interpreter. Each case runs in a child process; rc 1 with a RuntimeError is the healthy answer,
a negative rc (signal) reproduces the crash. Run: python tests/gpu_exception_probe.py (the inline cases build a
tiny extension first, ~30 s; `tools/device_session.sh kernels` runs the probe).
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

# Which step crashes? A tiny extension built here with the same compiler (torch.utils.cpp_extension.load_inline,
# ~30 s) separates number formatting (std::ostream's num_put, which c10::str uses for numbers) from throwing
# c10::Error, and both from the extension's own code.
INLINE_SRC = r"""
#include <torch/extension.h>
#include <sstream>
#include <string>
std::string format_number(int64_t x) { std::ostringstream os; os << "got " << x; return os.str(); }
std::string c10_str_number(int64_t x) { return c10::str("got ", x); }
void throw_string_only() { TORCH_CHECK(false, "probe: strings only"); }
void throw_with_number(int64_t x) { TORCH_CHECK(false, "probe: got ", x); }
void throw_preformatted(int64_t x) { TORCH_CHECK(false, std::string("probe: got ") + std::to_string(x)); }
void throw_std_runtime(int64_t x) { throw std::runtime_error("probe: got " + std::to_string(x)); }
"""
INLINE = ("import torch, os; from torch.utils.cpp_extension import load_inline; "
          "m = load_inline('elastic_exc_probe', cpp_sources=[INLINE_SRC], functions=['format_number', "
          "'c10_str_number', 'throw_string_only', 'throw_with_number', 'throw_preformatted', 'throw_std_runtime'], "
          "build_directory=os.environ['PROBE_BUILD'], verbose=False); ")
INLINE_CASES = {
    "inline: ostringstream << int (no throw)": "print(m.format_number(3))",
    "inline: c10::str with int (no throw)": "print(m.c10_str_number(3))",
    "inline: TORCH_CHECK strings only": "m.throw_string_only()",
    "inline: TORCH_CHECK with an int": "m.throw_with_number(3)",
    "inline: TORCH_CHECK preformatted to_string": "m.throw_preformatted(3)",
    "inline: std::runtime_error": "m.throw_std_runtime(3)",
    "elastic first, then inline TORCH_CHECK with an int": "import elastic_cuda; m.throw_with_number(3)",
}


def _run(name, code, env=None):
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    lines = (r.stdout if r.returncode == 0 and r.stdout.strip() else r.stderr).strip().splitlines()
    print(f"{name:52s} rc {r.returncode:4d}  {lines[-1][:150] if lines else ''}", flush=True)


if __name__ == "__main__":
    import os
    import tempfile

    for name, code in CASES.items():
        _run(name, code)
    build = tempfile.mkdtemp(prefix="elastic_exc_probe_")
    env = {**os.environ, "PROBE_BUILD": build}
    prelude = f"INLINE_SRC = {INLINE_SRC!r}; " + INLINE
    _run("inline: build", prelude + "print('built')", env)
    for name, code in INLINE_CASES.items():
        _run(name, prelude + code, env)
