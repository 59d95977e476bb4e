"""Learning-rate schedule: linear warm-up, then cosine decay to zero.

``lr(step) = base_lr * (step + 1) / warmup_steps``     for step < warmup_steps
``lr(step) = base_lr * (1 + cos(pi * p)) / 2``          otherwise,
with ``p = (step - warmup_steps) / (total_steps - warmup_steps)``, the schedule of
open_clip's ``cosine_lr``.  ``step`` counts optimizer steps from 0.
"""

from __future__ import annotations

import math

import torch


def warmup_cosine_factor(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the base learning rate at ``step`` (a pure function).

    Parameters
    ----------
    step : int
        Optimizer steps taken so far (0 for the first step).
    warmup_steps : int
        Length of the linear warm-up; 0 disables it.
    total_steps : int
        Steps of the whole run; the factor reaches 0 there.

    Returns
    -------
    float
        In [0, 1].
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_scheduler(optimizer: torch.optim.Optimizer, *, warmup_steps: int,
                            total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following :func:`warmup_cosine_factor`.

    Its ``state_dict`` holds only numbers (the step count and base rates, not
    the schedule's shape), so it reloads with ``torch.load(weights_only=True)``
    and a resumed run may change ``total_steps``.
    """

    def factor(step: int) -> float:
        return warmup_cosine_factor(step, warmup_steps=warmup_steps, total_steps=total_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
