"""``fedsim report RUN_DIR... -o report.html``: one self-contained HTML file comparing results folders, offline.

Every script and style is inlined (plotly's bundled JavaScript, rendered through a jinja2 template), so the file
opens from disk with no network. It shows, for the runs given (single runs, or ``--seeds`` folders whose seeds
become one group):

- the resolved config (with several runs, the keys whose values differ first), and ``summary.json``;
- one interactive plot per numeric metric of ``metrics.jsonl``, runs overlaid, with a selectable x axis
  (round, training samples, cumulative megabytes, virtual time where recorded) and, for a ``--seeds`` group,
  the median over seeds with a min-max band;
- every client's test accuracy at the last evaluation (``client_accuracy.npy``) and the label histogram;
- the topology of a decentralized run (spring layout of its graph file);
- warnings: diverged, interrupted, stopped early by a rule, resumed, or fewer rounds than configured.

The page embeds the data it plots as JSON (``<script id="fedsim-data">``): each run's ``metrics`` is its
``metrics.jsonl``, record for record.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import yaml

import topologies
from fedsim.config import flat_config
from fedsim.core.errors import FedsimError
from fedsim.plots import is_number, read_label_histogram, read_summary
from fedsim.results import (
    CLIENT_ACCURACY_FILE,
    CONFIG_FILE,
    HISTOGRAM_FILE,
    METRICS_FILE,
    SEEDS_FILE,
    read_metrics,
)

X_AXES = {"round": "round", "samples": "training samples (clients x local steps x batch size)",
          "total_mb": "megabytes sent and received", "virtual_time_s": "virtual time (s)"}  # fmt: skip
"""Selectable x axes: key -> label (see :func:`x_values`)."""
MAX_HISTOGRAM_CLIENTS = 100
"""Clients drawn in the label histogram (the first ones)."""


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_ready(v) for v in value]
    return _finite(value)


FIRST = ("test_accuracy", "test_loss", "train_loss", "client_accuracy_mean", "client_accuracy_worst10", "drift")
"""Metrics plotted first (when present); the others follow in first-seen order."""


def numeric_metrics(records: Sequence[dict[str, Any]]) -> list[str]:
    """Keys with a number in some record (``round`` excluded): :data:`FIRST`, then in first-seen order."""
    keys: dict[str, None] = {}
    for record in records:
        for key, value in record.items():
            if is_number(value) and key != "round":
                keys.setdefault(key, None)
    return [k for k in FIRST if k in keys] + [k for k in keys if k not in FIRST]


def _topology(run_dir: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """Node positions and edges of a decentralized run's graph file (spring layout, seed 0)."""
    name = config.get("topology")
    if not name or str(name).endswith((".yaml", ".yml")):
        return None
    path = run_dir / Path(str(name)).name
    if not path.is_file():
        path = Path(str(name))
    if not path.is_file():
        return None
    graph = topologies.load(path)
    layout = nx.spring_layout(graph, seed=0)
    return {
        "x": [float(layout[n][0]) for n in graph.nodes],
        "y": [float(layout[n][1]) for n in graph.nodes],
        "edges": [[int(a), int(b)] for a, b in graph.edges],
    }


def x_values(records: list[dict[str, Any]], config: dict[str, Any]) -> dict[str, list[float | None]]:
    """Per record, each x axis: ``round``; ``samples``, the running sum of ``clients x local_steps x batch_size``
    (absent with ``local_epochs``, whose steps depend on the client); ``total_mb``, the running sum of
    ``bytes_up + bytes_down`` in 10^6 bytes; ``virtual_time_s`` as recorded."""
    axes: dict[str, list[float | None]] = {"round": [r.get("round") for r in records]}
    steps, batch = config.get("local_steps"), config.get("batch_size")
    if not config.get("local_epochs") and isinstance(steps, int) and isinstance(batch, int):
        per_client, total, samples = steps * batch, 0, []
        for record in records:
            total += (record.get("clients") or 0) * per_client
            samples.append(total)
        axes["samples"] = samples
    total_bytes, mb = 0, []
    for record in records:
        total_bytes += (record.get("bytes_up") or 0) + (record.get("bytes_down") or 0)
        mb.append(total_bytes / 1e6)
    axes["total_mb"] = mb
    axes["virtual_time_s"] = [r.get("virtual_time_s") for r in records]
    return axes


