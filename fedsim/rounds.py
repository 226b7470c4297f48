"""The round loop shared by federated and decentralized training.

A run is a :class:`Simulation` over built components (:class:`Parts`, made by the composition root
:func:`fedsim.simulation.assemble`). Every round has the same skeleton:

1. ``mode.plan(round, state)``: which clients train and from where (a federated strategy's selection and
   broadcast; every node from its own parameters over a topology);
2. ``executor.train(plan, ...)``: the clients' local training, vectorized;
3. ``mode.combine(round, state, updates)``: the new state (a strategy's aggregation, or gossip ``X <- W X``)
   and the mode's own metrics;
4. metrics every round, ``mode.evaluate`` every ``eval_every`` rounds, checkpoints every
   ``checkpoint_every`` rounds.

The differences between federated and decentralized training are the mode (:class:`FederatedMode`,
:class:`fedsim.decentralized.DecentralizedMode`); those between classification and a min-max problem are the
task (:class:`fedsim.tasks.ClassificationTask`, :class:`fedsim.minimax.MinimaxTask`). This module never names Flower,
Ray or a particular strategy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from fedsim.attacks import attack_uploads
from fedsim.compression import UPLINK, Downlink
from fedsim.core.errors import DivergenceError, FedsimError, OutOfMemory, RunInterrupted
from fedsim.core.protocol import ClientUpdates, Executor, Plan, ServerState
from fedsim.core.pytree import Tree, all_finite, flatten, nbytes
from fedsim.core.reduction import Reduction
from fedsim.data.datasets import Dataset
from fedsim.data.markov import chain_report
from fedsim.engine.evaluate import client_accuracy_spread, evaluate, per_client_accuracy
from fedsim.engine.store import ClientStore
from fedsim.privacy import poisson_clients
from fedsim.results import SUMMARY_FILE, ResultsDir
from fedsim.round_policy import RoundPolicy, RoundSchedule, check_reachable, extra_clients, schedule_round
from fedsim.system import durations, phases
from fedsim.threads import ThreadGovernor

RoundCallback = Callable[[dict[str, Any]], None]
RoundHook = Callable[[int, ServerState, dict[str, Any]], bool]

OSCILLATION_WINDOW = 10


_OOM_MARKERS = ("out of memory", "can't allocate memory", "you tried to allocate", "not enough memory")


def _out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure (torch reports host and GPU ones as RuntimeErrors)."""
    return isinstance(err, MemoryError) or any(m in str(err).lower() for m in _OOM_MARKERS)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:200]


def parameters_of(model: nn.Module) -> Tree:
    """The model's trainable parameters as a detached tree (the initial global model)."""
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def oscillation(history: list[dict[str, Any]], latest: float | None, window: int = OSCILLATION_WINDOW) -> float | None:
    """Standard deviation (population, ddof 0) of test accuracy over the last ``window`` evaluations,
    ``latest`` included; None before two evaluations exist."""
    values = [h["test_accuracy"] for h in history if h.get("test_accuracy") is not None]
    if latest is not None:
        values.append(latest)
    values = values[-window:]
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


@dataclass
class RoundPlan:
    """What a round trains: the executor's ``plan`` from ``params`` (decentralized nodes from their own
    ``start`` rows with their optimizer state ``opt_state``), and ``metrics`` known before training."""

    plan: Plan
    params: Tree
    start: Tree | None = None
    opt_state: Tree | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


class Mode(Protocol):
    """How a round plans, combines and evaluates (federated or over a topology)."""

    strategy: Any

    def initial_state(self, sim: Simulation) -> ServerState: ...

    def clients_per_round(self, sim: Simulation) -> int: ...

    def plan(self, sim: Simulation, round_: int, state: ServerState) -> RoundPlan: ...

    def combine(
        self, sim: Simulation, round_: int, state: ServerState, plan: Plan, updates: ClientUpdates
    ) -> tuple[ServerState, dict[str, Any]]: ...

    def evaluate(self, sim: Simulation, state: ServerState) -> dict[str, Any]: ...


