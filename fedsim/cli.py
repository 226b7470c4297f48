"""The ``fedsim`` command line: simulate, plot, list, bench, privacy, ppi.

Bad input (unknown names, out-of-range values, missing files) ends with a one-line ``error:`` message and
exit code 2; a diverging run ends with exit code 3 after keeping everything it wrote.
"""

from __future__ import annotations

import inspect
import signal
import sys
import time
import typing
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from fedsim.benchmarks.cli import bench_app
from fedsim.config import (
    COMPONENT_KEYS,
    RunConfig,
    check_run_level,
    config_file_values,
    load_config,
    make_config,
    merge,
    parse_pairs,
    precheck_components,
    run_parts,
)
from fedsim.core import components
from fedsim.core.errors import DivergenceError, FedsimError, FedsimWarning, OutOfMemory, RunInterrupted
from fedsim.docs import readme_block
from fedsim.threads import choose_wait_policy

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="fedsim: vectorized federated learning simulator (all clients trained at once on a client axis).",
)  # fmt: skip
app.add_typer(bench_app, name="bench")
topology_app = typer.Typer(no_args_is_help=True, help="Build, inspect and convert graph topologies.")
app.add_typer(topology_app, name="topology")

Opt = typer.Option


def _default_out(cfg: RunConfig, tag: str | None = None) -> Path:
    """``runs/STRATEGY[+REGULATOR...]-DATASET-MODEL[-OPTIMIZER]-sSEED`` (a suffix -1, -2, ... when taken)."""
    parts = [p.replace(":", "_").replace("/", "_") for p in run_parts(cfg.to_dict())]
    base = Path("runs") / f"{'-'.join(parts)}-{tag or f's{cfg.seed}'}"
    path, i = base, 1
    while path.exists():
        path, i = Path(f"{base}-{i}"), i + 1
    return path


OPTION_FLAGS: dict[str, tuple[str, type, str]] = {
    "data_path": ("dataset.path", str, "File for --dataset npz (arrays x, y, optional client)."),
    "alpha": ("partition.alpha", float, "Dirichlet concentration (label skew)."),
    "mu": ("strategy.mu", float, "FedProx/FedNova proximal coefficient."),
    "dual_lr": ("strategy.dual_lr", float, "Dual (ascent) step size of dsgda (default: --lr)."),
    "momentum": ("optimizer.momentum", float, "SGD (or SGD-SaI) momentum."),
    "laziness": ("sampler.laziness", float, "Markov samplers: probability the chain stays put."),
    "num_actors": ("executor.num_actors", int, "Ray actors (default: as many as CPUs/GPUs allow)."),
    "cpus_per_actor": ("executor.cpus_per_actor", float, "CPUs reserved per Ray actor (fractional allowed)."),
    "gpus_per_actor": ("executor.gpus_per_actor", float, "GPUs per Ray actor (fractional allowed)."),
    "ray_address": ("executor.address", str, "Ray cluster to join: auto or host:port."),
}
"""Shortcut flags for common component options: ``--momentum 0.9`` is ``--set optimizer.momentum=0.9``."""


