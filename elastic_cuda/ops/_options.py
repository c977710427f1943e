"""The A/B-timing switches of the CUDA kernels (csrc/attention/kernel_options.h) as Python reads them."""
from __future__ import annotations

import torch


def reload_kernel_options() -> str:
    """Read the A/B-timing switches of the CUDA kernels (ELASTIC_CUDA_SM90, ELASTIC_SM90_*: README, "Tuning
    switches") from the environment again and return the options now in effect, e.g. "sm90=1 stages=3 tma=0 ...".

    The extension reads them once per process, at its first CUDA attention call; tests and benchmarks that
    change them call this afterwards. A value other than the documented ones raises RuntimeError naming the
    variable. Not needed (and not meant) for normal use: the defaults are the product."""
    global _KERNEL_OPTIONS
    described = torch.ops.elastic.reload_kernel_options()
    _KERNEL_OPTIONS = _parse_options(described)
    return described


_KERNEL_OPTIONS: dict | None = None  # the switches in effect as Python reads them (_kernel_option)


def _parse_options(described: str) -> dict:
    return dict(item.split("=", 1) for item in described.split())


def _kernel_option(name: str) -> str:
    """The value of one switch of csrc/attention/kernel_options.h as the extension holds it ("0" / "1" ...), read
    from the extension once per process (the C++ side reads the environment once, too) and again by
    reload_kernel_options()."""
    global _KERNEL_OPTIONS
    if _KERNEL_OPTIONS is None:
        _KERNEL_OPTIONS = _parse_options(torch.ops.elastic.kernel_options())
    return _KERNEL_OPTIONS[name]
