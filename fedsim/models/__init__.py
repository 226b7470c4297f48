"""Model registry: built-in vmappable models by name, user models by ``package.module:factory``.

A factory is called as ``factory(input_shape, num_classes)`` and returns an ``nn.Module`` whose forward
maps ``[B, *input_shape]`` to logits ``[B, num_classes]``. Sequence models (:data:`SEQUENCE_MODELS`) take
windows of token indices ``[B, L]`` (float32 indices from a token dataset such as ``shakespeare``) and return
the logits of the next token.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import nn

from fedsim.core.errors import FedsimError, unknown

from .transformer import char_transformer
from .zoo import cnn, lenet5, logreg, mlp

ModelFactory = Callable[[tuple[int, ...], int], nn.Module]

MODELS: dict[str, ModelFactory] = {
    "logreg": logreg,
    "mlp": mlp,
    "lenet5": lenet5,
    "cnn": cnn,
    "char_transformer": char_transformer,
}
SEQUENCE_MODELS: tuple[str, ...] = ("char_transformer",)
"""Built-in models whose input is a window of token indices (they need a token dataset)."""


def register_model(name: str, factory: ModelFactory) -> None:
    """Add a model factory to the registry under ``name``."""
    MODELS[name] = factory


def _import_factory(spec: str) -> ModelFactory:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise FedsimError(f"cannot import model module '{module_name}' from '{spec}': {e}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise FedsimError(f"'{spec}': module '{module_name}' has no callable '{attr}'")
    return factory


def build_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, *, seed: int | None = None, **model_args
) -> nn.Module:
    """Build a registered model by name, or a user model from ``package.module:factory``; ``model_args``
    are passed to the factory as keywords (e.g. ``hidden=(200, 200)`` for ``mlp``).

    With ``seed`` the model is constructed (and so initialized) on the CPU under a private generator seeded
    with it, leaving the global RNG untouched: the same seed gives the same initial weights on any device,
    also for user models that draw their parameters in ``__init__``.
    """
    if ":" in name:
        factory = _import_factory(name)
    elif name in MODELS:
        factory = MODELS[name]
    else:
        raise unknown("model", name, MODELS)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        try:
            model = factory(tuple(input_shape), num_classes, **model_args)
        except Exception as e:  # a user factory or bad model_args: report, do not crash
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise FedsimError(f"model '{name}' could not be built with model_args {model_args}: {detail}") from None
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