class FederatedMode:
    """A federated strategy selects clients among the available ones, broadcasts, and aggregates.

    Metrics: ``update_norm`` = ||w_{t+1} - w_t||, ``bytes_up``/``bytes_down`` (the model plus any strategy
    extras per selected client), ``available_clients`` with an availability model; evaluation of the global
    model on the test set and on every client's local test split."""

    def __init__(self, strategy, availability=None) -> None:
        self.strategy, self.availability = strategy, availability

    def initial_state(self, sim: Simulation) -> ServerState:
        return self.strategy.init(sim.init_params)

    def clients_per_round(self, sim: Simulation) -> int:
        state = self.strategy.init(sim.init_params)
        return len(self.strategy.configure(1, state, sim.store.num_clients, sim.config.seed).client_ids)

    def available(self, sim: Simulation, round_: int) -> np.ndarray | None:
        """Sorted ids of the clients that may take part in round ``round_``: the availability model's, and
        those online at the round's start in the system model's windows (None: everyone)."""
        n = sim.store.num_clients
        available = self.availability.available(round_, n) if self.availability is not None else None
        if sim.windows is not None:
            online = sim.windows.online(sim.clock, n)
            available = online if available is None else np.intersect1d(available, online)
        return available

    def plan(self, sim: Simulation, round_: int, state: ServerState) -> RoundPlan:
        n, extra, before = sim.store.num_clients, {}, {}
        available = self.available(sim, round_)
        if available is not None:  # passed only when on, so strategies without the keyword still work
            extra["available"] = available
            before["available_clients"] = len(available)
        plan = self.strategy.configure(round_, state, n, sim.config.seed, **extra)
        return RoundPlan(plan, state.params, metrics=before)

    def combine(
        self, sim: Simulation, round_: int, state: ServerState, plan: Plan, updates: ClientUpdates
    ) -> tuple[ServerState, dict[str, Any]]:
        new = self.strategy.aggregate(round_, state, updates)
        selected = len(updates.client_ids)
        step = {k: new.params[k] - state.params[k] for k in new.params}
        return new, {
            "update_norm": float(flatten(step, stacked=False).norm()),
            "bytes_up": selected * (sim.uplink_bytes + updates.extras_bytes()),
            "bytes_down": selected * (sim.downlink_bytes + nbytes(plan.broadcast)),
        }

    def client_bytes(self, sim: Simulation, round_: int, plan: Plan, updates: ClientUpdates) -> tuple[int, int]:
        """Bytes each selected client downloads (the model and the broadcast) and uploads (the model and its
        extras) this round."""
        return sim.downlink_bytes + nbytes(plan.broadcast), sim.uplink_bytes + updates.extras_bytes()

    def evaluate(self, sim: Simulation, state: ServerState) -> dict[str, Any]:
        params = state.params
        test = evaluate(sim.model, params, sim.x_test, sim.y_test)
        record = {"test_accuracy": test["accuracy"], "test_loss": test["loss"]}
        store = sim.store
        acc = per_client_accuracy(sim.model, params, store.x, store.y, store.test_order, store.test_offsets)
        sim.client_accuracy = acc
        record.update(client_accuracy_spread(acc))
        return record


@dataclass
class Parts:
    """The built components of a run (see :func:`fedsim.simulation.assemble`)."""

    device: torch.device
    dataset: Dataset
    histogram: np.ndarray
    store: ClientStore
    x_test: Tensor
    y_test: Tensor
    task: Any
    model: nn.Module
    mode: Any
    sampler: Any
    lr_schedule: Any
    executor: Executor
    optimizer_state_bytes: int
    system: Any = None
    attack: Any = None
    privacy: Any = None
    uplink: Any = None
    downlink: Any = None


