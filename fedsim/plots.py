"""Plots of finished (or still running) runs, read from their results folders.

A run folder holds ``metrics.jsonl`` (one JSON object per round; any value may be ``null``, a final line
may be truncated while the run is still appending), ``config.yaml`` and optionally ``label_histogram.csv``.
Everything here works for any numeric metric key, so new metrics need no change in this module.

Matplotlib is imported lazily inside the functions and only through the object-oriented API
(:class:`matplotlib.figure.Figure` with the Agg canvas), so importing this module is cheap and never
touches global pyplot state.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import networkx as nx
import numpy as np
import yaml

from fedsim.config import run_parts
from fedsim.core.errors import FedsimError, did_you_mean
from fedsim.results import CONFIG_FILE, _run_dir, read_metrics
from fedsim.rounds import OSCILLATION_WINDOW

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "available_metrics",
    "plot_label_histogram",
    "plot_run",
    "plot_runs",
    "plot_seed_bands",
    "read_config",
    "read_label_histogram",
    "read_metrics",
    "run_label",
]

HISTOGRAM_FILE = "label_histogram.csv"
DPI = 120
# Metrics whose values may span orders of magnitude: these get a log y axis when that helps.
_LOG_CANDIDATES = ("drift", "update_norm", "consensus_distance", "loss", "norm", "distance")
_LOG_SPAN = 100.0  # more than two orders of magnitude


# --------------------------------------------------------------------------------------------------
# Reading a results folder
# --------------------------------------------------------------------------------------------------


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """Return ``RUN/config.yaml`` as a mapping (loaded with ``yaml.safe_load``), or ``{}`` if it is absent.

    The config only decorates titles here, so an unreadable or non-mapping file also gives ``{}``.
    """
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return {}

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def read_label_histogram(path: str | Path) -> np.ndarray:
    """Read a ``label_histogram.csv`` (header ``client,class_0,...``) into an int array [clients, classes]."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = [row for row in csv.reader(fh) if row and any(cell.strip() for cell in row)]
    except OSError as exc:
        raise FedsimError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not rows:
        raise FedsimError(f"{path}: empty label histogram")
    header, body = rows[0], rows[1:]
    num_classes = len(header) - 1
    if num_classes < 1:
        raise FedsimError(f"{path}: header must be 'client,class_0,class_1,...'")
    counts = np.zeros((len(body), num_classes), dtype=np.int64)
    for i, row in enumerate(body):
        if len(row) != num_classes + 1:
            raise FedsimError(f"{path}:{i + 2}: expected {num_classes + 1} columns, got {len(row)}")
        try:
            counts[i] = [int(float(cell)) for cell in row[1:]]
        except ValueError as exc:
            raise FedsimError(f"{path}:{i + 2}: non-numeric count") from exc
    return counts


def run_label(run_dir: str | Path) -> str:
    """Legend label of a run: the name of its folder (resolved, so '.' gives the real name)."""
    path = Path(run_dir)
    return path.name or path.resolve().name or str(path)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)


def _round_of(record: dict, index: int) -> float:
    x = record.get("round")
    return float(x) if is_number(x) else float(index)


def available_metrics(records: Sequence[dict]) -> list[str]:
    """Sorted numeric metric keys that have at least one finite value (``round`` excluded)."""
    keys: set[str] = set()
    for record in records:
        for key, value in record.items():
            if key != "round" and _is_finite(value):
                keys.add(key)
    return sorted(keys)


def _series(records: Sequence[dict], key: str, x: str = "round") -> tuple[list[float], list[float]]:
    """(x, values) of the finite values of ``key``; x is the round (the record index when 'round' is absent)
    or another key of the record (``virtual_time_s``), rows without it skipped."""
    xs: list[float] = []
    ys: list[float] = []
    for index, record in enumerate(records):
        value = record.get(key)
        where = _round_of(record, index) if x == "round" else record.get(x)
        if _is_finite(value) and _is_finite(where):
            xs.append(float(where))
            ys.append(float(value))
    return xs, ys


