"""Evaluation of one model on a data set, and per-client accuracy of one model on each client's data."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from fedsim.core.pytree import Tree

from .trainer import LossFn, cross_entropy


@torch.no_grad()
def per_sample(
    model: nn.Module, params: Tree, x: Tensor, y: Tensor, loss_fn: LossFn = cross_entropy, batch_size: int = 4096
) -> tuple[Tensor, Tensor]:
    """Per-sample loss and correctness (float 0/1) of ``params`` on ``(x, y)``."""
    losses, correct = [], []
    for start in range(0, len(y), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        logits = functional_call(model, params, (xb,))
        losses.append(loss_fn(logits, yb).double())
        correct.append((logits.argmax(dim=1) == yb).double())
    if not losses:
        empty = torch.zeros(0, dtype=torch.float64, device=y.device)
        return empty, empty
    return torch.cat(losses), torch.cat(correct)


def evaluate(model: nn.Module, params: Tree, x: Tensor, y: Tensor, loss_fn: LossFn = cross_entropy) -> dict:
    """Mean loss and accuracy on ``(x, y)``."""
    losses, correct = per_sample(model, params, x, y, loss_fn)
    return {"loss": float(losses.mean()), "accuracy": float(correct.mean())}


def client_accuracy_spread(accuracies: np.ndarray) -> dict:
    """Mean, standard deviation and worst-10% mean of per-client accuracies (FL-bench style spread).

    ``worst10`` is the mean accuracy of the ``ceil(0.1 * n)`` worst clients.
    """
    if len(accuracies) == 0:
        return {"client_accuracy_mean": None, "client_accuracy_std": None, "client_accuracy_worst10": None}
    acc = np.sort(accuracies)
    worst = acc[: max(1, int(np.ceil(0.1 * len(acc))))]
    return {
        "client_accuracy_mean": float(acc.mean()),
        "client_accuracy_std": float(acc.std()),
        "client_accuracy_worst10": float(worst.mean()),
    }


def per_client_accuracy(
    model: nn.Module, params: Tree, x: Tensor, y: Tensor, order: Tensor, offsets: np.ndarray
) -> np.ndarray:
    """Accuracy of one model on each client's samples ``order[offsets[c]:offsets[c+1]]``, computed in one
    pass over all clients' samples; clients with no samples are left out."""
    _, correct = per_sample(model, params, x[order], y[order])
    sizes = np.diff(offsets)
    owner = torch.as_tensor(np.repeat(np.arange(len(sizes)), sizes), device=correct.device)
    hits = torch.zeros(len(sizes), dtype=torch.float64, device=correct.device).index_add_(0, owner, correct)
    keep = sizes > 0
    return (hits.cpu().numpy()[keep] / sizes[keep]).astype(np.float64)