def load_run(run_dir: Path, name: str | None = None) -> dict[str, Any]:
    """Everything the report shows of one results folder."""
    config = yaml.safe_load((run_dir / CONFIG_FILE).read_text(encoding="utf-8")) or {}
    summary = read_summary(run_dir)
    metrics = read_metrics(run_dir)
    accuracy = None
    if (run_dir / CLIENT_ACCURACY_FILE).is_file():
        accuracy = np.load(run_dir / CLIENT_ACCURACY_FILE, allow_pickle=False).astype(float).tolist()
    histogram = None
    if (run_dir / HISTOGRAM_FILE).is_file():
        histogram = read_label_histogram(run_dir / HISTOGRAM_FILE)[:MAX_HISTOGRAM_CLIENTS].tolist()
    return {
        "name": name or run_dir.name,
        "path": str(run_dir),
        "config": config,
        "summary": summary,
        "metrics": metrics,
        "x": x_values(metrics, config),
        "client_accuracy": accuracy,
        "label_histogram": histogram,
        "topology": _topology(run_dir, config),
        "warnings": run_warnings(config, summary, metrics),
    }


def run_warnings(config: dict[str, Any], summary: dict[str, Any], metrics: list[dict[str, Any]]) -> list[str]:
    """What a reader should know before trusting the curves."""
    notes = []
    if summary.get("diverged") or any(r.get("diverged") for r in metrics):
        notes.append("diverged")
    if summary.get("interrupted"):
        notes.append(f"interrupted after round {summary.get('rounds_completed')}")
    if summary.get("stopped"):
        notes.append(f"stopped early: {summary['stopped']}")
    if summary.get("resumed_from_round") is not None:
        notes.append(f"resumed from round {summary['resumed_from_round']}")
    done, planned = (metrics[-1].get("round") if metrics else 0), config.get("rounds")
    if not summary:
        notes.append("no summary.json (the run is still going, or was killed)")
    elif isinstance(planned, int) and isinstance(done, int) and done < planned and not notes:
        notes.append(f"{done} of {planned} rounds")
    return notes


def load_group(path: Path) -> dict[str, Any]:
    """A results folder given to the report: a run, or a ``--seeds`` folder (its seeds' runs, one group)."""
    if not path.is_dir():
        raise FedsimError(f"'{path}' is not a folder")
    if (path / SEEDS_FILE).is_file():
        seeds = sorted((p for p in path.glob("seed-*") if (p / METRICS_FILE).is_file()), key=_seed_number)
        if not seeds:
            raise FedsimError(f"'{path}' is a --seeds folder without finished seed runs (seed-*/metrics.jsonl)")
        runs = [load_run(p, f"{path.name}/{p.name}") for p in seeds]
        return {"name": path.name, "seeds": True, "runs": runs, "bands": seed_bands(runs)}
    if not ((path / CONFIG_FILE).is_file() and (path / METRICS_FILE).is_file()):
        raise FedsimError(f"'{path}' is not a fedsim results folder (no config.yaml and metrics.jsonl)")
    return {"name": path.name, "seeds": False, "runs": [load_run(path)], "bands": None}


def _seed_number(path: Path) -> int:
    tail = path.name.removeprefix("seed-")
    return int(tail) if tail.isdigit() else 1 << 30


def seed_bands(runs: list[dict[str, Any]]) -> dict[str, dict[str, list]]:
    """Per metric: the rounds and, per round, the median, min and max over the seeds that have a value."""
    bands: dict[str, dict[str, list]] = {}
    keys = numeric_metrics([r for run in runs for r in run["metrics"]])
    for key in keys:
        per_round: dict[int, list[float]] = {}
        for run in runs:
            for record in run["metrics"]:
                value = record.get(key)
                if is_number(value) and math.isfinite(value):
                    per_round.setdefault(int(record["round"]), []).append(float(value))
        rounds = sorted(per_round)
        bands[key] = {
            "round": rounds,
            "median": [float(np.median(per_round[r])) for r in rounds],
            "min": [min(per_round[r]) for r in rounds],
            "max": [max(per_round[r]) for r in rounds],
        }
    return bands


