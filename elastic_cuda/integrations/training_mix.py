"""The router-training forward, as a context the trainer enters (ElasticState.training_mix).

Inside it every elastic layer computes the training mix O = z * O_FA + (1 - z) * O_SA (attention.
train_mix_attention) with the routers' straight-through z at Gumbel temperature `tau`, so the LM loss reaches the
routers; outside it the model routes and attends as at inference. Activation checkpointing recomputes the forward
inside backward(), so a backward of a mixed forward runs inside the context too.
"""
from __future__ import annotations

from contextlib import contextmanager

from ..attention import FULL_BRANCHES

__all__ = ["TrainingMix"]


class TrainingMix:
    """Whether the mix is on, its temperature and how it computes O_FA (full_branch: attention.FULL_BRANCHES)."""

    def __init__(self):
        self.active = False
        self.tau = 1.0
        self.full_branch = "auto"

    @contextmanager
    def entered(self, tau: float | None = None, full_branch: str | None = None):
        """Turn the mix on (with this tau / full_branch when given) until the block ends; nests, restoring the
        outer settings on exit."""
        if full_branch is not None and full_branch not in FULL_BRANCHES:
            raise ValueError(f"training_mix: full_branch must be one of {FULL_BRANCHES}, got {full_branch!r}")
        if tau is not None and not (isinstance(tau, (int, float)) and tau > 0):
            raise ValueError(f"training_mix: tau must be a positive number, got {tau!r}")
        saved = (self.active, self.tau, self.full_branch)
        self.active = True
        self.tau = self.tau if tau is None else float(tau)
        self.full_branch = self.full_branch if full_branch is None else full_branch
        try:
            yield self
        finally:
            self.active, self.tau, self.full_branch = saved