def _simulate_parameters() -> list[inspect.Parameter]:
    """The ``simulate`` command's flags, derived from the run config: one flag per run-level key (help from
    its field), one per component (``--strategy NAME_OR_REF``), the shortcut flags, then the CLI's own."""

    def flag(name: str, annotation: Any, default: Any = None, *decls: str, **option: Any) -> inspect.Parameter:
        return inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            default=default,
            annotation=Annotated[annotation, Opt(*decls, **option)],
        )

    params = [
        inspect.Parameter(
            "config", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
            annotation=Annotated[Path | None, typer.Argument(help="YAML or TOML config file; flags override it.")],
        )
    ]  # fmt: skip
    for name, field in RunConfig.model_fields.items():
        if name in COMPONENT_KEYS:
            kind = components.kind_of(COMPONENT_KEYS[name])
            help_ = f"The {kind.help}: a name from `fedsim list {kind.name}`, or package.module:Name."
            params.append(flag(name, str | None, help=help_))
        elif name == "logger":
            params.append(flag(name, str | None, help=f"{field.description} `fedsim list logger`."))
        else:
            params.append(flag(name, _cli_type(field.annotation), help=field.description))
    for name, (target, kind, help_) in OPTION_FLAGS.items():
        params.append(flag(name, kind | None, help=f"{help_} (--set {target}=VALUE)"))
    params += [
        flag("set_", list[str] | None, None, "--set",
             help="Any config key or component option: --set strategy.server_lr=0.01 (repeatable)."),
        flag("out", Path | None, help="Results folder (default: runs/STRATEGY-DATASET-MODEL-sSEED)."),
        flag("overwrite", bool, False, help="Replace an existing results folder."),
        flag("resume", Path | None, help="Continue the run in this results folder from its checkpoint."),
        flag("seeds", str | None,
             help="Repeat over seeds (0-9, 0,3,7, 1-3,8): OUT/seed-S/ each, quantiles in seeds_summary.json"),
        flag("jobs", int | None, None, min=1,
             help="With --seeds: run this many seeds at once, each on its share of the CPUs (1)."),
        flag("probe", str | None, help="stability: twin run on data differing in one sample of one node."),
        flag("probe_node", int | None, help="Stability probe: node/client whose sample is replaced (0)."),
        flag("probe_sample", int | None, help="Stability probe: position of that sample in its list (0)."),
        flag("quiet", bool, False, help="No progress bar."),
        flag("no_plots", bool, False, "--no-plots", help="Skip the PNGs (draw them later with fedsim plot OUT)."),
    ]  # fmt: skip
    return params


def _cli_type(annotation: Any) -> Any:
    """A run-level field's type as a CLI flag: Literal and bool choices stay strings/flags, all optional."""
    if typing.get_origin(annotation) is typing.Literal:
        return str | None
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if any(typing.get_origin(a) is typing.Literal for a in args):  # a number or a word (threads: N | adaptive)
        return str | None
    base = args[0] if args else annotation
    return base | None


_CLI_ONLY = ("config", "set_", "out", "overwrite", "resume", "seeds", "jobs", "probe", "probe_node", "probe_sample",
             "quiet", "no_plots")  # fmt: skip


def simulate(**flags: Any) -> None:
    """Run a federated or decentralized experiment and write its results folder."""
    try:
        _simulate(**flags)
    except RunInterrupted as e:  # a KeyboardInterrupt, which typer would turn into a bare exit code
        signum = _SIGNAL[0] if _SIGNAL else signal.SIGINT
        typer.echo(f"{signal.Signals(signum).name}: {e}", err=True)
        _SIGNAL.append(-1)  # reported
        raise typer.Exit(128 + signum) from None


def _simulate(**flags: Any) -> None:
    config, set_, out, overwrite, resume, seeds, jobs, probe, probe_node, probe_sample, quiet, no_plots = (
        flags.pop(k) for k in _CLI_ONLY
    )  # fmt: skip
    if jobs is not None and seeds is None:
        raise FedsimError("--jobs runs seeds side by side; it needs --seeds")
    progress = _Progress(quiet)
    if resume is not None and seeds is not None:
        raise FedsimError("--seeds cannot be combined with --resume; resume one seed's folder: --resume OUT/seed-S")
    if resume is not None:
        rounds, threads = flags.pop("rounds"), flags.pop("threads")
        given = [n for n, v in {**flags, "config": config, "set": set_, "out": out, "seeds": seeds, "probe": probe,
                                "probe_node": probe_node, "probe_sample": probe_sample}.items()
                 if v not in (None, False, [])]  # fmt: skip
        if given:
            raise FedsimError(
                f"--resume continues a run with its saved config (only --rounds and --threads may change); drop "
                f"{', '.join(given)}"
            )
        choose_wait_policy()
        from fedsim import simulation  # torch: after the flags are checked

        if (resume / "config.yaml").is_file():
            saved = load_config(resume / "config.yaml")
            progress.configure(saved if rounds is None else saved.replace(rounds=rounds), resume)
        with progress:
            summary = simulation.resume(resume, rounds=rounds, threads=threads, overwrite=overwrite,
                                        on_round=progress.update, plots=not no_plots)  # fmt: skip
        _print_summary(summary, resume)
        return
    overrides = {OPTION_FLAGS[k][0] if k in OPTION_FLAGS else k: v for k, v in flags.items() if v is not None}
    overrides.update(parse_pairs(set_))
    file_values = config_file_values(config)
    check_run_level(file_values, overrides)  # answers before torch loads
    values = merge(file_values, overrides)
    precheck_components(values)  # built-in components' names and options, still without torch
    choose_wait_policy()  # before torch loads: passive waits when the machine is busy (fedsim.threads)
    repeat = _repeat_options(seeds, flags.get("seed"), probe, probe_node, probe_sample)
    cfg = make_config(values)
    from fedsim import simulation  # torch: after the config is checked

    if repeat is not None:
        _simulate_repeats(cfg, *repeat, out=out, overwrite=overwrite, progress=progress, plots=not no_plots,
                          jobs=jobs or 1)  # fmt: skip
        return
    out = out or _default_out(cfg)
    progress.configure(cfg, out)
    with progress:
        summary = simulation.simulate(cfg, out, overwrite=overwrite, on_round=progress.update, plots=not no_plots)
    _print_summary(summary, out)


