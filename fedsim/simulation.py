"""One federated run: data -> partition -> model -> strategy -> rounds of (configure, train, aggregate),
with metrics every round, evaluation every ``eval_every`` rounds and checkpoints every
``checkpoint_every`` rounds. Entry point: :func:`simulate` (the CLI's ``fedsim simulate``)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedsim.config import RunConfig, dump_config, load_config, make_config, merge
from fedsim.core import components, rng
from fedsim.core.errors import DivergenceError, FedsimError
from fedsim.core.protocol import ClientUpdates, Executor, ServerState
from fedsim.core.pytree import Tree, all_finite, flatten, nbytes, stack
from fedsim.data import label_histogram, split_clients, subsample_train
from fedsim.data.markov import chain_report
from fedsim.engine.evaluate import client_accuracy_spread, evaluate, per_client_accuracy
from fedsim.engine.executor import LocalExecutor
from fedsim.engine.store import ClientStore
from fedsim.engine.trainer import cross_entropy
from fedsim.models import build_model
from fedsim.optim import state_bytes
from fedsim.results import CONFIG_FILE, SUMMARY_FILE, ResultsDir
from strategies import build_strategy

RoundCallback = Callable[[dict[str, Any]], None]
RoundHook = Callable[[int, ServerState, dict[str, Any]], bool]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if name not in ("auto", "cpu", "cuda"):
        from fedsim.core.errors import unknown

        raise unknown("device", name, ("auto", "cpu", "cuda"))
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FedsimError("device 'cuda' requested but torch sees no CUDA GPU; use --device cpu or auto")
    return torch.device(name)


def make_deterministic(device: torch.device) -> None:
    """Ask cuDNN for deterministic convolution algorithms (same numbers run after run)."""
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def init_seed(seed: int) -> int:
    """The model-initialization seed of a run."""
    return rng.seed_for(seed, rng.STREAM_INIT)


def parameters_of(model: torch.nn.Module) -> Tree:
    """The model's trainable parameters as a detached tree (the initial global model)."""
    return {k: v.detach().clone() for k, v in model.named_parameters()}


OSCILLATION_WINDOW = 10


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