X_AXES = {
    "round": "round",
    "virtual_time_s": "virtual time (s)",
    "uplink_mb": "cumulative uplink (MB, log scale)",
    "total_mb": "cumulative uplink + downlink (MB, log scale)",
}
"""The x axes of :func:`plot_runs`: the round (server step), the virtual clock, or the cumulative megabytes
(10^6 bytes) the run sent up (``bytes_up``), or up and down, by the end of each round."""
CUMULATIVE_BYTES = {"uplink_mb": ("bytes_up",), "total_mb": ("bytes_up", "bytes_down")}


def with_cumulative_mb(records: Sequence[dict], x: str) -> list[dict]:
    """The records with ``x`` (a key of :data:`CUMULATIVE_BYTES`) added: the running sum of the round's byte
    counts, in MB; a record without them carries the sum so far."""
    total, out = 0.0, []
    for record in records:
        total += sum(float(record.get(key) or 0) for key in CUMULATIVE_BYTES[x])
        out.append({**record, x: total / 1e6})
    return out


# --------------------------------------------------------------------------------------------------
# Figure helpers
# --------------------------------------------------------------------------------------------------


def _new_figure(nrows: int = 1, *, width: float = 8.0, row_height: float = 3.0) -> tuple[Figure, list[Axes]]:
    """A figure of ``nrows`` stacked axes sharing x, on the Agg canvas, at the resolution it is saved at (so
    :func:`_save`'s layout pass and its drawing share one renderer and its cache of text sizes)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(width, 1.0 + row_height * nrows), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, 1, sharex=True, squeeze=False)[:, 0]
    for ax in axes:  # rounds and clients are integers
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, list(axes)


def _save(fig: Figure, out: str | Path) -> Path:
    """Lay ``fig`` out tightly and write it as a PNG at :data:`DPI`; parent folders are created.

    The figure is not cleared afterwards: it is dropped with its last reference, and clearing would rebuild
    every axes only to throw them away.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=DPI, format="png")
    return out


def _wants_log(name: str, values: Sequence[float]) -> bool:
    """Log scale only for norm/drift/loss/distance-like metrics, never negative, whose positive values span more
    than 2 orders of magnitude (zeros, e.g. a stability distance before the swapped sample is drawn, are then
    not drawn)."""
    if not values or not any(token in name for token in _LOG_CANDIDATES) or min(values) < 0:
        return False
    positive = [v for v in values if v > 0]
    return bool(positive) and max(positive) / min(positive) > _LOG_SPAN


def _pretty(name: str) -> str:
    return name.replace("_", " ")


def _config_title(config: dict[str, Any]) -> str:
    return " · ".join(run_parts(config)) if config else ""


def _run_title(run_dir: Path, config: dict[str, Any]) -> str:
    title = _config_title(config) or run_label(run_dir)
    seed = config.get("seed")
    if is_number(seed):
        title += f" (seed {seed})"
    return title


def _plot_line(ax: Axes, xs: Sequence[float], ys: Sequence[float], label: str, **kwargs: Any) -> None:
    marker = "o" if len(xs) <= 30 else None
    ax.plot(xs, ys, label=label, marker=marker, markersize=3, linewidth=1.5, **kwargs)


def _unique_labels(dirs: Sequence[Path]) -> list[str]:
    """Folder names, disambiguated with parent folders when two runs share a name."""
    labels = [run_label(d) for d in dirs]
    depth = 1
    while len(set(labels)) < len(labels) and depth < 6:
        depth += 1
        labels = ["/".join(d.resolve().parts[-depth:]) for d in dirs]
    if len(set(labels)) < len(labels):
        labels = [str(d) for d in dirs]
    return labels


# --------------------------------------------------------------------------------------------------
# Public plotting API
# --------------------------------------------------------------------------------------------------