simulate.__signature__ = inspect.Signature(_simulate_parameters())  # type: ignore[attr-defined]
app.command()(simulate)


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
    out: Path | None, overwrite: bool, progress: _Progress, plots: bool = True, jobs: int = 1,
) -> None:  # fmt: skip
    """``--seeds`` (optionally with ``--probe``) or a single ``--probe`` run, with a short summary line."""
    from fedsim.probes import run_stability_probe
    from fedsim.seeds import run_seeds

    tag = "seeds" if seeds is not None else None
    out = out or _default_out(cfg, tag)
    progress.configure(cfg, out)
    progress.total = cfg.rounds * (len(seeds) if seeds else 1)
    done = iter(range(1, progress.total + 1))
    tick = lambda record: progress.update({**record, "round": next(done)})  # noqa: E731
    with progress:
        if seeds is None:
            summary = run_stability_probe(cfg, out, overwrite=overwrite, on_round=tick, plots=plots, **options)
        else:
            report = run_seeds(cfg, seeds, out, overwrite=overwrite, on_round=tick, probe=probe, probe_options=options,
                               plots=plots, jobs=jobs)  # fmt: skip
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
    """Progress over rounds: on a terminal a rich bar (a spinner while the run sets up: data, model, Ray, the
    first compiled round) with the round, test accuracy, loss, samples/s, elapsed time, ETA and the results
    folder; off a terminal (nohup, CI, a pipe, a scheduler's log) one plain line on stderr at round 1, then at
    most every :attr:`PLAIN_EVERY_S` seconds, and at the last round. Silent when quiet.

    ``samples_per_client`` (local steps x batch size) turns a round's ``clients`` and ``time_s`` into samples/s;
    None (local epochs, ragged) leaves the rate out."""

    PLAIN_EVERY_S = 5.0

    def __init__(self, quiet: bool):
        self.quiet, self.total, self._bar, self._task = quiet, None, None, None
        self.folder: Path | None = None
        self.samples_per_client: int | None = None
        self._plain = False
        self._start = self._last = self._round_s = 0.0

    def configure(self, cfg: Any, folder: Path | None) -> None:
        """Rounds, the samples a selected client trains on per round, and the results folder of ``cfg``."""
        self.total, self.folder = cfg.rounds, folder
        self.samples_per_client = None if cfg.local_epochs else cfg.local_steps * cfg.batch_size

    def __enter__(self):
        if self.quiet:
            return self
        self._start = time.monotonic()
        if not sys.stderr.isatty():
            self._plain = True
            return self
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        where = f"-> {self.folder}" if self.folder else ""
        self._bar = Progress(
            SpinnerColumn(), TextColumn("round"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.description}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn(where), transient=False,
        )  # fmt: skip
        self._bar.__enter__()
        self._task = self._bar.add_task("setting up (data, model, workers)", total=self.total)
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def describe(self, record: dict[str, Any]) -> str:
        acc, loss = record.get("test_accuracy"), record.get("train_loss")
        text = f"loss {loss:.4f}" if loss is not None else "no clients"
        text += f"  acc {acc:.4f}" if acc is not None else ""
        seconds, clients = record.get("time_s"), record.get("clients")
        if self.samples_per_client and seconds and isinstance(clients, int):
            text += f"  {clients * self.samples_per_client / seconds:,.0f} samples/s"
        return text

    def update(self, record: dict[str, Any]) -> None:
        text = self.describe(record)
        if self._bar is not None:
            self._bar.update(self._task, completed=record["round"], description=text)
        elif self._plain:
            self._round_s += record.get("time_s") or 0.0
            self._plain_line(record["round"], text)

    def _plain_line(self, done: int, text: str) -> None:
        now = time.monotonic()
        last = self.total is not None and done >= self.total
        if done > 1 and not last and now - self._last < self.PLAIN_EVERY_S:
            return
        self._last, elapsed = now, now - self._start
        eta = f"  eta {self._round_s / done * (self.total - done):.1f} s" if self.total and not last else ""
        total = f"/{self.total}" if self.total else ""
        where = f"  -> {self.folder}" if self.folder and done == 1 else ""
        typer.echo(f"round {done}{total}  {text}  elapsed {elapsed:.1f} s{eta}{where}", err=True)


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
    metric: Annotated[str | None, Opt(help="Comma-separated metrics [default: test_accuracy].")] = None,
    out: Annotated[Path | None, Opt(help="Output PNG (a folder: plot.png in it) [default: plot.png].")] = None,
    standard: Annotated[bool, Opt(help="Draw each folder's own plots into it (a run made with --no-plots).")] = False,
    x: Annotated[
        str, Opt("--x", help="x axis: round, virtual_time_s (the virtual clock), uplink_mb or total_mb (log).")
    ] = "round",
) -> None:
    """Overlay runs' metrics in one PNG, or (--standard) draw each results folder's own plots into it."""
    from fedsim.plots import plot_runs

    if standard:
        if metric is not None or out is not None or x != "round":
            raise FedsimError("--standard draws each folder's own plots into it; drop --metric/--out/--x")
        for run_dir in run_dirs:
            _standard_plots(run_dir)
            typer.echo(f"wrote the plots of {run_dir}")
        return
    metric, out = metric or "test_accuracy", out or Path("plot.png")
    if out.is_dir():
        out = out / "plot.png"
    metrics = [m.strip() for m in metric.split(",") if m.strip()]
    path = plot_runs(run_dirs, metrics, out, x=x)
    typer.echo(f"wrote {path}")