class Simulation:
    """A fully set-up experiment: the round loop over built components (:class:`Parts`)."""

    def __init__(self, config, parts: Parts) -> None:
        self.config = config
        self.device, self.dataset, self.histogram = parts.device, parts.dataset, parts.histogram
        self.store, self.x_test, self.y_test = parts.store, parts.x_test, parts.y_test
        self.task, self.model, self.mode = parts.task, parts.model, parts.mode
        self.strategy = parts.mode.strategy
        self.sampler, self.lr_schedule, self.executor = parts.sampler, parts.lr_schedule, parts.executor
        self.optimizer_state_bytes = parts.optimizer_state_bytes
        self.system = parts.system
        """The system model (:mod:`fedsim.system`): clients' speeds on the virtual clock."""
        self._phases: dict[str, np.ndarray] | None = None
        self.clock = 0.0
        """Virtual time at the start of the next round (seconds)."""
        self.client_accuracy: np.ndarray | None = None
        """Every client's (node's) test accuracy at the last evaluation, where the mode measures it."""
        self.windows = getattr(parts.system, "windows", None)
        """The system model's availability windows in virtual time (:mod:`fedsim.windows`), or None."""
        if self.windows is not None:
            self.windows.check_clients(parts.store.num_clients)
        self.attack = parts.attack
        """The Byzantine attack (:mod:`fedsim.attacks`), or None."""
        self.byzantine = np.zeros(parts.store.num_clients, dtype=bool)
        """``byzantine[k]``: client k is Byzantine (fixed for the run by the attack's fraction and the seed)."""
        if self.attack is not None:
            self.byzantine[self.attack.clients(parts.store.num_clients, config.seed)] = True
        self.privacy = parts.privacy
        """Differential privacy (:mod:`fedsim.privacy`), or None."""
        self.record_level = bool(getattr(self.privacy, "record_level", False))
        """Record-level privacy (DP-SGD): the trainer clips and noises every local step."""
        if self.privacy is not None and not self.record_level and self.strategy.reductions() != {"mean": Reduction()}:
            raise FedsimError(
                f"privacy '{self.privacy.name}' replaces the strategy's one weighted mean; strategy "
                f"'{config.strategy.name}' reads other means or the stacked updates (use fedavg, fedprox, fedavgm, "
                "fedadam, fedyogi or fedadagrad)"
            )
        self.stopped: str | None = None
        """Why the run stopped before its last round (a privacy budget), or None."""
        self.policy: RoundPolicy = config.round_policy
        """Synchronous round policies (deadline, over-selection, dropout, time budget)."""
        self.participation = np.zeros(parts.store.num_clients, dtype=np.int64)
        """Rounds each client has trained in (``summary.json``'s ``participation``)."""
        self.loss_fn, self.correct = self.task.loss_fn, self.task.correct
        self.init_params = parameters_of(self.model)
        self.governor: ThreadGovernor | None = None
        """Adapts torch's thread count to the free CPUs once per round (``threads: adaptive``; fedsim.threads)."""
        self.saved_threads: int | None = None
        """The caller's torch thread count, restored by :meth:`close`."""
        self.model_bytes = nbytes(self.init_params)
        self.uplink = parts.uplink
        """The uplink channel (:mod:`fedsim.compression`; over a topology: the gossip's), or None."""
        self.downlink = None if parts.downlink is None else Downlink(parts.downlink, self.init_params)
        """The compressed broadcast (:class:`fedsim.compression.Downlink`), or None."""
        for channel in (self.uplink, parts.downlink):
            if channel is not None:
                channel.check_model(self.init_params)
        self.uplink_bytes = self.model_bytes if self.uplink is None else self.uplink.message_bytes(self.init_params)
        """Bytes of one client's model-sized upload (one node's gossip message), after compression."""
        self.downlink_bytes = self.model_bytes if parts.downlink is None else \
            parts.downlink.message_bytes(self.init_params)  # fmt: skip
        """Bytes of the model broadcast to one client, after compression."""
        declared = getattr(getattr(self.strategy, "client_algorithm", None), "extra_uploads", None)
        extras = declared(self.init_params) if declared is not None else {}
        self.upload_bytes = self.uplink_bytes + nbytes(extras)
        """Bytes one client uploads per round (the model-sized delta and its algorithm's extras)."""
        if self.policy.active:
            down = self.downlink_bytes  # plus a broadcast, known per round
            check_reachable(self.policy, self.system.profiles(self.store.num_clients), down, self.upload_bytes)
        self.num_params = sum(v.numel() for v in self.init_params.values())
        if hasattr(self.privacy, "attach"):  # DP-BREM: client and server momenta for this run
            self.privacy.attach(self)
        self._sampler_report: dict[str, Any] | None = None

    @property
    def availability(self):
        return getattr(self.mode, "availability", None)

    def close(self) -> None:
        """Release the executor (a Ray executor kills its actors and shuts down the Ray it started) and give
        the caller back its torch thread count."""
        self.executor.close()
        if self.saved_threads is not None and torch.get_num_threads() != self.saved_threads:
            torch.set_num_threads(self.saved_threads)

    def __enter__(self) -> Simulation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def lr(self, round_: int) -> float:
        return self.lr_schedule.lr(round_, self.config.lr, self.config.rounds)

    def initial_state(self) -> ServerState:
        return self.mode.initial_state(self)

    def clients_per_round(self) -> int:
        return self.mode.clients_per_round(self)

    def round(self, round_: int, state: ServerState) -> tuple[ServerState, dict[str, Any]]:
        """One round: plan, train the planned clients, combine; returns the new state and the round's metrics
        (without evaluation)."""
        step = getattr(self.mode, "step", None)
        if step is not None:  # the asynchronous event loop: events until the next server step
            return step(self, round_, state)
        self._phases = None
        if getattr(self.privacy, "owns_round", False):  # DP-BREM
            return self.privacy.round(self, round_, state)
        if self.privacy is not None and not self.record_level:
            return self._private_round(round_, state)
        new_state, record = self._synchronous_round(round_, state)
        if self.clocked and self._phases is not None:
            record["timeline"] = timeline(self._phases)
        return new_state, record

    def _synchronous_round(self, round_: int, state: ServerState) -> tuple[ServerState, dict[str, Any]]:
        planned = self.mode.plan(self, round_, state)
        plan, before, lr = planned.plan, planned.metrics, self.lr(round_)
        schedule = None
        if (self.policy.active or self.windows is not None) and len(plan.client_ids):
            plan, schedule = self.schedule(round_, plan)
            before.update(dropped=schedule.dropped, wasted_samples=schedule.wasted_samples)
            self._phases = schedule.phases
        if len(plan.client_ids) == 0:  # nobody available (or kept): the model and server state stay as they are
            idle = schedule.round_time_s if schedule else self.wait_for_clients()
            record = {"round": round_, "lr": lr, "clients": 0, "train_loss": None, "drift": None,
                      "update_norm": 0.0, "bytes_up": 0, "bytes_down": 0, "round_time_s": idle}  # fmt: skip
            if self.record_level:
                record["epsilon"] = self.privacy.spent()
            return state, {**record, **before}
        attacked = self.attack is not None and self.attack.model_attack
        compressed = self.uplink is not None and isinstance(self.mode, FederatedMode)  # gossip: fedsim.choco
        chunkwise = compressed and not attacked and getattr(self.executor, "encodes_uploads", False)
        if chunkwise:  # each trained chunk is compressed before it is folded into the streamed means
            plan = replace(plan, encode=lambda ids, deltas: self.encode_uploads(round_, ids, deltas))
        elif attacked or compressed:  # the attack (then the uplink) reads the round's stacked updates
            plan = replace(plan, reductions=None)
        params = planned.params
        if self.downlink is not None:
            params = self.downlink.broadcast(params, self.config.seed, round_)
        updates = self.executor.train(plan, params, round_, lr, start=planned.start, opt_state=planned.opt_state)
        if self.attack is not None:
            before["byzantine"] = int(self.byzantine[np.asarray(updates.client_ids, dtype=np.int64)].sum())
        if attacked:
            updates = self.attacked(round_, updates)
        if compressed and not chunkwise:
            updates = with_deltas(updates, self.encode_uploads(round_, updates.client_ids, updates.deltas))
        new_state, metrics = self.mode.combine(self, round_, state, plan, updates)
        np.add.at(self.participation, np.asarray(updates.client_ids, dtype=np.int64), 1)
        stats = {name: float(v.double().mean()) for name, v in updates.stats.items() if name != "clipped_samples"}
        if self.record_level:
            before.update(self.record_level_metrics(updates))
        record = {
            **stats,
            "round": round_,
            "lr": lr,
            "clients": len(updates.client_ids),
            "train_loss": float((updates.train_loss.double() * updates.weights.to(torch.float64)).sum()),
            "drift": updates.drift(),
            **metrics,
            "round_time_s": self.round_time(round_, plan, updates) if schedule is None else schedule.round_time_s,
            **before,
        }
        return new_state, record

    def _private_round(self, round_: int, state: ServerState) -> tuple[ServerState, dict[str, Any]]:
        """A DP-FedAvg round (:mod:`fedsim.privacy`): Poisson-sampled clients, clipped and noised mean, the
        strategy's server step, ``epsilon`` after this round."""
        c, privacy, n = self.config, self.privacy, self.store.num_clients
        lr, q = self.lr(round_), c.fraction
        plan = self.mode.plan(self, round_, state).plan
        ids = poisson_clients(n, q, c.seed, round_)
        reduction = privacy.clip_reduction() if privacy.mode == "central" else None
        attacked = self.attack is not None and self.attack.model_attack
        streamed = reduction is not None and not attacked  # a model attack reads the round's stacked updates
        plan = replace(plan, client_ids=ids, reductions={"mean": reduction} if streamed else None)
        sizes = torch.as_tensor(self.store.sizes, dtype=torch.float64)
        uniform = privacy.weighting == "uniform"
        total, largest = (float(n), 1.0) if uniform else (float(sizes.sum()), float(sizes.max()))
        record: dict[str, Any] = {"round": round_, "lr": lr, "clients": len(ids)}
        updates = None
        if len(ids):
            updates = self.executor.train(plan, state.params, round_, lr)
            np.add.at(self.participation, ids, 1)
            if self.attack is not None:
                record["byzantine"] = int(self.byzantine[ids].sum())
            if attacked:
                updates = self.attacked(round_, updates)
        aggregator = self.strategy.aggregator
        mean = privacy.mean(updates, total, largest, n, q, c.seed, round_, state.params, reduction, aggregator)
        clipped_fraction = privacy.clipped_fraction() if updates is not None else None
        clip = privacy.clip
        privacy.adapt(q, n, c.seed, round_)
        new = self.strategy.server_update(round_, state, mean)
        step = {k: new.params[k] - state.params[k] for k in new.params}
        record.update({
            "train_loss": None if updates is None else float((updates.train_loss.double() * updates.weights).sum()),
            "drift": None if updates is None else updates.drift(),
            "update_norm": float(flatten(step, stacked=False).norm()),
            "bytes_up": len(ids) * self.model_bytes,
            "bytes_down": len(ids) * self.model_bytes,
            "round_time_s": 0.0 if updates is None else self.round_time(round_, plan, updates),
            "clipped_fraction": clipped_fraction,
            "epsilon": privacy.epsilon(q, round_),
            **({"clip": clip} if privacy.adaptive else {}),
        })  # fmt: skip
        return new, record

    def record_level_metrics(self, updates: ClientUpdates) -> dict[str, Any]:
        """DP-SGD's row entries: the share of the round's samples whose gradient was clipped, and ``epsilon``
        after counting the clients' steps."""
        self.privacy.record(updates.client_ids, updates.num_steps.cpu().numpy())
        samples = float(updates.samples_processed.double().sum())
        clipped = float(updates.stats["clipped_samples"].double().sum())
        return {"clipped_fraction": clipped / samples if samples else None, "epsilon": self.privacy.spent()}

    def predictor(self, state: ServerState) -> Callable[[Tensor], Tensor]:
        """The global model's predicted labels of a batch (a backdoor's success rate)."""
        from torch.func import functional_call

        def predict(x: Tensor) -> Tensor:
            with torch.no_grad():
                return functional_call(self.model, state.params, (x,)).argmax(dim=-1)

        return predict

    def attacked(self, round_: int, updates: ClientUpdates) -> ClientUpdates:
        """The round's updates with the Byzantine clients' uploads replaced by the model attack."""
        rows = torch.as_tensor(self.byzantine[np.asarray(updates.client_ids, dtype=np.int64)])
        return with_deltas(updates, attack_uploads(self.attack, updates.deltas, rows, self.config.seed, round_))

    def encode_uploads(self, round_: int, client_ids: np.ndarray, deltas: Tree) -> Tree:
        """The clients' stacked deltas as the server decodes them from the compressed uplink
        (:mod:`fedsim.compression`); updates their error-feedback state."""
        return self.uplink.compress(deltas, client_ids, self.store.num_clients, self.config.seed, UPLINK, round_)

    def schedule(self, round_: int, plan: Plan) -> tuple[Plan, RoundSchedule]:
        """The round's clients after the synchronous policies (:mod:`fedsim.round_policy`): over-selected
        candidates, then those kept, with their step limits."""
        c, policy = self.config, self.policy
        ids = np.asarray(plan.client_ids, dtype=np.int64)
        candidates = ids
        if policy.over_selection > 0:
            available = self.mode.available(self, round_)
            pool = np.arange(self.store.num_clients) if available is None else available
            candidates = np.union1d(ids, extra_clients(ids, pool, policy.over_selection, c.seed, round_))
        online_for = None
        if self.windows is not None:
            online_for = self.windows.online_until(candidates, self.clock) - self.clock
        batches, _ = self.sampler.sample(
            c.seed, round_, candidates, self.store.sizes[candidates], steps=None if c.local_epochs else c.local_steps,
            epochs=c.local_epochs, batch_size=c.batch_size, state=None,
        )  # fmt: skip
        down = self.downlink_bytes + nbytes(plan.broadcast)
        schedule = schedule_round(
            policy, self.system.profiles(self.store.num_clients), candidates, len(ids), batches.mask.sum(axis=2),
            down, self.upload_bytes, seed=c.seed, round_=round_, online_for=online_for,
        )  # fmt: skip
        return replace(plan, client_ids=schedule.kept, step_limit=schedule.step_limit), schedule

    def round_time(self, round_: int, plan: Plan, updates: ClientUpdates) -> float:
        """Virtual seconds of a synchronous round: the slowest trained client's duration
        (:func:`fedsim.system.durations`)."""
        down, up = self.mode.client_bytes(self, round_, plan, updates)
        samples = updates.samples_processed
        if samples is None:
            samples = updates.num_steps.double() * self.config.batch_size
        samples = samples.double().cpu().numpy()
        profiles = self.system.profiles(self.store.num_clients)
        seconds = durations(profiles, updates.client_ids, down, up, samples)
        if self.clocked:
            ids = np.asarray(updates.client_ids, dtype=np.int64)
            download, compute, upload = phases(profiles, ids, down, up, samples)
            self._phases = {"client": ids, "download_s": download, "compute_s": compute, "upload_s": upload,
                            "status": np.full(len(ids), "trained", dtype=object)}  # fmt: skip
        return float(seconds.max()) if len(seconds) else 0.0

    def wait_for_clients(self) -> float:
        """Virtual seconds of a round in which nobody could take part: 0, or with availability windows the wait
        until the next window opens (a FedsimError when none opens again)."""
        if self.windows is None or len(self.windows.online(self.clock, self.store.num_clients)):
            return 0.0
        opens = self.windows.next_start(self.clock)
        if opens is None:
            raise FedsimError(
                f"no client is online after virtual time {self.clock:g} s: the availability windows "
                f"({self.windows.path}) have all closed; lower --rounds or extend the windows"
            )
        return opens - self.clock

    @property
    def clocked(self) -> bool:
        """Whether the run's clock is more than the default (a non-uniform system model, a round policy or an
        asynchronous strategy): its rows then carry a client ``timeline`` and it gets the time plots."""
        return (
            getattr(self.system, "name", "") != "uniform"
            or self.policy.active
            or self.windows is not None
            or hasattr(self.mode, "step")
        )

    def evaluate_state(self, state: ServerState) -> dict[str, Any]:
        return self.mode.evaluate(self, state)

    def checkpoint_payload(self, round_: int, state: ServerState) -> dict[str, Any]:
        sampler_state = self.executor.sampler_state or {}
        return {
            "round": round_,
            "config": self.config.to_dict(),
            "params": {k: v.cpu() for k, v in state.params.items()},
            "extras": {k: v.cpu() for k, v in state.extras.items()},
            "client_state": self.executor.client_state,
            "sampler_state": {k: torch.as_tensor(v) for k, v in sampler_state.items()},
            "participation": torch.as_tensor(self.participation),
            **({"event_loop": self.mode.state_dict()} if hasattr(self.mode, "state_dict") else {}),
            **({"privacy": self.privacy.state_dict()} if hasattr(self.privacy, "state_dict") else {}),
            **({"compression": self.compression_state()} if self.compressing else {}),
        }

    @property
    def compressing(self) -> bool:
        return self.uplink is not None or self.downlink is not None

    def compression_state(self) -> dict[str, dict[str, Tensor]]:
        """The channels' per-client state (error-feedback residuals, EF21 estimates, PowerSGD's Q)."""
        channels = {"uplink": self.uplink, "downlink": getattr(self.downlink, "compression", None)}
        return {name: c.state_dict() for name, c in channels.items() if c is not None}

    def restore(self, payload: dict[str, Any]) -> tuple[int, ServerState]:
        """Server state, client state and sampler state from a checkpoint payload (validated first)."""
        self._check_checkpoint(payload)
        to_dev = lambda tree: {k: v.to(self.device) for k, v in tree.items()}  # noqa: E731
        state = ServerState(to_dev(payload["params"]), to_dev(payload["extras"]))
        self.executor.client_state = dict(payload["client_state"])
        sampler_state = payload.get("sampler_state") or {}
        self.executor.sampler_state = {k: v.numpy() for k, v in sampler_state.items()} or None
        if "participation" in payload:  # checkpoints before the virtual clock: counts restart at resume
            self.participation = payload["participation"].numpy().astype(np.int64).copy()
        if hasattr(self.mode, "load_state_dict"):
            if "event_loop" not in payload:
                raise FedsimError("checkpoint has no asynchronous event-loop state (in-flight clients, clock)")
            self.mode.load_state_dict(payload["event_loop"], self.device)
        if hasattr(self.privacy, "load_state_dict"):
            self.privacy.load_state_dict(payload.get("privacy"))
        if self.compressing:
            if "compression" not in payload:
                raise FedsimError("checkpoint has no compression state (error-feedback residuals) for the channels")
            saved = payload["compression"]
            if self.uplink is not None:
                self.uplink.load_state_dict(saved.get("uplink"))
            if self.downlink is not None:
                self.downlink.compression.load_state_dict(saved.get("downlink"))
        return int(payload["round"]), state

    def _check_checkpoint(self, payload: Any) -> None:
        keys = ("round", "params", "extras", "client_state")
        if not isinstance(payload, dict) or any(k not in payload for k in keys):
            raise FedsimError("checkpoint is not a fedsim checkpoint (missing round/params/extras/client_state)")
        expected = {k: tuple(v.shape) for k, v in self.initial_state().params.items()}
        found = {k: tuple(v.shape) for k, v in payload["params"].items()}
        if found != expected:
            raise FedsimError("checkpoint parameters do not match the run's model (names or shapes differ)")

    def run(
        self,
        results: ResultsDir | None = None,
        *,
        start_round: int = 1,
        state: ServerState | None = None,
        on_round: RoundCallback | None = None,
        extend: RoundHook | None = None,
    ) -> dict[str, Any]:
        """Run rounds ``start_round..rounds``; returns the summary (also written to ``summary.json``).

        ``extend(round, state, record)`` (the stability probe's twin run) may add metrics to each round's
        record before it is written (``test_loss`` is not None on evaluated rounds); True means it diverged."""
        state = state if state is not None else self.initial_state()
        history = results.read_metrics() if results else []
        try:
            return self._run_rounds(results, start_round, state, history, on_round, extend)
        except (MemoryError, RuntimeError) as err:  # torch's OutOfMemoryError is a RuntimeError
            if not _out_of_memory(err):
                raise
            where = f"; metrics so far are in {results.path}" if results else ""
            raise OutOfMemory(
                f"out of memory in round {len(history) + 1} ({_first_line(err)}): lower --chunk-size (clients "
                f"trained at once, now {self.executor.chunk_size}), --fraction, the batch size or the model, or switch "
                f"off per-client metrics{where}"
            ) from None
        except KeyboardInterrupt:  # SIGINT, or SIGTERM turned into it by the CLI: keep what is written
            if results:  # the lines on disk are the rounds kept (the signal may fall between a row and its line)
                history = results.read_metrics()
            summary = self.summary(history, interrupted=True)
            where = "nothing was written"
            if results:
                results.write_json(SUMMARY_FILE, summary)
                where = f"metrics so far and the last checkpoint are in {results.path}; resume with: fedsim " \
                    f"simulate --resume {results.path}"  # fmt: skip
            raise RunInterrupted(f"interrupted after round {summary['rounds_completed']}; {where}") from None

    def _run_rounds(self, results, start_round, state, history, on_round, extend) -> dict[str, Any]:
        c = self.config
        self.clock = (history[-1].get("virtual_time_s") if history else None) or 0.0
        for r in range(start_round, c.rounds + 1):
            if self.over_budget(r):
                self.stopped = f"privacy budget: round {r} would exceed target_epsilon {self.privacy.target_epsilon:g}"
                break
            if self.governor is not None:
                self.governor.update()
            t0 = time.perf_counter()
            state, record = self.round(r, state)
            before = (history[-1].get("virtual_time_s") if history else None) or 0.0
            record["virtual_time_s"] = before + record["round_time_s"]
            self.clock = record["virtual_time_s"]
            for entry in record.get("timeline", ()):  # from the round's start to virtual time
                entry[1] += before
            loss = record["train_loss"]  # None in a round without clients
            diverged = (loss is not None and not math.isfinite(loss)) or not all_finite(state.params)
            if not diverged and (r % c.eval_every == 0 or r == c.rounds):
                self.client_accuracy = None
                record.update(self.evaluate_state(state))
                if results and self.client_accuracy is not None:
                    results.write_client_accuracy(self.client_accuracy)
                if self.attack is not None:
                    record["honest_accuracy"] = record["test_accuracy"]
                    rate = getattr(self.attack, "success_rate", None)
                    if rate is not None:
                        record["attack_success_rate"] = rate(self.predictor(state), self.x_test, self.y_test)
                record["oscillation"] = oscillation(history, record["test_accuracy"])
            else:
                record.update({"test_accuracy": None, "test_loss": None})
            if extend is not None and extend(r, state, record):
                diverged = True
            record["time_s"] = time.perf_counter() - t0
            if diverged:
                record["diverged"] = True
            history.append(record)
            if results:
                results.append_metrics(record)
            if on_round:
                on_round(record)
            if diverged:
                summary = self.summary(history, diverged=True)
                if results:
                    results.write_json(SUMMARY_FILE, summary)
                where = f"; metrics so far are in {results.path}" if results else ""
                raise DivergenceError(
                    f"training diverged at round {r} (train_loss={record['train_loss']}){where}; try a smaller --lr"
                )
            checkpoints = c.checkpoint_every and self.executor.checkpoints
            if results and checkpoints and (r % c.checkpoint_every == 0 or r == c.rounds):
                results.save_checkpoint(self.checkpoint_payload(r, state))
        summary = self.summary(history)
        if results:
            results.write_json(SUMMARY_FILE, summary)
        return summary

    def over_budget(self, round_: int) -> bool:
        """Whether running round ``round_`` would take epsilon past the privacy's ``target_epsilon``."""
        target = getattr(self.privacy, "target_epsilon", None)
        if target is None:
            return False
        if self.record_level:
            return self.privacy.would_exceed()
        value = self.privacy.epsilon(self.config.fraction, round_)
        return value is None or value > target

    def summary(
        self, history: list[dict[str, Any]], diverged: bool = False, interrupted: bool = False
    ) -> dict[str, Any]:
        evaluated = [h for h in history if h.get("test_accuracy") is not None]
        best = max(evaluated, key=lambda h: h["test_accuracy"], default=None)
        last_eval = evaluated[-1] if evaluated else {}
        return {
            "rounds_completed": history[-1]["round"] if history else 0,
            "diverged": diverged,
            "final_test_accuracy": last_eval.get("test_accuracy"),
            "final_test_loss": last_eval.get("test_loss"),
            "best_test_accuracy": best["test_accuracy"] if best else None,
            "best_round": best["round"] if best else None,
            "final_oscillation": last_eval.get("oscillation"),
            "final_train_loss": next((h["train_loss"] for h in reversed(history) if h["train_loss"] is not None), None),
            "total_time_s": float(sum(h.get("time_s", 0.0) for h in history)),
            "virtual_time_s": history[-1].get("virtual_time_s") if history else 0.0,
            "time_to_accuracy": time_to_accuracy(history),
            "participation": participation_stats(self.participation),
            "total_bytes_up": int(sum(h["bytes_up"] for h in history)),
            "total_bytes_down": int(sum(h["bytes_down"] for h in history)),
            **self.compression_report(history),
            "num_params": self.num_params,
            "num_clients": self.store.num_clients,
            "device": str(self.device),
            "threads": torch.get_num_threads(),
            "chunk_size": self.executor.chunk_size,
            "client_state_bytes": sum(v.numel() * v.element_size() for v in self.executor.client_state.values()),
            "optimizer": self.config.optimizer.name,
            "optimizer_state_bytes_per_client": self.optimizer_state_bytes,
            "optimizer_state_bytes_all_clients": self.optimizer_state_bytes * self.store.num_clients,
            "dataset": self.config.dataset.name,
            "model": self.config.model.name,
            "strategy": self.config.strategy.name,
            **self.sampler_report(),
            **(self.mode.report() if hasattr(self.mode, "report") else {}),
            **self.privacy_report(history),
            **({"stopped": self.stopped} if self.stopped else {}),
            **({"interrupted": True} if interrupted else {}),
        }

    def compression_report(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        """``total_mb_up``/``total_mb_down`` (10^6 bytes), and with compression the channels, their compression
        ratios (model bytes over message bytes) and the host memory of their state."""
        report: dict[str, Any] = {
            "total_mb_up": sum(h["bytes_up"] for h in history) / 1e6,
            "total_mb_down": sum(h["bytes_down"] for h in history) / 1e6,
        }
        if self.compressing:
            down = getattr(self.downlink, "compression", None)
            report["compression"] = {
                "uplink": self.config.uplink.name,
                "downlink": self.config.downlink.name,
                "uplink_ratio": self.model_bytes / self.uplink_bytes,
                "downlink_ratio": self.model_bytes / self.downlink_bytes,
                "state_bytes": sum(c.state_bytes() for c in (self.uplink, down) if c is not None),
            }
        return report

    def privacy_report(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        """``epsilon`` (after the rounds run) and ``delta`` of a private run; nothing otherwise."""
        if self.privacy is None:
            return {}
        if self.record_level:
            return {"epsilon": self.privacy.spent(), "delta": self.privacy.delta}
        rounds = history[-1]["round"] if history else 0
        return {"epsilon": self.privacy.epsilon(self.config.fraction, rounds), "delta": self.privacy.delta}

    def sampler_report(self) -> dict[str, Any]:
        """``sampler_spectral_gap`` (slowest client chain) and ``sampler_mixing_time`` (largest bound
        ``log(4 n_c) / gap_c``) of a Markov sampler, computed once per run; None for samplers without a chain."""
        if self._sampler_report is None:
            self._sampler_report = chain_report(self.sampler, self.store.sizes, self.config.seed)
        return self._sampler_report


def with_deltas(updates: ClientUpdates, deltas: Tree) -> ClientUpdates:
    """``updates`` with its stacked deltas replaced (an attack's or the uplink's)."""
    u = updates
    return ClientUpdates(u.client_ids, deltas, u.num_samples, u.num_steps, u.train_loss, u.extras, u.opt_state,
                         u.stats, u.lr, u.num_clients, u.samples_processed)  # fmt: skip


TIMELINE_CLIENTS = 16
"""Clients ``0..15`` are the timeline's sample (rows' ``timeline``, the Gantt plot)."""


def timeline(phases: dict[str, np.ndarray], offset: np.ndarray | float = 0.0) -> list[list[Any]]:
    """``[client, start_s, download_s, compute_s, upload_s, status]`` of the sampled clients among ``phases``
    (``start_s``: seconds from the round's start, ``offset`` per client; the loop makes it absolute)."""
    clients = np.asarray(phases["client"], dtype=np.int64)
    starts = np.broadcast_to(np.asarray(offset, dtype=np.float64), clients.shape)
    return [
        [int(c), float(starts[i]), float(phases["download_s"][i]), float(phases["compute_s"][i]),
         float(phases["upload_s"][i]), str(phases["status"][i])]
        for i, c in enumerate(clients) if c < TIMELINE_CLIENTS
    ]  # fmt: skip


ACCURACY_TARGETS = (0.5, 0.7, 0.8, 0.9)


def time_to_accuracy(history: list[dict[str, Any]]) -> dict[str, float | None]:
    """Virtual seconds until the test accuracy first reaches each of :data:`ACCURACY_TARGETS` (null if never),
    keyed ``"0.5"``, ``"0.7"``, ..."""
    out: dict[str, float | None] = {}
    for target in ACCURACY_TARGETS:
        hit = next((h for h in history if (h.get("test_accuracy") or 0.0) >= target), None)
        out[str(target)] = hit.get("virtual_time_s") if hit else None
    return out


def participation_stats(counts: np.ndarray) -> dict[str, float]:
    """Rounds each client trained in: min, median, max, and the Gini coefficient of the counts
    (``sum_ij |c_i - c_j| / (2 n^2 mean)``; 0 when every client took part equally)."""
    counts = np.asarray(counts, dtype=np.float64)
    if len(counts) == 0:
        return {"min": 0, "median": 0.0, "max": 0, "gini": 0.0}
    ordered = np.sort(counts)
    n, total = len(ordered), float(ordered.sum())
    gini = 0.0 if total == 0 else float((2 * np.arange(1, n + 1) - n - 1) @ ordered / (n * total))
    return {"min": int(ordered[0]), "median": float(np.median(ordered)), "max": int(ordered[-1]), "gini": gini}
