"""Thin Python front of the elastic:: operators: input validation, autograd and fake kernels, one module per op
family (as csrc/): _attention, _train_mix, _routing (boundary_pool, router_decision), _xattn, _decode (decode_attention,
static_cache_commit); _checks and _options are what they share.

`attention` is the function users call; `torch.ops.elastic.attention` is the raw operator (it checks its arguments
again in C++). Gradients flow to q, k and v in every head mode through `torch.library.register_autograd`; fake kernels
let `torch.compile(fullgraph=True)` trace it.
"""
from .._ext import has_cuda_kernels
from ._attention import attention, hopper_backward_serves, validate_attention_args
from ._checks import BLOCK, FULL, MODE_NAMES, STRATEGIES, STREAM
from ._decode import MAX_DECODE_QUERIES, decode_attention, static_cache_commit, validate_decode_args
from ._options import reload_kernel_options
from ._routing import boundary_pool, router_decision
from ._train_mix import train_mix
from ._xattn import check_xattn_args, xattn_block_mask

__all__ = ["FULL", "STREAM", "BLOCK", "MODE_NAMES", "STRATEGIES", "MAX_DECODE_QUERIES", "attention", "boundary_pool",
           "check_xattn_args", "decode_attention", "has_cuda_kernels", "hopper_backward_serves",
           "reload_kernel_options", "router_decision", "static_cache_commit", "train_mix", "validate_attention_args",
           "validate_decode_args", "xattn_block_mask"]
