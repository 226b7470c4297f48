"""Model registry: built-in vmappable models by name, user models by ``package.module:factory``, a
registered name or a ``fedsim.model`` entry point (component kind ``model``).

A factory is called as ``factory(input_shape, num_classes, **options)`` and returns an ``nn.Module`` whose
forward maps ``[B, *input_shape]`` to logits ``[B, num_classes]``; its keyword parameters after the first two
are its options (``model: {name: mlp, hidden: [200, 200]}``). Sequence models (:data:`SEQUENCE_MODELS`) take
windows of token indices ``[B, L]`` (float32 indices from a token dataset such as ``shakespeare``) and return
the logits of the next token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fedsim.core import components
from fedsim.core.errors import FedsimError

from .transformer import char_transformer
from .zoo import cnn, lenet5, logreg, mlp, resnet

ModelFactory = Callable[..., nn.Module]

MODELS: dict[str, ModelFactory] = {
    "logreg": logreg,
    "mlp": mlp,
    "lenet5": lenet5,
    "cnn": cnn,
    "resnet": resnet,
    "char_transformer": char_transformer,
}
for _name, _factory in MODELS.items():
    components.register("model", _name, _factory)
SEQUENCE_MODELS: tuple[str, ...] = ("char_transformer",)
"""Built-in models whose input is a window of token indices (they need a token dataset)."""


def register_model(name: str, factory: ModelFactory) -> None:
    """Add a model factory under ``name`` (same as ``fedsim.core.components.register("model", ...)``)."""
    MODELS[name] = factory
    components.register("model", name, factory)


def build_model(
    spec: Any, input_shape: tuple[int, ...], num_classes: int, *, seed: int | None = None, **options: Any
) -> nn.Module:
    """Build a model from a name (built-in, registered, entry point or ``package.module:factory``) or a
    ``{name: ..., option: ...}`` spec; ``options`` are the factory's keyword options (e.g.
    ``hidden=(200, 200)`` for ``mlp``), validated against its signature.

    With ``seed`` the model is constructed (and so initialized) on the CPU under a private generator seeded
    with it, leaving the global RNG untouched: the same seed gives the same initial weights on any device,
    also for user models that draw their parameters in ``__init__``.
    """
    name, given = components.split_spec("model", spec)
    component = components.get("model", name)
    values = component.validate({**given, **options})
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        try:
            model = component.obj(tuple(input_shape), num_classes, **values)
        except Exception as e:  # a user factory or bad options: report, do not crash
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise FedsimError(f"model '{name}' could not be built with options {values}: {detail}") from None
    if not isinstance(model, nn.Module):
        raise FedsimError(f"model factory '{name}' returned {type(model).__name__}, not a torch.nn.Module")
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise FedsimError(
            f"model '{name}' uses BatchNorm, whose running statistics cannot be vectorized across clients; "
            "use GroupNorm or LayerNorm"
        )
    if any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
        raise FedsimError(f"model '{name}' uses Dropout, which the vectorized trainer does not support yet")
    return model


__all__ = [
    "MODELS",
    "SEQUENCE_MODELS",
    "ModelFactory",
    "build_model",
    "char_transformer",
    "cnn",
    "lenet5",
    "logreg",
    "mlp",
    "register_model",
]
