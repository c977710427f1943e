"""Learning-rate and Gumbel-temperature schedules of the router training.

LR (the paper's code: HF cosine-with-min-lr): linear warmup over the first `warmup_ratio` of the steps, then
cosine decay to `min_lr_ratio` x peak (1e-7, i.e. ~0). Applied to every parameter group (routers and lambdas).

Temperature tau ("code", the default): cosine from tau_max=1.5 to tau_min=1.0 over the first ceil(0.6 x steps),
then held at tau_min (lh_trainer.get_current_tau). The paper's text describes instead
tau(p) = max(tau_min, tau_init * exp(-0.6 p)) without numbers; "paper" implements that with p = step / steps
(the fraction of training done) and the same tau_max/tau_min. The hard Gumbel sample does not depend on tau
(argmax of logits + noise), tau only shapes the straight-through gradient.
"""
from __future__ import annotations

import math

TAU_SCHEDULES = ("code", "paper")


def lr_factor(step: int, total_steps: int, warmup_ratio: float = 0.2, min_lr_ratio: float = 1e-7) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based) of `total_steps`."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return (step + 1) / warmup  # step 0 already moves the routers a little (HF starts at 0: a wasted step)
    progress = (step - warmup) / max(1, total_steps - warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return min_lr_ratio + (1.0 - min_lr_ratio) * cosine


def tau_at(step: int, total_steps: int, tau_max: float = 1.5, tau_min: float = 1.0, decay_ratio: float = 0.6,
           schedule: str = "code") -> float:
    """Gumbel-softmax temperature at step `step` of `total_steps`."""
    if schedule not in TAU_SCHEDULES:
        raise ValueError(f"schedule must be one of {TAU_SCHEDULES}, got {schedule!r}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if schedule == "paper":
        return max(tau_min, tau_max * math.exp(-0.6 * step / total_steps))
    decay_steps = math.ceil(decay_ratio * total_steps)
    if step >= decay_steps:
        return tau_min
    return tau_min + 0.5 * (tau_max - tau_min) * (1.0 + math.cos(math.pi * step / decay_steps))
