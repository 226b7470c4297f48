"""Ray executor: a few long-lived actors, each owning a shard of the clients, on all CPUs/GPUs of a machine
or of a Ray cluster.

Clients are split into ``num_actors`` contiguous shards of ids. Each actor (:class:`ShardWorker` inside
``ray.remote``) holds its shard's training samples (put once in the object store), its clients' persistent
state (SCAFFOLD's ``c_k``, FedDyn's ``h_k``) and its sampler state, and trains its selected clients with the
same vectorized :class:`~fedsim.engine.executor.LocalExecutor` code, chunk by chunk. A round:

1. the driver puts the global model and the broadcast once in the object store; every actor with selected
   clients trains them and answers with per-client scalars (steps, loss, diagnostics), its part of the
   sample-weighted delta sum (what FedAvg-like strategies reduce) and of the plain delta sum (for drift);
2. any other reduction of the strategy (:meth:`ClientUpdates.reduce`) is one call per actor that returns the
   partial sum ``sum_{k in shard} w_k s_k u_k``; the driver adds the partials. A robust aggregator, or code
   that reads ``updates.deltas`` itself (decentralized gossip), gathers the per-client stack instead;
3. drift's second pass (distances to the mean delta) is sent as soon as the mean is known.

Results equal the local executor's: each client's batches and state depend only on (seed, round, id), the
chunk size is the driver's, and reductions differ only in float summation order.

Faults: every train call also returns a snapshot of the actor's state (kept by reference in the object
store, never fetched by the driver). When an actor dies, a new one is started from the snapshot of the
round's start and the shard's round is run again (then the interrupted call), so the run ends with the
same numbers. Ray started by the executor is shut down by :meth:`RayExecutor.close`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedsim.core.errors import FedsimError
from fedsim.core.protocol import Plan, delta_sum, distance_sum, reduce_rows, upload_of
from fedsim.core.pytree import Tree, concat
from fedsim.data.samplers import merge_states
from fedsim.threads import WAIT_POLICY

from .executor import LocalExecutor
from .store import ClientStore, shard_arrays

RAY_EXTRA = "pip install 'fedsim[ray]'"


@dataclass(frozen=True)
class RayOptions:
    """Where and how the actors run. ``num_actors`` None: as many as the cluster's GPUs (with
    ``gpus_per_actor > 0``) or CPUs allow; ``address`` None starts Ray on this machine, ``"auto"`` or
    ``"host:port"`` / ``"ray://host:port"`` joins an existing cluster; ``max_restarts``: new actors started
    for one shard within one call before the run fails."""

    num_actors: int | None = None
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    address: str | None = None
    max_restarts: int = 3


def import_ray():
    """The ``ray`` module, or a one-line error naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise FedsimError(f"--executor ray needs Ray, which is not installed: {RAY_EXTRA}") from None
    return ray


def shard_clients(num_clients: int, num_shards: int) -> list[np.ndarray]:
    """``num_shards`` contiguous, nearly equal ranges of client ids (none empty)."""
    return [s for s in np.array_split(np.arange(num_clients, dtype=np.int64), num_shards) if len(s)]


def _on(value, device: torch.device | str):
    """A tensor or a tree moved to ``device`` (None stays None)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.detach().to(device)
    return {k: v.detach().to(device) for k, v in value.items()}


def _cpu(tree: Tree | None) -> Tree | None:
    return _on(tree, "cpu")


@dataclass
class _Pending:
    """Calls submitted to shards' actors: ``calls[i] = (method, args)``, their refs, and the actor each went to."""

    calls: dict[int, tuple[str, tuple]]
    refs: dict[int, Any]
    actors: dict[int, Any]


def add_parts(parts: dict[int, Tree]) -> Tree:
    """The sum of shards' partial sums, in shard order."""
    order = sorted(parts)
    return {k: sum(parts[i][k] for i in order) for k in parts[order[0]]}


