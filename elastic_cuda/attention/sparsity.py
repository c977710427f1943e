"""Exact counts of the (query, key) pairs a head mode lets through, for the Effective Sparsity Ratio.

ESR (method-digest section 6) = 1 - attended causal pairs / all causal pairs. The counts follow the
token-level rule of csrc/attention/head_mode.h (tested against elastic_cuda.reference.visible_mask):
the queries are the last n_q of n_k positions (bottom-right causal), so decode steps count too.
"""
from __future__ import annotations

from functools import lru_cache

from ..ops import FULL, STREAM

__all__ = ["causal_pairs", "visible_pairs"]


def _check(n_q: int, n_k: int):
    if n_q < 0 or n_k < 0 or n_q > n_k:
        raise ValueError(f"visible_pairs: need 0 <= n_q <= n_k, got n_q={n_q}, n_k={n_k}")


def causal_pairs(n_q: int, n_k: int) -> int:
    """Causal pairs of the last n_q query positions over n_k keys: sum of (i + 1) for i in [n_k - n_q, n_k)."""
    _check(n_q, n_k)
    first = n_k - n_q
    return (first + 1 + n_k) * n_q // 2


def _prefix_sum_min(n: int, cap: int) -> int:
    """sum_{i=0}^{n-1} min(i + 1, cap) for n >= 0, cap >= 0."""
    if n <= 0 or cap <= 0:
        return 0
    if n <= cap:
        return n * (n + 1) // 2
    return cap * (cap + 1) // 2 + (n - cap) * cap


@lru_cache(maxsize=4096)
def visible_pairs(mode: int, n_q: int, n_k: int, sink: int, window: int) -> int:
    """Pairs (i, j), j <= i, visible under `mode` for the last n_q query positions of n_k keys.

    STREAM: |{j < sink} U {i - window < j}| within [0, i] = min(sink, i+1) + min(window, i+1) - overlap,
    overlap = max(0, min(sink, i+1) - (i + 1 - min(window, i+1))) = max(0, min(sink, i+1) + min(window, i+1) - (i+1)).
    """
    _check(n_q, n_k)
    if mode == FULL:
        return causal_pairs(n_q, n_k)
    if mode != STREAM:
        raise ValueError(f"visible_pairs: only FULL ({FULL}) and STREAM ({STREAM}) have data-independent counts, "
                         f"got mode {mode}")
    first = n_k - n_q

    def upto(n):  # sum over i in [0, n) of the STREAM count
        sink_part = _prefix_sum_min(n, sink)
        win_part = _prefix_sum_min(n, window)
        # The overlap is non-zero only while i + 1 < sink + window: sum it directly over that bounded range.
        limit = min(n, sink + window)
        overlap = 0
        for i in range(limit):
            t = i + 1
            overlap += max(0, min(sink, t) + min(window, t) - t)
        return sink_part + win_part - overlap

    return upto(n_k) - upto(first)
