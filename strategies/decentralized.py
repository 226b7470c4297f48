"""Decentralized SGD over a graph (nodes are the client axis; gossip is ``X <- W X``).

Node ``i`` holds ``x_i``; in each round it takes ``tau`` local optimizer steps from ``x_i`` (``tau`` =
``local_steps``; ``tau = 1`` is plain D-SGD) reaching ``y_i``, with ``Delta_i = x_i - y_i``, and then gossips
with a doubly stochastic ``W`` (static, or ``W_t`` from a time-varying schedule):

- combine-then-adapt (``dsgd``; Lian et al., NeurIPS 2017): ``x_i <- sum_j W_ij x_j - Delta_i``, i.e. for
  ``tau = 1``, ``x_i <- sum_j W_ij x_j - eta grad l(x_i; xi_i)``;
- adapt-then-combine (``dsgd-atc``): ``x_i <- sum_j W_ij (x_j - Delta_j) = sum_j W_ij y_j``.

With ``W = 11^T / m`` (complete graph, uniform weights) adapt-then-combine with ``tau`` local steps is
FedAvg with full participation and equal client weights (tested).

Every strategy has ``init(x) -> state`` and ``update(w, x, deltas, lr, state) -> (x, state)``: ``state`` is a
stacked tree of per-node quantities that live across rounds (the gradient tracker of :class:`DSGT`); the
stateless rules implement only ``step(w, x, deltas)``. ``client_algorithm`` shapes local training (SGDA's
descent-ascent lives there, see :mod:`fedsim.minimax`).
"""

from __future__ import annotations

from typing import Annotated, ClassVar

import numpy as np
import torch
from torch import Tensor

from fedsim.core.components import option
from fedsim.core.protocol import ClientAlgorithm
from fedsim.core.pytree import Tree