class ShardWorker:
    """What runs inside one Ray actor: a :class:`LocalExecutor` over the shard's clients, plus the last
    round's updates kept for the driver's reductions (a plain class, usable without Ray)."""

    def __init__(self, data: dict[str, np.ndarray], setup: dict[str, Any], snapshot: dict[str, Any] | None,
                 threads: int, use_gpu: bool):  # fmt: skip
        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        setup = dict(setup)
        model = setup.pop("model").to(self.device)
        store = ClientStore.from_shard(data, self.device)
        self.executor = LocalExecutor(model, store, clients=data["clients"], **setup)
        self.updates = None
        if snapshot is not None:
            self.load(snapshot)

    def load(self, snapshot: dict[str, Any]) -> None:
        """Take over client state rows and sampler state (a checkpoint, or a dead actor's last snapshot)."""
        self.executor.client_state = {k: v.clone() for k, v in snapshot["client_state"].items()}
        self.executor.sampler_state = snapshot["sampler_state"]

    def snapshot(self) -> dict[str, Any]:
        return {"client_state": self.executor.client_state, "sampler_state": self.executor.sampler_state}

    def train(
        self, ids, params, round_, lr, broadcast, start=None, opt_state=None, weights=None, step_limit=None,
        round_keys=None,
    ):  # fmt: skip
        """Train the shard's selected clients; keep the updates; return per-client scalars, the flattened
        ``sum_k Delta_k`` (float64, for the drift metric), the partial sum ``sum_k weights[k] Delta_k`` (the
        sample-weighted mean most strategies ask for, computed before they ask) and a snapshot."""
        on = lambda value: _on(value, self.device)  # noqa: E731
        self.updates = u = self.executor.train(
            Plan(ids, on(broadcast), step_limit=step_limit, round_keys=round_keys),
            on(params),
            round_,
            lr,
            on(start),
            on(opt_state),
        )
        meta = {
            "num_samples": u.num_samples.cpu(), "num_steps": u.num_steps.cpu(), "train_loss": u.train_loss.cpu(),
            "samples_processed": u.samples_processed.cpu(),
            "stats": _cpu(u.stats), "extras_bytes": u.extras_bytes(),
            "delta_sum": delta_sum(u.deltas).cpu(),
            "weighted_sum": self.reduce("deltas", weights) if weights is not None else None,
        }  # fmt: skip
        return meta, self.snapshot()

    def reduce(self, source: str, weights, scale=None, rows=None) -> Tree:
        """This shard's part of ``sum_k w_k s_k u_k`` (see :func:`reduce_rows`)."""
        on = lambda value: _on(value, self.device)  # noqa: E731
        return _cpu(reduce_rows(self.updates.upload(source), on(weights), scale=on(scale), rows=on(rows)))

    def gather(self, what: str) -> Tree:
        """The per-client stack of an upload (``"deltas"``, an extras prefix), or ``"extras"``/``"opt_state"``."""
        u = self.updates
        if what in ("extras", "opt_state"):
            return _cpu(getattr(u, what))
        return _cpu(upload_of(u.deltas, u.extras, what))

    def distance_sum(self, mean: torch.Tensor) -> float:
        """``sum_k ||Delta_k - mean||`` (float64) over the shard's trained clients."""
        return distance_sum(self.updates.deltas, mean)

    def ping(self) -> bool:
        return True