def _standard_plots(run_dir: Path) -> None:
    """The PNGs ``fedsim simulate`` draws into a results folder: a run's (with a stability probe's), or a
    ``--seeds`` folder's (every seed's, then the bands)."""
    from fedsim.plots import plot_run, plot_seed_bands
    from fedsim.probes import plot_stability
    from fedsim.results import METRICS_FILE, SEEDS_FILE, STABILITY_FILE
    from fedsim.seeds import BAND_METRICS, SEEDS_PLOT

    if (run_dir / SEEDS_FILE).is_file():
        seeds = yaml.safe_load((run_dir / SEEDS_FILE).read_text()).get("seeds") or []
        runs = [run_dir / f"seed-{s}" for s in seeds if (run_dir / f"seed-{s}" / METRICS_FILE).is_file()]
        for run in runs:
            _standard_plots(run)
        if runs:
            plot_seed_bands(runs, BAND_METRICS, run_dir / SEEDS_PLOT)
        return
    if not (run_dir / METRICS_FILE).is_file():
        raise FedsimError(f"{run_dir} is not a results folder (no {METRICS_FILE} or {SEEDS_FILE})")
    plot_run(run_dir)
    if (run_dir / STABILITY_FILE).is_file():
        plot_stability(run_dir)


@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="Results folders (runs, or --seeds folders) to compare.")],
    out: Annotated[Path, Opt("-o", "--out", help="The HTML file to write.")] = Path("report.html"),
) -> None:
    """One self-contained HTML file (works offline) comparing results folders: config, summary, interactive
    curves, client accuracy, label histograms, topology and warnings."""
    from fedsim.report import build_report

    path = build_report(run_dirs, out)
    typer.echo(f"wrote {path}")


