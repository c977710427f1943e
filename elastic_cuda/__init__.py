"""elastic_cuda: Elastic Attention (arXiv 2601.17367) for PyTorch.

A trained router picks, per input and per KV head, full causal attention or a cheap sparse
attention (streaming sink+window or block-sparse); the kernels here run the mixed heads.
`enable`/`disable` (the transformers backend) and the router classes are imported lazily, so
`import elastic_cuda` for the ops alone does not import transformers.
"""
from ._ext import has_cuda_kernels
from .ops import BLOCK, FULL, STREAM, attention, boundary_pool

__version__ = "0.1.0"

_LAZY = {
    "enable": ("integrations.transformers", "enable"),
    "disable": ("integrations.transformers", "disable"),
    "ElasticCache": ("integrations.cache", "ElasticCache"),
    "AttentionRouter": ("router", "AttentionRouter"),
    "RouterSet": ("router", "RouterSet"),
}

__all__ = ["FULL", "STREAM", "BLOCK", "attention", "boundary_pool", "has_cuda_kernels", "__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module_name}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'elastic_cuda' has no attribute {name!r}")
