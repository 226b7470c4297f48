"""The ``fedsim`` command line: simulate, plot, list, bench.

Bad input (unknown names, out-of-range values, missing files) ends with a one-line ``error:`` message and
exit code 2; a diverging run ends with exit code 3 after keeping everything it wrote.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from fedsim.core.errors import DivergenceError, FedsimError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="fedsim: vectorized federated learning simulator (all clients trained at once on a client axis).",
)  # fmt: skip
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (JSON on stdout).")
app.add_typer(bench_app, name="bench")
topology_app = typer.Typer(no_args_is_help=True, help="Build, inspect and convert graph topologies.")
app.add_typer(topology_app, name="topology")

Opt = typer.Option


def _parse_pairs(items: list[str] | None, flag: str = "--set") -> dict[str, Any]:
    """``KEY=VALUE`` pairs (``--set``, ``--param``); values parsed as YAML scalars (numbers, booleans, lists)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise FedsimError(f"{flag} expects KEY=VALUE, got '{item}'")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


def _default_out(strategy: str, dataset: str, model: str, seed: int, tag: str | None = None) -> Path:
    base = Path("runs") / f"{strategy}-{dataset}-{model.replace(':', '_')}-{tag or f's{seed}'}"
    path, i = base, 1
    while path.exists():
        path, i = Path(f"{base}-{i}"), i + 1
    return path