@app.command()
def sweep(
    config: Annotated[Path | None, typer.Argument(help="YAML or TOML config file of the base run.")] = None,
    grid: Annotated[
        list[str] | None,
        Opt(help="KEY=V1,V2 (repeatable): the grid's values of a config key; with --optimize also KEY=LOW:HIGH[:log]."),
    ] = None,
    seeds: Annotated[str, Opt(help="Seeds of every point (0-4, 0,3,7).")] = "0",
    jobs: Annotated[int, Opt(help="Runs at once, each on its share of the CPUs.")] = 1,
    out: Annotated[Path | None, Opt(help="The sweep folder (runs/, summary.csv, report.html).")] = None,
    set_: Annotated[list[str] | None, Opt("--set", help="Base config KEY=VALUE (repeatable).")] = None,
    metric: Annotated[
        str | None,
        Opt(
            help="Comma list of summary or metrics keys to tabulate [default: "
            "final_test_accuracy,best_test_accuracy,final_train_loss]."
        ),
    ] = None,
    executor: Annotated[str, Opt(help="local (worker processes) or ray (Ray tasks).")] = "local",
    optimize: Annotated[str | None, Opt(help="Search with Optuna for the best median of this metric.")] = None,
    trials: Annotated[int | None, Opt(help="With --optimize: trials in all (the study resumes).")] = None,
    direction: Annotated[str | None, Opt(help="With --optimize: maximize or minimize (default: by the name).")] = None,
    quiet: Annotated[bool, Opt(help="No progress.")] = False,
    no_plots: Annotated[bool, Opt("--no-plots", help="Skip comparison.png and report.html.")] = False,
) -> None:
    """Run a grid (or an Optuna search) of experiments over seeds, resumably, with a summary table and report."""
    from fedsim.seeds import parse_seeds
    from fedsim.sweep import DEFAULT_METRICS, check_executor, parse_grid

    check_executor(executor, jobs)
    if out is None:
        raise FedsimError("give the sweep folder: --out DIR")
    if optimize is None and (trials is not None or direction is not None):
        raise FedsimError("--trials and --direction belong to a search; add --optimize METRIC")
    if optimize is not None and trials is None:
        raise FedsimError("--optimize needs --trials N")
    space = parse_grid(grid or [], ranges=optimize is not None)
    if optimize is not None and not space:
        raise FedsimError("--optimize searches the --grid keys; give at least one --grid KEY=...")
    seed_list = parse_seeds(seeds)
    metrics = [m.strip() for m in (metric or ",".join(DEFAULT_METRICS)).split(",") if m.strip()]
    base = merge(config_file_values(config), parse_pairs(set_))
    check_run_level(base)
    if "seed" in base or "seed" in space:
        raise FedsimError("the sweep sets the seed from --seeds; drop seed from the config, --set and --grid")
    choose_wait_policy()
    from fedsim import sweep as sweeps

    progress = _Progress(quiet)
    per_run = make_config(base).rounds if "rounds" not in space else 0
    if optimize is None and per_run:  # the rounds of all runs; a run skipped as complete counts as done
        progress.total = len(sweeps.grid_points(space)) * len(seed_list) * per_run
    count = [0]

    def tick(record: dict[str, Any]) -> None:
        count[0] += 1
        progress.update({**record, "round": count[0]})

    def skip(run: Path) -> None:
        count[0] += per_run
        if not quiet:
            typer.echo(f"complete, skipped: {run}", err=True)

    with progress:
        if optimize is None:
            table = sweeps.run_grid(base, space, seed_list, out, jobs=jobs, executor=executor, metrics=metrics,
                                    plots=not no_plots, on_round=tick, on_skip=skip)  # fmt: skip
        else:
            table, best, value = sweeps.optimize(
                base, space, seed_list, out, metric=optimize, trials=trials, direction=direction, jobs=jobs,
                executor=executor, metrics=metrics, plots=not no_plots, on_round=tick, on_skip=skip,
            )  # fmt: skip
    typer.echo(table)
    if optimize is not None:
        typer.echo(f"best {optimize}: {value} at {best}" if best else f"no trial gave a value of {optimize}")
    typer.echo(f"-> {out / 'summary.csv'}")


