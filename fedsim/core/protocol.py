"""The data that flows between the engine and strategies (see DESIGN.md, "How a federated round flows").

Server state, broadcasts and client updates are plain data: flat ``dict[str, Tensor]`` trees, so they
checkpoint with ``torch.save`` and load with ``weights_only=True``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from .errors import FedsimError
from .pytree import STAT_BLOCK_BYTES, Tree, client_blocks, per_client, weighted_sum  # noqa: F401
from .reduction import Reduction, RowFold, mean_of


@dataclass
class ServerState:
    """Global model ``params`` plus strategy-specific ``extras`` (server momentum, Adam moments, ...)."""

    params: Tree
    extras: Tree = field(default_factory=dict)


@dataclass
class Plan:
    """What one round trains: the selected clients (sorted ids) and what the server broadcasts to them
    besides the global parameters (e.g. a control variate)."""

    client_ids: np.ndarray
    broadcast: Tree = field(default_factory=dict)
    reductions: dict[str, Reduction] | None = None
    """When set, the server reads nothing of the uploads but these weighted means (by name, through
    :meth:`ClientUpdates.mean`) and the per-client scalars: an executor may then fold each chunk of clients
    into them as it finishes and drop its uploads (:class:`~fedsim.engine.streamed.StreamedUpdates`)."""
    step_limit: np.ndarray | None = None
    """When set, the most local steps each client (in ``client_ids`` order) takes this round: the first
    ``step_limit[k]`` of its planned steps (a deadline's partial work, a per-round time budget)."""
    round_keys: np.ndarray | None = None
    """When set, the round number each client's batches are drawn for (in ``client_ids`` order), instead of
    the round passed to ``train``: asynchronous clients trained together come from different server versions,
    and client ``k``'s ``j``-th job draws the batches of its round ``j``."""
    encode: Callable[[np.ndarray, Tree], Tree] | None = None
    """When set, what the server decodes from a chunk's uploads: ``encode(client_ids, deltas)`` maps each
    trained chunk's stacked deltas to their decoded form (a compressed uplink, :mod:`fedsim.compression`), before
    they are folded or stacked. Only an executor in the driver's process applies it (it updates the driver's
    per-client state)."""


@dataclass
class ClientUpdates:
    """Stacked results of the selected clients, in ``client_ids`` order.

    ``deltas[k] = w_global - w_k`` (so the FedAvg step is ``w <- w - sum_k p_k deltas[k]``);
    ``num_samples``: local training set sizes; ``num_steps``: optimizer steps taken; ``train_loss``: mean
    local minibatch loss over the round; ``extras``: additional per-client uploads (stacked trees);
    ``opt_state``: the clients' local optimizer state at the end (kept by decentralized nodes);
    ``stats``: per-client diagnostics ``[C]`` that are not uploaded (a regulator's damped norm fraction);
    ``lr``: the round's local learning rate; ``num_clients``: the population size N the clients were drawn
    from (SCAFFOLD's and FedDyn's ``|S| / N``); ``samples_processed``: the samples each client trained on
    (the virtual clock's compute time).
    """

    client_ids: np.ndarray
    deltas: Tree
    num_samples: Tensor
    num_steps: Tensor
    train_loss: Tensor
    extras: Tree = field(default_factory=dict)
    opt_state: Tree = field(default_factory=dict)
    stats: Tree = field(default_factory=dict)
    lr: float | None = None
    num_clients: int | None = None
    samples_processed: Tensor | None = None
    """Samples each client processed in the round (None when the executor does not report them)."""

    @property
    def weights(self) -> Tensor:
        """Sample weights ``p_k = n_k / sum_j n_j`` over the selected clients."""
        return self.num_samples / self.num_samples.sum()

    def upload(self, source: str = "deltas") -> Tree:
        """The stacked upload ``source``: ``"deltas"``, or the extras under a key prefix (prefix removed)."""
        return upload_of(self.deltas, self.extras, source)

    def reduce(
        self, source: str, weights: Tensor, *, scale: Tensor | None = None, rows: Tensor | None = None,
        aggregator: Callable[[Tree, Tensor], Tree] | None = None,
    ) -> Tree:  # fmt: skip
        """``sum_k weights[k] scale[k] upload[k]`` over the clients in ``rows`` (see :func:`reduce_rows`).
        Executors that keep the uploads where they were trained override this with partial sums."""
        return reduce_rows(self.upload(source), weights, scale=scale, rows=rows, aggregator=aggregator)

    def mean(self, name: str, reduction: Reduction) -> Tree | None:
        """The declared weighted mean ``reduction`` of the uploads (``name``: its key in the plan's
        reductions), or None when its subset of clients is empty (:mod:`fedsim.core.reduction`)."""
        return mean_of(reduction, self, self.upload(reduction.source))

    def drift(self) -> float | None:
        """Client drift of the deltas (:func:`client_drift`)."""
        return client_drift(self.deltas)

    def extras_bytes(self) -> int:
        """Bytes of the extra uploads (beyond the delta) of one client."""
        return sum(v[0].numel() * v.element_size() for v in self.extras.values()) if self.extras else 0


def upload_of(deltas: Tree, extras: Tree, source: str) -> Tree:
    """``deltas`` for ``source="deltas"``, else the ``extras`` whose keys start with ``source`` (prefix removed)."""
    if source == "deltas":
        return deltas
    return {k[len(source) :]: v for k, v in extras.items() if k.startswith(source)}


def reduce_rows(
    tree: Tree, weights: Tensor, *, scale: Tensor | None = None, rows: Tensor | None = None,
    aggregator: Callable[[Tree, Tensor], Tree] | None = None,
) -> Tree:  # fmt: skip
    """The one reduction over the client axis: ``sum_k weights[k] (scale[k] tree[k])`` over the clients where
    the boolean ``rows[C]`` is True (all when None), or ``aggregator(scale * tree, weights)`` (a robust
    aggregator) on those rows. ``weights``, ``scale`` and ``rows`` are full-length ``[C]``.

    A weighted sum splits over any partition of the clients: the sum of the parts' reductions is the whole's
    (what the Ray executor's actors return as partial sums)."""
    if rows is not None:
        index = rows.nonzero().squeeze(1)
        tree = {k: v[index] for k, v in tree.items()}
        weights = weights[index]
        scale = scale[index] if scale is not None else None
    if scale is not None:
        tree = {k: v * per_client(scale, v) for k, v in tree.items()}
    return aggregator(tree, weights) if aggregator is not None else weighted_sum(tree, weights)


def delta_sum(deltas: Tree) -> Tensor:
    """``sum_k Delta_k`` flattened, in float64, in :class:`~fedsim.core.reduction.RowFold`'s fixed order (the
    same bits as the chunk-by-chunk sum of :class:`~fedsim.engine.streamed.StreamingRound`)."""
    fold = RowFold()
    for block in client_blocks(deltas):
        fold.add(block, owned=True)
    return fold.result()


def distance_sum(deltas: Tree, mean: Tensor) -> float:
    """``sum_k ||Delta_k - mean||`` in float64, block by block (``mean`` flattened, float64)."""
    total = 0.0
    for block in client_blocks(deltas):
        total += float((block - mean.to(block.device)).norm(dim=1).sum())
    return total


def client_drift(deltas: Tree) -> float | None:
    """Client drift: ``mean_k ||Delta_k - mean Delta|| / ||mean Delta||`` (plain mean over the clients), in
    float64 and streamed over blocks of clients (:func:`client_blocks`: two passes, the mean and then the
    distances), so its memory is one block whatever the number of clients."""
    clients = next(iter(deltas.values())).shape[0]
    mean = delta_sum(deltas) / clients
    norm = float(mean.norm())
    if norm == 0.0 or not math.isfinite(norm):
        return None
    return distance_sum(deltas, mean) / clients / norm


@dataclass
class LocalContext:
    """What a client algorithm sees during local training of one chunk: the global parameters
    (unstacked), the broadcast extras, and the chunk's persistent client state (stacked, or empty)."""

    global_params: Tree
    broadcast: Tree
    client_state: Tree
    lr: float
    scratch: Tree = field(default_factory=dict)
    """Per-chunk working memory of the algorithm (e.g. a running sum of raw gradients); dropped afterwards."""


@dataclass(frozen=True)
class TrajectorySpec:
    """What local training records for a regulator (see :mod:`fedsim.engine.trajectory`).

    ``unit``: ``"step"`` records every local step's parameter delta ``D_i = w_before - w_after``;
    ``"microbatch"`` the learning-rate-scaled gradient of each of ``microbatches`` equal slices of every
    step's minibatch; ``"sample"`` the learning-rate-scaled per-sample gradients of the round's samples at the
    round-start model. ``dtype``/``device`` set where the ``[C, U, D]`` buffer lives (``None``: the
    parameters' dtype and device; ``"cpu"``: host memory).
    """

    unit: str = "step"
    microbatches: int = 1
    dtype: torch.dtype | None = None
    device: str | None = None

    @classmethod
    def stored(cls, unit: str, microbatches: int, dtype: str = "float32", device: str = "same") -> TrajectorySpec:
        """A spec from the regulators' options: ``dtype`` in ``float32`` (the parameters' own), ``float16``,
        ``bfloat16``; ``device`` ``same`` (the parameters') or ``cpu`` (host memory)."""
        dtypes = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}
        if dtype not in dtypes or device not in ("same", "cpu"):
            raise FedsimError(f"trajectory dtype/device must be in {list(dtypes)} / [same, cpu], got {dtype}/{device}")
        return cls(unit, microbatches, dtypes[dtype], None if device == "same" else device)