@app.command()
def simulate(
    config: Annotated[Path | None, typer.Argument(help="YAML or TOML config file; flags override it.")] = None,
    dataset: Annotated[
        str | None, Opt(help="digits | mnist5k | mnist | fashion-mnist | synthetic | shakespeare | npz")
    ] = None,
    data_path: Annotated[str | None, Opt(help="File for --dataset npz (arrays x, y, optional client).")] = None,
    model: Annotated[
        str | None, Opt(help="logreg | mlp | lenet5 | cnn | char_transformer | package.module:factory")
    ] = None,
    clients: Annotated[int | None, Opt(help="Number of simulated clients.")] = None,
    partition: Annotated[str | None, Opt(help="iid | dirichlet | shards | natural")] = None,
    alpha: Annotated[float | None, Opt(help="Dirichlet concentration (label skew).")] = None,
    topology: Annotated[
        str | None, Opt(help="Graph file (GraphML, GML, edge list, .adj, JSON): decentralized training over it.")
    ] = None,
    mixing: Annotated[str | None, Opt(help="Mixing matrix: metropolis_hastings | max_degree | uniform | ...")] = None,
    strategy: Annotated[
        str | None,
        Opt(
            help="fedavg | fedprox | fedavgm | fedadam | fedyogi | fedadagrad | scaffold | scaffold-m | fednova | "
            "feddyn | fedcm; over a topology: dsgd | dsgd-atc | dsgt | dsgda | dsgda-atc"
        ),
    ] = None,
    regulator: Annotated[str | None, Opt(help="Client regulator wrapping the strategy: none | ecgr | bherd.")] = None,
    ecgr_beta: Annotated[float | None, Opt(help="ECGR damping of the unselected steps (0.2).")] = None,
    ecgr_rho: Annotated[float | None, Opt(help="ECGR fraction of steps selected by herding (0.5).")] = None,
    ecgr_center: Annotated[str | None, Opt(help="ECGR herding centre: zero | local_mean.")] = None,
    bherd_unit: Annotated[str | None, Opt(help="BHerd units: step | microbatch | sample.")] = None,
    bherd_ratio: Annotated[float | None, Opt(help="BHerd fraction of units kept (0.5).")] = None,
    bherd_scale: Annotated[str | None, Opt(help="BHerd upload: sum | rescale.")] = None,
    aggregator: Annotated[
        str | None, Opt(help="Server aggregation: mean | median | trimmed_mean | krum | gaf.")
    ] = None,
    problem: Annotated[str | None, Opt(help="Min-max problem of dsgda: auc | dro.")] = None,
    dual_lr: Annotated[float | None, Opt(help="Dual (ascent) step size of dsgda (default: --lr).")] = None,
    fraction: Annotated[float | None, Opt(help="Fraction of clients selected per round.")] = None,
    availability: Annotated[
        str | None, Opt(help="always | markov (clients on/off by a two-state chain; --set availability_p_on=...)")
    ] = None,
    rounds: Annotated[int | None, Opt(help="Communication rounds.")] = None,
    local_steps: Annotated[int | None, Opt(help="Local optimizer steps per round.")] = None,
    local_epochs: Annotated[int | None, Opt(help="Local epochs per round (overrides --local-steps).")] = None,
    batch_size: Annotated[int | None, Opt(help="Local minibatch size.")] = None,
    laziness: Annotated[
        float | None, Opt(help="Markov samplers (--set sampler=markov-ring|markov-regular): P(chain stays put).")
    ] = None,
    lr: Annotated[float | None, Opt(help="Local learning rate.")] = None,
    lr_schedule: Annotated[str | None, Opt(help="constant | step | cosine (per round).")] = None,
    optimizer: Annotated[
        str | None, Opt(help="Local optimizer: sgd | adam | adamw | foam | gwt | mols | sgd-sai.")
    ] = None,
    foam_level: Annotated[int | None, Opt(help="FOAM folding level l: state at 1/2^l columns (2).")] = None,
    foam_scale: Annotated[float | None, Opt(help="FOAM update scale alpha (0.25).")] = None,
    gwt_level: Annotated[int | None, Opt(help="GWT Haar levels L: state at 1/2^L columns (2).")] = None,
    gwt_scale: Annotated[float | None, Opt(help="GWT update scale alpha (0.25).")] = None,
    mols_estimator: Annotated[str | None, Opt(help="MoLS-style SNR estimator: sai | ema.")] = None,
    mols_refresh: Annotated[int | None, Opt(help="MoLS-style steps between SNR estimates (0: once).")] = None,
    momentum: Annotated[float | None, Opt(help="SGD momentum.")] = None,
    mu: Annotated[float | None, Opt(help="FedProx proximal coefficient.")] = None,
    seed: Annotated[int | None, Opt(help="Run seed.")] = None,
    device: Annotated[str | None, Opt(help="auto | cpu | cuda")] = None,
    chunk_size: Annotated[int | None, Opt(help="Clients trained per vectorized call (default: from memory).")] = None,
    eval_every: Annotated[int | None, Opt(help="Evaluate every N rounds.")] = None,
    executor: Annotated[str | None, Opt(help="local (in-process) | ray (actors owning client shards).")] = None,
    num_actors: Annotated[int | None, Opt(help="Ray actors (default: as many as CPUs/GPUs allow).")] = None,
    cpus_per_actor: Annotated[float | None, Opt(help="CPUs reserved per Ray actor, fractional allowed (1).")] = None,
    gpus_per_actor: Annotated[float | None, Opt(help="GPUs per Ray actor, fractional allowed (0).")] = None,
    backend: Annotated[
        str | None, Opt(help="fedsim (our engine) | flower (clients as Flower ClientApps, Flower's simulation).")
    ] = None,
    ray_address: Annotated[
        str | None, Opt(help="Ray cluster to join: auto or host:port (default: start Ray on this machine).")
    ] = None,
    set_: Annotated[list[str] | None, Opt("--set", help="Any config key: --set key=value (repeatable).")] = None,
    out: Annotated[Path | None, Opt(help="Results folder (default: runs/STRATEGY-DATASET-MODEL-sSEED).")] = None,
    overwrite: Annotated[bool, Opt(help="Replace an existing results folder.")] = False,
    resume: Annotated[Path | None, Opt(help="Continue the run in this results folder from its checkpoint.")] = None,
    seeds: Annotated[
        str | None, Opt(help="Repeat over seeds (0-9, 0,3,7, 1-3,8): OUT/seed-S/ each, quantiles in seeds_summary.json")
    ] = None,
    probe: Annotated[str | None, Opt(help="stability: twin run on data differing in one sample of one node.")] = None,
    probe_node: Annotated[int | None, Opt(help="Stability probe: node/client whose sample is replaced (0).")] = None,
    probe_sample: Annotated[int | None, Opt(help="Stability probe: position of that sample in its list (0).")] = None,
    quiet: Annotated[bool, Opt(help="No progress bar.")] = False,
) -> None:
    """Run a federated experiment and write its results folder."""
    from fedsim import simulation
    from fedsim.config import load_config

    progress = _Progress(quiet)
    if resume is not None and seeds is not None:
        raise FedsimError("--seeds cannot be combined with --resume; resume one seed's folder: --resume OUT/seed-S")
    if resume is not None:
        given = [
            n
            for n, v in locals().items()
            if n not in ("resume", "quiet", "progress", "simulation", "load_config", "overwrite")
            and v not in (None, False, [])
        ]
        if given:
            raise FedsimError(f"--resume continues a run with its saved config; drop {', '.join(given)}")
        with progress:
            summary = simulation.resume(resume, on_round=progress.update)
        _print_summary(summary, resume)
        return
    overrides = dict(
        dataset=dataset, data_path=data_path, model=model, topology=topology, mixing=mixing,
        clients=clients, partition=partition, alpha=alpha,
        availability=availability, problem=problem, dual_lr=dual_lr,
        strategy=strategy, fraction=fraction, rounds=rounds, local_steps=local_steps, local_epochs=local_epochs,
        batch_size=batch_size, lr=lr, lr_schedule=lr_schedule, optimizer=optimizer, momentum=momentum, mu=mu,
        seed=seed, device=device, chunk_size=chunk_size, eval_every=eval_every,
        laziness=laziness, regulator=regulator, ecgr_beta=ecgr_beta, ecgr_rho=ecgr_rho, ecgr_center=ecgr_center,
        bherd_unit=bherd_unit, bherd_ratio=bherd_ratio, bherd_scale=bherd_scale, aggregator=aggregator,
        foam_level=foam_level, foam_scale=foam_scale, gwt_level=gwt_level, gwt_scale=gwt_scale,
        mols_estimator=mols_estimator, mols_refresh=mols_refresh, executor=executor, num_actors=num_actors,
        cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor, ray_address=ray_address, backend=backend,
    )  # fmt: skip
    overrides.update(_parse_pairs(set_))
    repeat = _repeat_options(seeds, seed, probe, probe_node, probe_sample)
    cfg = load_config(config, overrides)
    if repeat is not None:
        _simulate_repeats(cfg, *repeat, out=out, overwrite=overwrite, progress=progress)
        return
    out = out or _default_out(cfg.strategy, cfg.dataset, cfg.model, cfg.seed)
    progress.total = cfg.rounds
    with progress:
        summary = simulation.simulate(cfg, out, overwrite=overwrite, on_round=progress.update)
    _print_summary(summary, out)


