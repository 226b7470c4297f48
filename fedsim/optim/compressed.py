"""Shared machinery of the compressed-state Adam optimizers (FOAM, GWT): a ``torch.optim.Optimizer`` base
class and a functional, client-stacked base.

A parameter is *compressed* when its group's flag (``fold`` for FOAM, ``wave`` for GWT) is true and it has
at least two dimensions; it then gets the subclass's rule (a transform of the gradient with Adam moments on
the reduced representation). Every other parameter gets AdamW in the form of the authors' code (GaLore's
AdamW): ``m <- b1 m + (1 - b1) g``, ``v <- b2 v + (1 - b2) g^2``,
``w <- w - lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps')``. Both kinds then take decoupled weight
decay on the updated weight, ``w <- w - lr * wd * w``.

Where ``eps`` enters (``eps_mode``): ``"torch"`` (default) uses ``eps' = eps sqrt(1 - b2^t)``, which is
``torch.optim.Adam``'s placement (``eps`` added to the bias-corrected ``sqrt(v_hat)``), so level 0 and
scale 1 reproduce ``torch.optim.Adam`` to rounding; ``"authors"`` uses ``eps' = eps`` as the authors' code
(GaLore's AdamW) does. The two differ only for gradient entries near ``eps``, mostly in the first steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from fedsim.core.pytree import Tree

from .kernels import Direction, adam_moments
from .quantized_state import check_state_bits, dequantize_state, expand_, quantize_state, shrink_
from .stacked import AppliesUpdate, evaluate_closure, step_counter

EPS_MODES = ("torch", "authors")


def bias_corrected_step(lr: float, beta1: float, beta2: float, step: int) -> float:
    """``lr * sqrt(1 - b2^t) / (1 - b1^t)``."""
    return lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)


def check_eps_mode(eps_mode: str) -> None:
    """Refuse an unknown ``eps_mode``."""
    if eps_mode not in EPS_MODES:
        raise ValueError(f"unknown eps_mode {eps_mode!r}; choose one of {', '.join(EPS_MODES)}")


class CompressedAdam(torch.optim.Optimizer):
    """Base class: subclasses set ``flag`` and implement :meth:`_init_compressed` and :meth:`_compressed_step`
    (which updates the parameter in place by ``-step_size`` times its direction)."""

    flag = "compress"

    def __init__(self, params: Iterable, defaults: dict) -> None:
        lr, eps, wd, (b1, b2) = defaults["lr"], defaults["eps"], defaults["weight_decay"], defaults["betas"]
        if lr < 0 or eps < 0 or wd < 0 or not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"invalid hyperparameters: lr={lr}, betas={defaults['betas']}, eps={eps}, wd={wd}")
        check_eps_mode(defaults["eps_mode"])
        defaults.setdefault("state_bits", 32)
        check_state_bits(defaults["state_bits"])
        if int(defaults["level"]) != defaults["level"] or defaults["level"] < 0:
            raise ValueError(f"level must be a non-negative integer, got {defaults['level']!r}")
        defaults.setdefault(self.flag, True)
        super().__init__(params, defaults)

    def workspace(self, shape: tuple[int, ...], like: Tensor, count: int) -> tuple[Tensor, ...]:
        """``count`` scratch tensors of ``shape`` (dtype and device of ``like``), kept between steps and
        shared by parameters of one shape: fresh full-size allocations cost page faults on every step.
        Not part of the state (nothing to save)."""
        key = (shape, like.dtype, like.device)
        cache = self.__dict__.setdefault("_workspaces", {})
        if key not in cache:
            cache[key] = tuple(torch.empty(shape, dtype=like.dtype, device=like.device) for _ in range(count))
        return cache[key]

    def is_compressed(self, p: Tensor, group: dict) -> bool:
        """Whether ``p`` gets the compressed rule: the group's flag is on and ``p.dim() >= 2``."""
        return bool(group[self.flag]) and p.dim() >= 2

    def _init_compressed(self, p: Tensor, state: dict, group: dict) -> None:
        raise NotImplementedError

    def _compressed_step(self, p: Tensor, state: dict, group: dict, step_size: float, eps: float) -> None:
        raise NotImplementedError

    def _fusable(self, p: Tensor, group: dict) -> bool:
        """Whether the compressed ``p`` takes the compiled path (``fused=True`` and a divisible width)."""
        return bool(group.get("fused")) and p.shape[-1] % (1 << int(group["level"])) == 0

    def _fused_steps(self, params: list[Tensor], step_sizes: list[float], eps: list[float], group: dict) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 (torch.optim.Optimizer.step)
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            b1, b2 = group["betas"]
            plain: tuple[list[Tensor], ...] = ([], [], [], [])
            plain_steps: list[float] = []
            plain_eps: list[float] = []
            decayed: list[Tensor] = []
            fused: tuple[list[Tensor], list[float], list[float]] = ([], [], [])
            eight_bit = group["state_bits"] == 8
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                compressed = self.is_compressed(p, group)
                if not state:
                    state["step"] = 0
                    if compressed:
                        self._init_compressed(p, state, group)
                    else:
                        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if eight_bit:  # float32 moments for this step, 8 bits again after it
                    expand_(state)
                state["step"] += 1
                step_size = bias_corrected_step(group["lr"], b1, b2, state["step"])
                eps = group["eps"] * (math.sqrt(1 - b2 ** state["step"]) if group["eps_mode"] == "torch" else 1.0)
                if compressed and self._fusable(p, group):
                    for bucket, value in zip(fused, (p, step_size, eps), strict=True):
                        bucket.append(value)
                elif compressed:
                    self._compressed_step(p, state, group, step_size, eps)
                else:
                    for bucket, t in zip(plain, (p, p.grad, state["exp_avg"], state["exp_avg_sq"]), strict=True):
                        bucket.append(t)
                    plain_steps.append(-step_size)
                    plain_eps.append(eps)
                decayed.append(p)
            if fused[0]:
                self._fused_steps(*fused, group)
            if plain[0]:
                params, grads, exp_avgs, exp_avg_sqs = plain
                torch._foreach_lerp_(exp_avgs, grads, 1 - b1)
                torch._foreach_mul_(exp_avg_sqs, b2)
                torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - b2)
                denom = torch._foreach_sqrt(exp_avg_sqs)
                torch._foreach_add_(denom, plain_eps)
                torch._foreach_addcdiv_(params, exp_avgs, denom, plain_steps)
            if group["weight_decay"] and decayed:
                torch._foreach_mul_(decayed, 1 - group["lr"] * group["weight_decay"])
            if eight_bit:
                for p in decayed:
                    shrink_(self.state[p])
        return loss


