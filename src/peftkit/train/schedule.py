"""Learning-rate schedules: linear warm-up, then linear decay, cosine decay or a constant rate.

The multiplier for optimizer step ``s`` (0-based) is what :class:`torch.optim.lr_scheduler.LambdaLR`
applies to each parameter group's peak rate. Warm-up starts at ``1 / (warmup + 1)`` rather than 0, so
the first step is never wasted on a zero learning rate, and reaches 1 at step ``warmup``. Decay runs
from there to the last step; the last step's rate is small but not zero (a zero-rate step would be
spent for nothing).
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "cosine", "constant")


def warmup_steps_for(warmup_steps: int | None, warmup_ratio: float, total_steps: int) -> int:
    """Warm-up length: ``warmup_steps`` when given, else ``warmup_ratio`` of ``total_steps`` (rounded)."""
    if warmup_steps is not None:
        return min(warmup_steps, total_steps)
    return min(round(warmup_ratio * total_steps), total_steps)


def lr_multiplier(step: int, *, schedule: str, warmup: int, total: int) -> float:
    """The fraction of the peak learning rate used by optimizer step ``step`` (0-based).

    Args:
        step: 0-based optimizer step.
        schedule: "linear", "cosine" or "constant" (after warm-up).
        warmup: Warm-up steps (linear ramp).
        total: All optimizer steps of the run.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    raise ValueError(f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, warmup: int, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over every parameter group of ``optimizer`` following :func:`lr_multiplier`.

    The multiplier is a plain function (a closure), which ``LambdaLR.state_dict`` leaves out: a
    checkpoint then holds only the position (``last_epoch``) and the base rates, and a resumed run
    rebuilds the function from its (checked-equal) config.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")

    def multiplier(step: int) -> float:
        return lr_multiplier(step, schedule=schedule, warmup=warmup, total=total)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
