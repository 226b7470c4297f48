"""The composition root: a validated config becomes built components (data on the device, model, task,
strategy in its mode, sampler, optimizer, executor), handed to the round loop (:mod:`fedsim.rounds`).
Entry points: :func:`simulate` (the CLI's ``fedsim simulate``), :func:`resume`, :func:`make_simulation`."""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch

import topologies
from fedsim.asynchronous import AsyncMode
from fedsim.config import RunConfig, dump_config, load_config, make_config, merge
from fedsim.core import components, rng
from fedsim.core.errors import DivergenceError, FedsimError, FedsimWarning, OutOfMemory, RunInterrupted, unknown
from fedsim.core.pytree import stack
from fedsim.data import label_histogram, split_clients, subsample_train
from fedsim.data.samplers import steps_per_client
from fedsim.decentralized import DecentralizedMode, mixing_schedule
from fedsim.engine.executor import LocalExecutor
from fedsim.engine.store import ClientStore
from fedsim.minimax import MinimaxTask
from fedsim.models import build_model
from fedsim.optim import state_bytes
from fedsim.results import CHECKPOINT_FILE, CONFIG_FILE, SUMMARY_FILE, ResultsDir
from fedsim.rounds import FederatedMode, Parts, RoundCallback, Simulation, oscillation, parameters_of
from fedsim.tasks import ClassificationTask
from fedsim.threads import ThreadGovernor, thread_count
from fedsim.threads import configure as configure_threads
from fedsim.tracking import preflight as preflight_tracking
from fedsim.tracking import start_tracking
from strategies import build_strategy
from strategies.asynchronous import is_asynchronous

__all__ = ["Simulation", "assemble", "make_simulation", "oscillation", "parameters_of", "resume", "simulate"]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if name not in ("auto", "cpu", "cuda"):
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


