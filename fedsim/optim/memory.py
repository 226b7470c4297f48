"""Bytes held in optimizer state, for ``torch.optim`` optimizers and the engine's functional state trees."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


def _tensor_bytes(values) -> int:
    return sum(v.numel() * v.element_size() for v in values if isinstance(v, Tensor))


def state_bytes(optimizer: torch.optim.Optimizer | Mapping[str, Tensor]) -> int:
    """Bytes of every tensor in an optimizer's state (``torch.optim.Optimizer``: ``optimizer.state``; a
    functional state tree: its tensors, all stacked clients together). Python scalars count 0."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return sum(_tensor_bytes(s.values()) for s in optimizer.state.values())
    return _tensor_bytes(optimizer.values())
