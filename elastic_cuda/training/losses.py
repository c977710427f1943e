"""Losses of the router training: LM cross-entropy and the per-task Lagrangian sparsity regulariser.

MSR per sample = 1 - mean over layers and KV heads of z (z = 1 FULL, the code's convention), computed from the
straight-through z, so it is differentiable. Per sample: lambda1[task] * |MSR - t| + lambda2[task] * (MSR - t)^2
(the code's |d|; the paper's Eq. 8 writes a signed difference), t = 1 for robust tasks, t_sen for sensitive
ones. The regulariser is averaged within each task present in the (global) batch, then across those tasks.
Both terms are >= 0, so gradient ascent on the lambdas only increases them (never clamped, as in the paper).
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F


def msr_from_z(z: torch.Tensor) -> torch.Tensor:
    """[B, L, Hkv] z (1 = full) -> [B] model sparsity ratio."""
    if z.dim() != 3:
        raise ValueError(f"z must have shape [B, L, Hkv], got {tuple(z.shape)}")
    return 1.0 - z.float().mean(dim=(1, 2))


def masked_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (fp32) over the target tokens of one sequence.

    logits [T', V] are the model's logits for the LAST T' positions of input_ids [T] (T' <= T; HF's
    `logits_to_keep`); loss_mask [T] marks target tokens (token i is predicted by position i - 1).
    """
    if input_ids.dim() != 1 or loss_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids and loss_mask must be 1-D of one shape, got {tuple(input_ids.shape)} "
                         f"and {tuple(loss_mask.shape)}")
    T, kept = input_ids.shape[0], logits.shape[0]
    if kept > T or logits.dim() != 2:
        raise ValueError(f"logits must be [T', V] with T' <= {T}, got {tuple(logits.shape)}")
    # position p (absolute T - kept + r) predicts token p + 1
    targets = input_ids[T - kept + 1:]
    mask = loss_mask[T - kept + 1:].bool()
    if int(loss_mask[: T - kept + 1].sum()) != 0:
        raise ValueError("loss_mask marks tokens whose predicting position is not among the kept logits")
    if not bool(mask.any()):
        raise ValueError("loss_mask selects no token")
    return F.cross_entropy(logits[:-1][mask].float(), targets[mask], reduction="mean")


def logits_needed(loss_mask: torch.Tensor) -> int:
    """How many trailing positions' logits are needed to score every target of `loss_mask`."""
    nz = torch.nonzero(loss_mask).flatten()
    if nz.numel() == 0:
        raise ValueError("loss_mask selects no token")
    return int(loss_mask.shape[0] - nz[0].item() + 1)


def sample_regulariser(msr: torch.Tensor, target: float, lambda1: torch.Tensor, lambda2: torch.Tensor):
    d = msr - target
    return lambda1 * d.abs() + lambda2 * d * d


def task_weights(task_ids) -> list[float]:
    """Per-sample weights w with sum_i w_i r_i = mean over tasks of (mean over the task's samples of r)."""
    counts = Counter(task_ids)
    return [1.0 / (counts[t] * len(counts)) for t in task_ids]


def lagrangian_regulariser(msr: torch.Tensor, task_idx: torch.Tensor, targets: torch.Tensor,
                           lambda1: torch.Tensor, lambda2: torch.Tensor) -> torch.Tensor:
    """Batched form: msr/task_idx/targets [N]; lambda1/lambda2 [num_tasks]. Mean within tasks then across."""
    per_sample = sample_regulariser(msr, targets, lambda1[task_idx], lambda2[task_idx])
    present = torch.unique(task_idx)
    return torch.stack([per_sample[task_idx == t].mean() for t in present]).mean()
