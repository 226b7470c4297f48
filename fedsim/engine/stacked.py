"""A client-stacked forward pass written directly in batched ops, for sequential dense models.

The trainer's general forward is ``vmap(functional_call(model))`` over the client axis. For an
``nn.Sequential`` of ``Flatten``, ``Linear`` and elementwise activations, vmap lowers every layer to the same
batched ops this module calls directly: ``Linear`` to ``matmul(h, W^T) + b`` with ``W[C, out, in]`` and
``b[C, 1, out]``, an activation to itself. Calling them without vmap and without re-parametrizing the module
removes about a fifth of a step's time on the benchmark MLP (3.35 -> 2.68 ms per gradient call, 100 clients)
and gives bitwise the same losses and gradients (tested against the vmap path). Any other model keeps the
vmap path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from fedsim.core.pytree import Tree

ELEMENTWISE = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Identity)
"""Parameter-free layers that act on each value alone: the same on ``[C, B, ...]`` as per client."""


def stacked_forward(model: nn.Module) -> Callable[[Tree, Tensor], Tensor] | None:
    """``forward(params, x)`` for stacked ``params`` (``{name: [C, ...]}``) and ``x[C, B, ...]``, or None
    when ``model`` is not a plain ``nn.Sequential`` of a ``Flatten`` (default dims), then ``Linear`` and
    :data:`ELEMENTWISE` layers (the ``Flatten`` first, so every ``Linear`` sees ``[C, B, features]``)."""
    steps = _steps(model)
    if steps is None:
        return None

    def forward(params: Tree, x: Tensor) -> Tensor:
        h = x
        for step in steps:
            h = step(params, h)
        return h

    return forward


def stacked_linear_layers(model: nn.Module) -> list[tuple[str, bool]] | None:
    """The ``(name, has_bias)`` of every ``Linear`` of a model :func:`stacked_forward` runs, in order (None for
    another model): the layers whose per-sample gradients are outer products (ghost clipping)."""
    if _steps(model) is None:
        return None
    return [(name, layer.bias is not None) for name, layer in model.named_children() if type(layer) is nn.Linear]


def traced_forward(model: nn.Module) -> Callable[[Tree, Tensor], tuple[Tensor, list[Tensor], list[Tensor]]]:
    """Like :func:`stacked_forward`, also returning every ``Linear``'s input ``a_l[C, B, in]`` and output
    ``z_l[C, B, out]`` (for a model :func:`stacked_linear_layers` accepts)."""
    linear = {name for name, _ in stacked_linear_layers(model) or ()}
    steps = _steps(model)
    names = [name for name, _ in model.named_children()]

    def forward(params: Tree, x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        h, inputs, outputs = x, [], []
        for name, step in zip(names, steps, strict=True):
            if name in linear:
                inputs.append(h)
                h = step(params, h)
                outputs.append(h)
            else:
                h = step(params, h)
        return h, inputs, outputs

    return forward


def _steps(model: nn.Module) -> list[Callable[[Tree, Tensor], Tensor]] | None:
    if type(model) is not nn.Sequential:
        return None
    steps: list[Callable[[Tree, Tensor], Tensor]] = []
    flat = False
    for name, layer in model.named_children():
        if type(layer) is nn.Linear and flat:
            steps.append(_linear(name, layer.bias is not None))
        elif type(layer) is nn.Flatten and layer.start_dim == 1 and layer.end_dim == -1:
            steps.append(lambda params, h: h.reshape(h.shape[0], h.shape[1], -1))
            flat = True
        elif type(layer) in ELEMENTWISE:
            steps.append(lambda params, h, layer=layer: layer(h))
        else:
            return None
    return steps


def _linear(name: str, bias: bool) -> Callable[[Tree, Tensor], Tensor]:
    weight_key, bias_key = f"{name}.weight", f"{name}.bias"

    def linear(params: Tree, h: Tensor) -> Tensor:
        out = torch.matmul(h, params[weight_key].transpose(1, 2))
        return out + params[bias_key].unsqueeze(1) if bias else out

    return linear