def _repeat_options(
    seeds: str | None, seed: int | None, probe: str | None, node: int | None, sample: int | None
) -> tuple[list[int] | None, str | None, dict[str, int]] | None:
    """Parsed ``--seeds`` and ``--probe*`` flags (None when neither is given); bad values fail here."""
    from fedsim.probes import check_probe, check_probe_options
    from fedsim.seeds import parse_seeds

    options = {k: v for k, v in (("node", node), ("sample", sample)) if v is not None}
    if probe is None and options:
        raise FedsimError("--probe-node/--probe-sample need --probe stability")
    if probe is not None:
        check_probe(probe)
        check_probe_options(**options)
    if seeds is not None and seed is not None:
        raise FedsimError("--seed and --seeds exclude each other; list the seeds in --seeds")
    if seeds is None and probe is None:
        return None
    return (parse_seeds(seeds) if seeds is not None else None), probe, options


def _simulate_repeats(
    cfg: Any, seeds: list[int] | None, probe: str | None, options: dict[str, int], *,
    out: Path | None, overwrite: bool, progress: _Progress,
) -> None:  # fmt: skip
    """``--seeds`` (optionally with ``--probe``) or a single ``--probe`` run, with a short summary line."""
    from fedsim.probes import run_stability_probe
    from fedsim.seeds import run_seeds

    tag = "seeds" if seeds is not None else None
    out = out or _default_out(cfg.strategy, cfg.dataset, cfg.model, cfg.seed, tag)
    progress.total = cfg.rounds * (len(seeds) if seeds else 1)
    done = iter(range(1, progress.total + 1))
    tick = lambda record: progress.update({**record, "round": next(done)})  # noqa: E731
    with progress:
        if seeds is None:
            summary = run_stability_probe(cfg, out, overwrite=overwrite, on_round=tick, **options)
        else:
            report = run_seeds(cfg, seeds, out, overwrite=overwrite, on_round=tick, probe=probe, probe_options=options)
    if seeds is None:
        _print_summary(summary, out)
        typer.echo(
            f"stability: final distance {summary['final_stability_distance']:.4g} (mean over nodes), "
            f"max {summary['final_stability_distance_max']:.4g}, perturbed node "
            f"{summary['final_stability_distance_node']:.4g} -> {Path(out) / 'stability.csv'}"
        )
        return
    parts = []
    for key in ("final_test_accuracy", "final_stability_distance"):
        if key in report["final"]:
            st = report["final"][key]
            name = key.replace("_", " ")
            parts.append(f"{name} median {st['median']:.4g}, q90 {st['q90']:.4g}, mean {st['mean']:.4g}")
    typer.echo(f"done: {len(seeds)} seeds x {cfg.rounds} rounds; {'; '.join(parts) or 'no final values'} -> {out}")


