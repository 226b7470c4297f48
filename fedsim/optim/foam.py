"""FOAM: Adam with blocked state folding (rule from the authors' code, zqOuO/FOAM; ALGORITHMS.md "FOAM").

For a matrix with last dimension ``n``, level ``l`` (block ``b = 2^l``), scale ``alpha`` and residual scale
``s``: ``g_f = fold(g)``, ``g2_f = fold(g * g)``, ``R = g - unfold(g_f)``; the moments live at ``n / b``
columns, ``m <- b1 m + (1 - b1) g_f``, ``v <- b2 v + (1 - b2) g2_f``; the update direction is
``U = alpha (unfold(m) + s R) / (sqrt(unfold(v) + s^2 R^2) + eps)`` and
``w <- w - lr sqrt(1 - b2^t) / (1 - b1^t) U``, then decoupled weight decay. Level 0 and scale 1 is Adam.
State on a folded matrix is ``1 / 2^l`` of Adam's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated

from torch import Tensor, nn

from fedsim.core.components import option
from fedsim.core.pytree import Tree

from .compressed import CompressedAdam, FunctionalCompressedAdam
from .fused import foam_steps_
from .kernels import Direction, FoamRule
from .options import Betas, CompressParams, Eps, EpsMode, StateBits, WeightDecay, compressed_names


class FOAM(CompressedAdam):
    """FOAM as a ``torch.optim.Optimizer``: every parameter with ``ndim >= 2`` is folded unless its param
    group says ``fold=False`` (see :func:`fedsim.optim.transformer_param_groups`); the others get Adam(W)
    inside the same optimizer. ``fused=True`` runs the folded step ``torch.compile``d
    (:mod:`fedsim.optim.fused`; it compiles on the first step of each new shape). Defaults are the authors'
    (``lr`` 1e-2 is theirs for LLM pre-training; here 1e-3 as ``torch.optim.Adam``)."""

    flag = "fold"

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        level: int = 2,
        scale: float = 0.25,
        res_scale: float = 1.0,
        eps_mode: str = "torch",
        fused: bool = False,
        state_bits: int = 32,
    ) -> None:
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, level=level, scale=scale,
                        res_scale=res_scale, eps_mode=eps_mode, fused=fused, state_bits=state_bits)  # fmt: skip
        super().__init__(params, defaults)

    @staticmethod
    def rule(group: dict) -> FoamRule:
        """The folding rule of a param group."""
        b1, b2 = group["betas"]
        return FoamRule(int(group["level"]), group["scale"], group["res_scale"], b1, b2)

    def _init_compressed(self, p: Tensor, state: dict, group: dict) -> None:
        shape = self.rule(group).state_shape(tuple(p.shape))
        state["exp_avg"] = p.new_zeros(shape)
        state["exp_avg_sq"] = p.new_zeros(shape)

    def _compressed_step(self, p: Tensor, state: dict, group: dict, step_size: float, eps: float) -> None:
        rule, grad = self.rule(group), p.grad
        shape = (*rule.state_shape(tuple(grad.shape)), 1 << rule.level)
        direction, state["exp_avg"], state["exp_avg_sq"] = rule.direction(
            grad, state["exp_avg"], state["exp_avg_sq"], eps, self.workspace(shape, grad, 2)
        )
        direction.apply_(p, step_size)

    def _fused_steps(self, params: list[Tensor], step_sizes: list[float], eps: list[float], group: dict) -> None:
        rule, states = self.rule(group), [self.state[p] for p in params]
        foam_steps_(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                    [s["exp_avg_sq"] for s in states], step_sizes, eps, rule.beta1, rule.beta2, rule.res_scale,
                    rule.scale, rule.level)  # fmt: skip


@dataclass(frozen=True)
class FunctionalFOAM(FunctionalCompressedAdam):
    """FOAM in the engine's functional, client-stacked form (same rule as :class:`FOAM`, tested equal)."""

    level: int = 2
    scale: float = 0.25
    res_scale: float = 1.0

    @property
    def rule(self) -> FoamRule:
        return FoamRule(self.level, self.scale, self.res_scale, *self.betas)

    def _compressed_state(self, name: str, value: Tensor) -> Tree:
        shape = self.rule.state_shape(tuple(value.shape))
        return {f"m.{name}": value.new_zeros(shape), f"v.{name}": value.new_zeros(shape)}

    def _compressed_update(self, name: str, g: Tensor, state: Tree, eps: Tensor) -> tuple[Direction, Tree]:
        u, m, v = self.rule.direction(g, state[f"m.{name}"], state[f"v.{name}"], eps)
        return u, {f"m.{name}": m, f"v.{name}": v}


def foam(
    level: Annotated[int, option("folding level l: moments at 1/2^l of the columns", ge=0, le=16)] = 2,
    scale: Annotated[float, option("update scale alpha", gt=0)] = 0.25,
    res_scale: Annotated[float, option("residual scale s", ge=0)] = 1.0,
    betas: Betas = (0.9, 0.999),
    eps: Eps = 1e-8,
    weight_decay: WeightDecay = 0.0,
    eps_mode: EpsMode = "torch",
    compress_params: CompressParams = "body",
    state_bits: StateBits = 32,
    *,
    model: nn.Module | None = None,
    compress: frozenset[str] | None = None,
) -> FunctionalFOAM:
    """FOAM (blocked state folding; zqOuO/FOAM): Adam moments of folded gradients, residual re-added."""
    return FunctionalFOAM(
        betas=tuple(betas), eps=eps, weight_decay=weight_decay, eps_mode=eps_mode, state_bits=state_bits,
        compress=compressed_names(model, compress_params, compress), level=level, scale=scale, res_scale=res_scale,
    )  # fmt: skip


__all__ = ["FOAM", "FunctionalFOAM", "foam"]
