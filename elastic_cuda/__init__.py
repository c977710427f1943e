"""elastic_cuda: Elastic Attention (arXiv 2601.17367) for PyTorch.

A trained router picks, per input and per KV head, full causal attention or a cheap sparse
attention (streaming sink+window or block-sparse); the kernels here run the mixed heads.
"""
from ._ext import has_cuda_kernels
from .ops import BLOCK, FULL, STREAM, attention, boundary_pool

__version__ = "0.1.0"

__all__ = ["FULL", "STREAM", "BLOCK", "attention", "boundary_pool", "has_cuda_kernels", "__version__"]