class ShardedUpdates:
    """The round's :class:`~fedsim.core.protocol.ClientUpdates` while the uploads stay on the actors:
    per-client scalars are here; :meth:`reduce` asks the actors for partial sums (the sample-weighted sum of
    the deltas came with the training reply); ``deltas``, ``extras`` and ``opt_state`` gather the per-client
    stacks on first use. The drift metric's second pass is started as soon as the round's mean delta is known.
    """

    def __init__(self, executor: RayExecutor, client_ids: np.ndarray, spans: dict[int, slice],
                 metas: dict[int, dict[str, Any]], lr: float, device: torch.device,
                 train_weights: torch.Tensor):  # fmt: skip
        self.executor, self.client_ids, self.spans, self.lr, self.device = executor, client_ids, spans, lr, device
        self.num_clients = executor.num_clients
        order = sorted(spans)
        cat = lambda key: torch.cat([metas[i][key] for i in order]).to(device)  # noqa: E731
        self.num_samples, self.num_steps, self.train_loss = cat("num_samples"), cat("num_steps"), cat("train_loss")
        self.samples_processed = cat("samples_processed")
        stats = [metas[i]["stats"] for i in order]
        self.stats = {k: v.to(device) for k, v in concat(stats).items()} if stats[0] else {}
        self._extras_bytes = metas[order[0]]["extras_bytes"]
        self._gathered: dict[str, Tree] = {}
        self._train_weights = train_weights
        self._weighted_sum = add_parts({i: metas[i]["weighted_sum"] for i in order})
        self._mean = sum(metas[i]["delta_sum"] for i in order) / len(client_ids)
        self._distances = None
        if 0.0 < float(self._mean.norm()) < math.inf:  # drift's second pass, in flight while the server works
            self._distances = executor.submit({i: ("distance_sum", (self._mean,)) for i in order})

    @property
    def weights(self) -> torch.Tensor:
        return self.num_samples / self.num_samples.sum()

    def _part(self, values: torch.Tensor | None, i: int) -> torch.Tensor | None:
        return values[self.spans[i]].cpu() if values is not None else None

    def reduce(self, source, weights, *, scale=None, rows=None, aggregator=None) -> Tree:
        if aggregator is not None:  # a robust aggregator needs every client's upload
            return reduce_rows(self.upload(source), weights, scale=scale, rows=rows, aggregator=aggregator)
        if source == "deltas" and scale is None and rows is None and torch.equal(weights.cpu(), self._train_weights):
            parts = {0: self._weighted_sum}  # computed by the actors with the training (same rule, same weights)
        else:
            calls = {i: ("reduce", (source, *(self._part(t, i) for t in (weights, scale, rows)))) for i in self.spans}
            parts = self.executor.call_shards(calls)
        return {k: v.to(self.device) for k, v in add_parts(parts).items()}

    def mean(self, name: str, reduction) -> Tree | None:
        """A declared mean (:class:`~fedsim.core.reduction.Reduction`) from the actors' partial sums of
        ``sum_k w_k s_k u_k`` (float32 on each actor, so it agrees with the local executor's float64 fold to
        float32 rounding)."""
        weights, scale, rows = reduction.normalized(self)
        if rows is not None and not bool(rows.any()):
            return None
        return self.reduce(reduction.source, weights, scale=scale, rows=rows)

    def _gather(self, what: str) -> Tree:
        if what not in self._gathered:
            parts = self.executor.call_shards({i: ("gather", (what,)) for i in self.spans})
            trees = [parts[i] for i in sorted(parts)]
            self._gathered[what] = {k: v.to(self.device) for k, v in concat(trees).items()} if trees[0] else {}
        return self._gathered[what]

    def upload(self, source: str = "deltas") -> Tree:
        return self._gather(source)

    @property
    def deltas(self) -> Tree:
        return self._gather("deltas")

    @property
    def extras(self) -> Tree:
        return self._gather("extras")

    @property
    def opt_state(self) -> Tree:
        return self._gather("opt_state")

    def drift(self) -> float | None:
        """:func:`~fedsim.core.protocol.client_drift` from the actors' sums: ``sum_k Delta_k`` (with the
        training reply), then ``sum_k ||Delta_k - mean||``."""
        if self._distances is None:
            return None
        distances = self.executor.collect(self._distances)
        return float(sum(distances[i] for i in sorted(distances)) / len(self.client_ids) / float(self._mean.norm()))

    def extras_bytes(self) -> int:
        return self._extras_bytes


