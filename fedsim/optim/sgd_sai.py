"""SGD-SaI: SGD with momentum and learning rates scaled at initialization by each tensor's gradient
signal-to-noise ratio (rule from the authors' code, AnonymousAlethiometer/SGD_SaI; ALGORITHMS.md "SGD-SaI").

At a parameter's first step ``gsnr_p = ||g_p||_2 / (std(g_p) + eps)`` (unbiased std over the tensor's
entries; 0 for a one-element tensor), frozen afterwards. Momentum ``b <- mu b + (1 - mu) g`` (``b = g`` at
the first step); ``p <- p (1 - lr wd) - lr gsnr_p b``. One state buffer per parameter plus a scalar.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated

import torch

from fedsim.core.components import option
from fedsim.core.pytree import Tree

from .kernels import gradient_snr
from .options import Eps
from .stacked import AppliesUpdate, evaluate_closure, step_counter


class SGDSaI(torch.optim.Optimizer):
    """SGD-SaI as a ``torch.optim.Optimizer`` (the authors' defaults: lr 1e-2, momentum 0.9, eps 1e-8,
    weight decay 1e-2, decoupled)."""

    def __init__(
        self, params: Iterable, lr: float = 1e-2, momentum: float = 0.9, eps: float = 1e-8, weight_decay: float = 1e-2
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not 0 <= momentum < 1:
            raise ValueError(f"invalid hyperparameters: lr={lr}, momentum={momentum}, eps={eps}, wd={weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 (torch.optim.Optimizer.step)
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["gsnr"] = gradient_snr(g, 0, group["eps"]).reshape(())
                    state["momentum_buffer"] = g.clone()
                else:
                    state["momentum_buffer"].lerp_(g, 1 - mu)
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(state["momentum_buffer"] * state["gsnr"], alpha=-lr)
        return loss


@dataclass(frozen=True)
class FunctionalSGDSaI(AppliesUpdate):
    """SGD-SaI in the engine's functional, client-stacked form (``gsnr`` per client and tensor, computed at
    each client's first step; tested equal to :class:`SGDSaI`)."""

    momentum: float = 0.9
    eps: float = 1e-8
    weight_decay: float = 1e-2

    def init(self, params: Tree) -> Tree:
        state: Tree = {"step": step_counter(params)}
        for name, value in params.items():
            state[f"gsnr.{name}"] = value.new_zeros(value.shape[0])
            state[f"buf.{name}"] = torch.zeros_like(value)
        return state

    def update(self, grads: Tree, state: Tree, params: Tree, lr: float) -> tuple[Tree, Tree]:
        first = state["step"] == 0
        new_state: Tree = {"step": state["step"] + 1}
        updates = {}
        for name, g in grads.items():
            w = params[name]
            shape = (-1, *([1] * (w.dim() - 1)))
            is_first = first.reshape(shape)
            gsnr = torch.where(first, gradient_snr(g, 1, self.eps).reshape(-1), state[f"gsnr.{name}"])
            buf = torch.where(is_first, g, torch.lerp(state[f"buf.{name}"], g, 1 - self.momentum))
            new_state[f"gsnr.{name}"], new_state[f"buf.{name}"] = gsnr, buf
            updates[name] = -lr * (self.weight_decay * w + gsnr.reshape(shape) * buf)
        return updates, new_state


def sgd_sai(
    momentum: Annotated[float, option("momentum mu of the buffer b <- mu b + (1 - mu) g", ge=0, lt=1)] = 0.9,
    eps: Eps = 1e-8,
    weight_decay: Annotated[float, option("decoupled weight decay (0 here; the authors use 1e-2)", ge=0)] = 0.0,
) -> FunctionalSGDSaI:
    """SGD-SaI (AnonymousAlethiometer/SGD_SaI): momentum SGD scaled per tensor by its first-step gradient SNR."""
    return FunctionalSGDSaI(momentum=momentum, eps=eps, weight_decay=weight_decay)