class Simulation:
    """A fully set-up federated experiment (data on device, model, strategy, executor)."""

    def __init__(self, config: RunConfig):
        self.config = c = config
        preflight = getattr(components.get("executor", c.executor.name).obj, "preflight", None)
        if preflight is not None:  # an executor's optional dependency: fail before loading data
            preflight()
        if c.backend == "flower" or c.flower_hosted:
            from strategies.flower.records import require_flower

            require_flower()
        self.device = resolve_device(c.device)
        make_deterministic(self.device)
        ds = components.build("dataset", c.dataset, seed=c.seed, num_clients=c.clients)
        if c.train_samples is not None:
            ds = subsample_train(ds, c.train_samples, c.seed)
        self.dataset = ds
        parts = components.build(
            "partitioner", c.partition, y=ds.y_train, num_clients=c.clients, seed=c.seed, min_size=c.min_client_size,
            natural=ds.client_train,
        )  # fmt: skip
        self.histogram = label_histogram(ds.y_train, parts, ds.num_classes)
        train_parts, test_parts = split_clients(parts, c.client_test_fraction, c.seed)
        if any(len(p) == 0 for p in train_parts):
            raise FedsimError("a client has no training samples; raise --min-client-size or lower the test fraction")
        self.store = ClientStore.build(ds.x_train, ds.y_train, train_parts, test_parts, self.device)
        self.x_test = torch.as_tensor(ds.x_test, device=self.device)
        self.y_test = torch.as_tensor(ds.y_test, dtype=torch.int64, device=self.device)
        self.model = self.make_model(ds).to(self.device)
        self.init_params = parameters_of(self.model)
        self.strategy = self.make_strategy()
        self.availability = components.build("availability", c.availability, seed=c.seed)
        self.lr_schedule = components.build("lr_schedule", c.lr_schedule)
        optimizer = components.build("optimizer", c.optimizer, model=self.model)
        self.optimizer_state_bytes = state_bytes(optimizer.init(stack(self.init_params, 1)))
        sampler = components.build("sampler", c.sampler)
        local = LocalExecutor(
            self.model, self.store, sampler, optimizer, self.strategy.client_algorithm,
            seed=c.seed, local_steps=None if c.local_epochs else c.local_steps, local_epochs=c.local_epochs,
            batch_size=c.batch_size, chunk_size=c.chunk_size, grad_mode=c.grad_mode, sequential=c.sequential,
            loss_fn=self.loss_fn,
        )  # fmt: skip
        local.init_client_state(self.init_params)
        # Resolved once per run (not per round from free memory): float32 results of convolutional models
        # depend slightly on the chunk size, so a run keeps one.
        local.chunk_size = local.resolve_chunk_size(self.init_params, self.clients_per_round())
        self.model_bytes = nbytes(self.init_params)
        self.num_params = sum(v.numel() for v in self.init_params.values())
        # A remote executor copies the local one's settings, data shards and client state.
        self.executor: Executor = components.build("executor", c.executor, local=local)

    def close(self) -> None:
        """Release the executor (a Ray executor kills its actors and shuts down the Ray it started)."""
        self.executor.close()

    def __enter__(self) -> Simulation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    loss_fn = staticmethod(cross_entropy)
    """Per-sample training loss ``(outputs, targets) -> [B]`` (a min-max problem's objective overrides it)."""

    def make_model(self, ds) -> torch.nn.Module:
        """The model trained by every client (built on the CPU from the run's init seed)."""
        c = self.config
        return build_model(c.model, ds.feature_shape, ds.num_classes, seed=init_seed(c.seed))

    def make_strategy(self):
        c = self.config
        momentum = c.optimizer.get("momentum", 0.0) if c.optimizer.name == "sgd" else 0.0
        return build_strategy(
            c.strategy, aggregator=c.aggregator, regulator=c.regulator, client_filter=c.client_filter,
            fraction=c.fraction, min_clients=c.min_clients, local_momentum=momentum, simulation=self,
        )  # fmt: skip

    def clients_per_round(self) -> int:
        state = self.strategy.init(self.init_params)
        return len(self.strategy.configure(1, state, self.config.clients, self.config.seed).client_ids)

    def lr(self, round_: int) -> float:
        return self.lr_schedule.lr(round_, self.config.lr, self.config.rounds)

    def initial_state(self) -> ServerState:
        return self.strategy.init(self.init_params)

    def round(self, round_: int, state: ServerState) -> tuple[ServerState, dict[str, Any]]:
        """One federated round: configure, train the selected clients, aggregate; returns the new state and
        the round's metrics (without evaluation)."""
        n, extra = self.store.num_clients, {}
        if self.availability is not None:  # passed only when on, so strategies without the keyword still work
            extra["available"] = self.availability.available(round_, n)
        plan = self.strategy.configure(round_, state, n, self.config.seed, **extra)
        if len(plan.client_ids) == 0:  # nobody available: the model and server state stay as they are
            new_state = state
            record = {"round": round_, "lr": self.lr(round_), "clients": 0, "train_loss": None, "drift": None,
                      "update_norm": 0.0, "bytes_up": 0, "bytes_down": 0}  # fmt: skip
        else:
            updates = self.executor.train(plan, state.params, round_, self.lr(round_))
            new_state = self.strategy.aggregate(round_, state, updates)
            record = self.round_metrics(round_, state, new_state, updates, nbytes(plan.broadcast))
        if "available" in extra:
            record["available_clients"] = len(extra["available"])
        return new_state, record

    def evaluate_state(self, state: ServerState) -> dict[str, Any]:
        return self.evaluate(state.params)

    def round_metrics(
        self, round_: int, state: ServerState, new: ServerState, updates: ClientUpdates, broadcast_bytes: int
    ) -> dict[str, Any]:
        selected = len(updates.client_ids)
        extras_up = updates.extras_bytes()
        step = {k: new.params[k] - state.params[k] for k in new.params}
        stats = {name: float(v.double().mean()) for name, v in updates.stats.items()}
        return {
            **stats,
            "round": round_,
            "lr": self.lr(round_),
            "clients": selected,
            "train_loss": float((updates.train_loss.double() * updates.weights.to(torch.float64)).sum()),
            "drift": updates.drift(),
            "update_norm": float(flatten(step, stacked=False).norm()),
            "bytes_up": selected * (self.model_bytes + extras_up),
            "bytes_down": selected * (self.model_bytes + broadcast_bytes),
        }

    def evaluate(self, params: Tree) -> dict[str, Any]:
        test = evaluate(self.model, params, self.x_test, self.y_test)
        record = {"test_accuracy": test["accuracy"], "test_loss": test["loss"]}
        acc = per_client_accuracy(
            self.model, params, self.store.x, self.store.y, self.store.test_order, self.store.test_offsets
        )
        record.update(client_accuracy_spread(acc))
        return record

    def checkpoint_payload(self, round_: int, state: ServerState) -> dict[str, Any]:
        sampler_state = self.executor.sampler_state or {}
        return {
            "round": round_,
            "params": {k: v.cpu() for k, v in state.params.items()},
            "extras": {k: v.cpu() for k, v in state.extras.items()},
            "client_state": self.executor.client_state,
            "sampler_state": {k: torch.as_tensor(v) for k, v in sampler_state.items()},
        }

    def restore(self, payload: dict[str, Any]) -> tuple[int, ServerState]:
        """Server state, client state and sampler state from a checkpoint payload (validated first)."""
        self._check_checkpoint(payload)
        to_dev = lambda tree: {k: v.to(self.device) for k, v in tree.items()}  # noqa: E731
        state = ServerState(to_dev(payload["params"]), to_dev(payload["extras"]))
        self.executor.client_state = dict(payload["client_state"])
        sampler_state = payload.get("sampler_state") or {}
        self.executor.sampler_state = {k: v.numpy() for k, v in sampler_state.items()} or None
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
        c = self.config
        state = state if state is not None else self.initial_state()
        history = results.read_metrics() if results else []
        for r in range(start_round, c.rounds + 1):
            t0 = time.perf_counter()
            state, record = self.round(r, state)
            loss = record["train_loss"]  # None in a round without clients
            diverged = (loss is not None and not math.isfinite(loss)) or not all_finite(state.params)
            if not diverged and (r % c.eval_every == 0 or r == c.rounds):
                record.update(self.evaluate_state(state))
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

    def summary(self, history: list[dict[str, Any]], diverged: bool = False) -> dict[str, Any]:
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
            "total_bytes_up": int(sum(h["bytes_up"] for h in history)),
            "total_bytes_down": int(sum(h["bytes_down"] for h in history)),
            "num_params": self.num_params,
            "num_clients": self.store.num_clients,
            "device": str(self.device),
            "chunk_size": self.executor.chunk_size,
            "client_state_bytes": sum(v.numel() * v.element_size() for v in self.executor.client_state.values()),
            "optimizer": self.config.optimizer.name,
            "optimizer_state_bytes_per_client": self.optimizer_state_bytes,
            "optimizer_state_bytes_all_clients": self.optimizer_state_bytes * self.store.num_clients,
            "dataset": self.config.dataset.name,
            "model": self.config.model.name,
            "strategy": self.config.strategy.name,
            **self.sampler_report(),
        }

    def sampler_report(self) -> dict[str, Any]:
        """``sampler_spectral_gap`` (slowest client chain) and ``sampler_mixing_time`` (largest bound
        ``log(4 n_c) / gap_c``) of a Markov sampler, computed once per run; None for samplers without a chain."""
        if getattr(self, "_sampler_report", None) is None:
            self._sampler_report = chain_report(self.executor.sampler, self.store.sizes, self.config.seed)
        return self._sampler_report