class RayExecutor:
    """Trains a plan's clients on Ray actors that each own a shard of the clients (see the module docstring).

    Built from a configured :class:`LocalExecutor` (the one the run would use in-process: model, data,
    sampler, optimizer, client algorithm, chunk size, initial client state), whose settings every actor
    copies. :meth:`close` kills the actors and shuts Ray down when this executor started it.
    """

    checkpoints = True

    def __init__(self, local: LocalExecutor, options: RayOptions | None = None):
        self.options = options = options or RayOptions()
        ray = self.ray = import_ray()
        self.sampler, self.chunk_size = local.sampler, local.chunk_size
        self.num_clients, self.device, self.sizes = local.store.num_clients, local.device, local.store.sizes
        self.actors: list[Any] = []
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
            try:
                ray.init(address=options.address, include_dashboard=False, logging_level=logging.WARNING)
            except Exception as err:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError, ...
                self._owns_ray = False
                where = f"the Ray cluster at {options.address}" if options.address else "Ray on this machine"
                raise FedsimError(f"could not start or join {where}: {str(err).splitlines()[0]}") from None
        try:
            self._start(local)
        except BaseException:
            self.close()
            raise

    def _start(self, local: LocalExecutor) -> None:
        ray, options = self.ray, self.options
        count = self._num_actors()
        self.shards = shard_clients(self.num_clients, min(count, self.num_clients))
        self.setup_ref = ray.put({
            "model": local.model.cpu(), "sampler": local.sampler, "optimizer": local.optimizer,
            "algorithm": local.algorithm, "seed": local.seed, "local_steps": local.local_steps,
            "local_epochs": local.local_epochs, "batch_size": local.batch_size, "chunk_size": local.chunk_size,
            "grad_mode": local.trainer.grad_mode, "sequential": local.sequential, "loss_fn": local.loss_fn,
            "clipping": local.clipping,
        })  # fmt: skip
        local.model.to(self.device)
        self.data_refs = [ray.put(shard_arrays(local.store, owned)) for owned in self.shards]
        self._snapshots = [ray.put(self._initial_snapshot(local, owned)) for owned in self.shards]
        self._round_start = list(self._snapshots)
        self._round_calls: dict[int, tuple] = {}
        policy = os.environ.get(WAIT_POLICY, "PASSIVE")  # actors share cores: idle OpenMP threads sleep
        self.actor_class = ray.remote(ShardWorker).options(
            num_cpus=options.cpus_per_actor,
            num_gpus=options.gpus_per_actor,
            max_restarts=0,
            runtime_env={"env_vars": {WAIT_POLICY: policy}},
        )
        self.actors = [self._spawn(i, self._snapshots[i]) for i in range(len(self.shards))]
        self.call_shards({i: ("ping", ()) for i in range(len(self.shards))})
        self.restarts = 0

    def _initial_snapshot(self, local: LocalExecutor, owned: np.ndarray) -> dict[str, Any]:
        rows = local.state_rows(owned)
        return {"client_state": {k: v[rows].clone() for k, v in local.client_state.items()},
                "sampler_state": local.sampler_state}  # fmt: skip

    def _num_actors(self) -> int:
        o = self.options
        resources = self.ray.cluster_resources()
        cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
        if o.num_actors is None:
            fit = gpus / o.gpus_per_actor if o.gpus_per_actor > 0 else cpus / o.cpus_per_actor
            count = max(1, int(fit + 1e-9))
        else:
            count = o.num_actors
        need_cpu, need_gpu = count * o.cpus_per_actor, count * o.gpus_per_actor
        if need_cpu > cpus + 1e-9 or need_gpu > gpus + 1e-9:
            raise FedsimError(
                f"{count} actors x ({o.cpus_per_actor} CPU, {o.gpus_per_actor} GPU) need {need_cpu:g} CPUs and "
                f"{need_gpu:g} GPUs but the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs; lower --num-actors "
                "or the per-actor resources"
            )
        return count

    def _spawn(self, i: int, snapshot_ref):
        threads = max(1, int(self.options.cpus_per_actor))
        use_gpu = self.options.gpus_per_actor > 0
        return self.actor_class.remote(self.data_refs[i], self.setup_ref, snapshot_ref, threads, use_gpu)

    # -- calls with restart ---------------------------------------------------------------------------

    def call_shards(self, calls: dict[int, tuple[str, tuple]]) -> dict[int, Any]:
        """Call ``method(*args)`` on the actors of the given shards in parallel and wait for the results."""
        return self.collect(self.submit(calls))

    def submit(self, calls: dict[int, tuple[str, tuple]]) -> _Pending:
        """Start ``method(*args)`` on the actors of the given shards; :meth:`collect` waits for the results."""
        refs = {i: self._submit(i, method, args) for i, (method, args) in calls.items()}
        return _Pending(calls, refs, {i: self.actors[i] for i in calls})

    def collect(self, pending: _Pending) -> dict[int, Any]:
        """The results of submitted calls. An actor that died is replaced (from the snapshot of the round's
        start, its shard's round trained again) and the call repeated; a call that was waiting on an actor
        already replaced is just repeated on the new one."""
        ray, out = self.ray, {}
        for i, (method, args) in pending.calls.items():
            for attempt in range(self.options.max_restarts + 1):
                try:
                    out[i] = self._result(i, method, pending.refs[i])
                    break
                except ray.exceptions.RayActorError as err:
                    if attempt == self.options.max_restarts:
                        raise FedsimError(
                            f"Ray actor of shard {i} died {attempt + 1} times in a row ({type(err).__name__}); "
                            "giving up"
                        ) from None
                    if self.actors[i] is pending.actors[i]:
                        self._restart(i, replay=method != "train")
                    pending.refs[i], pending.actors[i] = self._submit(i, method, args), self.actors[i]
        return out

    def _submit(self, i: int, method: str, args: tuple):
        handle = getattr(self.actors[i], method)
        if method == "train":
            return handle.options(num_returns=2).remote(*args)
        return handle.remote(*args)

    def _result(self, i: int, method: str, ref):
        ray = self.ray
        try:
            if method == "train":
                meta_ref, snapshot_ref = ref
                meta = ray.get(meta_ref)
                self._snapshots[i] = snapshot_ref  # kept in the object store, not fetched
                return meta
            return ray.get(ref)
        except ray.exceptions.RayTaskError as err:  # our code raised inside the actor: re-raise its error
            cause = err.cause if isinstance(err.cause, BaseException) else err
            raise cause from None

    def _restart(self, i: int, replay: bool) -> None:
        """A fresh actor for shard ``i`` from the snapshot of the round's start; with ``replay`` the shard's
        round is trained again (the killed actor's updates died with it)."""
        self.restarts += 1
        with contextlib.suppress(Exception):  # already gone
            self.ray.kill(self.actors[i], no_restart=True)
        self._snapshots[i] = self._round_start[i]
        self.actors[i] = self._spawn(i, self._round_start[i])
        if replay and i in self._round_calls:
            self.call_shards({i: ("train", self._round_calls[i])})

    # -- the executor interface -----------------------------------------------------------------------

    def train(self, plan: Plan, params: Tree, round_: int, lr: float, start: Tree | None = None,
              opt_state: Tree | None = None) -> ShardedUpdates:  # fmt: skip
        """Train the plan's clients on the actors owning them (``start``/``opt_state`` rows in plan order, as
        in :meth:`LocalExecutor.train`)."""
        ray = self.ray
        ids = np.asarray(plan.client_ids, dtype=np.int64)
        sizes = torch.as_tensor(self.sizes[ids], dtype=torch.float64)
        weights = sizes / sizes.sum()  # ClientUpdates.weights, known before training
        self._round_start = list(self._snapshots)
        params_ref, broadcast_ref = ray.put(_cpu(params)), ray.put(_cpu(plan.broadcast))
        spans, self._round_calls = {}, {}
        for i, owned in enumerate(self.shards):
            lo, hi = np.searchsorted(ids, [owned[0], owned[-1] + 1])
            if hi == lo:
                continue
            spans[i] = rows = slice(int(lo), int(hi))
            start_rows, opt_rows = (ray.put({k: v[rows].cpu() for k, v in t.items()}) if t else None
                                    for t in (start, opt_state))  # fmt: skip
            limit, keys = (v[rows] if v is not None else None for v in (plan.step_limit, plan.round_keys))
            args = (ids[rows], params_ref, round_, lr, broadcast_ref, start_rows, opt_rows, weights[rows], limit, keys)
            self._round_calls[i] = args
        metas = self.call_shards({i: ("train", args) for i, args in self._round_calls.items()})
        return ShardedUpdates(self, ids, spans, metas, lr, self.device, weights)

    @property
    def client_state(self) -> Tree:
        """All clients' persistent state, rows in client order (fetched from the actors' snapshots)."""
        states = [s["client_state"] for s in self.ray.get(self._snapshots)]
        return concat(states) if states and states[0] else {}

    @client_state.setter
    def client_state(self, state: Tree) -> None:
        self._load(client_state=state)

    @property
    def sampler_state(self) -> dict[str, np.ndarray] | None:
        return merge_states([s["sampler_state"] for s in self.ray.get(self._snapshots)], self.shards)

    @sampler_state.setter
    def sampler_state(self, state: dict[str, np.ndarray] | None) -> None:
        self._load(sampler_state=state)

    def _load(self, **changes: Any) -> None:
        """Replace client or sampler state on every actor (restoring a checkpoint)."""
        snapshots = self.ray.get(self._snapshots)
        for i, owned in enumerate(self.shards):
            new = dict(snapshots[i])
            if "client_state" in changes:
                new["client_state"] = {k: v[owned] for k, v in changes["client_state"].items()}
            if "sampler_state" in changes:
                new["sampler_state"] = changes["sampler_state"]
            self._snapshots[i] = self.ray.put(new)
        self.call_shards({i: ("load", (self._snapshots[i],)) for i in range(len(self.shards))})
        self._round_start = list(self._snapshots)

    def close(self) -> None:
        """Kill the actors; shut Ray down if this executor started it (nothing is left running)."""
        for actor in self.actors:
            with contextlib.suppress(Exception):  # already dead
                self.ray.kill(actor, no_restart=True)
        self.actors = []
        if self._owns_ray and self.ray.is_initialized():
            self.ray.shutdown()
        self._owns_ray = False
