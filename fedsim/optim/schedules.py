"""Per-round learning-rate schedules. ``lr_at(r)`` is the local learning rate of round ``r`` (1-based)."""

from __future__ import annotations

import math

SCHEDULES = ("constant", "step", "cosine")


def lr_at(
    round_: int,
    base_lr: float,
    schedule: str = "constant",
    *,
    total_rounds: int = 1,
    decay: float = 0.5,
    step: int = 10,
    min_lr: float = 0.0,
) -> float:
    """Learning rate of round ``round_`` (1-based).

    - ``constant``: ``lr``.
    - ``step``: ``lr * decay ** floor((r - 1) / step)`` (e.g. halved every 10 rounds: decay 0.5, step 10).
    - ``cosine``: ``min_lr + (lr - min_lr) * (1 + cos(pi * (r - 1) / total_rounds)) / 2``.
    """
    from fedsim.core.errors import unknown

    r = round_ - 1
    if schedule == "constant":
        return base_lr
    if schedule == "step":
        return base_lr * decay ** (r // step)
    if schedule == "cosine":
        return min_lr + (base_lr - min_lr) * (1 + math.cos(math.pi * r / max(total_rounds, 1))) / 2
    raise unknown("learning-rate schedule", schedule, SCHEDULES)
