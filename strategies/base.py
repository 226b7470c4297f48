"""The strategy interface: ``init(params) -> state``, ``configure(round, state) -> Plan``,
``aggregate(round, state, updates) -> state``. State is explicit data (:class:`ServerState`)."""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from fedsim.core import rng
from fedsim.core.errors import FedsimError
from fedsim.core.protocol import ClientAlgorithm, ClientUpdates, Plan, ServerState
from fedsim.core.pytree import Tree, tree_map
from fedsim.core.reduction import Reduction

from .robust import Aggregator


def select_clients(
    num_clients: int, fraction: float, min_clients: int, seed: int, round_: int, available: np.ndarray | None = None
) -> np.ndarray:
    """Uniformly sample ``max(min_clients, floor(fraction * N + 0.5))`` distinct clients (sorted ids), at most N.

    The draw depends only on (seed, round), not on earlier rounds, so a resumed run selects the same clients.
    With ``available`` (sorted ids of the clients that can take part, the set A) the draw is among A only,
    ``min(|A|, max(min_clients, floor(fraction * |A| + 0.5)))`` clients: the ones in A with the smallest
    per-client hash keys, so ``available = arange(N)`` selects exactly what ``available = None`` does.
    """
    if available is None:
        count = min(num_clients, max(min_clients, math.floor(fraction * num_clients + 0.5)))
        if count >= num_clients:
            return np.arange(num_clients)
        keys = rng.hash_keys(seed, rng.STREAM_SELECTION, round_, np.arange(num_clients))
        return np.sort(np.argsort(keys, kind="stable")[:count])
    pool = np.asarray(available, dtype=np.int64)
    count = min(len(pool), max(min_clients, math.floor(fraction * len(pool) + 0.5)))
    if count >= len(pool):
        return pool
    keys = rng.hash_keys(seed, rng.STREAM_SELECTION, round_, pool)
    return np.sort(pool[np.argsort(keys, kind="stable")[:count]])


class Strategy:
    """Base server strategy: FedAvg's client selection and hooks for subclasses.

    Subclasses implement :meth:`server_update` (how the weighted mean update moves the global model) and
    may set ``client_algorithm`` and extra state in :meth:`init`. Every reduction of per-client updates over
    the client axis goes through :meth:`reduce`: the sample-weighted mean, or a robust ``aggregator``
    (:mod:`strategies.robust`: coordinate median, trimmed mean, Krum, GAF) in its place.
    """

    name: ClassVar[str] = "base"
    client_algorithm: ClientAlgorithm
    server_state: ClassVar[tuple[str, ...]] = ()
    """Prefixes of per-parameter server state in ``extras``, zero at the start (``"c."``: ``c.<param>``)."""
    broadcast: ClassVar[tuple[str, ...]] = ()
    """Prefixes of the ``extras`` sent to the selected clients with the model (SCAFFOLD's ``c``)."""

    def __init__(self, *, fraction: float = 1.0, min_clients: int = 1, aggregator: Aggregator | None = None):
        if not 0.0 < fraction <= 1.0:
            raise FedsimError(f"fraction must be in (0, 1], got {fraction}")
        if min_clients < 1:
            raise FedsimError(f"min_clients must be >= 1, got {min_clients}")
        self.fraction, self.min_clients = fraction, min_clients
        self.aggregator = aggregator
        self.client_algorithm = ClientAlgorithm()

    def reduce(
        self, updates: ClientUpdates, weights: Tensor, source: str = "deltas", *, scale: Tensor | None = None,
        rows: Tensor | None = None,
    ) -> Tree:  # fmt: skip
        """``sum_k weights[k] scale[k] upload[k]`` over the client axis (the clients in ``rows``), or the robust
        aggregator's combination of ``scale * upload``; ``source``: ``"deltas"`` or an extras prefix. The
        updates carry out the reduction (:meth:`ClientUpdates.reduce`), so an executor that keeps the uploads
        on its workers answers with partial sums."""
        return updates.reduce(source, weights, scale=scale, rows=rows, aggregator=self.aggregator)

    def reductions(self) -> dict[str, Reduction] | None:
        """The weighted means :meth:`aggregate` reads, by name (:class:`~fedsim.core.reduction.Reduction`), when
        that is all it reads of the uploads; None (the default for a strategy of one's own) when it reads the
        stacked uploads themselves. Declared means let the executor fold every chunk of clients as it finishes
        instead of holding the round's updates. The base strategy reads the sample-weighted mean delta; a
        subclass that overrides :meth:`aggregate` declares its own (it reads nothing declared by default)."""
        return {"mean": Reduction()} if type(self).aggregate is Strategy.aggregate else None

    def reduced(self, updates: ClientUpdates, name: str) -> Tree | None:
        """The declared mean ``name`` of :meth:`reductions` (None when its subset of clients is empty); with a
        robust ``aggregator``, the aggregator's combination of ``scale * upload`` over the subset instead."""
        reduction = self.reductions()[name]
        if self.aggregator is not None:
            weights, scale, rows = reduction.normalized(updates)
            if rows is not None and not bool(rows.any()):
                return None
            return self.reduce(updates, weights, reduction.source, scale=scale, rows=rows)
        return updates.mean(name, reduction)

    def streams(self) -> bool:
        """Whether the executor may fold chunks into :meth:`reductions` and drop the uploads: declared means
        and no robust aggregator (median, Krum, ... need every client's update at once)."""
        return self.aggregator is None and self.reductions() is not None

    def init(self, params: Tree) -> ServerState:
        """Initial server state from the initial global parameters (plus zero :attr:`server_state`)."""
        extras = {f"{prefix}{k}": torch.zeros_like(v) for prefix in self.server_state for k, v in params.items()}
        return ServerState({k: v.detach().clone() for k, v in params.items()}, extras)

    def configure(
        self, round_: int, state: ServerState, num_clients: int, seed: int, available: np.ndarray | None = None
    ) -> Plan:
        """Pick this round's clients (among ``available`` when given: sorted ids) and the broadcast extras."""
        ids = select_clients(num_clients, self.fraction, self.min_clients, seed, round_, available)
        broadcast = {k: v for k, v in state.extras.items() if k.startswith(self.broadcast)} if self.broadcast else {}
        return Plan(ids, broadcast, self.reductions() if self.streams() else None)

    def aggregate(self, round_: int, state: ServerState, updates: ClientUpdates) -> ServerState:
        """New server state from the clients' updates: ``server_update`` of the weighted mean delta."""
        mean_delta = self.reduced(updates, "mean")
        return self.server_update(round_, state, mean_delta)

    def server_update(self, round_: int, state: ServerState, mean_delta: Tree) -> ServerState:
        raise NotImplementedError


def apply_step(params: Tree, step: Tree, scale: float = 1.0) -> Tree:
    """``params - scale * step`` leaf-wise."""
    return tree_map(lambda p, s: p - scale * s, params, step)


def check_positive(**values: float) -> None:
    """Raise a FedsimError naming the first value that is not a positive finite number."""
    for name, v in values.items():
        if not (v > 0 and math.isfinite(v)):
            raise FedsimError(f"{name} must be > 0, got {v}")
