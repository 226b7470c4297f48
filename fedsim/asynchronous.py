"""Asynchronous federated learning on the virtual clock, trained vectorized (FedAsync, FedBuff).

The server keeps ``C = strategy.concurrency`` clients in flight. A client dispatched at virtual time ``t0``
from server version ``tau`` arrives at ``t0 + d_k`` (:func:`fedsim.system.durations`, with the samples its
planned local steps process). Events run in virtual-time order, ties broken by client id:

1. when no arrival is left at the current time, idle slots are refilled: each new client is drawn uniformly
   among the clients not in flight (:func:`pick_client`, counter-based on the dispatch number) and starts from
   the current model; client ``k``'s ``j``-th job draws the local batches of round ``j``;
2. the earliest arrival is handed to the strategy (its staleness is ``t - tau``, ``t`` the server version);
   when the strategy has ``step_size`` arrivals (FedAsync 1, FedBuff K) the server steps: one metrics row.

**Vectorized.** A client's start model is known when it is dispatched and its result is needed only by the
server step that applies it. When a server step needs a result not trained yet, every in-flight client not yet
trained is trained in one batched call, each from its own start model (the executor's stacked ``start`` rows,
per-client sampler keys). The schedule never waits for training: arrival times depend only on the planned
samples and counter-based draws.
Results equal a per-client event loop (tested). ``mean_vectorized_batch`` in ``summary.json`` is the mean
size of these calls; it approaches C when clients' speeds differ moderately.

Metrics per server step (one row, ``round`` counts server steps): ``clients`` (arrivals applied),
``staleness_mean``/``staleness_max`` (over them), ``arrived`` (client updates received so far, cumulative),
``in_flight``, ``wasted_samples`` (work of clients whose availability window closed before they arrived:
their share of samples by then), ``round_time_s`` (virtual seconds
since the previous step), ``train_loss`` (their sample-weighted mean), ``drift``, ``update_norm``,
``bytes_up``/``bytes_down`` (arrivals and dispatches since the previous step). The in-flight clients, their
start models and results, the buffer and the clock are checkpointed: ``--resume`` continues exactly.

With availability windows (``system.availability``, :mod:`fedsim.windows`) only online clients are dispatched;
a client whose window closes before it arrives is lost then (never trained, its work wasted) and its slot is
refilled; when nobody is online and nobody is in flight, the clock jumps to the next window's start.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from fedsim.core import rng
from fedsim.core.errors import FedsimError
from fedsim.core.protocol import Plan, ServerState
from fedsim.core.pytree import Tree, flatten
from fedsim.data.samplers import planned_samples
from fedsim.rounds import TIMELINE_CLIENTS, FederatedMode, timeline
from fedsim.system import durations, phases
from strategies.asynchronous import Arrival

STREAM_DISPATCH = 10
REJECTION_TRIES = 64


def pick_client(seed: int, dispatch: int, busy: np.ndarray) -> int:
    """The client of dispatch number ``dispatch``: uniform among those not ``busy``. Tries the counter-based
    uniform draws ``randint(N; seed, dispatch, attempt)`` for attempts ``0..63`` and takes the first idle one;
    if all are busy, the idle client with the smallest hash key of (seed, dispatch, client)."""
    n = len(busy)
    for attempt in range(REJECTION_TRIES):
        k = rng.randint_scalar(n, seed, STREAM_DISPATCH, dispatch, attempt)
        if not busy[k]:
            return k
    idle = np.flatnonzero(~busy)
    keys = rng.hash_keys(seed, STREAM_DISPATCH, dispatch, REJECTION_TRIES, idle)
    return int(idle[np.argmin(keys)])


@dataclass(eq=False)
class Job:
    """One client's local training in flight: its job number ``key`` (its sampler round), the server
    ``version`` it started from, its virtual start and arrival times, planned samples and learning rate; the
    ``result`` once trained (``delta``, ``loss``, ``steps``, ``processed``, ``num_samples``)."""

    client: int
    key: int
    version: int
    start_s: float
    end_s: float
    samples: float
    lr: float
    result: dict[str, Any] | None = None
    lost: bool = False
    """The client goes offline before it finishes: ``end_s`` is the end of its window, ``samples`` the share
    of its work done by then (wasted)."""


class AsyncMode(FederatedMode):
    """The asynchronous event loop as the round loop's mode: :meth:`step` runs events until the next server
    step (see the module docstring)."""

    def __init__(self, strategy) -> None:
        super().__init__(strategy, None)
        self.reset()

    def reset(self) -> None:
        self.clock, self.last_step_s = 0.0, 0.0
        self.jobs: dict[int, Job] = {}
        """In-flight jobs by client (a client is in flight at most once)."""
        self.queue: list[tuple[float, int, Job]] = []
        self.in_flight: np.ndarray | None = None
        """``in_flight[k]``: client k has a job in flight (the complement of the dispatch pool)."""
        """The in-flight jobs as a heap ordered by (arrival time, client)."""
        self.buffer: list[tuple[Job, int]] = []
        self.models: dict[int, Tree] = {}
        self.dispatched, self.arrived = 0, 0
        self.job_counts: np.ndarray | None = None
        self.batches: list[int] = []
        self.staleness_counts: dict[int, int] = {}

    def initial_state(self, sim) -> ServerState:
        self.reset()
        return self.strategy.init(sim.init_params)

    def clients_per_round(self, sim) -> int:
        return self.strategy.clients_in_flight(sim.store.num_clients)

    # -- the event loop ----------------------------------------------------------------------------------

    def step(self, sim, round_: int, state: ServerState) -> tuple[ServerState, dict[str, Any]]:
        """Events until the next server step (version ``round_ - 1`` -> ``round_``); the step's metrics row."""
        version, strategy = round_ - 1, self.strategy
        n = sim.store.num_clients
        if self.job_counts is None:
            self.job_counts = np.zeros(n, dtype=np.int64)
        if self.in_flight is None:  # kept up to date from here on (rebuilt after a restore)
            self.in_flight = np.zeros(n, dtype=bool)
            self.in_flight[list(self.jobs)] = True
        bytes_down = bytes_up = 0
        wasted = 0.0
        capacity = self.clients_per_round(sim)
        while True:
            upcoming = self.queue[0][2] if self.queue else None
            if (upcoming is None or upcoming.end_s > self.clock) and len(self.jobs) < capacity:
                bytes_down += self._dispatch(sim, version, state.params)
                upcoming = self.queue[0][2] if self.queue else None
            if upcoming is None:  # nobody online and nobody in flight: wait for the next window
                self.clock = self._next_window(sim)
                continue
            job = heapq.heappop(self.queue)[2]
            self.clock = job.end_s
            del self.jobs[job.client]
            self.in_flight[job.client] = False
            if job.lost:  # its window closed before it finished: its work so far is wasted
                wasted += job.samples
                continue
            self.buffer.append((job, version - job.version))
            self.arrived += 1
            sim.participation[job.client] += 1
            bytes_up += sim.upload_bytes
            if len(self.buffer) >= strategy.step_size:
                break
        applied, self.buffer = self.buffer, []
        untrained = [job for job, _ in applied if job.result is None]
        if untrained:  # results are needed now, not at each arrival: more clients are trained together
            self._train_pending(sim, untrained)
        arrivals = [
            Arrival(job.client, job.result["delta"], self.models[job.version], staleness, job.result["num_samples"])
            for job, staleness in applied
        ]  # fmt: skip
        new = strategy.server_step(round_, state, arrivals)
        self._forget_models()
        record = self._record(sim, round_, state, new, applied, bytes_up, bytes_down)
        record["wasted_samples"] = wasted
        self.last_step_s = self.clock
        return new, record

    def _next_window(self, sim) -> float:
        opens = sim.windows.next_start(self.clock) if sim.windows is not None else None
        if opens is None:
            raise FedsimError(
                f"no client is online after virtual time {self.clock:g} s and none is in flight: the availability "
                "windows have all closed; lower --rounds or extend the windows"
            )
        return opens

    def _dispatch(self, sim, version: int, params: Tree) -> int:
        """Fill the idle slots at the current time with clients starting from ``params`` (version
        ``version``); returns the bytes sent."""
        n = sim.store.num_clients
        busy, idle = self.in_flight, n - len(self.jobs)
        if sim.windows is not None:  # offline clients cannot start
            busy = np.ones(n, dtype=bool)
            busy[sim.windows.online(self.clock, n)] = False
            busy |= self.in_flight
            idle = int((~busy).sum())
        picks = []
        for _ in range(min(self.clients_per_round(sim) - len(self.jobs), idle)):
            k = pick_client(sim.config.seed, self.dispatched, busy)
            busy[k] = self.in_flight[k] = True
            self.dispatched += 1
            picks.append(k)
        if not picks:
            return 0
        ids = np.asarray(picks, dtype=np.int64)
        self.job_counts[ids] += 1
        keys = self.job_counts[ids]
        samples = self.planned_samples(sim, ids, keys)
        profiles = sim.system.profiles(sim.store.num_clients)
        seconds = durations(profiles, ids, np.full(len(ids), sim.model_bytes), np.full(len(ids), sim.upload_bytes),
                            samples)  # fmt: skip
        if version not in self.models:
            self.models[version] = {k: v.detach().clone() for k, v in params.items()}
        lr = sim.lr(version + 1)
        until = sim.windows.online_until(ids, self.clock) if sim.windows is not None else np.full(len(ids), np.inf)
        for k, key, s, d, u in zip(ids.tolist(), keys.tolist(), samples.tolist(), seconds.tolist(), until.tolist(),
                                   strict=True):  # fmt: skip
            job = Job(k, key, version, self.clock, self.clock + d, s, lr)
            if u < job.end_s:  # goes offline first: lost at the end of its window, after this share of its work
                job.lost, job.end_s = True, u
                job.samples = s * max(0.0, min(1.0, (u - self.clock) / d))
            self.jobs[k] = job
            heapq.heappush(self.queue, (job.end_s, k, job))
        return len(ids) * sim.model_bytes

    @staticmethod
    def planned_samples(sim, ids: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """Samples each job's planned local steps process (the sampler's mask; no sampler state is used)."""
        c = sim.config
        return planned_samples(
            sim.sampler, c.seed, keys, ids, sim.store.sizes[ids], steps=None if c.local_epochs else c.local_steps,
            epochs=c.local_epochs, batch_size=c.batch_size,
        )  # fmt: skip

    def _train_pending(self, sim, needed: list[Job]) -> None:
        """Train every in-flight job without a result and the ``needed`` arrivals, in one batched call per
        learning rate; lost jobs are never trained."""
        waiting = [j for j in self.jobs.values() if j.result is None and not j.lost]
        pending = sorted([*waiting, *needed], key=lambda j: j.client)
        for lr in sorted({j.lr for j in pending}):
            group = [j for j in pending if j.lr == lr]
            ids = np.asarray([j.client for j in group], dtype=np.int64)
            keys = np.asarray([j.key for j in group], dtype=np.int64)
            start = {k: torch.stack([self.models[j.version][k] for j in group]) for k in self.models[group[0].version]}
            plan = Plan(ids, round_keys=keys)
            updates = sim.executor.train(plan, self.models[group[0].version], group[0].key, lr, start=start)
            deltas = updates.deltas
            flat = flatten(deltas)
            losses, steps = updates.train_loss.tolist(), updates.num_steps.tolist()
            sizes = updates.num_samples.tolist()
            processed = updates.samples_processed
            processed = processed.tolist() if processed is not None else [j.samples for j in group]
            for i, job in enumerate(group):
                job.result = {
                    "delta": {k: v[i] for k, v in deltas.items()},
                    "flat": flat[i],
                    "loss": float(losses[i]),
                    "steps": int(steps[i]),
                    "processed": float(processed[i]),
                    "num_samples": float(sizes[i]),
                }
            self.batches.append(len(group))

    def _forget_models(self) -> None:
        needed = {j.version for j in self.jobs.values()} | {j.version for j, _ in self.buffer}
        self.models = {v: m for v, m in self.models.items() if v in needed}

    def _record(self, sim, round_, state, new, applied, bytes_up, bytes_down) -> dict[str, Any]:
        results = [job.result for job, _ in applied]
        staleness = [s for _, s in applied]
        weights = np.asarray([r["num_samples"] for r in results], dtype=np.float64)
        losses = np.asarray([r["loss"] for r in results], dtype=np.float64)
        drift = None
        if len(results) > 1:  # client_drift's definition on the few applied deltas, from one flattened copy
            flat = torch.stack([r["flat"] for r in results]).double()
            mean = flat.mean(dim=0)
            norm = float(mean.norm())
            drift = float((flat - mean).norm(dim=1).mean()) / norm if norm > 0 and math.isfinite(norm) else None
        step = {k: new.params[k] - state.params[k] for k in new.params}
        for s in staleness:
            self.staleness_counts[s] = self.staleness_counts.get(s, 0) + 1
        return {
            "round": round_,
            "lr": sim.lr(round_),
            "clients": len(applied),
            "train_loss": float(weights @ losses / weights.sum()),
            "drift": drift,
            "update_norm": float(flatten(step, stacked=False).norm()),
            "bytes_up": int(bytes_up),
            "bytes_down": int(bytes_down),
            "round_time_s": self.clock - self.last_step_s,
            "staleness_mean": float(np.mean(staleness)),
            "staleness_max": int(max(staleness)),
            "arrived": self.arrived,
            "in_flight": len(self.jobs),
            "wasted_samples": 0.0,
            "timeline": self._timeline(sim, [job for job, _ in applied]),
        }

    def _timeline(self, sim, jobs: list[Job]) -> list[list[Any]]:
        """The sampled clients' jobs among ``jobs`` (:func:`fedsim.rounds.timeline`), from the step's start."""
        jobs = [j for j in jobs if j.client < TIMELINE_CLIENTS]
        if not jobs:
            return []
        ids = np.asarray([j.client for j in jobs], dtype=np.int64)
        profiles = sim.system.profiles(sim.store.num_clients)
        processed = np.asarray([j.result["processed"] for j in jobs])
        download, compute, upload = phases(profiles, ids, sim.model_bytes, sim.upload_bytes, processed)
        spans = {"client": ids, "download_s": download, "compute_s": compute, "upload_s": upload,
                 "status": np.full(len(ids), "arrived", dtype=object)}  # fmt: skip
        return timeline(spans, np.asarray([j.start_s for j in jobs]) - self.last_step_s)

    def report(self) -> dict[str, Any]:
        """``mean_vectorized_batch`` (clients per batched training call) and ``staleness_histogram`` (applied
        updates per staleness)."""
        return {
            "mean_vectorized_batch": float(np.mean(self.batches)) if self.batches else None,
            "staleness_histogram": {str(k): v for k, v in sorted(self.staleness_counts.items())},
        }

    # -- checkpoints -----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything the event loop needs to continue exactly (plain data for ``torch.load(weights_only=True)``)."""
        cpu = lambda tree: {k: v.detach().cpu() for k, v in tree.items()}  # noqa: E731
        copy = lambda tree: {k: v.detach().cpu().clone() for k, v in tree.items()}  # noqa: E731

        def job_data(job: Job) -> dict[str, Any]:
            data = {f.name: getattr(job, f.name) for f in fields(job) if f.name != "result"}
            data["result"] = None
            if job.result is not None:  # the delta alone (a copy, not a view of its batch); flat is rebuilt
                kept = {k: v for k, v in job.result.items() if k not in ("delta", "flat")}
                data["result"] = {**kept, "delta": copy(job.result["delta"])}
            return data

        return {
            "clock": self.clock,
            "last_step_s": self.last_step_s,
            "dispatched": self.dispatched,
            "arrived": self.arrived,
            "job_counts": torch.as_tensor(self.job_counts if self.job_counts is not None else np.zeros(0, np.int64)),
            "jobs": [job_data(j) for j in self.jobs.values()],
            "buffer": [{"job": job_data(j), "staleness": s} for j, s in self.buffer],
            "models": {v: cpu(m) for v, m in self.models.items()},
            "batches": list(self.batches),
            "staleness_counts": dict(self.staleness_counts),
        }

    def load_state_dict(self, data: dict[str, Any], device: torch.device) -> None:
        on = lambda tree: {k: v.to(device) for k, v in tree.items()}  # noqa: E731

        def job_of(d: dict[str, Any]) -> Job:
            job = Job(**{k: v for k, v in d.items() if k != "result"})
            if d["result"] is not None:
                delta = on(d["result"]["delta"])
                job.result = {**d["result"], "delta": delta, "flat": flatten(delta, stacked=False)}
            return job

        self.reset()
        self.clock, self.last_step_s = float(data["clock"]), float(data["last_step_s"])
        self.dispatched, self.arrived = int(data["dispatched"]), int(data["arrived"])
        counts = data["job_counts"].numpy().astype(np.int64)
        self.job_counts = counts.copy() if len(counts) else None
        self.jobs = {job.client: job for job in map(job_of, data["jobs"])}
        self.queue = [(job.end_s, job.client, job) for job in self.jobs.values()]
        heapq.heapify(self.queue)
        self.buffer = [(job_of(b["job"]), int(b["staleness"])) for b in data["buffer"]]
        self.models = {int(v): on(m) for v, m in data["models"].items()}
        self.batches = [int(b) for b in data["batches"]]
        self.staleness_counts = {int(k): int(v) for k, v in data["staleness_counts"].items()}