def assemble(config: RunConfig) -> Simulation:
    """Build every component of ``config`` and the round loop over them (federated, or decentralized over
    the config's topology; a min-max task for ``dsgda``). Optional dependencies (Ray, Flower) fail first,
    before any data loads."""
    c = config
    for kind in ("executor", "backend"):  # optional dependencies (Ray, Flower): fail before any data loads
        preflight = getattr(components.get(kind, getattr(c, kind).name).obj, "preflight", None)
        if preflight is not None:
            preflight()
    if c.flower_hosted:
        from fedsim.flower.records import require_flower  # optional dependency: flwr

        require_flower()
    itself = _SimulationRef()  # for strategies that drive the engine themselves (flwr:NAME), bound below
    schedule = mixing_schedule(c) if c.topology else None
    if schedule is not None and schedule.n != c.clients:
        raise topologies.TopologyError(f"topology has {schedule.n} nodes but --clients is {c.clients}")
    device = resolve_device(c.device)
    make_deterministic(device)
    ds = components.build("dataset", c.dataset, seed=c.seed, num_clients=c.clients)
    if c.train_samples is not None:
        ds = subsample_train(ds, c.train_samples, c.seed)
    parts = components.build(
        "partitioner", c.partition, y=ds.y_train, num_clients=c.clients, seed=c.seed, min_size=c.min_client_size,
        natural=ds.client_train,
    )  # fmt: skip
    histogram = label_histogram(ds.y_train, parts, ds.num_classes)
    train_parts, test_parts = split_clients(parts, c.client_test_fraction, c.seed)
    if any(len(p) == 0 for p in train_parts):
        raise FedsimError("a client has no training samples; raise --min-client-size or lower the test fraction")
    store = ClientStore.build(ds.x_train, ds.y_train, train_parts, test_parts, device)
    attack = components.build("attack", c.attack)
    if attack is not None:  # a data attack relabels the Byzantine clients' training samples, once
        poison(attack, store, attack.clients(store.num_clients, c.seed), ds.num_classes, c.seed)
    system = components.build("system", c.system, seed=c.seed)
    system.profiles(store.num_clients)  # a trace that does not fit the run fails here, before training
    if c.batch_size > int(store.sizes.max()):
        warnings.warn(
            f"batch size {c.batch_size} exceeds every client's training samples (the largest client has "
            f"{int(store.sizes.max())}): each step sees at most a client's whole data",
            FedsimWarning,
            stacklevel=2,
        )
    task = MinimaxTask(components.build("problem", c.problem)) if c.minimax else ClassificationTask()
    task.prepare(store.y[store.order], ds.num_classes)
    base = build_model(c.model, ds.feature_shape, task.output_classes(ds.num_classes), seed=init_seed(c.seed))
    model = task.wrap(base).to(device)
    if schedule is not None:
        algorithm = task.client_algorithm(c.lr, c.strategy.options)
        context = {"client_algorithm": algorithm} if algorithm is not None else {}
        mode = DecentralizedMode(components.build("decentralized", c.strategy, **context), schedule, device)
    else:
        strategy = _federated_strategy(c, itself)
        if is_asynchronous(strategy):
            mode = AsyncMode(strategy)
        else:
            mode = FederatedMode(strategy, components.build("availability", c.availability, seed=c.seed))
    optimizer = components.build("optimizer", c.optimizer, model=model)
    init_params = parameters_of(model)
    sampler = components.build("sampler", c.sampler)
    privacy = components.build("privacy", c.privacy)
    clipping = None
    if getattr(privacy, "record_level", False):
        clipping = record_level_privacy(privacy, mode.strategy.client_algorithm, store, sampler, c)
    local = LocalExecutor(
        model, store, sampler, optimizer, mode.strategy.client_algorithm,
        seed=c.seed, local_steps=None if c.local_epochs else c.local_steps, local_epochs=c.local_epochs,
        batch_size=c.batch_size, chunk_size=c.chunk_size, grad_mode=c.grad_mode, sequential=c.sequential,
        loss_fn=task.loss_fn, clipping=clipping,
    )  # fmt: skip
    local.init_client_state(init_params)
    sim = Simulation(c, Parts(
        device=device, dataset=ds, histogram=histogram, store=store,
        x_test=torch.as_tensor(ds.x_test, device=device),
        y_test=torch.as_tensor(ds.y_test, dtype=torch.int64, device=device),
        task=task, model=model, mode=mode, sampler=sampler,
        lr_schedule=components.build("lr_schedule", c.lr_schedule), executor=local,
        optimizer_state_bytes=state_bytes(optimizer.init(stack(init_params, 1))), system=system, attack=attack,
        privacy=privacy, uplink=components.build("compressor", c.uplink),
        downlink=components.build("compressor", c.downlink),
    ))  # fmt: skip
    itself.target = sim
    # Resolved once per run (not per round from free memory): float32 results of convolutional models
    # depend slightly on the chunk size, so a run keeps one.
    local.chunk_size = local.resolve_chunk_size(init_params, sim.clients_per_round())
    # A remote executor copies the local one's settings, data shards and client state.
    sim.executor = components.build("executor", c.executor, local=local)
    return sim


def record_level_privacy(privacy, algorithm, store: ClientStore, sampler, c: RunConfig):
    """DP-SGD's per-step clipping for the executor; starts the privacy's per-client accountant (every
    client's Poisson rate and planned steps per round)."""
    if algorithm.trajectory is not None or algorithm.microbatches > 1:
        raise FedsimError(
            f"privacy '{privacy.name}' clips and noises every local gradient; strategy '{c.strategy.name}' reads the "
            "raw per-step gradients; use another strategy"
        )
    steps = steps_per_client(store.sizes, None if c.local_epochs else c.local_steps, c.local_epochs, c.batch_size)
    privacy.start(sampler.rates(store.sizes, c.batch_size), steps)
    return privacy.sample_clipping(c.batch_size, c.seed)


def poison(attack, store: ClientStore, byzantine, num_classes: int, seed: int) -> None:
    """Let ``attack`` change the ``byzantine`` clients' training samples (copies of the store's samples and
    labels, so the caller's data set is untouched)."""
    rows = [store.order[store.offsets[c] : store.offsets[c + 1]] for c in byzantine]
    if not rows:
        return
    store.x, store.y = store.x.clone(), store.y.clone()
    attack.poison_samples(store.x, store.y, torch.cat(rows), num_classes, seed)


def _federated_strategy(c: RunConfig, simulation: _SimulationRef):
    momentum = c.optimizer.get("momentum", 0.0) if c.optimizer.name == "sgd" else 0.0
    return build_strategy(
        c.strategy, aggregator=c.aggregator, regulator=c.regulator, client_filter=c.client_filter,
        fraction=c.fraction, min_clients=c.min_clients, local_momentum=momentum, simulation=simulation,
    )  # fmt: skip


