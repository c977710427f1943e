"""Build script for the elastic_cuda extension (torch cpp_extension).

Builds the CUDA kernels when a CUDA toolkit and a CUDA build of torch are both present,
and a CPU-only extension otherwise; it says which one it built.

Environment knobs:
  CUDA_HOME              toolkit root (defaults to /usr/local/cuda when that exists)
  TORCH_CUDA_ARCH_LIST   target archs (default "8.0;9.0a": Ampere + Hopper with wgmma)
  ELASTIC_CUDA_CPU_ONLY  set to 1 to skip the CUDA sources even when a toolkit is present
  ELASTIC_BUILD_EXPERIMENTS  set to 1 to also build the A/B-timing experiments (sources under an experiments/
                         folder, e.g. the 2-stage sm90 instance behind ELASTIC_SM90_STAGES=2) and define
                         ELASTIC_EXPERIMENTS; the product never needs them
  MAX_JOBS               parallel compile jobs (ninja)
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# The toolkit is found before torch.utils.cpp_extension reads CUDA_HOME at import time.
if not os.environ.get("CUDA_HOME") and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")

import torch  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)


def _want_cuda():
    if os.environ.get("ELASTIC_CUDA_CPU_ONLY", "0") == "1":
        return False, "ELASTIC_CUDA_CPU_ONLY=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    return True, f"CUDA toolkit at {CUDA_HOME}, torch CUDA {torch.version.cuda}"


def _cutlass_include():
    """CuTe/CUTLASS headers from the `nvidia-cutlass` wheel, when it is installed."""
    try:
        import cutlass_library  # type: ignore
    except Exception:
        return None
    inc = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
    return inc if os.path.isdir(os.path.join(inc, "cute")) else None


def _experiments():
    return os.environ.get("ELASTIC_BUILD_EXPERIMENTS", "0") == "1"


def _sources(with_cuda):
    cpp = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cu = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True)) if with_cuda else []
    keep = _experiments()
    return [f for f in cpp + cu if keep or "experiments" not in f.split(os.sep)]


def _jobs():
    # Printed with the plan: parallel compile jobs set both the build time and its peak memory.
    return f"MAX_JOBS={os.environ.get('MAX_JOBS', 'unset (ninja picks)')}"


def _extension():
    with_cuda, why = _want_cuda()
    include_dirs = [os.path.join(ROOT, "csrc")]
    cxx = ["-O3", "-fopenmp", "-DELASTIC_PYTHON_MODULE"]
    experiments = ["-DELASTIC_EXPERIMENTS"] if _experiments() else []
    cxx += experiments
    link = ["-fopenmp"]
    if with_cuda:
        cutlass = _cutlass_include()
        if cutlass:
            include_dirs.append(cutlass)
        nvcc = [
            "-O3",
            "--use_fast_math",
            "-lineinfo",
            "--expt-relaxed-constexpr",
            "--expt-extended-lambda",
            "-U__CUDA_NO_HALF_OPERATORS__",
            "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_OPERATORS__",
            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        ] + experiments
        if os.environ.get("ELASTIC_CUDA_PTXAS_VERBOSE", "0") == "1":
            nvcc.append("-Xptxas=-v")
        sources = _sources(True)
        n_cu = sum(s.endswith(".cu") for s in sources)
        print(
            f"elastic_cuda: building CUDA + CPU kernels ({why}; "
            f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}; cutlass={'yes' if cutlass else 'no'}; "
            f"experiments={'yes' if experiments else 'no'}): {len(sources) - n_cu} C++ and {n_cu} CUDA files, "
            f"{_jobs()}",
            file=sys.stderr,
        )
        return CUDAExtension(
            "elastic_cuda._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link,
        )
    sources = _sources(False)
    print(f"elastic_cuda: building CPU-only kernels, no CUDA kernels ({why}): {len(sources)} C++ files, {_jobs()}",
          file=sys.stderr)
    return CppExtension(
        "elastic_cuda._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
    )


setup(
    packages=find_packages(include=["elastic_cuda", "elastic_cuda.*"]),
    package_data={"elastic_cuda": ["routers/*/*.json", "routers/*/*.safetensors", "data/*.txt"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
)