class ClientAlgorithm:
    """Hooks that shape local training; the default is plain local training (FedAvg's client).

    All tensors are stacked over the chunk's clients. Subclasses override only what they change.

    Ownership: the ``grads`` and ``params`` a hook receives belong to the trainer, which updates them in
    place after the hook returns (the fast optimizer path); a hook that keeps a tensor across steps must
    ``clone()`` it. ``ctx`` tensors (global params, broadcast, client state) are never written by the trainer.
    """

    name = "local"
    trajectory: TrajectorySpec | None = None
    """Set by regulators: local training then records a :class:`~fedsim.engine.trajectory.Trajectory` and
    hands it to :meth:`regulate`."""
    microbatches: int = 1
    """When > 1 every step's minibatch is split into this many equal slices whose gradients are computed
    separately and merged by :meth:`combine_microbatches` (GAF's client filter, BHerd's microbatch unit)."""

    def init_client_state(self, params: Tree) -> Tree:
        """Per-client persistent state template (unstacked); empty means stateless."""
        return {}

    def grad_transform(self, grads: Tree, params: Tree, ctx: LocalContext) -> Tree:
        """Turn the minibatch gradient into the local direction (e.g. FedProx adds ``mu (w - w_g)``)."""
        return grads

    def after_step(self, params: Tree, ctx: LocalContext) -> Tree:
        """Change the parameters right after every optimizer step, outside the optimizer's state (SCAFFOLD's
        correction as its authors' and Flower's code apply it); only clients that took the step are changed.
        May work in place; returns the tree. Identity by default."""
        return params

    def project(self, params: Tree) -> Tree:
        """Map parameters back onto their feasible set after every local step (identity by default; the
        simplex-constrained dual of a min-max problem overrides it). May work in place; returns the tree."""
        return params

    def combine_microbatches(self, grads: Tree, counts: Tensor) -> tuple[Tree, Tensor | None]:
        """Merge per-microbatch gradients ``[C, M, ...]`` (``counts[C, M]`` valid samples in each) into the
        step's gradient ``[C, ...]``; also return which clients take the step (``None``: all). The default is
        the count-weighted mean, which is the whole minibatch's gradient."""
        total = counts.sum(1).clamp_min(1.0)
        weights = counts / total.unsqueeze(1)
        out = {}
        for k, g in grads.items():
            w = weights.reshape(*weights.shape, *([1] * (g.dim() - 2))).to(g.dtype)
            out[k] = (g * w).sum(1)
        return out, None

    def finish(self, deltas: Tree, num_steps: Tensor, ctx: LocalContext) -> tuple[Tree, Tree, Tree]:
        """After local training: return ``(uploaded deltas, upload extras, new client state)``."""
        return deltas, {}, ctx.client_state

    def extra_uploads(self, params: Tree) -> Tree:
        """Template (one client, unstacked) of the extras :meth:`finish` uploads besides the delta: the virtual
        clock needs their bytes before training (SCAFFOLD's control-variate change). Empty by default."""
        return {}

    def regulate(self, deltas: Tree, trajectory, num_steps: Tensor) -> tuple[Tree, Tree]:
        """Turn the uploaded deltas (and the recorded trajectory, when :attr:`trajectory` asks for one; else
        None) into the upload (ECGR, BHerd); also return per-client diagnostics ``{name: [C]}``. Runs after
        :meth:`finish`, so host state (SCAFFOLD's control variates) follows the actual local model."""
        return deltas, {}


@runtime_checkable
class Executor(Protocol):
    """Where the selected clients train (local in-process, Ray actors, Flower's grid).

    ``train`` runs one round for ``plan.client_ids`` from the global ``params`` (decentralized nodes start
    from their own ``start`` rows with their optimizer state ``opt_state``) and returns their
    :class:`ClientUpdates`. ``client_state`` / ``sampler_state`` are the persistent per-client state
    (checkpointed when ``checkpoints`` is True); ``chunk_size`` the clients per vectorized call; ``close``
    releases workers.
    """

    checkpoints: bool
    chunk_size: int | None

    def train(
        self, plan: Plan, params: Tree, round_: int, lr: float, start: Tree | None = None,
        opt_state: Tree | None = None,
    ) -> ClientUpdates: ...  # fmt: skip

    @property
    def client_state(self) -> Tree: ...

    @property
    def sampler_state(self) -> dict | None: ...

    def close(self) -> None: ...