def config_table(groups: list[dict[str, Any]]) -> tuple[list[str], list[str], list[list[str]]]:
    """(column names, keys, rows of values): every config key with one column per run, the keys whose values
    differ across runs first (all keys when there is one run)."""
    runs = [run for group in groups for run in group["runs"]]
    flat = [flat_config(run["config"]) for run in runs]
    keys = sorted({k for f in flat for k in f})
    differing = [k for k in keys if len({json.dumps(f.get(k), default=str) for f in flat}) > 1]
    same = [k for k in keys if k not in differing]
    rows = [[k, *(json.dumps(f.get(k), default=str) for f in flat)] for k in differing + same]
    return [run["name"] for run in runs], differing, rows


def summary_table(groups: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    runs = [run for group in groups for run in group["runs"]]
    flat = [_flatten(run["summary"]) for run in runs]
    keys = [k for k in dict.fromkeys(k for f in flat for k in f) if all(not isinstance(f.get(k), list) for f in flat)]

    def show(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.6g}"
        return "" if value is None else str(value)

    return [run["name"] for run in runs], [[k, *(show(f.get(k)) for f in flat)] for k in keys]


def build_report(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """Write the report of ``run_dirs`` (runs, or ``--seeds`` folders) to ``out`` (an ``.html`` file)."""
    if not run_dirs:
        raise FedsimError("give at least one results folder")
    _check_out(Path(out))
    groups = [load_group(Path(p)) for p in run_dirs]
    names = [g["name"] for g in groups]
    for i, name in enumerate(names):  # same folder names from different parents: tell them apart
        if names.count(name) > 1:
            groups[i]["name"] = str(Path(run_dirs[i]))
    return render(groups, Path(out))


def build_report_groups(groups: Sequence[tuple[str, Sequence[Path]]], out: str | Path) -> Path:
    """Write the report of named groups of runs (a sweep's points over their seeds) to ``out``."""
    _check_out(Path(out))
    loaded = []
    for name, dirs in groups:
        runs = [load_run(Path(d), f"{name} / {Path(d).name}" if len(dirs) > 1 else name) for d in dirs]
        several = len(runs) > 1
        loaded.append({"name": name, "seeds": several, "runs": runs, "bands": seed_bands(runs) if several else None})
    return render(loaded, Path(out))


def _check_out(out: Path) -> None:
    if out.suffix.lower() not in (".html", ".htm"):
        raise FedsimError(f"the report is an HTML file: '{out}' should end in .html")


def render(groups: list[dict[str, Any]], out: Path) -> Path:
    """The page of ``groups`` (see :func:`load_group`) written to ``out``."""
    import jinja2
    from plotly.offline import get_plotlyjs

    metrics = numeric_metrics([r for g in groups for run in g["runs"] for r in run["metrics"]])
    columns, differing, config_rows = config_table(groups)
    summary_columns, summary_rows = summary_table(groups)
    records = [r for g in groups for run in g["runs"] for r in run["metrics"]]
    runs = [run for g in groups for run in g["runs"]]
    present = {"round": True, "samples": any("samples" in run["x"] for run in runs),
               "total_mb": any("bytes_up" in r for r in records),
               "virtual_time_s": any(r.get("virtual_time_s") is not None for r in records)}  # fmt: skip
    x_axes = {k: label for k, label in X_AXES.items() if present[k]}
    data = {"groups": _json_ready(groups), "metrics": metrics, "x_axes": x_axes}
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    template = jinja2.Environment(
        loader=jinja2.PackageLoader("fedsim", "templates"), autoescape=jinja2.select_autoescape(["html"])
    ).get_template("report.html")
    page = template.render(
        title=", ".join(g["name"] for g in groups),
        groups=groups,
        columns=columns,
        differing=differing,
        config_rows=config_rows,
        summary_columns=summary_columns,
        summary_rows=summary_rows,
        metrics=metrics,
        x_axes=x_axes,
        has_topology=any(run["topology"] for g in groups for run in g["runs"]),
        plotly_js=get_plotlyjs(),
        payload=payload,
    )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise FedsimError(f"cannot write {out}: {exc.strerror or exc}") from None
    return out


def expected_plots(groups: list[dict[str, Any]], metrics: list[str]) -> int:
    """How many plots the page draws: one per metric, and per run its client accuracy, label histogram and
    topology where present."""
    runs = [run for group in groups for run in group["runs"]]
    extra = sum(bool(run["client_accuracy"]) + bool(run["label_histogram"]) + bool(run["topology"]) for run in runs)
    return len(metrics) + extra