@app.command("privacy")
def privacy_cmd(
    q: Annotated[float, Opt("--q", help="Client sampling rate per round (fraction).")],
    rounds: Annotated[int, Opt(help="Rounds composed.")],
    noise_multiplier: Annotated[float | None, Opt(help="Noise multiplier z: print epsilon.")] = None,
    target_epsilon: Annotated[float | None, Opt(help="Instead: print the z that reaches this epsilon.")] = None,
    delta: Annotated[float, Opt(help="Delta of (epsilon, delta).")] = 1e-5,
    accountant: Annotated[str, Opt(help="rdp (dp-accounting's default orders) or pld.")] = "rdp",
) -> None:
    """Epsilon of DP-FedAvg's Poisson-sampled Gaussian rounds (dp-accounting), or the noise for a target."""
    from fedsim.privacy import epsilon, noise_for

    if not 0 < q <= 1:
        raise FedsimError(f"--q must be in (0, 1], got {q}")
    if rounds < 1:
        raise FedsimError(f"--rounds must be >= 1, got {rounds}")
    if not 0 < delta < 1:
        raise FedsimError(f"--delta must be in (0, 1), got {delta}")
    if accountant not in ("rdp", "pld"):
        raise FedsimError(f"--accountant must be rdp or pld, got {accountant!r}")
    if (noise_multiplier is None) == (target_epsilon is None):
        raise FedsimError("give exactly one of --noise-multiplier (prints epsilon) or --target-epsilon (prints z)")
    if noise_multiplier is not None:
        if noise_multiplier < 0:
            raise FedsimError(f"--noise-multiplier must be >= 0, got {noise_multiplier}")
        typer.echo(f"epsilon {epsilon(q, noise_multiplier, rounds, delta, accountant):.6g} at delta {delta:g} "
                   f"(q {q:g}, z {noise_multiplier:g}, {rounds} rounds, {accountant})")  # fmt: skip
        return
    if target_epsilon <= 0:
        raise FedsimError(f"--target-epsilon must be > 0, got {target_epsilon}")
    z = noise_for(target_epsilon, q, rounds, delta, accountant)
    typer.echo(f"noise multiplier {z:.6g} reaches epsilon {target_epsilon:g} at delta {delta:g} "
               f"(q {q:g}, {rounds} rounds, {accountant})")  # fmt: skip


@app.command("ppi")
def ppi_cmd(
    run: Annotated[Path, Opt("--run", help="Results folder of fedsim simulate (config.yaml, checkpoint.pt).")],
    estimand: Annotated[str, Opt(help="mean (class prevalences), quantile (of the label), ols or logistic.")] = "mean",
    labelled_fraction: Annotated[float, Opt(help="Fraction of each client's labels kept; the rest are hidden.")] = 0.05,
    alpha: Annotated[float, Opt(help="Error level: 1 - alpha intervals.")] = 0.1,
    target_class: Annotated[
        int | None, Opt("--class", help="Class K: estimate for 1{y = K} (needed by ols, logistic).")
    ] = None,
    prediction: Annotated[str, Opt(help="Yhat: score (predicted probabilities) or label (predicted class).")] = "score",
    q: Annotated[float | None, Opt("--q", help="Quantile level for --estimand quantile [default: 0.5].")] = None,
    features: Annotated[
        str | None, Opt(help="Comma-separated input indices used as covariates (ols, logistic).")
    ] = None,
    lam_mode: Annotated[
        str | None, Opt(help="Fed-PPI power tuning: client (default) or global (one more round).")
    ] = None,
    imputed_variance: Annotated[str, Opt(help="Fed-PPI imputed variance: averaged or pooled.")] = "averaged",
    seed: Annotated[int | None, Opt(help="Seed of the labelled draw [default: the run's seed].")] = None,
    out: Annotated[Path | None, Opt(help="Folder for ppi.json and ppi.png [default: the run folder].")] = None,
    overwrite: Annotated[bool, Opt(help="Replace an existing ppi.json / ppi.png.")] = False,
) -> None:
    """Fed-PPI on a trained run: intervals from a few labels per client plus the model's predictions."""
    from fedsim.ppi.run import federated_ppi, write_report

    try:
        indices = [int(f) for f in features.split(",") if f.strip()] if features else None
    except ValueError:
        raise FedsimError(f"--features must be comma-separated integers, got {features!r}") from None
    target = out or run
    if target.exists() and not target.is_dir():
        raise FedsimError(f"--out {target} is a file, not a folder")
    for name in ("ppi.json", "ppi.png"):  # before any work: nothing already written is replaced
        if (target / name).exists() and not overwrite:
            raise FedsimError(f"{target / name} exists; pass --overwrite to replace it, or --out DIR")
    result = federated_ppi(run, estimand, labelled_fraction, alpha, seed=seed, target_class=target_class,
                           prediction=prediction, q=q, features=indices, lam_mode=lam_mode,
                           imputed_variance=imputed_variance)  # fmt: skip
    json_path, png_path = write_report(result, target, overwrite=overwrite)
    typer.echo(f"{result['estimand']}: {result['labelled']} labelled, {result['unlabelled']} unlabelled, "
               f"{result['clients']} clients, {1 - alpha:.0%} intervals")  # fmt: skip
    for j, name in enumerate(result["coordinates"]):
        cells = []
        for method, row in result["methods"].items():
            cells.append(f"{method} [{row['lower'][j]:.4g}, {row['upper'][j]:.4g}] width {row['width'][j]:.3g}")
        typer.echo(f"  {name} (truth {result['truth'][j]:.4g}): " + "; ".join(cells))
    ratio = {k: "n/a" if v is None else f"{v:.3f}" for k, v in result["width_ratio"].items()}
    typer.echo(f"median width: fed_ppi / classical {ratio['classical']}, fed_ppi / centralized {ratio['centralized']}")
    typer.echo(f"wrote {json_path} and {png_path}")


