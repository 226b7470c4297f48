"""GWT: Adam on the coarse band of a gradient wavelet transform (rule from the authors' code, zqOuO/GWT;
ALGORITHMS.md "GWT").

For a matrix with last dimension ``n``: ``[A_L, D_L, ..., D_1] = haar_dwt(g, L)``; Adam moments on ``A_L``
only, ``den = sqrt(v) + eps``, ``N = m / den``; a norm-growth limiter from the second step on,
``lim = max(||N||_F / prev, gamma) / gamma``, ``N <- N / lim``, ``prev <- ||N||_F``; each detail band,
coarsest first, is divided by ``den * lim`` (``den`` upsampled by repetition from band to band);
``w <- w - lr sqrt(1 - b2^t) / (1 - b1^t) alpha haar_idwt([N, D_L, ..., D_1])``, then decoupled weight
decay. State on a transformed matrix is ``1 / 2^L`` of Adam's (plus one scalar).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from torch import Tensor, nn

from fedsim.core.components import option
from fedsim.core.pytree import Tree

from .compressed import CompressedAdam, FunctionalCompressedAdam
from .fused import gwt_steps_
from .kernels import Direction, GwtRule
from .options import Betas, CompressParams, Eps, EpsMode, StateBits, WeightDecay, compressed_names

WAVELETS = ("haar",)


def _check_wavelet(wavelet: str) -> None:
    if wavelet not in WAVELETS:
        raise ValueError(f"unknown wavelet {wavelet!r}; available: {', '.join(WAVELETS)}")


class GWT(CompressedAdam):
    """GWT as a ``torch.optim.Optimizer``: every parameter with ``ndim >= 2`` is transformed unless its param
    group says ``wave=False``; the others get Adam(W) inside the same optimizer. Only the Haar wavelet is
    built in (the authors' default). ``fused=True`` runs the transformed step ``torch.compile``d
    (:mod:`fedsim.optim.fused`)."""

    flag = "wave"

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        level: int = 2,
        scale: float = 0.25,
        wavelet: str = "haar",
        limiter: float = 1.01,
        eps_mode: str = "torch",
        fused: bool = False,
        state_bits: int = 32,
    ) -> None:
        _check_wavelet(wavelet)
        if limiter <= 0:
            raise ValueError(f"limiter must be positive, got {limiter!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, level=level, scale=scale,
                        wavelet=wavelet, limiter=limiter, eps_mode=eps_mode, fused=fused,
                        state_bits=state_bits)  # fmt: skip
        super().__init__(params, defaults)

    @staticmethod
    def rule(group: dict) -> GwtRule:
        """The wavelet rule of a param group."""
        _check_wavelet(group["wavelet"])
        b1, b2 = group["betas"]
        return GwtRule(int(group["level"]), group["scale"], group["limiter"], b1, b2)

    def _init_compressed(self, p: Tensor, state: dict, group: dict) -> None:
        shape = self.rule(group).state_shape(tuple(p.shape))
        state["exp_avg"] = p.new_zeros(shape)
        state["exp_avg_sq"] = p.new_zeros(shape)
        state["prev_norm"] = torch.zeros((), dtype=torch.float32, device=p.device)

    def _compressed_step(self, p: Tensor, state: dict, group: dict, step_size: float, eps: float) -> None:
        rule, grad = self.rule(group), p.grad
        direction, state["exp_avg"], state["exp_avg_sq"], state["prev_norm"] = rule.direction(
            grad, state["exp_avg"], state["exp_avg_sq"], state["prev_norm"], eps, batch_dims=0
        )
        direction.apply_(p, step_size)

    def _fused_steps(self, params: list[Tensor], step_sizes: list[float], eps: list[float], group: dict) -> None:
        rule, states = self.rule(group), [self.state[p] for p in params]
        gwt_steps_(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                   [s["exp_avg_sq"] for s in states], [s["prev_norm"] for s in states], step_sizes, eps,
                   rule.beta1, rule.beta2, rule.scale, rule.limiter, rule.level)  # fmt: skip


@dataclass(frozen=True)
class FunctionalGWT(FunctionalCompressedAdam):
    """GWT in the engine's functional, client-stacked form (same rule as :class:`GWT`, tested equal); the
    limiter's norm is per client."""

    eps: float = 1e-6
    level: int = 2
    scale: float = 0.25
    wavelet: str = "haar"
    limiter: float = 1.01

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_wavelet(self.wavelet)

    @property
    def rule(self) -> GwtRule:
        return GwtRule(self.level, self.scale, self.limiter, *self.betas)

    def _compressed_state(self, name: str, value: Tensor) -> Tree:
        shape = self.rule.state_shape(tuple(value.shape))
        prev = torch.zeros(value.shape[0], dtype=torch.float32, device=value.device)
        return {f"m.{name}": value.new_zeros(shape), f"v.{name}": value.new_zeros(shape), f"prev.{name}": prev}

    def _compressed_update(self, name: str, g: Tensor, state: Tree, eps: Tensor) -> tuple[Direction, Tree]:
        prev = state[f"prev.{name}"]
        u, m, v, prev = self.rule.direction(g, state[f"m.{name}"], state[f"v.{name}"], prev, eps, batch_dims=1)
        return u, {f"m.{name}": m, f"v.{name}": v, f"prev.{name}": prev}


def gwt(
    level: Annotated[int, option("Haar levels L: moments at 1/2^L of the columns", ge=0, le=16)] = 2,
    scale: Annotated[float, option("update scale alpha", gt=0)] = 0.25,
    limiter: Annotated[float, option("norm-growth limiter gamma", gt=0)] = 1.01,
    wavelet: Annotated[Literal["haar"], option("wavelet family")] = "haar",
    betas: Betas = (0.9, 0.999),
    eps: Eps = 1e-6,
    weight_decay: WeightDecay = 0.0,
    eps_mode: EpsMode = "torch",
    compress_params: CompressParams = "body",
    state_bits: StateBits = 32,
    *,
    model: nn.Module | None = None,
    compress: frozenset[str] | None = None,
) -> FunctionalGWT:
    """GWT (gradient wavelet transform + Adam; zqOuO/GWT): Adam moments on the coarsest Haar coefficients."""
    return FunctionalGWT(
        betas=tuple(betas), eps=eps, weight_decay=weight_decay, eps_mode=eps_mode, state_bits=state_bits,
        compress=compressed_names(model, compress_params, compress), level=level, scale=scale, limiter=limiter,
        wavelet=wavelet,
    )  # fmt: skip
