"""Local optimizers in functional, vmappable form (optax-style), acting on stacked parameter trees.

An optimizer has ``init(params) -> state`` and ``update(grads, state, params, lr) -> (updates, state)``;
the caller applies ``params + updates``. All tensors carry the client axis ``[C, ...]`` first and every
operation is elementwise per client, so one call updates a whole chunk of clients. The step counter is a
per-client tensor ``[C]`` so clients with fewer local steps (ragged epochs) keep exact bias corrections.
The rules follow ``torch.optim.SGD`` / ``torch.optim.Adam`` / ``torch.optim.AdamW`` exactly (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
from torch import Tensor

from fedsim.core import components
from fedsim.core.components import option
from fedsim.core.errors import FedsimError
from fedsim.core.pytree import Tree

from .options import Betas, Eps, StateBits, WeightDecay
from .quantized_state import dequantize_state, quantize_state
from .stacked import step_counter


def _per_client(t: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-client ``[C]`` tensor to broadcast against ``like`` ``[C, ...]``."""
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


@dataclass(frozen=True)
class SGD:
    """SGD with optional (Nesterov) momentum and L2 weight decay, as ``torch.optim.SGD`` (dampening 0):

    ``d = g + wd * w``;  ``b <- mu * b + d`` (``b_1 = d``);  ``d <- d + mu * b`` (Nesterov) or ``d <- b``;
    ``w <- w - lr * d``.
    """

    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    def init(self, params: Tree) -> Tree:
        if self.momentum == 0.0:
            return {}
        return {f"buf.{k}": torch.zeros_like(v) for k, v in params.items()}

    def update(self, grads: Tree, state: Tree, params: Tree, lr: float) -> tuple[Tree, Tree]:
        updates, new_state = {}, {}
        for k, g in grads.items():
            d = g + self.weight_decay * params[k] if self.weight_decay else g
            if self.momentum:
                buf = self.momentum * state[f"buf.{k}"] + d
                new_state[f"buf.{k}"] = buf
                d = d + self.momentum * buf if self.nesterov else buf
            updates[k] = -lr * d
        return updates, new_state

    def step_(self, grads: Tree, state: Tree, params: Tree, lr: float) -> Tree:
        """In-place form of :meth:`update` + apply, for callers that own ``grads``, ``state`` and
        ``params`` (the vectorized trainer): no new full-size allocations. Returns the state."""
        for k, g in grads.items():
            if self.weight_decay:
                g.add_(params[k], alpha=self.weight_decay)
            if self.momentum:
                buf = state[f"buf.{k}"].mul_(self.momentum).add_(g)
                g = g.add_(buf, alpha=self.momentum) if self.nesterov else buf
            params[k].add_(g, alpha=-lr)
        return state


