"""Python strategy helpers on top of the elastic op: padding-aware calls, the training-time FA/SA mix,
and exact (query, key) pair counts of the head-mode masks (for ESR)."""
from .hybrid import FULL_BRANCHES, PaddingLayout, dense_causal_sdpa, hybrid_attention, train_mix_attention
from .sparse_config import SPARSE_MODES, SparseConfig
from .sparsity import causal_pairs, visible_pairs

__all__ = ["FULL_BRANCHES", "PaddingLayout", "dense_causal_sdpa", "hybrid_attention", "train_mix_attention",
           "causal_pairs", "visible_pairs", "SPARSE_MODES", "SparseConfig"]
