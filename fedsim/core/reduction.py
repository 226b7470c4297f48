"""Declared weighted means of client uploads, computable chunk by chunk.

A strategy that only reads weighted means of its clients' uploads (FedAvg and its server optimizers, FedProx,
FedNova, FedDyn, FedCM, SCAFFOLD) declares them as :class:`Reduction` values. The executor can then fold every
chunk of trained clients into running sums as the chunk finishes, and never hold the round's stacked updates
(:class:`~fedsim.core.protocol.Plan.reductions`). The same rule computed from a stack gives the same bits:

    mean = sum_{k in R} w_k s_k u_k / sum_{k in R} w_k

with ``u_k`` the upload (``deltas``, or the extras under a prefix such as SCAFFOLD's ``dc.``), ``w_k`` the
client's weight (``n_k`` samples, or 1), ``s_k`` an optional per-client scale (FedNova's ``1 / ||a_k||_1``) and
``R`` an optional subset (FedCM: the clients that took a step). The numerator is a left fold in client order
in float64 in one fixed order (:class:`RowFold`: aligned blocks of clients summed pairwise, the blocks left to
right), which depends neither on where the chunks are cut nor on the thread count (only elementwise adds).
The mean is rounded to the upload's dtype once.
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


FOLD_BLOCK = 64
"""Rows per aligned block of :class:`RowFold` (a power of two)."""


def pairwise_sum(blocks: Tensor) -> Tensor:
    """``[m, FOLD_BLOCK, D] -> [m, D]``: each block summed by a fixed pairwise tree, in place in ``blocks`` (halves
    added elementwise, so the rounding does not depend on the thread count, unlike ``sum(dim)``)."""
    size = blocks.shape[1]
    while size > 1:
        size //= 2
        blocks[:, :size] += blocks[:, size : 2 * size]
    return blocks[:, 0]


class RowFold:
    """``sum_k rows_k`` in float64 in one fixed order, however the rows arrive: the rows are cut into aligned
    blocks of :data:`FOLD_BLOCK` by their position (the last one padded with zeros), each block is summed by a
    pairwise tree, and the block sums are added left to right. Chunks of any size, or the whole stack at
    once, give the same bits; the memory is one block plus what one :meth:`add` brings."""

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.pending: list[Tensor] = []
        self.pending_rows = 0

    def add(self, rows: Tensor, owned: bool = False) -> None:
        """Append rows ``[b, D]``; they are used as scratch space when ``owned`` (else not modified)."""
        if rows.shape[0] == 0:
            return
        if self.pending:
            self.pending.append(rows)
            rows, owned = torch.cat(self.pending), True
            self.pending, self.pending_rows = [], 0
        whole = (rows.shape[0] // FOLD_BLOCK) * FOLD_BLOCK
        if whole:
            blocks = rows[:whole].reshape(-1, FOLD_BLOCK, rows.shape[1])
            self._fold(blocks if owned else blocks.clone())
        if whole < rows.shape[0]:
            self.pending, self.pending_rows = [rows[whole:].clone()], rows.shape[0] - whole

    def _fold(self, blocks: Tensor) -> None:
        for block_sum in pairwise_sum(blocks):
            self.total = block_sum.clone() if self.total is None else self.total + block_sum

    def result(self) -> Tensor | None:
        """The sum so far (None before any row); pending rows are folded as a block whose missing rows are
        zero (the tree adds only the rows that exist: ``x + 0 = x``)."""
        if self.pending:
            rows = torch.cat(self.pending) if len(self.pending) > 1 else self.pending[0]
            self.pending, self.pending_rows = [], 0
            size = FOLD_BLOCK
            while size > 1:
                size //= 2
                upper = rows[size : 2 * size]
                rows = rows[:size]
                rows[: len(upper)] += upper
            self.total = rows[0].clone() if self.total is None else self.total + rows[0]
        return self.total


def exact_sum(values: Tensor) -> float:
    """The correctly rounded sum of a small vector (order-free, so thread- and chunk-independent)."""
    return math.fsum(values.double().tolist())


class MeanAccumulator:
    """Running numerator and weight of one :class:`Reduction`, fed chunk by chunk in client order."""

    def __init__(self, reduction: Reduction) -> None:
        self.reduction = reduction
        self.numerator = RowFold()
        self.weights: list[Tensor] = []
        self.like: Tree | None = None

    def add(self, clients: Any, upload: Tree) -> None:
        """Fold one chunk: ``clients`` its per-client scalars, ``upload`` its stacked upload ``[c, ...]``."""
        if not upload:
            return
        c = self.begin(clients, upload)
        start = 0
        for block in client_blocks(upload):
            self.add_rows(block, c[start : start + len(block)])
            start += len(block)

    def begin(self, clients: Any, upload: Tree) -> Tensor:
        """Take a chunk's weights; return its coefficients ``w_k s_k`` for :meth:`add_rows`."""
        if self.like is None:
            self.like = {k: v[0] for k, v in upload.items()}
        w, c = self.reduction.coefficients(clients)
        self.weights.append(w.cpu())
        return c

    def add_rows(self, block: Tensor, coefficients: Tensor) -> None:
        """Fold the flattened float64 uploads ``[b, D]`` of the next ``b`` clients times their coefficients."""
        self.numerator.add(block * coefficients.to(block.device).unsqueeze(1), owned=True)

    def result(self) -> Tree | None:
        """The mean as a tree in the upload's dtype, or None when ``sum_{k in R} w_k`` is 0 (nobody in R)."""
        if self.like is None:
            return {}
        total = exact_sum(torch.cat(self.weights)) if self.weights else 0.0
        if total == 0.0:
            return None
        dtype = next(iter(self.like.values())).dtype
        return unflatten((self.numerator.result() / total).to(dtype), self.like)


def mean_of(reduction: Reduction, clients: Any, upload: Tree) -> Tree | None:
    """:class:`Reduction` ``reduction`` over a whole stack (the same bits as chunk by chunk)."""
    acc = MeanAccumulator(reduction)
    acc.add(clients, upload)
    return acc.result()