def make_simulation(config: RunConfig) -> Simulation:
    """A federated :class:`Simulation`, or a decentralized one when the config names a topology file.

    Over a topology, the number of clients is the graph's node count unless ``clients`` was set explicitly
    (then the two must agree).
    """
    if not config.topology:
        return Simulation(config)
    from fedsim.decentralized import DecentralizedSimulation, MinimaxSimulation, mixing_schedule

    if "clients" not in config.model_fields_set:
        config = config.replace(clients=mixing_schedule(config).n)
    return MinimaxSimulation(config) if config.minimax else DecentralizedSimulation(config)


def simulate(
    config: RunConfig | dict[str, Any] | str | Path | None = None,
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
    on_round: RoundCallback | None = None,
    plots: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """Run a federated experiment and return its summary.

    ``config`` is a :class:`RunConfig`, a mapping, or a YAML/TOML file; keyword ``overrides`` win. With
    ``out`` the results folder is written (config.yaml, metrics.jsonl, summary.json, checkpoints, plots).
    """
    if isinstance(config, RunConfig):
        cfg = make_config(merge(config.to_dict(), overrides)) if overrides else config
    elif isinstance(config, dict):
        cfg = make_config(merge(config, overrides))
    else:
        cfg = load_config(config, overrides)
    if out is not None:
        ResultsDir.check_new(out, overwrite)  # before loading data: fail fast, touch nothing
    with make_simulation(cfg) as sim:
        results = None
        if out is not None:
            results = ResultsDir.create(out, overwrite=overwrite)
            results.write_text(CONFIG_FILE, dump_config(sim.config))
            results.write_histogram(sim.histogram)
        if cfg.backend == "flower":
            from fedsim.flower_backend import run_with_flower

            summary = run_with_flower(sim, results, on_round)
        else:
            summary = sim.run(results, on_round=on_round)
    if results and plots:
        from fedsim.plots import plot_run

        plot_run(results.path)
    return summary


def resume(out: str | Path, *, on_round: RoundCallback | None = None, plots: bool = True) -> dict[str, Any]:
    """Continue a killed run from its last checkpoint; ends with the same metrics as an uninterrupted run."""
    results = ResultsDir.open_existing(out)
    cfg = load_config(results.file(CONFIG_FILE))
    if cfg.backend == "flower":
        raise FedsimError("a --backend flower run cannot resume: its client state lived in the Flower nodes")
    with make_simulation(cfg) as sim:
        payload = results.load_checkpoint()
        if payload is None:
            start, state = 1, None
        else:
            last, state = sim.restore(payload)
            start = last + 1
        results.truncate_metrics(start - 1)
        if start > cfg.rounds:
            summary = sim.summary(results.read_metrics())
            results.write_json(SUMMARY_FILE, summary)
        else:
            summary = sim.run(results, start_round=start, state=state, on_round=on_round)
    if plots:
        from fedsim.plots import plot_run

        plot_run(results.path)
    return summary