@app.command("list")
def list_components(
    kind: Annotated[str | None, typer.Argument(help="A component kind (strategy, optimizer, ...).")] = None,
    name: Annotated[str | None, typer.Argument(help="A component: its options with type, default and help.")] = None,
    markdown: Annotated[bool, Opt(help="Print the README's generated component tables.")] = False,
) -> None:
    """The component kinds and their names; one kind with a line per component; one component's options."""
    if markdown:
        typer.echo(readme_block())
        return
    if kind is None:
        from topologies import GENERATORS, MIXING_METHODS

        for k in components.KINDS.values():
            shown = [f"{c.name} (not installed)" if _missing(c) else c.name for c in components.components(k.name)]
            if k.none:
                shown = [k.none, *shown]
            typer.echo(f"{k.name + ':':15} {', '.join(shown)}")
        typer.echo(f"{'topologies:':15} {', '.join(GENERATORS)}")
        typer.echo(f"{'mixing:':15} {', '.join(MIXING_METHODS)}")
        typer.echo(f"{'flower:':15} {_flower_names()}")
        typer.echo("fedsim list KIND for one line each; fedsim list KIND NAME for a component's options")
        return
    k = components.kind_of(kind)
    if name is None:
        typer.echo(f"{k.name} ({k.help}); config key {' or '.join(repr(key) for key in _config_keys(k))}")
        if k.none:
            typer.echo(f"  {k.none:18} no {k.name}")
        for component in components.components(k.name):
            origin = "" if component.origin == "built-in" else f" [{component.origin}]"
            missing = _missing(component)
            note = f" [not installed here: {missing}]" if missing else ""
            typer.echo(f"  {component.name:18} {component.summary}{origin}{note}")
        if k.name == "strategy":
            typer.echo(f"  {'flwr:NAME':18} Flower's strategies on our engine: {_flower_names()}")
        if k.name == "partitioner":
            typer.echo(f"  {'flwr:NAME':18} Flower Datasets' partitioners: {_flower_partitioner_names()}")
        return
    component = components.get(k.name, name)
    typer.echo(f"{k.name} {component.name}: {component.summary}")
    rows = components.describe(component)
    if not rows:
        typer.echo("  (no options)")
    for row in rows:
        default = "required" if row["required"] else f"default {row['default']!r}"
        bounds = f", {row['bounds']}" if row["bounds"] else ""
        typer.echo(f"  {row['name']:20} {row['type']} ({default}{bounds})")
        if row["help"]:
            typer.echo(f"  {'':20} {row['help']}")
    if component.open:
        typer.echo("  (also accepts any other keyword option)")
    for key in _config_keys(k):
        if key == "logger":  # a list: the options go with each logger's name
            spec = f"{{name: {component.name}, OPTION: VALUE}}"
            typer.echo(f"set with: --set 'logger=[{spec}]', or in a config file logger: [{spec}, ...]")
        else:
            typer.echo(f"set with: --set {key}.OPTION=VALUE, or {key}: {{name: {component.name}, OPTION: VALUE}}")


