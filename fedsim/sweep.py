"""Sweeps: ``fedsim sweep CONFIG --grid strategy=fedavg,scaffold --grid lr=0.01,0.1 --seeds 0-4 --out DIR``.

A grid sweep runs the Cartesian product of the ``--grid`` values and the seeds; a search (``--optimize METRIC
--trials N``) lets Optuna's TPE sampler (seeded by the number of trials the study has) choose the points instead,
from the same ``--grid`` values (categorical) or ranges ``KEY=LOW:HIGH`` / ``KEY=LOW:HIGH:log``, each point run
over the seeds and scored by the median of METRIC. Every run is an ordinary results folder ``DIR/runs/<hash>/``,
named by a content hash of its resolved config (threads and loggers left out: they change no result). A run whose
folder holds the same config and a ``summary.json`` of a finished run is skipped, so a killed sweep resumes where
it stopped; a search's Optuna study lives in ``DIR/optuna.db`` (SQLite) and resumes too, counting the trials it
has.

Runs go side by side in ``--jobs N`` worker processes that divide the CPUs (:mod:`fedsim.parallel`), or as Ray
tasks (``--executor ray``, one CPU share each). Written at the end:

- ``DIR/runs.csv``: one row per run (grid point, seed, folder, the chosen metrics);
- ``DIR/summary.csv``: one row per grid point: ``n`` and, per metric, ``median``, ``std`` (sample, ddof 1; 0 for
  one seed), ``min`` and ``max`` over the seeds (also printed as a markdown table);
- ``DIR/comparison.png``: the medians with min-max bars of the first metric per point;
- ``DIR/report.html``: :mod:`fedsim.report` of the points (seed bands where there are several seeds).

A metric is a ``summary.json`` key (``final_test_accuracy``), or a ``metrics.jsonl`` key whose last value is
taken (``test_accuracy``, ``consensus_distance``).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from fedsim.config import COMPONENT_KEYS, RunConfig, make_config, merge
from fedsim.core.errors import DivergenceError, FedsimError, did_you_mean
from fedsim.parallel import check_jobs, run_parallel
from fedsim.plots import _new_figure, _save, is_number, read_summary
from fedsim.report import build_report_groups
from fedsim.results import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, read_metrics
from fedsim.seeds import csv_text
from fedsim.seeds import statistics as seed_statistics
from fedsim.simulation import simulate

DEFAULT_METRICS = ("final_test_accuracy", "best_test_accuracy", "final_train_loss")
NOT_HASHED = ("threads", "logger", "mlflow_uri")
"""Config keys that change no result, left out of a run's content hash."""
SWEEP_FILE = "sweep.yaml"


# --------------------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------------------


def check_key(key: str) -> str:
    """``key`` as a config key: a run-level key (``lr``), a component (``strategy``) or a component's option
    (``strategy.mu``); a one-line error otherwise."""
    top, _, option = key.partition(".")
    known = set(RunConfig.model_fields)
    if top not in known or (option and top not in COMPONENT_KEYS):
        raise FedsimError(f"grid key {key!r} is not a config key{did_you_mean(top, known)} (see fedsim list)")
    return key


