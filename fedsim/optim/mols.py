"""MoLS-style module-wise learning-rate scaling from gradient signal-to-noise ratios: **our reconstruction**.

The MoLS paper's abstract says it estimates module-level gradient SNRs to scale Adam's updates per module;
its code is not public, so everything below is inferred (ALGORITHMS.md "MoLS"). A module is one parameter
tensor. Per tensor ``p`` an estimate ``SNR_p`` gives the scale ``s_p = SNR_p / mean_q SNR_q`` (mean over all
tensors of the optimizer; ``s_p = 1`` before the first estimate or when every estimate is 0), and the update
is AdamW's times ``s_p``:

    ``w <- w (1 - lr wd) - lr s_p (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)``.

Estimators (``estimator``):

- ``"sai"``: SGD-SaI's ``||g_p||_2 / (std(g_p) + snr_eps)`` over the tensor's entries of the current gradient,
  at the first step and then every ``refresh`` steps (``refresh = 0``: once, "at init");
- ``"ema"``: from Adam's bias-corrected moments, ``||m_hat||_2 / (||sqrt(max(v_hat - m_hat^2, 0))||_2 +
  snr_eps)``, every ``refresh`` steps (``refresh`` must be positive; scale 1 before the first);
- ``"microbatch"`` (``torch.optim`` form only): the same ratio with the mean and standard deviation taken
  across the micro-batch gradients recorded by :meth:`MoLS.accumulate_microbatch` since the last step, at the
  first step and every ``refresh`` steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from torch import Tensor

from fedsim.core.components import option
from fedsim.core.pytree import Tree

from .kernels import gradient_snr, reduce_dims
from .options import Betas, Eps, WeightDecay
from .stacked import AppliesUpdate, evaluate_closure, step_counter

ESTIMATORS = ("sai", "ema", "microbatch")
FUNCTIONAL_ESTIMATORS = ("sai", "ema")


def _check(estimator: str, refresh: int, allowed: tuple[str, ...]) -> None:
    if estimator not in allowed:
        raise ValueError(f"unknown MoLS estimator {estimator!r}; choose one of {', '.join(allowed)}")
    if int(refresh) != refresh or refresh < 0:
        raise ValueError(f"refresh must be a non-negative integer, got {refresh!r}")
    if estimator == "ema" and refresh == 0:
        raise ValueError("the ema estimator needs refresh > 0 (Adam's moments carry no noise estimate at step 1)")


def is_due(step: Tensor | int, estimator: str, refresh: int) -> Tensor | bool:
    """Whether the SNR estimate is refreshed at (1-based) ``step``."""
    if estimator == "ema":
        return step % refresh == 0
    first = step == 1
    return first | ((step - 1) % refresh == 0) if refresh else first


def ratio_snr(mean: Tensor, std: Tensor, batch_dims: int, eps: float) -> Tensor:
    """``||mean||_2 / (||std||_2 + eps)`` per parameter (shape ``mean.shape[:batch_dims]``)."""
    dims = reduce_dims(mean, batch_dims)
    norm = torch.linalg.vector_norm
    return norm(mean, dim=dims) / (norm(std, dim=dims) + eps)


def ema_snr(m: Tensor, v: Tensor, bc1: Tensor | float, bc2: Tensor | float, batch_dims: int, eps: float) -> Tensor:
    """The ``ema`` estimator from Adam's moments with bias corrections ``bc1 = 1 - b1^t``, ``bc2 = 1 - b2^t``."""
    m_hat, v_hat = m / bc1, v / bc2
    return ratio_snr(m_hat, (v_hat - m_hat * m_hat).clamp_min_(0).sqrt_(), batch_dims, eps)


def normalized_scales(snrs: Tensor) -> Tensor:
    """``s_p = SNR_p / mean_q SNR_q`` along dim 0 (tensors); 1 where the mean is 0."""
    mean = snrs.mean(dim=0, keepdim=True)
    return torch.where(mean > 0, snrs / torch.where(mean > 0, mean, torch.ones_like(mean)), torch.ones_like(snrs))