class _Progress:
    """A rich progress bar over rounds showing the latest test accuracy (silent when quiet)."""

    def __init__(self, quiet: bool):
        self.quiet, self.total, self._bar, self._task = quiet, None, None, None

    def __enter__(self):
        if not self.quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn("round"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.description}"),
                TimeElapsedColumn(), transient=False, disable=not sys.stderr.isatty(),
            )  # fmt: skip
            self._bar.__enter__()
            self._task = self._bar.add_task("", total=self.total)
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def update(self, record: dict[str, Any]) -> None:
        if self._bar is None:
            return
        acc = record.get("test_accuracy")
        loss = record["train_loss"]
        text = f"loss {loss:.4f}" if loss is not None else "no clients"
        text += f"  acc {acc:.4f}" if acc is not None else ""
        self._bar.update(self._task, completed=record["round"], description=text)


def _print_summary(summary: dict[str, Any], out: Path) -> None:
    acc = summary.get("final_test_accuracy")
    best = summary.get("best_test_accuracy")
    acc_text = f"{acc:.4f}" if acc is not None else "n/a"
    best_text = f"{best:.4f} (round {summary['best_round']})" if best is not None else "n/a"
    typer.echo(
        f"done: {summary['rounds_completed']} rounds, final test accuracy {acc_text}, best {best_text}, "
        f"{summary['total_time_s']:.1f} s -> {out}"
    )


@app.command()
def plot(
    run_dirs: Annotated[list[Path], typer.Argument(help="One or more results folders.")],
    metric: Annotated[str, Opt(help="Comma-separated metrics, e.g. test_accuracy,drift.")] = "test_accuracy",
    out: Annotated[Path, Opt(help="Output PNG.")] = Path("plot.png"),
) -> None:
    """Overlay runs' metrics in one PNG."""
    from fedsim.plots import plot_runs

    metrics = [m.strip() for m in metric.split(",") if m.strip()]
    path = plot_runs(run_dirs, metrics, out)
    typer.echo(f"wrote {path}")


