"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2), functional and
client-stacked. One state buffer per parameter, like SGD with momentum:

    c = b1 m + (1 - b1) g
    w <- w (1 - lr wd) - lr sign(c)
    m <- b2 m + (1 - b2) g

Defaults from the paper: betas (0.9, 0.99), weight decay 0 (the paper uses lr 3-10x smaller than AdamW's).
This file is also the README's example of adding a built-in optimizer: this file plus one ``register`` line.
"""

from __future__ import annotations

from typing import Annotated

import torch

from fedsim.core.components import option
from fedsim.core.pytree import Tree

from .options import Betas
from .stacked import AppliesUpdate


class Lion(AppliesUpdate):
    """Lion: the sign of an interpolated momentum, decoupled weight decay (see the module docstring)."""

    def __init__(
        self,
        betas: Betas = (0.9, 0.99),
        weight_decay: Annotated[float, option("decoupled weight decay", ge=0)] = 0.0,
    ):
        self.betas, self.weight_decay = tuple(betas), weight_decay

    def init(self, params: Tree) -> Tree:
        return {f"m.{k}": torch.zeros_like(v) for k, v in params.items()}

    def update(self, grads: Tree, state: Tree, params: Tree, lr: float) -> tuple[Tree, Tree]:
        b1, b2 = self.betas
        updates, new_state = {}, {}
        for k, g in grads.items():
            m = state[f"m.{k}"]
            updates[k] = -lr * (torch.sign(b1 * m + (1 - b1) * g) + self.weight_decay * params[k])
            new_state[f"m.{k}"] = b2 * m + (1 - b2) * g
        return updates, new_state