def plot_runs(run_dirs: Sequence[str | Path], metrics: Sequence[str], out: str | Path, x: str = "round") -> Path:
    """Overlay several runs in one PNG: one subplot per metric (stacked, shared x = round, or the virtual clock
    with ``x="virtual_time_s"``), one line per run.

    Raises :class:`FedsimError` when ``run_dirs`` or ``metrics`` is empty, when a run folder does not exist
    or has no ``metrics.jsonl``, or when a requested metric appears in none of the runs (the message lists
    the available metrics and suggests the closest). A metric missing from only some runs is drawn for the
    others. Returns the path written; parent folders of ``out`` are created.
    """
    if x not in X_AXES:
        raise FedsimError(f"unknown x axis {x!r}; choose {', '.join(X_AXES)}")
    if isinstance(metrics, str):
        metrics = [metrics]
    metrics = list(dict.fromkeys(metrics))  # drop duplicates, keep order
    if not metrics:
        raise FedsimError("no metrics to plot; name at least one metric")
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise FedsimError("no run directories to plot")
    runs = [read_metrics(d) for d in dirs]
    if x in CUMULATIVE_BYTES:
        runs = [with_cumulative_mb(records, x) for records in runs]

    available = sorted({key for records in runs for key in available_metrics(records)})
    for metric in metrics:
        if metric not in available:
            listing = ", ".join(available) if available else "none"
            raise FedsimError(
                f"metric '{metric}' is in none of the runs{did_you_mean(metric, available)}; "
                f"available metrics: {listing}"
            )

    labels = _unique_labels(dirs)
    fig, axes = _new_figure(len(metrics))
    for ax, metric in zip(axes, metrics, strict=True):
        all_values: list[float] = []
        for records, label in zip(runs, labels, strict=True):
            xs, ys = _series(records, metric, x)
            all_values.extend(ys)
            if xs:
                _plot_line(ax, xs, ys, label)
            else:  # keep colours aligned with the other panels and list the run in the legend
                ax.plot([], [], label=f"{label} (no data)")
        if _wants_log(metric, all_values):
            ax.set_yscale("log")
        ax.set_ylabel(_pretty(metric))
        ax.set_title(_pretty(metric), fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[-1].set_xlabel(X_AXES[x])
    if x in CUMULATIVE_BYTES:
        for ax in axes:
            ax.set_xscale("log")
    elif x != "round":
        for ax in axes:
            ax.xaxis.set_major_locator(_auto_locator())
    if len(dirs) == 1:
        fig.suptitle(_run_title(dirs[0], read_config(dirs[0])))
    else:
        common = {_config_title(read_config(d)) for d in dirs}
        shared = common.pop() if len(common) == 1 else ""
        fig.suptitle(f"{len(dirs)} runs" + (f": {shared}" if shared else ""))
    return _save(fig, out)


def plot_label_histogram(counts: np.ndarray, out: str | Path, max_clients: int = 100) -> Path:
    """Stacked bars of the label counts of each client, coloured by class (a partition plot).

    ``counts`` is [num_clients, num_classes]. With more than ``max_clients`` clients only the first
    ``max_clients`` are drawn and the title says so. Returns the path written.

    All the bars are one :class:`~matplotlib.collections.PolyCollection` (one artist, drawn in one call): a
    Rectangle patch per client and class took about a second for 100 clients.
    """
    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.shape[0] == 0 or counts.shape[1] == 0:
        raise FedsimError(f"label histogram must be a non-empty [clients, classes] array, got {counts.shape}")
    if max_clients < 1:
        raise FedsimError(f"max_clients must be at least 1, got {max_clients}")
    if np.any(counts < 0):
        raise FedsimError("label histogram has negative counts")
    num_clients, num_classes = counts.shape
    shown = counts[:max_clients].astype(float)
    n = shown.shape[0]
    colours = _class_colours(num_classes)

    fig, (ax,) = _new_figure(1, width=max(8.0, min(24.0, 0.12 * n + 4.0)), row_height=4.0)
    _stacked_bars(ax, shown, colours, width=0.8 if n > 1 else 0.5)
    ax.set_xlabel("client")
    ax.set_ylabel("samples")
    ax.set_xlim(-0.6, n - 0.4)
    top = float(shown.sum(axis=1).max())
    ax.set_ylim(0.0, 1.02 * top if top > 0 else 1.0)  # from 0, with 2% headroom above the tallest client
    if n <= 30:
        ax.set_xticks(np.arange(n))
    if num_classes <= 20:
        _class_legend(ax, colours)
    title = f"Label distribution: {num_clients} clients, {num_classes} classes"
    if num_clients > n:
        title += f" (first {n} of {num_clients} clients shown)"
    ax.set_title(title)
    return _save(fig, out)


def _class_colours(num_classes: int) -> np.ndarray:
    """RGBA colours [num_classes, 4]: tab10 / tab20 by class index, viridis spread over more classes."""
    from matplotlib import colormaps

    if num_classes > 20:
        return colormaps["viridis"](np.arange(num_classes) / max(num_classes - 1, 1))
    return colormaps["tab10" if num_classes <= 10 else "tab20"](np.arange(num_classes))


def _stacked_bars(ax: Axes, heights: np.ndarray, colours: np.ndarray, width: float) -> None:
    """Draw ``heights`` [bars, classes] as bars centred on 0, 1, ... stacked in class order, as a single
    collection of rectangles; empty segments are left out (they draw nothing)."""
    from matplotlib.collections import PolyCollection

    tops = np.cumsum(heights, axis=1)
    bar, cls = np.nonzero(heights > 0)  # row-major: bar by bar, classes bottom-up
    left, right = bar - width / 2, bar + width / 2
    lo, hi = tops[bar, cls] - heights[bar, cls], tops[bar, cls]
    corners = np.stack([np.stack([left, left, right, right], 1), np.stack([lo, hi, hi, lo], 1)], axis=-1)
    ax.add_collection(PolyCollection(corners, facecolors=colours[cls], linewidths=0), autolim=False)


def _class_legend(ax: Axes, colours: np.ndarray) -> None:
    """Legend of the class colours, outside the axes on the right."""
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=colour, linewidth=0, label=f"class {c}") for c, colour in enumerate(colours)]
    ax.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), title="label")


