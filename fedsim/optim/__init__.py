"""Local optimizers: functional (vmappable, stacked over clients) forms and learning-rate schedules."""

from .functional import OPTIMIZERS, SGD, Adam, FunctionalOptimizer, make_optimizer
from .schedules import SCHEDULES, lr_at

__all__ = ["OPTIMIZERS", "SCHEDULES", "SGD", "Adam", "FunctionalOptimizer", "lr_at", "make_optimizer"]