class _SimulationRef:
    """The simulation being assembled, for a component built before it exists; attribute access goes to the
    simulation once :func:`assemble` binds it."""

    target: Simulation | None = None

    def __getattr__(self, name: str) -> Any:
        if self.target is None:
            raise AttributeError(f"the simulation is still being assembled (asked for {name!r})")
        return getattr(self.target, name)


def make_simulation(config: RunConfig) -> Simulation:
    """The run of ``config``, federated or (with a topology file) decentralized.

    Over a topology, the number of clients is the graph's node count unless ``clients`` was set explicitly
    (then the two must agree).
    """
    if config.topology and "clients" not in config.model_fields_set:
        config = config.replace(clients=mixing_schedule(config).n)
    fixed = None if config.threads in (None, "adaptive") else config.threads
    sim = assemble(config)
    sim.saved_threads = torch.get_num_threads()  # restored when the simulation closes (library callers)
    configure_threads(fixed)
    if config.threads == "adaptive":
        sim.governor = ThreadGovernor(thread_count())
    return sim


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
    if cfg.logger and out is None:
        raise FedsimError("loggers write into the results folder; give the run an output folder (out=...)")
    preflight_tracking(cfg)
    results = None
    try:
        with make_simulation(cfg) as sim:
            if out is not None:
                results = ResultsDir.create(out, overwrite=overwrite)  # locked until the end of the run
                sim.config = _standalone(sim.config, results)  # checkpoints then carry what config.yaml says
                results.write_text(CONFIG_FILE, dump_config(sim.config))
                results.write_histogram(sim.histogram)
            with _tracked(sim, results, on_round) as hook:
                with _plots_even_if_stopped(lambda: results if plots else None):
                    summary = components.build("backend", cfg.backend).run(sim, results, hook)
                if results and plots:
                    from fedsim.plots import plot_run

                    plot_run(results.path)
    finally:
        if results is not None:
            results.close()
    return summary


@contextlib.contextmanager
def _tracked(sim, results: ResultsDir | None, on_round: RoundCallback | None):
    """The round callback that also feeds the run's loggers (:mod:`fedsim.tracking`); they are closed with how
    the run ended (finished, failed or killed) and its ``summary.json``."""
    tracking = start_tracking(sim.config, results.path if results else None)
    if not tracking.loggers:
        yield on_round
        return

    def hook(record: dict[str, Any]) -> None:
        evaluated = record.get("test_accuracy") is not None
        tracking.log(record, sim.client_accuracy if evaluated else None)
        if on_round is not None:
            on_round(record)

    status = "failed"
    try:
        yield hook
        status = "finished"
    except (KeyboardInterrupt, RunInterrupted):
        status = "killed"
        raise
    finally:
        summary_file = results.file(SUMMARY_FILE)
        summary = json.loads(summary_file.read_text()) if summary_file.exists() else None
        tracking.close(summary, status)


@contextlib.contextmanager
def _plots_even_if_stopped(folder):
    """A run that diverged, ran out of memory or was interrupted still gets the plots of what it wrote."""
    try:
        yield
    except (DivergenceError, OutOfMemory, RunInterrupted):
        results = folder()
        if results is not None and results.file("metrics.jsonl").exists():
            from fedsim.plots import plot_run  # optional dependency: matplotlib

            with contextlib.suppress(Exception):  # a plot must not hide why the run stopped
                plot_run(results.path)
        raise


def _standalone(config: RunConfig, results: ResultsDir) -> RunConfig:
    """The config as the results folder keeps it: a graph topology file is copied into the folder and named
    by its file name there (so ``OUT/config.yaml`` and ``--resume`` work from any directory; a relative path in
    a config file is read relative to the file when it exists there). A YAML schedule of graph files keeps its
    path."""
    if not config.topology or str(config.topology).endswith((".yaml", ".yml")):
        return config
    source = Path(config.topology)
    copy = results.file(f"topology{source.suffix}")
    copy.write_bytes(source.read_bytes())
    return config.replace(topology=copy.name)


