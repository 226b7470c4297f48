"""Gradient agreement filtering (GAF; Chaubard, Eddy & Kochenderfer 2024, rule from the authors' code,
Fchaubard/gradient_agreement_filtering).

Fold a sequence of gradients (or updates) ``G_1, G_2, ...`` into one, keeping only those that agree with
the running fold: ``G <- G_1``; for ``j = 2, 3, ...``: if the cosine distance ``1 - cos(G, G_j) <= tau``
then ``G <- (G + G_j) / 2``, else skip ``G_j``. When no ``G_j`` agreed, the authors' code skips the
optimizer step altogether. Default ``tau = 0.97``.

Two uses here:

- :class:`GAF` as a server aggregator (``--aggregator gaf``): the selected clients' updates folded in client
  order; a round where nothing agreed leaves the model unchanged (zero update), except with a single
  client, whose update is used as it is (our choice: a fold of one has nothing to disagree with);
- :class:`GAFClientFilter` as a client micro-batch filter (``client_filter: gaf``): every local step's
  minibatch is split into ``microbatches`` equal slices, their gradients are folded, and a client whose
  slices never agree skips that step (parameters and optimizer state unchanged), as in the authors' code.
  A step with a single non-empty slice (a client smaller than a batch, or the last partial batch of an
  epoch) is taken with that slice's gradient: there is nothing to disagree with (our choice; the authors'
  microbatches are always full).
"""

from __future__ import annotations

from typing import Annotated, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from fedsim.core.components import option
from fedsim.core.errors import FedsimError
from fedsim.core.pytree import Tree, flatten, unflatten


def check_tau(tau: float) -> float:
    if not 0.0 <= tau <= 2.0:
        raise FedsimError(f"tau is a cosine distance in [0, 2], got {tau}")
    return float(tau)


def gaf_fold(units: Tensor, tau: float = 0.97, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Fold ``units[C, M, D]`` along M for every row at once; ``valid[C, M]`` marks usable units (all by
    default; an invalid unit never agrees). Returns the folds ``[C, D]`` and the count of agreeing units
    ``[C]`` (0 means the authors' code would skip the step)."""
    fold = units[:, 0].clone()
    agreed = torch.zeros(units.shape[0], dtype=torch.long, device=units.device)
    for j in range(1, units.shape[1]):
        other = units[:, j]
        distance = 1.0 - F.cosine_similarity(fold, other, dim=1, eps=1e-12)
        ok = distance <= tau
        if valid is not None:
            ok = ok & valid[:, j]
        fold = torch.where(ok.unsqueeze(1), 0.5 * (fold + other), fold)
        agreed += ok
    return fold, agreed


class GAF:
    """GAF as a server aggregator over the selected clients' updates (see the module docstring)."""

    name: ClassVar[str] = "gaf"

    def __init__(self, tau: Annotated[float, option("fold when 1 - cos <= tau", ge=0, le=2)] = 0.97):
        self.tau = check_tau(tau)

    def __call__(self, tree: Tree, weights: Tensor) -> Tree:
        flat = flatten(tree)
        fold, agreed = gaf_fold(flat.unsqueeze(0), self.tau)
        if flat.shape[0] > 1 and int(agreed[0]) == 0:
            fold = torch.zeros_like(fold)
        return unflatten(fold[0], {k: v[0] for k, v in tree.items()})


class GAFClientFilter:
    """GAF on every local step's microbatch gradients (see the module docstring)."""

    name: ClassVar[str] = "gaf"

    def __init__(
        self,
        tau: Annotated[float, option("fold when 1 - cos <= tau", ge=0, le=2)] = 0.97,
        microbatches: Annotated[int, option("micro-batches each minibatch is split into", ge=2)] = 4,
    ):
        if microbatches < 2:
            raise FedsimError(f"microbatches must be >= 2, got {microbatches}")
        self.tau, self.microbatches = check_tau(tau), microbatches

    def combine_microbatches(self, grads: Tree, counts: Tensor) -> tuple[Tree, Tensor]:
        like = {k: v[:, 0] for k, v in grads.items()}
        c, m = counts.shape
        flat = torch.cat([v.reshape(c, m, -1) for v in grads.values()], dim=2)
        valid = counts > 0
        fold, agreed = gaf_fold(flat, self.tau, valid)
        return unflatten(fold, like), (agreed > 0) | (valid.sum(1) == 1)
