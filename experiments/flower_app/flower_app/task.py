"""The task shared by the server and the clients: scikit-learn's digits (offline), a Dirichlet label-skew
partition over the nodes, fedsim's MLP. Settings come from the run config (``[tool.flwr.app.config]``)
with these defaults when a key is absent (as under ``flwr.simulation.run_simulation``)."""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np
import torch

from fedsim.data import load_dataset, partition
from fedsim.models import build_model

DEFAULTS: dict[str, Any] = {
    "num-server-rounds": 10, "fraction-train": 0.5, "lr": 0.1, "local-steps": 10, "batch-size": 16, "seed": 0,
    "dirichlet-alpha": 0.5, "ecgr-rho": 0.5, "ecgr-beta": 0.2,
}  # fmt: skip


def settings(run_config) -> dict[str, Any]:
    return {**DEFAULTS, **dict(run_config)}


@cache
def _data(seed: int):
    return load_dataset("digits", seed=seed)


def make_model(seed: int) -> torch.nn.Module:
    ds = _data(seed)
    return build_model("mlp", ds.feature_shape, ds.num_classes, seed=seed)


def load_partition(partition_id: int, num_partitions: int, seed: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Node ``partition_id``'s training samples (the same seeded partition on every node)."""
    ds = _data(seed)
    parts = partition("dirichlet", ds.y_train, num_partitions, seed=seed, alpha=alpha, min_size=2)
    rows = parts[partition_id]
    return ds.x_train[rows], ds.y_train[rows]


def test_set(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    ds = _data(seed)
    return torch.as_tensor(ds.x_test), torch.as_tensor(ds.y_test, dtype=torch.int64)