def _plot_panel_group(
    records: Sequence[dict], panels: Sequence[Sequence[str]], out: Path, title: str,
    labels: dict[str, str] | None = None,
) -> Path | None:  # fmt: skip
    """One subplot per panel (a list of metrics drawn together); empty panels are dropped. ``labels``: y-axis
    labels by a panel's first metric (default: the metric names)."""
    series = {metric: _series(records, metric) for panel in panels for metric in panel}
    present = [[m for m in panel if series[m][0]] for panel in panels]
    present = [panel for panel in present if panel]
    if not present:
        return None
    fig, axes = _new_figure(len(present))
    for ax, panel in zip(axes, present, strict=True):
        values: list[float] = []
        for metric in panel:
            xs, ys = series[metric]
            values.extend(ys)
            _plot_line(ax, xs, ys, _pretty(metric))
        if all(_wants_log(metric, values) for metric in panel):
            ax.set_yscale("log")
        default = _pretty(panel[0]) if len(panel) == 1 else " / ".join(_pretty(m) for m in panel)
        ax.set_ylabel((labels or {}).get(panel[0], default))
        ax.grid(True, alpha=0.3)
        if len(panel) > 1:
            ax.legend(fontsize=8, loc="best")
    axes[-1].set_xlabel("round")
    fig.suptitle(title)
    return _save(fig, out)


