"""The learning-rate schedule and the step budget it spans: warm-up, then constant, cosine or
warm-up/stable/decay (WSD), over a run whose length is a step count or a training-time budget."""

from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine", "wsd")
LR_SCALING_POWER = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}


def peak_lr(tc) -> float:
    """`train.lr`, scaled from `lr_reference_batch` to the global batch as `lr_scaling` says."""
    return tc.lr * (tc.global_batch_size / tc.lr_reference_batch) ** LR_SCALING_POWER[tc.lr_scaling]


def lr_factor(schedule: str, step: int, total: int, warmup: int, decay_fraction: float = 0.2,
              min_ratio: float = 0.0) -> float:
    """The learning rate at optimizer step `step` (0-based) of `total`, as a fraction of the peak.

    Warm-up is linear from 1/warmup to 1 over the first `warmup` steps. After it, cosine falls from 1 to
    `min_ratio` at the last step; WSD holds 1 until the last `decay_fraction` of the run and falls
    linearly to `min_ratio` over it."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    last = max(total - 1, 1)
    if schedule == "cosine":
        span = max(last - warmup, 1)
        p = min(max((step - warmup) / span, 0.0), 1.0)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
    if schedule == "wsd":
        start = max(warmup, total - round(decay_fraction * total))
        if step < start:
            return 1.0
        p = min((step - start + 1) / max(total - start, 1), 1.0)
        return 1.0 - (1.0 - min_ratio) * p
    raise ValueError(f"unknown learning-rate schedule '{schedule}'; use one of {', '.join(SCHEDULES)}")


def budgeted_total(step: int, steps: int, used_s: float, budget_s: float, interval_steps: int,
                   interval_s: float) -> int:
    """The optimizer steps a run gets: `steps`, or fewer where a training-time budget ends it first.

    `used_s` of `budget_s` are spent at `step`; the steps still to come are estimated at the rate of
    the last interval (`interval_steps` in `interval_s`), which leaves start-up costs such as
    compilation out of the estimate once the first interval has passed."""
    if not budget_s:
        return steps
    if used_s >= budget_s:
        return min(step, steps)
    if interval_steps <= 0 or interval_s <= 0:
        return steps
    return min(steps, step + max(1, int((budget_s - used_s) * interval_steps / interval_s)))