@app.command("list")
def list_components() -> None:
    """Show datasets, partitioners, samplers, models, strategies, optimizers and schedules."""
    from fedsim.data import DATASETS, PARTITIONERS
    from fedsim.data.samplers import SAMPLERS
    from fedsim.models import MODELS
    from fedsim.optim import OPTIMIZERS, SCHEDULES
    from strategies import AGGREGATORS, CLIENT_FILTERS, DECENTRALIZED, REGULATORS, STRATEGIES
    from topologies import GENERATORS, MIXING_METHODS

    for title, names in (
        ("datasets", DATASETS), ("partitioners", PARTITIONERS), ("samplers", SAMPLERS), ("models", MODELS),
        ("strategies", STRATEGIES), ("decentralized", DECENTRALIZED), ("regulators", REGULATORS),
        ("aggregators", AGGREGATORS), ("client filters", CLIENT_FILTERS), ("optimizers", OPTIMIZERS),
        ("lr schedules", SCHEDULES), ("topologies", GENERATORS), ("mixing", MIXING_METHODS),
    ):  # fmt: skip
        typer.echo(f"{title + ':':14} {', '.join(names)}")
    try:
        from strategies.flower import flower_strategies
    except FedsimError:
        typer.echo(f"{'flower:':14} (not installed: pip install 'fedsim[flower]')")
    else:
        typer.echo(f"{'flower:':14} {', '.join('flwr:' + n for n in sorted(flower_strategies()))}")


def _emit_json(result: dict[str, Any], out: Path | None) -> None:
    """Print a benchmark result as JSON (and write it to ``out`` when given)."""
    import json

    text = json.dumps(result, indent=2)
    if out:
        out.write_text(text + "\n")
    typer.echo(text)


@bench_app.command("engine")
def bench_engine_cmd(
    dataset: Annotated[str, Opt(help="Data set whose samples are used.")] = "digits",
    model: Annotated[str, Opt(help="Model name.")] = "mlp",
    clients: Annotated[int, Opt(min=1, help="Simulated clients.")] = 1000,
    local_steps: Annotated[int, Opt(min=1, help="Local steps per client.")] = 10,
    batch_size: Annotated[int, Opt(min=1, help="Minibatch size.")] = 32,
    repeats: Annotated[int, Opt(min=1, help="Timed repeats (median reported).")] = 5,
    device: Annotated[str, Opt(help="auto | cpu | cuda")] = "auto",
    chunk_size: Annotated[int | None, Opt(min=1, help="Clients per vectorized call (default: from memory).")] = None,
    grad_mode: Annotated[str, Opt(help="sum | vmap")] = "sum",
    skip_sequential: Annotated[bool, Opt(help="Skip the slow per-client loop.")] = False,
    out: Annotated[Path | None, Opt(help="Also write the JSON here.")] = None,
) -> None:
    """Vectorized vs sequential per-client loop vs one centralized batch of the same samples."""
    from fedsim.bench import bench_engine

    result = bench_engine(
        dataset=dataset, model=model, clients=clients, local_steps=local_steps, batch_size=batch_size,
        repeats=repeats, device=device, chunk_size=chunk_size, grad_mode=grad_mode,
        sequential=not skip_sequential,
    )  # fmt: skip
    _emit_json(result, out)


@bench_app.command("dsgd")
def bench_dsgd_cmd(
    nodes: Annotated[int, Opt(min=2, help="Graph nodes.")] = 64,
    topology: Annotated[str, Opt(help="Graph family (topologies.build).")] = "ring",
    model: Annotated[str, Opt(help="Model name.")] = "mlp",
    steps: Annotated[int, Opt(min=1, help="D-SGD steps per timing.")] = 10,
    repeats: Annotated[int, Opt(min=1, help="Timed repeats (median reported).")] = 5,
    device: Annotated[str, Opt(help="auto | cpu | cuda")] = "auto",
    skip_loop: Annotated[bool, Opt(help="Skip the slow per-node loop.")] = False,
    out: Annotated[Path | None, Opt(help="Also write the JSON here.")] = None,
) -> None:
    """D-SGD step: vectorized + sparse gossip vs a per-node loop with per-node optimizers; gossip share."""
    from fedsim.bench import bench_dsgd

    result = bench_dsgd(nodes=nodes, topology=topology, model=model, steps=steps, repeats=repeats, device=device,
                        loop=not skip_loop)  # fmt: skip
    _emit_json(result, out)


