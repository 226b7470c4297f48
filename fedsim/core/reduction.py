"""Declared weighted means of client uploads, computable chunk by chunk.

A strategy that only reads weighted means of its clients' uploads (FedAvg and its server optimizers, FedProx,
FedNova, FedDyn, FedCM, SCAFFOLD) declares them as :class:`Reduction` values. The executor can then fold every
chunk of trained clients into running sums as the chunk finishes, and never hold the round's stacked updates
(:class:`~fedsim.core.protocol.Plan.reductions`). The same rule computed from a stack gives the same bits:

    mean = sum_{k in R} w_k s_k u_k / sum_{k in R} w_k

with ``u_k`` the upload (``deltas``, or the extras under a prefix such as SCAFFOLD's ``dc.``), ``w_k`` the
client's weight (``n_k`` samples, or 1), ``s_k`` an optional per-client scale (FedNova's ``1 / ||a_k||_1``) and
``R`` an optional subset (FedCM: the clients that took a step). The numerator is a left fold in client order
in float64, ``((w_1 s_1 u_1 + w_2 s_2 u_2) + ...)``, which does not depend on where the chunks are cut: on CPU
``cumsum`` along the client axis is sequential (one accumulator per coordinate, whatever the thread count).
On CUDA ``cumsum`` is a parallel scan, so the float64 sum may differ in its last bits between chunk sizes
(the float32 result then agrees except in rare rounding ties). The mean is rounded to the upload's dtype once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from .pytree import Tree, client_blocks, unflatten

PerClient = Callable[[Any], Tensor]
"""A function of a group of clients' per-client scalars (``num_samples``, ``num_steps``, ``lr``, ...: a
:class:`~fedsim.core.protocol.ClientUpdates`) returning one value per client. It must be elementwise: a
client's value may depend only on that client's scalars (it is called on one chunk at a time)."""


@dataclass(frozen=True)
class Reduction:
    """``sum_{k in R} w_k s_k u_k / sum_{k in R} w_k`` over the round's clients (see the module docstring).

    ``source``: ``"deltas"`` or an extras prefix; ``weight``: ``"samples"`` (``w_k = n_k``) or ``"uniform"``
    (``w_k = 1``); ``scale``: per-client ``s_k`` (None: 1); ``rows``: per-client booleans selecting ``R``
    (None: every client).
    """

    source: str = "deltas"
    weight: Literal["samples", "uniform"] = "samples"
    scale: PerClient | None = None
    rows: PerClient | None = None

    def coefficients(self, clients: Any) -> tuple[Tensor, Tensor]:
        """``(w_k [k in R], w_k s_k [k in R])`` in float64 for a group of clients (zero outside ``R``)."""
        n = clients.num_samples.to(torch.float64)
        w = n if self.weight == "samples" else torch.ones_like(n)
        if self.rows is not None:
            w = w * self.rows(clients).to(torch.float64)
        c = w if self.scale is None else w * self.scale(clients).to(torch.float64)
        return w, c

    def normalized(self, clients: Any) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The rule as today's ``(weights, scale, rows)`` arguments of a reduction over the stack (what a robust
        aggregator receives in place of the mean): ``weights = w_k / sum_{j in R} w_j``."""
        w, _ = self.coefficients(clients)
        rows = self.rows(clients).to(torch.bool) if self.rows is not None else None
        scale = self.scale(clients) if self.scale is not None else None
        return w / w.sum(), scale, rows


def fold_rows(total: Tensor | None, rows: Tensor) -> Tensor:
    """``total + rows[0] + rows[1] + ...`` as a left fold along the first axis, in ``rows``' dtype (float64 here);
    ``total`` None starts from ``rows[0]``. Works in place on ``rows``."""
    if rows.shape[0] == 0:
        return total if total is not None else rows.new_zeros(rows.shape[1:])
    if total is not None:
        rows[0] += total
    return rows.cumsum(0)[-1] if rows.shape[0] > 1 else rows[0].clone()


def exact_sum(values: Tensor) -> float:
    """The correctly rounded sum of a small vector (order-free, so thread- and chunk-independent)."""
    return math.fsum(values.double().tolist())


class MeanAccumulator:
    """Running numerator and weight of one :class:`Reduction`, fed chunk by chunk in client order."""

    def __init__(self, reduction: Reduction) -> None:
        self.reduction = reduction
        self.numerator: Tensor | None = None
        self.weights: list[Tensor] = []
        self.like: Tree | None = None

    def add(self, clients: Any, upload: Tree) -> None:
        """Fold one chunk: ``clients`` its per-client scalars, ``upload`` its stacked upload ``[c, ...]``."""
        if not upload:
            return
        if self.like is None:
            self.like = {k: v[0] for k, v in upload.items()}
        w, c = self.reduction.coefficients(clients)
        self.weights.append(w.cpu())
        start = 0
        for block in client_blocks(upload):
            rows = block * c[start : start + len(block)].to(block.device).unsqueeze(1)
            self.numerator = fold_rows(self.numerator, rows)
            start += len(block)

    def result(self) -> Tree | None:
        """The mean as a tree in the upload's dtype, or None when ``sum_{k in R} w_k`` is 0 (nobody in R)."""
        if self.like is None:
            return {}
        total = exact_sum(torch.cat(self.weights)) if self.weights else 0.0
        if total == 0.0:
            return None
        dtype = next(iter(self.like.values())).dtype
        return unflatten((self.numerator / total).to(dtype), self.like)


def mean_of(reduction: Reduction, clients: Any, upload: Tree) -> Tree | None:
    """:class:`Reduction` ``reduction`` over a whole stack (the same bits as chunk by chunk)."""
    acc = MeanAccumulator(reduction)
    acc.add(clients, upload)
    return acc.result()