def gossip_matrix(w: np.ndarray, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """The mixing matrix as a sparse (COO) tensor on ``device``: only the graph's edges are stored."""
    return torch.as_tensor(w, dtype=dtype).to_sparse().coalesce().to(device)


def gossip(w: Tensor, x: Tree) -> Tree:
    """``X <- W X`` on every stacked leaf ``[m, ...]``: one sparse matmul on the flattened parameters. ``w`` may
    also be a compressed gossip operator with ``mix(x)`` (CHOCO-SGD, :mod:`fedsim.choco`), which replaces it."""
    if not isinstance(w, Tensor):
        return w.mix(x)
    out = {}
    for k, v in x.items():
        flat = v.reshape(v.shape[0], -1)
        out[k] = torch.sparse.mm(w, flat).reshape(v.shape)
    return out


class DSGD:
    """Combine-then-adapt D-SGD: ``x_i <- sum_j W_ij x_j - Delta_i`` (see the module docstring)."""

    name: ClassVar[str] = "dsgd"
    gossips: ClassVar[int] = 1
    """Gossip steps ``X <- W X`` per round (what each node sends every neighbour)."""

    def __init__(self, client_algorithm: ClientAlgorithm | None = None) -> None:
        self.client_algorithm = client_algorithm or ClientAlgorithm()

    def init(self, x: Tree) -> Tree:
        """Per-node state carried across rounds (none for D-SGD)."""
        return {}

    def update(self, w: Tensor, x: Tree, deltas: Tree, lr: float, state: Tree) -> tuple[Tree, Tree]:
        """One round's combine step; returns the new node parameters and strategy state."""
        return self.step(w, x, deltas), state

    def step(self, w: Tensor, x: Tree, deltas: Tree) -> Tree:
        mixed = gossip(w, x)
        return {k: mixed[k] - deltas[k] for k in x}


class DSGDATC(DSGD):
    """Adapt-then-combine D-SGD: ``x_i <- sum_j W_ij (x_j - Delta_j)`` (see the module docstring)."""

    name: ClassVar[str] = "dsgd-atc"

    def step(self, w: Tensor, x: Tree, deltas: Tree) -> Tree:
        return gossip(w, {k: x[k] - deltas[k] for k in x})


class DSGT(DSGD):
    """Gradient tracking (DSGT; Pu & Nedic 2021, "Distributed stochastic gradient tracking methods"; the
    combine-then-adapt form of Di Lorenzo & Scutari's NEXT and Nedic et al.'s DIGing with stochastic gradients).

    Each node keeps a tracker ``y_i`` of the network-average direction and its previous local direction
    ``g_i``. With ``g_i^t = Delta_i^t / eta_t`` (the stochastic gradient at ``x_i^t`` for ``tau = 1`` plain SGD;
    the sum of the ``tau`` local steps' directions otherwise):

        y_i^t     = sum_j W_ij y_j^{t-1} + g_i^t - g_i^{t-1}     (y^0 = g^0)
        x_i^{t+1} = sum_j W_ij x_j^t - eta_t y_i^t

    The invariant ``mean_i y_i^t = mean_i g_i^t`` holds for any doubly stochastic W (tested); with exact
    gradients DSGT converges to the exact minimizer of the average loss at a constant step size, where D-SGD
    keeps an O(eta) heterogeneity bias. The first round is D-SGD (``x <- W x - Delta``).
    """

    name: ClassVar[str] = "dsgt"
    gossips: ClassVar[int] = 2

    def init(self, x: Tree) -> Tree:
        zeros = {k: torch.zeros_like(v) for k, v in x.items()}
        return {**{f"y.{k}": v for k, v in zeros.items()}, **{f"g.{k}": v.clone() for k, v in zeros.items()}}

    def update(self, w: Tensor, x: Tree, deltas: Tree, lr: float, state: Tree) -> tuple[Tree, Tree]:
        g = {k: d / lr for k, d in deltas.items()}
        mixed_y = gossip(w, {k: state[f"y.{k}"] for k in x})
        y = {k: mixed_y[k] + g[k] - state[f"g.{k}"] for k in x}
        mixed_x = gossip(w, x)
        new_x = {k: mixed_x[k] - lr * y[k] for k in x}
        return new_x, {**{f"y.{k}": v for k, v in y.items()}, **{f"g.{k}": v for k, v in g.items()}}


class DSGDA(DSGD):
    """Decentralized stochastic gradient descent-ascent for ``min_x max_y f(x, y)`` (combine-then-adapt):

        x_i <- sum_j W_ij x_j - eta_x grad_x f_i(x_i, y_i; xi_i)
        y_i <- P_Y( sum_j W_ij y_j + eta_y grad_y f_i(x_i, y_i; xi_i) )

    Both blocks are gossiped; the descent-ascent and the dual learning rate ``eta_y`` live in the client
    algorithm (:class:`fedsim.minimax.DescentAscentClient`), the projection ``P_Y`` onto the dual's feasible set
    (identity for an unconstrained dual) is applied after every local step and again after the combine step
    (so every node's dual stays feasible; for tau = 1 that is the rule above up to where P_Y meets the local
    step, our inference). The problems (AUC maximization, distributionally robust logistic regression) are in
    :mod:`fedsim.minimax`.
    """

    name: ClassVar[str] = "dsgda"
    minimax: ClassVar[bool] = True

    def __init__(
        self,
        client_algorithm: ClientAlgorithm | None = None,
        dual_lr: Annotated[float | None, option("dual (ascent) step size eta_y (default: the run's lr)", gt=0)] = None,
    ) -> None:
        super().__init__(client_algorithm)
        self.dual_lr = dual_lr

    def step(self, w: Tensor, x: Tree, deltas: Tree) -> Tree:
        mixed = super().step(w, x, deltas)
        return self.client_algorithm.project(mixed)


class DSGDAATC(DSGDA):
    """Adapt-then-combine decentralized SGDA: every node takes its local descent-ascent steps, then averages
    the results, ``(x_i, y_i) <- sum_j W_ij (x_j, y_j)_local`` (a convex combination, so a projected dual stays
    feasible). Tolerates larger step sizes than :class:`DSGDA`: with ``W = 11^T/m`` the disagreement it
    leaves is zero, while combine-then-adapt leaves ``-eta (F(x_i) - mean_j F(x_j))``, which grows when
    ``eta`` times the local Lipschitz constant of the descent-ascent field exceeds 1."""

    name: ClassVar[str] = "dsgda-atc"

    def step(self, w: Tensor, x: Tree, deltas: Tree) -> Tree:
        return self.client_algorithm.project(DSGDATC.step(self, w, x, deltas))


DECENTRALIZED: dict[str, type[DSGD]] = {cls.name: cls for cls in (DSGD, DSGDATC, DSGT, DSGDA, DSGDAATC)}
