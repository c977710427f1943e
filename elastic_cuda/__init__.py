"""elastic_cuda: Elastic Attention (arXiv 2601.17367) for PyTorch.

A trained router picks, per input and per KV head, full causal attention or a cheap sparse
attention (streaming sink+window or block-sparse); the kernels here run the mixed heads.
The operator is `elastic_cuda.ops.attention` (`torch.ops.elastic.attention` underneath); the subpackage
`elastic_cuda.attention` holds the strategies built on it (padding-aware calls, the training-time mix).
`enable`/`disable` (the transformers backend) and the router classes are imported lazily, so
`import elastic_cuda` for the ops alone does not import transformers.
"""
from . import attention, ops  # noqa: F401  (ops.attention is the operator; attention/ holds the strategies)
from ._ext import has_cuda_kernels
from .ops import BLOCK, FULL, STREAM, boundary_pool

__version__ = "0.1.0"

_LAZY = {
    "enable": ("integrations.transformers", "enable"),
    "disable": ("integrations.transformers", "disable"),
    "ElasticCache": ("integrations.cache", "ElasticCache"),
    "ElasticStaticCache": ("integrations.static_cache", "ElasticStaticCache"),
    "AttentionRouter": ("router", "AttentionRouter"),
    "RouterSet": ("router", "RouterSet"),
}

__all__ = ["FULL", "STREAM", "BLOCK", "ops", "attention", "boundary_pool", "has_cuda_kernels", "__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module_name}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'elastic_cuda' has no attribute {name!r}")
