"""Loads the compiled extension, which registers the elastic:: operators with torch."""
from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (import registers torch.ops.elastic.*)
except ImportError as e:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "elastic_cuda: the compiled extension elastic_cuda._C is missing or does not match this torch "
        f"({torch.__version__}). Build it with `pip install --no-build-isolation -e .` or "
        "`python setup.py build_ext --inplace`. Original error: " + str(e)
    ) from e


def has_cuda_kernels() -> bool:
    """True when this build of the extension carries the CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("elastic::attention", "CUDA")
