"""Per-round learning-rate schedules (component kind ``lr_schedule``). A schedule's ``lr(round, base_lr,
total_rounds)`` is the local learning rate of round ``round`` (1-based)."""

from __future__ import annotations

import math
from typing import Annotated

from fedsim.core import components
from fedsim.core.components import option


class Constant:
    """``lr``, every round."""

    def lr(self, round_: int, base_lr: float, total_rounds: int) -> float:
        return base_lr


class Step:
    """``lr * decay ** floor((r - 1) / step)`` (e.g. halved every 10 rounds: decay 0.5, step 10)."""

    def __init__(
        self,
        decay: Annotated[float, option("factor applied every `step` rounds", gt=0, le=1)] = 0.5,
        step: Annotated[int, option("rounds between decays", ge=1)] = 10,
    ):
        self.decay, self.step = decay, step

    def lr(self, round_: int, base_lr: float, total_rounds: int) -> float:
        return base_lr * self.decay ** ((round_ - 1) // self.step)


class Cosine:
    """``min_lr + (lr - min_lr) * (1 + cos(pi * (r - 1) / total_rounds)) / 2``."""

    def __init__(self, min_lr: Annotated[float, option("learning rate the curve ends at", ge=0)] = 0.0):
        self.min_lr = min_lr

    def lr(self, round_: int, base_lr: float, total_rounds: int) -> float:
        r = round_ - 1
        return self.min_lr + (base_lr - self.min_lr) * (1 + math.cos(math.pi * r / max(total_rounds, 1))) / 2


def lr_at(round_: int, base_lr: float, schedule: object = "constant", *, total_rounds: int = 1, **options) -> float:
    """Learning rate of round ``round_`` (1-based) under ``schedule`` (a name, spec or schedule object) with
    its ``options`` (``decay``, ``step`` for ``step``; ``min_lr`` for ``cosine``)."""
    built = components.make("lr_schedule", schedule, **options)
    return built.lr(round_, base_lr, total_rounds)