@bench_app.command("regulator")
def bench_regulator_cmd(
    regulator: Annotated[str, Opt(help="ecgr | bherd")] = "ecgr",
    strategy: Annotated[str, Opt(help="Host strategy.")] = "fedavg",
    dataset: Annotated[str, Opt(help="Data set.")] = "digits",
    model: Annotated[str, Opt(help="Model name.")] = "mlp",
    clients: Annotated[int, Opt(min=1, help="Clients (all trained every round).")] = 20,
    local_steps: Annotated[int, Opt(min=1, help="Local steps K per round.")] = 40,
    batch_size: Annotated[int, Opt(min=1, help="Minibatch size.")] = 32,
    repeats: Annotated[int, Opt(min=1, help="Timed rounds per variant (median reported).")] = 5,
    device: Annotated[str, Opt(help="auto | cpu | cuda")] = "auto",
    set_: Annotated[list[str] | None, Opt("--set", help="Regulator option KEY=VALUE (repeatable).")] = None,
    out: Annotated[Path | None, Opt(help="Also write the JSON here.")] = None,
) -> None:
    """Per-round time of a strategy with and without a client regulator (ECGR's overhead)."""
    from fedsim.bench import bench_regulator

    result = bench_regulator(
        regulator=regulator, strategy=strategy, dataset=dataset, model=model, clients=clients,
        local_steps=local_steps, batch_size=batch_size, repeats=repeats, device=device, options=_parse_pairs(set_),
    )  # fmt: skip
    _emit_json(result, out)


@bench_app.command("executors")
def bench_executors_cmd(
    clients: Annotated[int, Opt(min=2, help="Clients (all trained every round).")] = 100,
    rounds: Annotated[int, Opt(min=1, help="Rounds per run.")] = 20,
    local_steps: Annotated[int, Opt(min=1, help="Local steps per round.")] = 10,
    batch_size: Annotated[int, Opt(min=1, help="Minibatch size.")] = 16,
    num_actors: Annotated[int | None, Opt(min=1, help="Ray actors (default: as many as CPUs allow).")] = None,
    cpus_per_actor: Annotated[float, Opt(help="CPUs per Ray actor and per Flower client.")] = 1.0,
    repeats: Annotated[int, Opt(min=1, help="Runs of ours per executor (median reported).")] = 3,
    flower: Annotated[bool, Opt(help="Also run Flower's simulation engine (needs the flower extra).")] = True,
    out: Annotated[Path | None, Opt(help="Also write the JSON here.")] = None,
) -> None:
    """Whole-run wall time on the digits MLP: local executor vs Ray executor vs Flower's simulation engine."""
    from fedsim.bench import bench_executors

    result = bench_executors(
        clients=clients, rounds=rounds, local_steps=local_steps, batch_size=batch_size, num_actors=num_actors,
        cpus_per_actor=cpus_per_actor, repeats=repeats, flower=flower,
    )  # fmt: skip
    _emit_json(result, out)