def _value(text: str, key: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise FedsimError(f"--grid {key}: cannot read the value {text!r} as YAML") from None


def parse_grid(items: Sequence[str], ranges: bool = False) -> dict[str, Any]:
    """``["lr=0.01,0.1", "strategy=fedavg,scaffold"]`` -> ``{"lr": [0.01, 0.1], ...}``; with ``ranges``
    (a search) also ``KEY=LOW:HIGH`` or ``KEY=LOW:HIGH:log`` -> ``("range", low, high, log)``."""
    grid: dict[str, Any] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key or not values.strip():
            raise FedsimError(f"--grid expects KEY=V1,V2,..., got {item!r}")
        check_key(key)
        if key in grid:
            raise FedsimError(f"--grid {key} is given twice")
        parts = values.split(":")
        if len(parts) in (2, 3) and all(is_number(_value(p, key)) for p in parts[:2]):
            if not ranges:
                raise FedsimError(f"--grid {key}={values}: a range needs --optimize (a grid lists values: V1,V2)")
            low, high = (_value(p, key) for p in parts[:2])
            log = len(parts) == 3 and parts[2].strip() == "log"
            if len(parts) == 3 and not log or not low < high or (log and low <= 0):
                raise FedsimError(f"--grid {key}={values}: expected LOW:HIGH or LOW:HIGH:log with LOW < HIGH")
            grid[key] = ("range", low, high, log)
        else:
            grid[key] = [_value(v.strip(), key) for v in values.split(",")]
    return grid


def grid_points(grid: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
    """The Cartesian product of the grid's values, the first key varying slowest."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]


def point_config(base: Mapping[str, Any], point: Mapping[str, Any], seed: int) -> RunConfig:
    """The run's config: ``base`` with the point's values and the seed (validated, one-line errors)."""
    return make_config(merge(dict(base), {**point, "seed": seed}))


def run_key(config: RunConfig) -> str:
    """The content hash of a run: SHA-256 of its resolved config (without :data:`NOT_HASHED`), 12 hex digits."""
    values = {k: v for k, v in config.to_dict().items() if k not in NOT_HASHED}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:12]


def is_complete(run_dir: Path, config: RunConfig) -> bool:
    """Whether ``run_dir`` holds a finished run of ``config`` (same content hash, a summary not interrupted)."""
    summary_file, config_file = run_dir / SUMMARY_FILE, run_dir / CONFIG_FILE
    if not (summary_file.is_file() and config_file.is_file()):
        return False
    try:
        summary = json.loads(summary_file.read_text())
        written = make_config(yaml.safe_load(config_file.read_text()))
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return not summary.get("interrupted") and run_key(written) == run_key(config)


# --------------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------------


def _simulate_run(config: RunConfig, out: Path, plots: bool = False, on_round=None) -> None:
    """One run of the sweep (module level: picklable for worker processes and Ray); a run that diverges
    still counts as done (its summary says so)."""
    with contextlib.suppress(DivergenceError):
        simulate(config, out, overwrite=True, plots=plots, on_round=on_round)


def check_executor(executor: str, jobs: int) -> None:
    """``local`` (``jobs`` worker processes) or ``ray`` (Ray schedules the runs, so ``jobs`` must stay 1)."""
    check_jobs(jobs)
    if executor not in ("local", "ray"):
        raise FedsimError(f"unknown sweep executor {executor!r}; choose from: local, ray")
    if executor == "ray" and jobs != 1:
        raise FedsimError("--jobs sets the local worker processes; with --executor ray, Ray schedules the runs")


def run_configs(
    configs: Sequence[RunConfig], folder: Path, jobs: int = 1, executor: str = "local", plots: bool = False,
    on_round: Callable[[dict], None] | None = None, on_skip: Callable[[Path], None] | None = None,
) -> list[Path]:  # fmt: skip
    """Run every config not already complete under ``folder/runs/<hash>/``; returns the run folders in order."""
    runs = folder / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    dirs = [runs / run_key(c) for c in configs]
    todo = []
    for config, run_dir in zip(configs, dirs, strict=True):
        if is_complete(run_dir, config):
            if on_skip is not None:
                on_skip(run_dir)
        elif all(run_dir != d for _, d in todo):
            todo.append((config, run_dir))
    if executor == "ray":
        _run_on_ray(todo, plots)
    else:
        tasks = [(_simulate_run, (config, run_dir), {"plots": plots}) for config, run_dir in todo]
        run_parallel(tasks, jobs, on_round, labels=[str(d) for _, d in todo])
    return dirs


def _run_on_ray(todo: list[tuple[RunConfig, Path]], plots: bool) -> None:
    """The runs as Ray tasks (one CPU each; a run's torch threads follow the CPUs Ray gives it)."""
    try:
        import ray
    except ImportError:
        raise FedsimError('--executor ray needs Ray (pip install "fedsim[ray]")') from None
    if not todo:
        return
    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        task = ray.remote(num_cpus=1)(_simulate_run)
        ray.get([task.remote(config.replace(threads=config.threads or 1), run_dir, plots) for config, run_dir in todo])
    finally:
        if started:
            ray.shutdown()


# --------------------------------------------------------------------------------------------------------
# Tables, plot and report
# --------------------------------------------------------------------------------------------------------


def metric_value(run_dir: Path, metric: str) -> float | None:
    """``metric`` of a finished run: its ``summary.json`` value, else the last value in ``metrics.jsonl``."""
    value = read_summary(run_dir).get(metric)
    if is_number(value):
        return float(value)
    if (run_dir / METRICS_FILE).is_file():
        for record in reversed(read_metrics(run_dir)):
            if is_number(record.get(metric)):
                return float(record[metric])
    return None


def statistics(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """``n``, ``median``, ``std`` (ddof 1; 0 for one value), ``min``, ``max`` of the finite values (those of
    :func:`fedsim.seeds.statistics`; None without any)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"n": 0, "median": None, "std": None, "min": None, "max": None}
    over_seeds = seed_statistics(finite)
    return {k: over_seeds[k] for k in ("n", "median", "std", "min", "max")}


def point_name(point: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in point.items()) or "base"


def write_tables(
    folder: Path, points: list[dict[str, Any]], seeds: list[int], dirs: list[Path], metrics: Sequence[str]
) -> list[dict[str, Any]]:
    """``runs.csv`` and ``summary.csv``; returns the summary rows."""
    run_rows, summary_rows = [], []
    for p, point in enumerate(points):
        per_seed = dirs[p * len(seeds) : (p + 1) * len(seeds)]
        values = {m: [metric_value(d, m) for d in per_seed] for m in metrics}
        for s, (seed, run_dir) in enumerate(zip(seeds, per_seed, strict=True)):
            run_rows.append({**point, "seed": seed, "run": str(run_dir.relative_to(folder)),
                             **{m: values[m][s] for m in metrics}})  # fmt: skip
        row: dict[str, Any] = {**point}
        for m in metrics:
            stats = statistics(values[m])
            row["n"] = max(row.get("n", 0), stats["n"])
            row.update({f"{m}_{k}": v for k, v in stats.items() if k != "n"})
        summary_rows.append(row)
    (folder / "runs.csv").write_text(csv_text(run_rows))
    (folder / "summary.csv").write_text(csv_text(summary_rows))
    return summary_rows


def markdown_table(rows: list[dict[str, Any]], keys: Sequence[str], metrics: Sequence[str]) -> str:
    """The summary as a markdown table: the point's values, n, and ``median ± std`` per metric."""
    head = [*keys, "n", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [str(row.get(k)) for k in keys] + [str(row.get("n"))]
        for m in metrics:
            median, std = row.get(f"{m}_median"), row.get(f"{m}_std")
            cells.append("n/a" if median is None else f"{median:.4g} ± {std:.2g}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_comparison(rows: list[dict[str, Any]], keys: Sequence[str], metric: str, out: Path) -> Path:
    """Median and min-max of ``metric`` per point, one horizontal bar each."""
    fig, (ax,) = _new_figure(1, width=8.0, row_height=max(2.0, 0.4 * len(rows) + 1))
    labels = [point_name({k: row.get(k) for k in keys}) for row in rows]
    for i, row in enumerate(rows):
        median, low, high = row.get(f"{metric}_median"), row.get(f"{metric}_min"), row.get(f"{metric}_max")
        if median is None:
            continue
        ax.errorbar([median], [i], xerr=[[median - low], [high - median]], fmt="o", color="C0", capsize=3)
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()
    ax.set_xlabel(f"{metric} (median, min-max over seeds)")
    return _save(fig, out)


def write_outputs(
    folder: Path, points: list[dict[str, Any]], seeds: list[int], dirs: list[Path], metrics: Sequence[str],
    plots: bool = True,
) -> str:  # fmt: skip
    """Tables, comparison plot and HTML report of a finished sweep; returns the markdown summary."""
    rows = write_tables(folder, points, seeds, dirs, metrics)
    keys = list(dict.fromkeys(k for p in points for k in p))
    if plots:
        plot_comparison(rows, keys, metrics[0], folder / "comparison.png")
        groups = [(point_name(p), dirs[i * len(seeds) : (i + 1) * len(seeds)]) for i, p in enumerate(points)]
        build_report_groups(groups, folder / "report.html")
    return markdown_table(rows, keys, metrics)


def prepare(folder: Path, record: dict[str, Any]) -> None:
    """``DIR/sweep.yaml`` (what was asked); a folder holding other files than a sweep's is refused."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FedsimError(f"--out {folder} is a file")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / SWEEP_FILE).is_file():
        raise FedsimError(f"--out {folder} is not empty and not a sweep folder (no {SWEEP_FILE})")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SWEEP_FILE).write_text(yaml.safe_dump(record, sort_keys=False))


def run_grid(
    base: Mapping[str, Any], grid: Mapping[str, list[Any]], seeds: Sequence[int], out: str | Path, *,
    jobs: int = 1, executor: str = "local", metrics: Sequence[str] = DEFAULT_METRICS, plots: bool = True,
    on_round: Callable[[dict], None] | None = None, on_skip: Callable[[Path], None] | None = None,
) -> str:  # fmt: skip
    """A grid sweep (see the module docstring); returns the markdown summary."""
    check_executor(executor, jobs)
    folder, seeds = Path(out), list(seeds)
    points = grid_points(grid)
    configs = [point_config(base, p, s) for p in points for s in seeds]  # every point validated first
    prepare(folder, {"mode": "grid", "grid": dict(grid), "seeds": seeds, "metrics": list(metrics),
                     "config": dict(base)})  # fmt: skip
    dirs = run_configs(configs, folder, jobs, executor, plots=False, on_round=on_round, on_skip=on_skip)
    return write_outputs(folder, points, seeds, dirs, metrics, plots)


def direction_of(metric: str) -> str:
    """``minimize`` for losses, times, bytes and distances; ``maximize`` otherwise (accuracies)."""
    lower = ("loss", "time", "bytes", "mb", "distance", "gap", "drift", "epsilon")
    return "minimize" if any(word in metric for word in lower) else "maximize"


def optimize(
    base: Mapping[str, Any], space: Mapping[str, Any], seeds: Sequence[int], out: str | Path, *, metric: str,
    trials: int, direction: str | None = None, jobs: int = 1, executor: str = "local",
    metrics: Sequence[str] = DEFAULT_METRICS, plots: bool = True, on_round: Callable[[dict], None] | None = None,
    on_skip: Callable[[Path], None] | None = None,
) -> tuple[str, dict[str, Any], float | None]:  # fmt: skip
    """An Optuna search over ``space`` (lists: categorical; ``("range", low, high, log)``: numeric), each trial
    the median of ``metric`` over ``seeds``; the study (``DIR/optuna.db``) resumes. Returns the markdown
    summary of the trials, the best point and its value."""
    try:
        import optuna
    except ImportError:
        raise FedsimError('--optimize needs Optuna (pip install "fedsim[sweep]")') from None
    check_executor(executor, jobs)
    if trials < 1:
        raise FedsimError(f"--trials must be >= 1, got {trials}")
    direction = direction or direction_of(metric)
    if direction not in ("maximize", "minimize"):
        raise FedsimError(f"--direction must be maximize or minimize, got {direction!r}")
    folder, seeds = Path(out), list(seeds)
    for key, values in space.items():  # every categorical value checked before the study starts
        for value in values if isinstance(values, list) else values[1:3]:
            point_config(base, {key: value}, seeds[0])
    record = {"mode": "optimize", "metric": metric, "direction": direction, "trials": trials,
              "space": {k: list(v) for k, v in space.items()}, "seeds": seeds, "config": dict(base)}  # fmt: skip
    prepare(folder, record)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{folder.resolve() / 'optuna.db'}"
    study = optuna.create_study(study_name="fedsim", storage=storage, load_if_exists=True, direction=direction)
    done = sum(t.state.name in ("COMPLETE", "FAIL") for t in study.trials)
    # seeded by the trials so far: a resumed study draws new points, the same ones on every machine
    study.sampler = optuna.samplers.TPESampler(seed=done)
    if study.direction.name.lower() != direction:
        raise FedsimError(f"the study in {folder} {study.direction.name.lower()}s; it cannot {direction} now")

    def objective(trial) -> float:
        point = {}
        for key, values in space.items():
            if isinstance(values, list):
                point[key] = trial.suggest_categorical(key, values)
            elif isinstance(values[1], int) and isinstance(values[2], int) and not values[3]:
                point[key] = trial.suggest_int(key, values[1], values[2])
            else:
                point[key] = trial.suggest_float(key, float(values[1]), float(values[2]), log=values[3])
        configs = [point_config(base, point, s) for s in seeds]
        dirs = run_configs(configs, folder, jobs, executor, on_round=on_round, on_skip=on_skip)
        value = statistics([metric_value(d, metric) for d in dirs])["median"]
        return float("nan") if value is None else value

    if trials > done:
        study.optimize(objective, n_trials=trials - done)
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "FAIL")]
    points = [dict(t.params) for t in finished]
    dirs = [folder / "runs" / run_key(point_config(base, p, s)) for p in points for s in seeds]
    table = write_outputs(folder, points, seeds, dirs, list(dict.fromkeys([metric, *metrics])), plots)
    complete = [t for t in finished if t.state.name == "COMPLETE"]
    best = study.best_trial if complete else None
    return table, (dict(best.params) if best else {}), (best.value if best else None)
