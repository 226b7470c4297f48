"""Model registry: built-in vmappable models by name, user models by ``package.module:factory``.

A factory is called as ``factory(input_shape, num_classes)`` and returns an ``nn.Module`` whose forward
maps ``[B, *input_shape]`` to logits ``[B, num_classes]``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from torch import nn

from fedsim.errors import FedsimError, unknown

from .zoo import cnn, lenet5, logreg, mlp

ModelFactory = Callable[[tuple[int, ...], int], nn.Module]

MODELS: dict[str, ModelFactory] = {"logreg": logreg, "mlp": mlp, "lenet5": lenet5, "cnn": cnn}


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


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, **model_args) -> nn.Module:
    """Build a registered model by name, or a user model from ``package.module:factory``; ``model_args``
    are passed to the factory as keywords (e.g. ``hidden=(200, 200)`` for ``mlp``)."""
    if ":" in name:
        factory = _import_factory(name)
    elif name in MODELS:
        factory = MODELS[name]
    else:
        raise unknown("model", name, MODELS)
    try:
        model = factory(tuple(input_shape), num_classes, **model_args)
    except TypeError as e:
        if not model_args:
            raise
        raise FedsimError(f"model '{name}' does not accept model_args {model_args}: {e}") from None
    if not isinstance(model, nn.Module):
        raise FedsimError(f"model factory '{name}' returned {type(model).__name__}, not a torch.nn.Module")
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise FedsimError(
            f"model '{name}' uses BatchNorm, whose running statistics cannot be vectorized across clients; "
            "use GroupNorm or LayerNorm"
        )
    return model


__all__ = ["MODELS", "ModelFactory", "build_model", "register_model", "cnn", "lenet5", "logreg", "mlp"]