def per_client(t: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-client ``[C]`` tensor to broadcast against ``like`` ``[C, ...]``."""
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


@dataclass(frozen=True)
class FunctionalCompressedAdam(AppliesUpdate):
    """Functional, client-stacked base of FOAM and GWT (``init`` / ``update`` / ``step_`` as
    :class:`fedsim.optim.Adam`). ``compress`` names the stacked parameters that get the compressed rule
    (``None``: every parameter with at least two dimensions per client); the rest get AdamW as above."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    compress: frozenset[str] | None = None
    eps_mode: str = "torch"
    state_bits: int = 32
    """8: every moment (the compressed rule's and AdamW's) is kept blockwise-quantized between steps
    (:mod:`fedsim.optim.quantized_state`)."""

    def __post_init__(self) -> None:
        check_eps_mode(self.eps_mode)

    def is_compressed(self, name: str, value: Tensor) -> bool:
        """Whether the stacked parameter ``name`` (shape ``[C, ...]``) gets the compressed rule."""
        return value.dim() >= 3 and (self.compress is None or name in self.compress)

    def _compressed_state(self, name: str, value: Tensor) -> Tree:
        raise NotImplementedError

    def _compressed_update(self, name: str, g: Tensor, state: Tree, eps: Tensor) -> tuple[Direction, Tree]:
        raise NotImplementedError

    def init(self, params: Tree) -> Tree:
        state: Tree = {"step": step_counter(params)}
        for name, value in params.items():
            if self.is_compressed(name, value):
                state.update(self._compressed_state(name, value))
            else:
                state[f"m.{name}"] = torch.zeros_like(value)
                state[f"v.{name}"] = torch.zeros_like(value)
        return quantize_state(state) if self.state_bits == 8 else state

    def update(self, grads: Tree, state: Tree, params: Tree, lr: float) -> tuple[Tree, Tree]:
        if self.state_bits == 8:
            state = dequantize_state(state, next(iter(params.values())).dtype)
        b1, b2 = self.betas
        step = state["step"] + 1
        step_size = lr * torch.sqrt(1 - b2**step) / (1 - b1**step)
        eps_per_client = self.eps * (torch.sqrt(1 - b2**step) if self.eps_mode == "torch" else torch.ones_like(step))
        new_state: Tree = {"step": step}
        updates = {}
        for name, g in grads.items():
            w = params[name]
            eps = per_client(eps_per_client, w)
            if self.is_compressed(name, w):
                compressed, sub = self._compressed_update(name, g, state, eps)
                direction = compressed.materialize()
                new_state.update(sub)
            else:
                m, v = adam_moments(g, state[f"m.{name}"], state[f"v.{name}"], b1, b2)
                new_state[f"m.{name}"], new_state[f"v.{name}"] = m, v
                direction = m / (v.sqrt() + eps)
            u = -per_client(step_size, w) * direction
            if self.weight_decay:
                u = u - lr * self.weight_decay * (w + u)
            updates[name] = u
        return updates, quantize_state(new_state) if self.state_bits == 8 else new_state