class MoLS(torch.optim.Optimizer):
    """MoLS-style (reconstruction) AdamW with per-tensor SNR scales, as a ``torch.optim.Optimizer``."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        estimator: str = "sai",
        refresh: int = 0,
        snr_eps: float = 1e-8,
    ) -> None:
        _check(estimator, refresh, ESTIMATORS)
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid hyperparameters: lr={lr}, betas={betas}, eps={eps}, wd={weight_decay}")
        self.estimator, self.refresh, self.snr_eps = estimator, int(refresh), snr_eps
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _params(self) -> list[tuple[Tensor, dict]]:
        return [(p, g) for g in self.param_groups for p in g["params"] if p.grad is not None]

    @torch.no_grad()
    def accumulate_microbatch(self) -> None:
        """Record the gradient added since the previous call (or the last step) as one micro-batch sample:
        call it after each micro-batch's ``backward()`` (gradients accumulating in ``.grad``)."""
        for p, _ in self._params():
            state = self.state[p]
            last = state.get("mb_last")
            g = p.grad - last if last is not None else p.grad.clone()
            if "mb_sum" not in state:
                state["mb_sum"], state["mb_sumsq"], state["mb_count"] = torch.zeros_like(p), torch.zeros_like(p), 0
            state["mb_sum"].add_(g)
            state["mb_sumsq"].addcmul_(g, g)
            state["mb_count"] += 1
            state["mb_last"] = p.grad.clone()

    def _estimate(self, p: Tensor, state: dict, group: dict) -> Tensor:
        b1, b2 = group["betas"]
        t = state["step"]
        if self.estimator == "sai":
            return gradient_snr(p.grad, 0, self.snr_eps).reshape(())
        if self.estimator == "ema":
            return ema_snr(state["exp_avg"], state["exp_avg_sq"], 1 - b1**t, 1 - b2**t, 0, self.snr_eps)
        n = state.get("mb_count", 0)
        if n < 2:
            raise RuntimeError("MoLS(estimator='microbatch') needs accumulate_microbatch() after at least two "
                               "micro-batch backward passes before a refreshing step")  # fmt: skip
        mean = state["mb_sum"] / n
        var = (state["mb_sumsq"] - n * mean * mean).clamp_min_(0) / (n - 1)
        return ratio_snr(mean, var.sqrt_(), 0, self.snr_eps)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 (torch.optim.Optimizer.step)
        loss = evaluate_closure(closure)
        live = self._params()
        for p, _ in live:
            state = self.state[p]
            if "step" not in state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["snr"] = torch.ones((), dtype=torch.float32, device=p.device)
            state["step"] += 1
        for group in self.param_groups:  # Adam's moments, one foreach pass per group
            b1, b2 = group["betas"]
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                grads = [p.grad for p in params]
                torch._foreach_lerp_([self.state[p]["exp_avg"] for p in params], grads, 1 - b1)
                squares = [self.state[p]["exp_avg_sq"] for p in params]
                torch._foreach_mul_(squares, b2)
                torch._foreach_addcmul_(squares, grads, grads, value=1 - b2)
        for p, group in live:
            state = self.state[p]
            if is_due(state["step"], self.estimator, self.refresh):
                state["snr"] = self._estimate(p, state, group).to(torch.float32)
            for key in ("mb_sum", "mb_sumsq", "mb_count", "mb_last"):
                state.pop(key, None)
        if not live:
            return loss
        scales = normalized_scales(torch.stack([self.state[p]["snr"] for p, _ in live])).tolist()
        scale_of = {id(p): scale for (p, _), scale in zip(live, scales, strict=True)}
        for group in self.param_groups:
            b1, b2 = group["betas"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lr, states = group["lr"], [self.state[p] for p in params]
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
            denom = torch._foreach_sqrt([s["exp_avg_sq"] for s in states])
            torch._foreach_div_(denom, [math.sqrt(1 - b2 ** s["step"]) for s in states])
            torch._foreach_add_(denom, group["eps"])
            factors = [scale_of[id(p)] * (-lr / (1 - b1 ** s["step"])) for p, s in zip(params, states, strict=True)]
            torch._foreach_addcdiv_(params, [s["exp_avg"] for s in states], denom, factors)
        return loss


@dataclass(frozen=True)
class FunctionalMoLS(AppliesUpdate):
    """MoLS-style (reconstruction) in the engine's functional, client-stacked form: estimators ``sai`` and
    ``ema`` (per client; tested equal to :class:`MoLS`)."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    estimator: str = "sai"
    refresh: int = 0
    snr_eps: float = 1e-8

    def __post_init__(self) -> None:
        _check(self.estimator, self.refresh, FUNCTIONAL_ESTIMATORS)

    def init(self, params: Tree) -> Tree:
        state: Tree = {"step": step_counter(params)}
        for name, value in params.items():
            state[f"m.{name}"] = torch.zeros_like(value)
            state[f"v.{name}"] = torch.zeros_like(value)
            state[f"snr.{name}"] = torch.ones(value.shape[0], dtype=torch.float32, device=value.device)
        return state

    def update(self, grads: Tree, state: Tree, params: Tree, lr: float) -> tuple[Tree, Tree]:
        b1, b2 = self.betas
        step = state["step"] + 1
        bc1, bc2 = 1 - b1**step, 1 - b2**step
        due = is_due(step, self.estimator, self.refresh)
        new_state: Tree = {"step": step}
        for name, g in grads.items():
            m = torch.lerp(state[f"m.{name}"], g, 1 - b1)
            v = torch.addcmul(state[f"v.{name}"] * b2, g, g, value=1 - b2)
            new_state[f"m.{name}"], new_state[f"v.{name}"] = m, v
            snr = state[f"snr.{name}"]
            if bool(due.any()):
                shape = (-1, *([1] * (g.dim() - 1)))
                if self.estimator == "sai":
                    fresh = gradient_snr(g, 1, self.snr_eps).reshape(-1)
                else:
                    fresh = ema_snr(m, v, bc1.reshape(shape).to(m.dtype), bc2.reshape(shape).to(m.dtype), 1,
                                    self.snr_eps)  # fmt: skip
                snr = torch.where(due, fresh.to(torch.float32), snr)
            new_state[f"snr.{name}"] = snr
        names = list(grads)
        scales = normalized_scales(torch.stack([new_state[f"snr.{n}"] for n in names]))
        updates = {}
        for name, scale in zip(names, scales, strict=True):
            w, m, v = params[name], new_state[f"m.{name}"], new_state[f"v.{name}"]
            shape = (-1, *([1] * (w.dim() - 1)))
            denom = (v / bc2.reshape(shape).to(w.dtype)).sqrt().add_(self.eps)
            u = m * (scale * (-lr / bc1)).reshape(shape).to(w.dtype) / denom
            updates[name] = u - lr * self.weight_decay * w if self.weight_decay else u
        return updates, new_state


def mols(
    estimator: Annotated[Literal["sai", "ema"], option("module SNR estimator: once at the first step, or EMA")] = "sai",
    refresh: Annotated[int, option("steps between SNR estimates (0: once; ema needs > 0)", ge=0)] = 0,
    betas: Betas = (0.9, 0.999),
    eps: Eps = 1e-8,
    weight_decay: WeightDecay = 0.0,
) -> FunctionalMoLS:
    """MoLS-style (reconstruction): Adam with module-wise learning-rate scaling from gradient SNR."""
    return FunctionalMoLS(betas=tuple(betas), eps=eps, weight_decay=weight_decay, estimator=estimator, refresh=refresh)


mols.check_options = lambda options: _check(options["estimator"], options["refresh"], FUNCTIONAL_ESTIMATORS)  # type: ignore[attr-defined]
