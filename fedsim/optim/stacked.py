"""Shared pieces of the optimizers: the per-client step counter and the in-place ``step_`` of a functional
optimizer defined by its pure ``update``, and the closure handling of the ``torch.optim`` classes."""

from __future__ import annotations

import torch
from torch import Tensor

from fedsim.core.pytree import Tree


def evaluate_closure(closure) -> Tensor | None:
    """``torch.optim`` convention: re-evaluate the loss with gradients enabled when a closure is given."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def step_counter(params: Tree) -> Tensor:
    """A float64 ``[C]`` step counter at 0, on the device of the stacked ``params``."""
    first = next(iter(params.values()))
    return torch.zeros(first.shape[0], device=first.device, dtype=torch.float64)


class AppliesUpdate:
    """Mixin: ``step_`` applies the pure ``update`` to ``params`` in place and returns the new state."""

    def update(self, grads: Tree, state: Tree, params: Tree, lr: float) -> tuple[Tree, Tree]:
        raise NotImplementedError

    def step_(self, grads: Tree, state: Tree, params: Tree, lr: float) -> Tree:
        """Apply :meth:`update` to ``params`` in place; returns the new state."""
        updates, new_state = self.update(grads, state, params, lr)
        for name, u in updates.items():
            params[name].add_(u)
        return new_state