def _plot_client_accuracy(records: Sequence[dict], out: Path, title: str, who: str = "client") -> Path | None:
    """Mean accuracy of the clients' (or, over a topology, the nodes') with a ± std band clipped to [0, 1],
    and the mean of the worst 10%."""
    xs_mean, ys_mean = _series(records, f"{who}_accuracy_mean")
    xs_worst, ys_worst = _series(records, f"{who}_accuracy_worst10")
    if not xs_mean and not xs_worst:
        return None
    fig, (ax,) = _new_figure(1, row_height=3.5)
    if xs_mean:
        _plot_line(ax, xs_mean, ys_mean, f"mean {who} accuracy", color="C0")
        band = [
            (x, mean, std)
            for x, mean, std in (
                (_round_of(record, i), record.get(f"{who}_accuracy_mean"), record.get(f"{who}_accuracy_std"))
                for i, record in enumerate(records)
            )
            if _is_finite(mean) and _is_finite(std)
        ]
        if band:
            bx = [b[0] for b in band]
            lo = [max(0.0, b[1] - b[2]) for b in band]
            hi = [min(1.0, b[1] + b[2]) for b in band]
            ax.fill_between(bx, lo, hi, color="C0", alpha=0.2, label="± std (within [0, 1])", linewidth=0)
    if xs_worst:
        _plot_line(ax, xs_worst, ys_worst, f"worst 10% of {who}s", color="C3")
    ax.set_xlabel("round")
    ax.set_ylabel(f"{who} accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title)
    return _save(fig, out)


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write the standard plots of one run into its folder and return the paths written.

    * ``convergence.png``: test accuracy, and in further panels train and test loss and the oscillation
      (std of test accuracy over the last 10 evaluations), vs round;
    * ``drift.png``: client drift and update norm vs round, and a regulator's damped norm fraction;
    * ``consensus.png`` (decentralized runs): consensus distance, spectral gap of W_t, and the generalization
      gaps of the average model and of the nodes;
    * min-max runs add the problem's metrics (``test_auc``, ``worst_class_accuracy``) to the accuracy panel
      of ``convergence.png`` and a ``primal_dual_gap`` panel;
    * ``label_histogram.png``: the clients' label counts, when ``label_histogram.csv`` exists;
    * ``client_accuracy.png``: mean client accuracy with a ± std band and the worst-10% accuracy;
    * runs on the virtual clock (a non-uniform system model, a round policy or an asynchronous strategy: rows
      with a ``timeline``): ``virtual_time.png`` (test accuracy vs virtual time; the staleness histogram of an
      asynchronous run) and ``timeline.png`` (a Gantt chart of clients 0..15 over the first 20 rounds).

    A plot (or panel) whose metrics are all absent or null is skipped.
    """
    run = _run_dir(run_dir)
    records = read_metrics(run)
    title = _run_title(run, read_config(run))
    diverged = next((r.get("round") for r in records if r.get("diverged")), None)
    if diverged is not None:
        title += f" — diverged at round {diverged}"
    written: list[Path] = []

    convergence = _plot_panel_group(
        _full_oscillation_windows(records),
        [
            ["test_accuracy", "test_auc", "worst_class_accuracy"],
            ["train_loss", "test_loss"],
            ["primal_dual_gap"],
            ["oscillation"],
        ],
        run / "convergence.png",
        title,
        labels={"oscillation": f"oscillation\n(std, last {OSCILLATION_WINDOW} evals)"},
    )
    drift = _plot_panel_group(records, [["drift"], ["update_norm"], ["damped_norm_fraction"]], run / "drift.png", title)
    gaps = {r.get("spectral_gap") for r in records if _is_finite(r.get("spectral_gap"))}
    static = len(gaps) == 1  # one mixing matrix: its gap goes in the title instead of a flat line
    consensus = _plot_panel_group(
        records,
        [["consensus_distance"], *([] if static else [["spectral_gap"]]),
         ["generalization_gap", "node_generalization_gap"]],
        run / "consensus.png",
        f"{title}\nspectral gap {gaps.pop():.4g}" if static else title,
        labels={"generalization_gap": "generalization gap"},
    )  # fmt: skip
    written += [p for p in (convergence, drift, consensus) if p is not None]

    histogram = run / HISTOGRAM_FILE
    if histogram.is_file():
        written.append(plot_label_histogram(read_label_histogram(histogram), run / "label_histogram.png"))

    if any("timeline" in r for r in records):  # a run on the virtual clock
        summary = read_summary(run)
        written += [p for p in (plot_virtual_time(records, summary, run / "virtual_time.png", title),
                                plot_timeline(records, run / "timeline.png", title)) if p is not None]  # fmt: skip

    who = "node" if any("node_accuracy_mean" in r for r in records) else "client"
    client = _plot_client_accuracy(records, run / "client_accuracy.png", title, who)
    if client is not None:
        written.append(client)
    return written


def _auto_locator():
    from matplotlib.ticker import AutoLocator

    return AutoLocator()


def read_summary(run: Path) -> dict[str, Any]:
    """``RUN/summary.json`` as a mapping; ``{}`` when it is absent or unreadable (a run still going)."""
    path = run / "summary.json"
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def plot_virtual_time(records: Sequence[dict], summary: dict[str, Any], out: Path, title: str) -> Path | None:
    """``virtual_time.png``: test accuracy against the virtual clock, and for asynchronous runs the histogram
    of the applied updates' staleness (``summary.json``'s ``staleness_histogram``)."""
    xs, ys = _series(records, "test_accuracy", "virtual_time_s")
    histogram = {int(k): v for k, v in (summary.get("staleness_histogram") or {}).items()}
    if not xs and not histogram:
        return None
    fig, axes = _new_figure(1 + bool(histogram))
    if histogram:  # separate x axes: time, then staleness
        axes[1].remove()
        axes[1] = fig.add_subplot(2, 1, 2)
    ax = axes[0]
    if xs:
        _plot_line(ax, xs, ys, "test accuracy")
    ax.xaxis.set_major_locator(_auto_locator())
    ax.tick_params(labelbottom=True)
    ax.set_xlabel("virtual time (s)")
    ax.set_ylabel("test accuracy")
    ax.grid(True, alpha=0.3)
    if histogram:
        keys = sorted(histogram)
        axes[1].bar(keys, [histogram[k] for k in keys], color="C1")
        axes[1].set_xlabel("staleness (server versions)")
        axes[1].set_ylabel("updates")
        axes[1].grid(True, alpha=0.3)
    fig.suptitle(title)
    return _save(fig, out)


TIMELINE_ROUNDS = 20
"""The Gantt plot shows the first 20 rounds (server steps)."""
_PHASE_COLOURS = {"download_s": "#4c72b0", "compute_s": "#dd8452", "upload_s": "#55a868"}
_LOST = {"dropout", "offline", "late", "cut"}


def plot_timeline(records: Sequence[dict], out: Path, title: str) -> Path | None:
    """``timeline.png``: a Gantt chart of the sampled clients (rows' ``timeline``: clients 0..15) over the first
    :data:`TIMELINE_ROUNDS` rounds: download (latency included), compute and upload as bars, work lost to a
    dropout, a missed deadline or over-selection in red, idle time as gaps; round ends as dotted lines."""
    from matplotlib.patches import Patch

    rows = [r for r in records if r.get("timeline") is not None][:TIMELINE_ROUNDS]
    entries = [e for r in rows for e in r["timeline"]]
    if not entries:
        return None
    clients = sorted({int(e[0]) for e in entries})
    fig, axes = _new_figure(1, row_height=max(2.0, 0.3 * len(clients)))
    ax = axes[0]
    for y, client in enumerate(clients):
        for phase, colour in _PHASE_COLOURS.items():
            spans = []
            for c, start, download, compute, upload, status in entries:
                if c != client:
                    continue
                offset = {"download_s": 0.0, "compute_s": download, "upload_s": download + compute}[phase]
                length = {"download_s": download, "compute_s": compute, "upload_s": upload}[phase]
                if length > 0:
                    lost = phase == "compute_s" and status in _LOST
                    spans.append(((start + offset, length), "#c44e52" if lost else colour))
            for span, shade in spans:
                ax.broken_barh([span], (y - 0.35, 0.7), facecolors=shade, linewidth=0)
    for r in rows:
        ax.axvline(r["virtual_time_s"], color="#999999", linestyle=":", linewidth=0.8)
    ax.set_yticks(range(len(clients)), [str(c) for c in clients])
    ax.set_ylabel("client")
    ax.set_xlabel("virtual time (s)")
    ax.xaxis.set_major_locator(_auto_locator())
    handles = [Patch(color=c, label=p[:-2]) for p, c in _PHASE_COLOURS.items()]
    handles.append(Patch(color="#c44e52", label="lost (dropout, offline, late, cut)"))
    ax.legend(handles=handles, fontsize=8, loc="upper right")
    ax.set_title(f"client timeline, first {len(rows)} rounds (gaps: idle)", fontsize=10)
    fig.suptitle(title)
    return _save(fig, out)


def _full_oscillation_windows(records: Sequence[dict]) -> list[dict]:
    """The records with ``oscillation`` kept only once its window of evaluations is full (before that it is
    the std of fewer values, and its drop when the window starts sliding is no change in the run)."""
    out, evaluations = [], 0
    for record in records:
        evaluations += record.get("test_accuracy") is not None
        out.append(record if evaluations >= OSCILLATION_WINDOW else {**record, "oscillation": None})
    return out


def plot_topology(graph: Any, out: str | Path, title: str | None = None) -> Path:
    """Draw a networkx graph (spring layout with a fixed seed; circular for rings and small regular graphs)
    with nodes labelled by the file's own names (the ``name`` attribute :func:`topologies.load` keeps), and
    save it as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = graph.number_of_nodes()
    degrees = {d for _, d in graph.degree()}
    layout = nx.circular_layout(graph) if degrees == {2} or n <= 8 else nx.spring_layout(graph, seed=0)
    fig = Figure(figsize=(6, 6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    nx.draw_networkx(
        graph,
        pos=layout,
        ax=ax,
        node_size=max(30, 300 - 2 * n),
        with_labels=n <= 64,
        labels={v: str(graph.nodes[v].get("name", v)) for v in graph.nodes},
        font_size=7,
        node_color="#4c72b0",
        edge_color="#999999",
        font_color="white",
    )
    ax.set_title(title or f"{n} nodes, {graph.number_of_edges()} edges")
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(out)
    fig.clear()
    return out


def plot_seed_bands(run_dirs: Sequence[str | Path], metrics: Sequence[str], out: str | Path) -> Path:
    """Repeats of one experiment (e.g. over seeds) in one PNG: per metric, the median over runs at each round
    with a 10-90% band and a min-max band (``numpy.quantile``, linear interpolation, over the runs that have a
    finite value at that round).

    Metrics present in none of the runs are skipped; :class:`FedsimError` when none is present or
    ``run_dirs`` is empty. Returns the path written.
    """
    dirs = [Path(d) for d in ([run_dirs] if isinstance(run_dirs, (str, Path)) else run_dirs)]
    if not dirs:
        raise FedsimError("no run directories to plot")
    runs = [read_metrics(d) for d in dirs]
    present = [m for m in dict.fromkeys(metrics) if any(_series(records, m)[0] for records in runs)]
    if not present:
        raise FedsimError(f"none of the metrics {', '.join(metrics)} is in the runs")
    fig, axes = _new_figure(len(present))
    for ax, metric in zip(axes, present, strict=True):
        by_round: dict[float, list[float]] = {}
        for records in runs:
            for x, y in zip(*_series(records, metric), strict=True):
                by_round.setdefault(x, []).append(y)
        xs = sorted(by_round)
        q = np.array([np.quantile(by_round[x], [0.0, 0.1, 0.5, 0.9, 1.0], method="linear") for x in xs])
        ax.fill_between(xs, q[:, 0], q[:, 4], color="C0", alpha=0.15, linewidth=0, label="min-max")
        ax.fill_between(xs, q[:, 1], q[:, 3], color="C0", alpha=0.3, linewidth=0, label="10-90%")
        _plot_line(ax, xs, q[:, 2], "median", color="C0")
        if _wants_log(metric, [v for values in by_round.values() for v in values]):
            ax.set_yscale("log")
        ax.set_ylabel(_pretty(metric))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[-1].set_xlabel("round")
    common = {_config_title(read_config(d)) for d in dirs}
    fig.suptitle(f"{len(dirs)} runs" + (f": {common.pop()}" if len(common) == 1 and "" not in common else ""))
    return _save(fig, out)