@dataclass(frozen=True)
class Adam:
    """Adam (Kingma & Ba, 2015) as ``torch.optim.Adam``; with ``decoupled=True`` it is AdamW
    (Loshchilov & Hutter, 2019):

    ``g <- g + wd * w`` (coupled only);  ``m <- b1 m + (1-b1) g``;  ``v <- b2 v + (1-b2) g^2``;
    ``w <- w (1 - lr wd)`` (decoupled only);  ``w <- w - lr * (m / (1-b1^t)) / (sqrt(v) / sqrt(1-b2^t) + eps)``.
    """

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = False
    state_bits: int = 32
    """8: the moments are kept blockwise-quantized (:mod:`fedsim.optim.quantized_state`), dequantized for each
    step and quantized again after it; the rule is otherwise the same."""

    def init(self, params: Tree) -> Tree:
        state: Tree = {"step": step_counter(params)}
        for k, v in params.items():
            state[f"m.{k}"] = torch.zeros_like(v)
            state[f"v.{k}"] = torch.zeros_like(v)
        return quantize_state(state) if self.state_bits == 8 else state

    def _moments(self, state: Tree, params: Tree) -> Tree:
        """The state with float moments (dequantized when kept in 8 bits)."""
        return dequantize_state(state, next(iter(params.values())).dtype) if self.state_bits == 8 else state

    def _stored(self, state: Tree, params: Tree) -> Tree:
        return quantize_state(state) if self.state_bits == 8 else state

    def update(self, grads: Tree, state: Tree, params: Tree, lr: float) -> tuple[Tree, Tree]:
        b1, b2 = self.betas
        state = self._moments(state, params)
        step = state["step"] + 1
        new_state: Tree = {"step": step}
        updates = {}
        for k, g in grads.items():
            w = params[k]
            if self.weight_decay and not self.decoupled:
                g = g + self.weight_decay * w
            m = b1 * state[f"m.{k}"] + (1 - b1) * g
            v = b2 * state[f"v.{k}"] + (1 - b2) * g * g
            new_state[f"m.{k}"], new_state[f"v.{k}"] = m, v
            bc1 = _per_client(1 - b1**step, w)
            bc2 = _per_client(torch.sqrt(1 - b2**step), w)
            u = -lr * (m / bc1) / (v.sqrt() / bc2 + self.eps)
            if self.weight_decay and self.decoupled:
                u = u - lr * self.weight_decay * w
            updates[k] = u
        return updates, self._stored(new_state, params)

    def step_(self, grads: Tree, state: Tree, params: Tree, lr: float) -> Tree:
        """In-place form of :meth:`update` + apply (see :meth:`SGD.step_`). Returns the state."""
        b1, b2 = self.betas
        quantized = self.state_bits == 8
        if quantized:
            state = self._moments(state, params)
        state["step"] = state["step"] + 1
        step = state["step"]
        for k, g in grads.items():
            w = params[k]
            if self.weight_decay and not self.decoupled:
                g.add_(w, alpha=self.weight_decay)
            m = state[f"m.{k}"].mul_(b1).add_(g, alpha=1 - b1)
            v = state[f"v.{k}"].mul_(b2).addcmul_(g, g, value=1 - b2)
            if self.weight_decay and self.decoupled:
                w.mul_(1 - lr * self.weight_decay)
            denom = v.sqrt().div_(_per_client(torch.sqrt(1 - b2**step), w)).add_(self.eps)
            w.sub_(g.copy_(m).mul_(_per_client(lr / (1 - b1**step), w)).div_(denom))
        return self._stored(state, params) if quantized else state


def sgd(
    momentum: Annotated[float, option("momentum coefficient", ge=0, lt=1)] = 0.0,
    nesterov: Annotated[bool, option("Nesterov momentum (needs momentum > 0)")] = False,
    weight_decay: Annotated[float, option("L2 weight decay added to the gradient", ge=0)] = 0.0,
) -> SGD:
    """SGD with optional (Nesterov) momentum and weight decay, as ``torch.optim.SGD``."""
    _check_sgd({"nesterov": nesterov, "momentum": momentum})
    return SGD(momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)


def _check_sgd(options: dict) -> None:
    if options["nesterov"] and options["momentum"] == 0:
        raise FedsimError("nesterov needs momentum > 0")


sgd.check_options = _check_sgd  # type: ignore[attr-defined]


def adam(
    betas: Betas = (0.9, 0.999), eps: Eps = 1e-8, weight_decay: WeightDecay = 0.0, state_bits: StateBits = 32
) -> Adam:
    """Adam, as ``torch.optim.Adam`` (weight decay added to the gradient)."""
    return Adam(betas=tuple(betas), eps=eps, weight_decay=weight_decay, state_bits=state_bits)


def adamw(
    betas: Betas = (0.9, 0.999), eps: Eps = 1e-8, weight_decay: WeightDecay = 0.0, state_bits: StateBits = 32
) -> Adam:
    """AdamW, as ``torch.optim.AdamW`` (decoupled weight decay)."""
    return Adam(betas=tuple(betas), eps=eps, weight_decay=weight_decay, decoupled=True, state_bits=state_bits)


def make_optimizer(spec: object, *, model=None, compress: frozenset[str] | None = None, **options: object):
    """Build a functional local optimizer from a name or ``{name: ..., option: ...}`` spec (``sgd``,
    ``adam``, ``adamw``, ``foam``, ``gwt``, ``mols`` (MoLS-style, our reconstruction), ``sgd-sai``, ``lion``,
    a registered or plugin optimizer, or ``package.module:Name``) and its options. ``compress`` (FOAM/GWT: the
    parameter names to transform) and ``model`` (to choose them by ``compress_params``) go to optimizers that
    take them. An option, ``compress`` or ``model`` the optimizer would not use is a :class:`FedsimError`."""
    name, given = components.split_spec("optimizer", spec)
    component = components.get("optimizer", name)
    takes = {p.name for p in component.parameters}
    for label, value in (("compress", compress), ("model", model)):
        if value is not None and label not in takes:
            raise FedsimError(f"optimizer '{name}' does not use {label}")
    return component.build({**given, **options}, model=model, compress=compress)