@bench_app.command("optimizer")
def bench_optimizer_cmd(
    workload: Annotated[str, Opt(help="char_transformer | llama_block")] = "char_transformer",
    optimizers: Annotated[
        str, Opt(help="Comma-separated from adam,foam,foam-fused,gwt,gwt-fused,mols,sgd-sai.")
    ] = "adam,foam,foam-fused,gwt,gwt-fused,mols,sgd-sai",
    steps: Annotated[int, Opt(min=1, help="Steps per timed round.")] = 10,
    rounds: Annotated[int, Opt(min=1, help="Timed rounds per optimizer (median reported).")] = 7,
    device: Annotated[str, Opt(help="cpu | cuda")] = "cpu",
    out: Annotated[Path | None, Opt(help="Also write the JSON here.")] = None,
) -> None:
    """Optimizer step time and state bytes against torch.optim.Adam(foreach=True) on the same parameters."""
    import torch

    from fedsim.optim.benchmark import BENCH_OPTIMIZERS, WORKLOADS, bench_optimizers

    names = tuple(n.strip() for n in optimizers.split(",") if n.strip())
    for name in names:
        if name not in BENCH_OPTIMIZERS:
            choices = ", ".join(BENCH_OPTIMIZERS)
            raise FedsimError(f"unknown optimizer {name!r} for the benchmark; choose from {choices}")
    if workload not in WORKLOADS:
        raise FedsimError(f"unknown workload {workload!r}; choose from {', '.join(WORKLOADS)}")
    if device not in ("cpu", "cuda"):
        raise FedsimError(f"unknown device {device!r}; choose cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise FedsimError("device cuda requested but CUDA is not available")
    result = bench_optimizers(workload, names, steps=steps, rounds=rounds, device=device)
    _emit_json(result, out)


@topology_app.command("build")
def topology_build(
    name: Annotated[str, typer.Argument(help="Graph family, e.g. ring, torus, exponential, erdos_renyi.")],
    n: Annotated[int, Opt("--n", min=1, help="Number of nodes.")],
    output: Annotated[Path, Opt("--output", "-o", help="Output file; the format follows the extension.")],
    param: Annotated[list[str] | None, Opt("--param", help="Generator option KEY=VALUE (repeatable).")] = None,
) -> None:
    """Generate a graph and save it (GraphML, GML, edge list, adjacency list, .adj, JSON)."""
    import topologies

    graph = topologies.build(name, n, **_parse_pairs(param, "--param"))
    topologies.save(graph, output)
    typer.echo(f"wrote {output} ({graph.number_of_nodes()} nodes, {graph.number_of_edges()} edges)")


@topology_app.command("show")
def topology_show(
    path: Annotated[Path, typer.Argument(help="Topology file.")],
    method: Annotated[str, Opt(help="Mixing-matrix method for the spectral gap.")] = "metropolis_hastings",
    png: Annotated[Path | None, Opt(help="Drawing (default: FILE with .png).")] = None,
) -> None:
    """Nodes, edges, degrees, spectral gap, mixing-time estimate, and a PNG drawing."""
    import topologies
    from fedsim.plots import plot_topology

    graph = topologies.load(path)
    info = topologies.analyze(graph)
    if method != "metropolis_hastings":
        w = topologies.mixing_matrix(graph, method)
        info["spectral_gap"] = topologies.spectral_gap(w)
        info["mixing_time_estimate"] = topologies.mixing_time_estimate(w)
    for key, value in info.items():
        typer.echo(f"{key + ':':22} {value:.6g}" if isinstance(value, float) else f"{key + ':':22} {value}")
    out = plot_topology(graph, png or path.with_suffix(".png"), title=path.name)
    typer.echo(f"{'drawing:':22} {out}")


@topology_app.command("convert")
def topology_convert(
    source: Annotated[Path, typer.Argument(help="Input topology file.")],
    target: Annotated[Path, typer.Argument(help="Output file; the format follows the extension.")],
) -> None:
    """Convert a topology file between formats."""
    import topologies

    graph = topologies.load(source)
    topologies.save(graph, target)
    typer.echo(f"wrote {target} ({graph.number_of_nodes()} nodes, {graph.number_of_edges()} edges)")


def _usage_error_type() -> type[Exception]:
    """The usage-error base class of the installed typer: its vendored click (typer >= 0.22 no longer depends
    on click) or click itself (older typer)."""
    try:
        from typer._click.exceptions import ClickException
    except ImportError:
        from click import ClickException
    return ClickException


def main(argv: list[str] | None = None) -> int:
    """Console entry point: runs the typer app and turns user errors into one-line messages."""
    usage_error = _usage_error_type()
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="fedsim")
        return int(rv or 0)
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 1
    except usage_error as e:
        e.show()
        return e.exit_code
    except FedsimError as e:
        typer.echo(f"error: {e}", err=True)
        return 2
    except DivergenceError as e:
        typer.echo(f"error: {e}", err=True)
        return 3
    except KeyboardInterrupt:
        typer.echo("interrupted; resume with: fedsim simulate --resume OUT", err=True)
        return 130


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