def _check_resumable(results: ResultsDir, payload: dict[str, Any], written: RunConfig, cfg: RunConfig) -> None:
    """The checkpoint belongs to this config.yaml, its round is within the run, and metrics.jsonl has every
    round up to it."""
    saved, current = payload.get("config"), _comparable(written.to_dict())
    if isinstance(saved, dict) and _comparable(saved) != current:
        changes = _differences(_comparable(saved), current)
        raise FedsimError(
            f"cannot resume {results.path}: config.yaml changed since the checkpoint ({'; '.join(changes[:4])}"
            f"{'; ...' if len(changes) > 4 else ''}); restore it, or start over with --overwrite"
        )
    last = int(payload.get("round", 0))
    if last > cfg.rounds:
        raise FedsimError(f"cannot resume {results.path} with {cfg.rounds} rounds: its checkpoint is at round {last}")
    have = {r.get("round") for r in results.read_metrics()}
    missing = [r for r in range(1, last + 1) if r not in have]
    if missing:
        raise FedsimError(
            f"cannot resume {results.path}: metrics.jsonl lacks round{'s' * (len(missing) > 1)} "
            f"{missing[0]}{f'-{missing[-1]}' if len(missing) > 1 else ''} that the checkpoint (round {last}) has "
            "passed; the history would be partial. Restore the file, or start over with --overwrite"
        )


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A config for comparison: the topology by its file name (the results folder keeps a copy under its own
    name, and the run may be resumed from another directory), without the thread count (it changes no
    result)."""
    topology = config.get("topology")
    kept = {k: v for k, v in config.items() if k != "threads"}
    return {**kept, "topology": Path(topology).name if topology else topology}


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: old -> new`` for every (nested) key whose value differs."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def resume(
    out: str | Path, *, rounds: int | None = None, threads: int | None = None, overwrite: bool = False,
    on_round: RoundCallback | None = None, plots: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Continue a killed run from its last checkpoint; ends with the same metrics as an uninterrupted run.

    ``overwrite`` starts the run over from round 1 with its saved config. Refused, with the reason: a folder
    without a checkpoint, a
    ``config.yaml`` changed since the checkpoint (the differing keys are named), and a ``metrics.jsonl``
    missing rounds the checkpoint has passed. ``rounds`` extends (or shortens, not below the checkpoint) the
    run and is written to its ``config.yaml``; ``threads`` sets the CPU threads of this part of the run."""
    with ResultsDir.open_existing(out) as results:  # locked until the end of the run
        return _resume(results, rounds, threads, overwrite, on_round, plots)


def _resume(
    results: ResultsDir, rounds: int | None, threads: int | None, overwrite: bool, on_round, plots: bool
) -> dict[str, Any]:
    written = load_config(results.file(CONFIG_FILE))
    cfg = written if rounds is None else written.replace(rounds=rounds)
    cfg = cfg if threads is None else cfg.replace(threads=threads)
    if not components.build("backend", cfg.backend).resumable:
        raise FedsimError(
            f"a --backend {cfg.backend.name} run cannot resume: its client state lived in the backend's nodes"
        )
    payload = None if overwrite else results.load_checkpoint()
    if overwrite:  # start over from round 1 with the saved config: the old checkpoint must not outlive it
        results.file(CHECKPOINT_FILE).unlink(missing_ok=True)
    elif payload is None:
        raise FedsimError(
            f"cannot resume {results.path}: it has no checkpoint (checkpoint_every {cfg.checkpoint_every}, or the run "
            f"stopped before its first one); start it over with --resume {results.path} --overwrite"
        )
    if payload is not None:
        _check_resumable(results, payload, written, cfg)
    if rounds is not None:
        results.write_text(CONFIG_FILE, dump_config(cfg))
    with make_simulation(cfg) as sim:
        if payload is None:
            start, state = 1, None
        else:
            last, state = sim.restore(payload)
            start = last + 1
        if start <= cfg.rounds and sim.over_budget(start):
            raise FedsimError(
                f"cannot resume {results.path}: its privacy budget is spent (round {start} would take epsilon past "
                f"target_epsilon {sim.privacy.target_epsilon:g}); raise privacy.target_epsilon in config.yaml"
            )
        results.truncate_metrics(start - 1)
        if start > cfg.rounds:
            summary = sim.summary(results.read_metrics())
            results.write_json(SUMMARY_FILE, summary)
        else:
            with _tracked(sim, results, on_round) as hook:
                summary = sim.run(results, start_round=start, state=state, on_round=hook)
            if payload is not None:  # the report's warning: this history was written in two parts
                summary["resumed_from_round"] = start - 1
                results.write_json(SUMMARY_FILE, summary)
    if plots:
        from fedsim.plots import plot_run

        plot_run(results.path)
    return summary
