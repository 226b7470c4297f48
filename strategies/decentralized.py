"""Decentralized SGD over a graph (nodes are the client axis; gossip is ``X <- W X``).

Node ``i`` holds ``x_i``; in each round it takes ``tau`` local optimizer steps from ``x_i`` (``tau`` =
``local_steps``; ``tau = 1`` is plain D-SGD) reaching ``y_i``, with ``Delta_i = x_i - y_i``, and then gossips
with a doubly stochastic ``W`` (static, or ``W_t`` from a time-varying schedule):

- combine-then-adapt (``dsgd``; Lian et al., NeurIPS 2017): ``x_i <- sum_j W_ij x_j - Delta_i``, i.e. for
  ``tau = 1``, ``x_i <- sum_j W_ij x_j - eta grad l(x_i; xi_i)``;
- adapt-then-combine (``dsgd-atc``): ``x_i <- sum_j W_ij (x_j - Delta_j) = sum_j W_ij y_j``.

With ``W = 11^T / m`` (complete graph, uniform weights) adapt-then-combine with ``tau`` local steps is
FedAvg with full participation and equal client weights (tested).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from fedsim.engine.pytree import Tree


def gossip_matrix(w: np.ndarray, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """The mixing matrix as a sparse (COO) tensor on ``device``: only the graph's edges are stored."""
    return torch.as_tensor(w, dtype=dtype).to_sparse().coalesce().to(device)


def gossip(w: Tensor, x: Tree) -> Tree:
    """``X <- W X`` on every stacked leaf ``[m, ...]``: one sparse matmul on the flattened parameters."""
    out = {}
    for k, v in x.items():
        flat = v.reshape(v.shape[0], -1)
        out[k] = torch.sparse.mm(w, flat).reshape(v.shape)
    return out


class DSGD:
    """Combine-then-adapt D-SGD: ``x_i <- sum_j W_ij x_j - Delta_i`` (see the module docstring)."""

    name: ClassVar[str] = "dsgd"

    def step(self, w: Tensor, x: Tree, deltas: Tree) -> Tree:
        mixed = gossip(w, x)
        return {k: mixed[k] - deltas[k] for k in x}


class DSGDATC(DSGD):
    """Adapt-then-combine D-SGD: ``x_i <- sum_j W_ij (x_j - Delta_j)`` (see the module docstring)."""

    name: ClassVar[str] = "dsgd-atc"

    def step(self, w: Tensor, x: Tree, deltas: Tree) -> Tree:
        return gossip(w, {k: x[k] - deltas[k] for k in x})


DECENTRALIZED: dict[str, type[DSGD]] = {cls.name: cls for cls in (DSGD, DSGDATC)}