def _config_keys(kind) -> list[str]:
    """The config keys that name a component of ``kind`` (``uplink`` and ``downlink`` for a compressor)."""
    return [key for key, name in COMPONENT_KEYS.items() if name == kind.name] or [kind.key]


def _missing(component) -> str | None:
    """How to install a component's missing offline source (a dataset's optional ``missing()``), or None."""
    check = getattr(component.obj, "missing", None)
    return check() if check is not None else None


def _flower_names() -> str:
    try:
        from fedsim.flower import flower_strategies
    except FedsimError:
        return "(not installed: pip install 'fedsim[flower]')"
    return ", ".join("flwr:" + n for n in sorted(flower_strategies()))


def _flower_partitioner_names() -> str:
    from fedsim.data.flower_partitioners import flower_partitioners

    try:
        return ", ".join("flwr:" + n for n in sorted(flower_partitioners()))
    except FedsimError:
        return "(not installed: pip install 'fedsim[hf]')"


@topology_app.command("build")
def topology_build(
    name: Annotated[str, typer.Argument(help="Graph family, e.g. ring, torus, exponential, erdos_renyi.")],
    n: Annotated[int, Opt("--n", min=1, help="Number of nodes.")],
    output: Annotated[Path, Opt("--output", "-o", help="Output file; the format follows the extension.")],
    param: Annotated[list[str] | None, Opt("--param", help="Generator option KEY=VALUE (repeatable).")] = None,
) -> None:
    """Generate a graph and save it (GraphML, GML, edge list, adjacency list, .adj, JSON)."""
    import topologies

    graph = topologies.build(name, n, **parse_pairs(param, "--param"))
    topologies.save(graph, output)
    typer.echo(f"wrote {output} ({graph.number_of_nodes()} nodes, {graph.number_of_edges()} edges)")


@topology_app.command("show")
def topology_show(
    path: Annotated[Path, typer.Argument(help="Topology file.")],
    method: Annotated[str, Opt(help="Mixing-matrix method for the spectral gap.")] = "metropolis_hastings",
    png: Annotated[Path | None, Opt("--png", "-o", help="Drawing (default: FILE's name with .png, here).")] = None,
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
    out = plot_topology(graph, png or Path(path.with_suffix(".png").name), title=path.name)
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


_SIGNAL: list[int] = []


def _stop_on_signal(signum: int, frame) -> None:
    """SIGTERM (schedulers send it) stops a run like Ctrl-C: the round loop keeps what it wrote."""
    _SIGNAL.append(signum)
    raise KeyboardInterrupt


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """fedsim's warnings as one ``warning:`` line on stderr (others as Python shows them)."""
    if issubclass(category, FedsimWarning):
        typer.echo(f"warning: {message}", err=True)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    """Console entry point: runs the typer app and turns user errors into one-line messages."""
    usage_error = _usage_error_type()
    warnings.showwarning = _show_warning
    _SIGNAL.clear()
    previous = signal.signal(signal.SIGTERM, _stop_on_signal)
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="fedsim")
        return int(rv or 0)
    except typer.Exit as e:
        if e.exit_code == 130 and -1 not in _SIGNAL:  # typer's form of Ctrl-C outside the round loop
            typer.echo("interrupted before the first round; nothing to resume", err=True)
        return e.exit_code
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 1
    except usage_error as e:
        if "Did you mean" in getattr(e, "message", "") and getattr(e, "possibilities", None):
            e.possibilities = []  # typer's message has the suggestion already; click would append it again
        e.show()
        return e.exit_code
    except FedsimError as e:
        typer.echo(f"error: {e}", err=True)
        return 2
    except (DivergenceError, OutOfMemory) as e:
        typer.echo(f"error: {e}", err=True)
        return 3
    except KeyboardInterrupt:
        typer.echo("interrupted before the first round; nothing to resume", err=True)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
