"""Fed-PPI (federated prediction-powered inference, Luo et al. 2024) for a mean: coverage where the truth is
known, and class prevalences on a model that fedsim trained.

**Part 1, synthetic (truth known).** One population split over clients: each point has a group g in {0..9}
(probability 0.1 each), ``Y | g ~ N(g / 3, 1)`` (so theta* = E[Y] = 1.5), and a biased, noisy predictor
``Yhat = Y + 0.3 + sigma_e eps`` with quality useless (``Yhat = 1.8 + N(0, 1)``, independent of Y), weak
(sigma_e = 2), good (0.5) or near-perfect (0.05). A repetition draws D = 10,000 fresh points, splits them over
K clients (iid: a random equal split; dirichlet a: each group's points divided over the clients by proportions
~ Dirichlet(a), fedsim's partitioner with a minimum client size of 2) and labels ``max(1, floor(f D_i))``
random points of client i. One factor at a time from the base (dirichlet 1.0, K = 10, f = 0.05, good): split,
K in {1, 10, 100}, f in {0.01, 0.05, 0.2, 0.5}, quality; plus a stress cell (dirichlet 0.1, K = 100,
f = 0.01, near-perfect). Methods (alpha = 0.1): classical, centralized (ppi_py on the pooled data), fed_ppi
with lam tuned per client or globally and the imputed variance averaged or pooled, and per_client. Two truths:
population (theta* = 1.5) and stratified (``sum p_i m_i``, m_i the mean of g / 3 over client i's points: the
truth given the groups drawn); per_client is scored against each client's own m_i.

**Part 2, real data.** ``fedsim simulate`` trains an MLP (784-64-10) on MNIST (10 clients, Dirichlet 0.5,
100 rounds); the model predicts on every client's training points; for labelled fractions 0.02, 0.05, 0.1
and many seeds ``fedsim.ppi.run.federated_ppi`` hides all but the fraction's labels and gives 90% intervals for
the prevalence of each class (fed_ppi default, with the pooled imputed variance, with a global lam; classical;
centralized), scored against the prevalence in the clients' data.

    python experiments/ppi/run.py                 # both parts, 1000 reps / seeds (about 15 minutes on 2 cores)
    python experiments/ppi/run.py --part synthetic --reps 200
    python experiments/ppi/run.py --quick         # a smoke run: 2 cells, a few reps, 3 rounds of digits

Writes coverage.json / .md / .png, widths.png, intervals.png (part 1) and real.json / .md / .png (part 2).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
SEED = 20240903
ALPHA = 0.1
POINTS = 10_000
GROUPS = 10
BIAS = 0.3
THETA = float(np.mean(np.arange(GROUPS) / 3))  # 1.5
QUALITY: dict[str, float | None] = {"useless": None, "weak": 2.0, "good": 0.5, "near-perfect": 0.05}
FACTORS: dict[str, tuple[Any, ...]] = {
    "split": ("iid", "dirichlet 1.0", "dirichlet 0.1"),
    "clients": (1, 10, 100),
    "fraction": (0.01, 0.05, 0.2, 0.5),
    "quality": tuple(QUALITY),
}
BASE_CELL: dict[str, Any] = {"split": "dirichlet 1.0", "clients": 10, "fraction": 0.05, "quality": "good"}
STRESS_CELL: dict[str, Any] = {"split": "dirichlet 0.1", "clients": 100, "fraction": 0.01, "quality": "near-perfect"}
# method name -> keyword arguments of fed_ppi_mean_ci
METHODS: dict[str, dict[str, Any]] = {
    "classical": {"method": "classical"},
    "centralized": {"method": "centralized"},
    "fed_ppi": {},  # lam per client, imputed variance averaged: the defaults
    "fed_ppi_pooled": {"imputed_variance": "pooled"},
    "fed_ppi_global": {"lam_mode": "global"},
    "fed_ppi_global_pooled": {"lam_mode": "global", "imputed_variance": "pooled"},
    "per_client": {"method": "per_client"},
}
LABELS = {
    "classical": "classical",
    "centralized": "centralized (ppi_py)",
    "fed_ppi": "fed_ppi client/averaged (default)",
    "fed_ppi_pooled": "fed_ppi client/pooled",
    "fed_ppi_global": "fed_ppi global/averaged",
    "fed_ppi_global_pooled": "fed_ppi global/pooled",
    "per_client": "per_client (own m_i)",
}
COLORS = {
    "classical": "tab:gray", "centralized": "tab:green", "fed_ppi": "tab:blue", "fed_ppi_pooled": "tab:cyan",
    "fed_ppi_global": "tab:purple", "fed_ppi_global_pooled": "tab:pink", "per_client": "tab:orange",
}  # fmt: skip
MARKERS = {
    "classical": "o", "centralized": "s", "fed_ppi": "^", "fed_ppi_pooled": "v", "fed_ppi_global": "D",
    "fed_ppi_global_pooled": "x", "per_client": "o",
}  # fmt: skip
SHIFT = {m: 0.04 * (i - (len(METHODS) - 1) / 2) for i, m in enumerate(METHODS)}  # dodge overlapping markers
FLOOR = 0.7  # the coverage plot's lower limit
TRUTHS = ("population", "stratified")
REAL_BASE: dict[str, Any] = {
    "dataset": "mnist", "clients": 10, "partition": {"name": "dirichlet", "alpha": 0.5},
    "model": {"name": "mlp", "hidden": [64]}, "rounds": 100, "seed": 0,
}  # fmt: skip
REAL_FALLBACK_ROUNDS = {"digits": 30}
REAL_FRACTIONS = (0.02, 0.05, 0.1)
REAL_VARIANTS: dict[str, dict[str, Any]] = {
    "fed_ppi": {},
    "fed_ppi_pooled": {"imputed_variance": "pooled"},
    "fed_ppi_global": {"lam_mode": "global"},
}
REAL_METHODS = (*REAL_VARIANTS, "classical", "centralized")


# --------------------------------------------------------------------------------------------------------
# Part 1: synthetic data
# --------------------------------------------------------------------------------------------------------


def cell_name(cell: dict[str, Any]) -> str:
    return f"{cell['split']}, K={cell['clients']}, f={cell['fraction']:g}, {cell['quality']}"


def design(quick: bool = False) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """The cells (base first, then one factor at a time, then the stress cell; no duplicates) and, per factor,
    the names of its cells in level order."""
    cells: dict[str, dict[str, Any]] = {cell_name(BASE_CELL): BASE_CELL}
    factors: dict[str, list[str]] = {}
    varied = {"split": ("dirichlet 1.0", "dirichlet 0.1")} if quick else FACTORS
    for factor, levels in varied.items():
        factors[factor] = []
        for level in levels:
            cell = {**BASE_CELL, factor: level}
            cells.setdefault(cell_name(cell), cell)
            factors[factor].append(cell_name(cell))
    if not quick:
        cells.setdefault(cell_name(STRESS_CELL), STRESS_CELL)
    return list(cells.values()), factors


def split_points(groups: np.ndarray, clients: int, split: str, rng: np.random.Generator) -> list[np.ndarray]:
    """fedsim's partitioner: iid (equal random split) or dirichlet a (label skew on the group), min size 2."""
    from fedsim.data.partition import partition

    name, _, alpha = split.partition(" ")
    seed = int(rng.integers(2**31 - 1))
    return partition(name, groups, clients, seed=seed, alpha=float(alpha or 0.5), min_size=2)


def draw(cell: dict[str, Any], rng: np.random.Generator, points: int = POINTS) -> dict[str, Any]:
    """One repetition's clients (the Fed-PPI dicts), their weights p_i and stratified truths m_i."""
    groups = rng.integers(GROUPS, size=points)
    mu = groups / 3
    y = mu + rng.standard_normal(points)
    sigma = QUALITY[cell["quality"]]
    noise = rng.standard_normal(points)
    yhat = 1.8 + noise if sigma is None else y + BIAS + sigma * noise
    clients, sizes, means = [], [], []
    for part in split_points(groups, cell["clients"], cell["split"], rng):
        order = rng.permutation(part)
        labelled = max(1, math.floor(cell["fraction"] * len(part)))
        lab, unl = order[:labelled], order[labelled:]
        clients.append({"y": y[lab], "yhat": yhat[lab], "yhat_unlabeled": yhat[unl]})
        sizes.append(len(part))
        means.append(float(mu[part].mean()))
    p = np.array(sizes, dtype=float) / points
    means = np.array(means)
    return {"clients": clients, "p": p, "m": means, "stratified": float(p @ means)}


def rep_seed(cell: dict[str, Any], rep: int) -> np.random.Generator:
    return np.random.default_rng([SEED, zlib.crc32(cell_name(cell).encode()), rep])


def intervals(clients: list[dict[str, np.ndarray]], alpha: float = ALPHA) -> dict[str, tuple[Any, Any]]:
    from fedsim.ppi import fed_ppi_mean_ci

    return {name: fed_ppi_mean_ci(clients, alpha, **kwargs) for name, kwargs in METHODS.items()}


def run_cell(cell: dict[str, Any], reps: int, points: int = POINTS) -> dict[str, Any]:
    """Coverage and width of every method over ``reps`` repetitions of a cell."""
    covers = {m: {t: [] for t in TRUTHS} for m in METHODS if m != "per_client"}
    widths: dict[str, list[float]] = {m: [] for m in METHODS}
    own_covered = own_total = 0
    for rep in range(reps):
        data = draw(cell, rep_seed(cell, rep), points)
        truths = {"population": THETA, "stratified": data["stratified"]}
        for name, (lower, upper) in intervals(data["clients"]).items():
            if name == "per_client":
                own_covered += int(((lower <= data["m"]) & (data["m"] <= upper)).sum())
                own_total += len(data["m"])
                widths[name].append(float(np.median(upper - lower)))
                continue
            widths[name].append(upper - lower)
            for truth, value in truths.items():
                covers[name][truth].append(lower <= value <= upper)
    classical, centralized = np.array(widths["classical"]), np.array(widths["centralized"])
    methods = {}
    for name in METHODS:
        w = np.array(widths[name])
        if name == "per_client":
            coverage = {"client": coverage_stats(own_covered, own_total)}
        else:
            coverage = {t: coverage_stats(int(np.sum(covers[name][t])), reps) for t in TRUTHS}
        methods[name] = {
            "coverage": coverage, "median_width": float(np.median(w)),
            "ratio_classical": float(np.median(w / classical)), "ratio_centralized": float(np.median(w / centralized)),
        }  # fmt: skip
    return {"cell": cell, "name": cell_name(cell), "reps": reps, "methods": methods}


def coverage_stats(covered: int, total: int, alpha: float = ALPHA) -> dict[str, Any]:
    """Empirical coverage, its standard error, and whether it is within 1 - alpha +- 2 SE (else under / over)."""
    c = covered / total
    se = math.sqrt(c * (1 - c) / total)
    status = "ok" if abs(c - (1 - alpha)) <= 2 * se else ("under" if c < 1 - alpha else "over")
    return {"coverage": c, "se": se, "n": total, "within": status == "ok", "status": status}


def synthetic(reps: int, quick: bool, points: int = POINTS) -> dict[str, Any]:
    cells, factors = design(quick)
    results = []
    for i, cell in enumerate(cells):
        started = time.perf_counter()
        result = run_cell(cell, reps, points)
        result["wall_s"] = time.perf_counter() - started
        results.append(result)
        fed = result["methods"]["fed_ppi"]["coverage"]
        print(f"[{i + 1}/{len(cells)}] {result['name']}: {result['wall_s']:.1f} s, fed_ppi coverage "
              f"{fed['population']['coverage']:.3f} (population) {fed['stratified']['coverage']:.3f} (stratified)",
              file=sys.stderr)  # fmt: skip
    config = {
        "seed": SEED, "alpha": ALPHA, "points": points, "groups": GROUPS, "group_mean": "g / 3", "bias": BIAS,
        "quality_sigma": QUALITY, "useless": "Yhat = 1.8 + N(0, 1)", "theta": THETA, "reps": reps,
        "base": BASE_CELL, "stress": STRESS_CELL, "factors": {k: list(v) for k, v in FACTORS.items()},
        "methods": METHODS, "min_client_size": 2, "labelled_per_client": "max(1, floor(f * D_i))",
    }  # fmt: skip
    return {"config": config, "factors": factors, "cells": results}


SUMMARY_NOTES = """
Why. Against theta* = 1.5 the group draw is part of the error. The averaged imputed variance (the clients'
own variances) leaves out the between-client spread of the mean prediction that label skew creates; that
spread only matters when the imputed term is most of the interval (lam near 1 and a tiny rectifier: near-perfect
predictions, strong skew, a global lam), which is the one population failure (the stress cell), and the pooled
imputed variance repairs it. Elsewhere the pooled rectifier variance, which adds the between-client differences
of the rectifier means (wider still when each client tunes its own lam), more than makes up for it, so the
federated intervals lean conservative; against the stratified truth (the groups as drawn, whose variation every
interval still carries) most methods over-cover, the more so the larger f or the better the predictor.
per_client fails where clients hold few labels (K = 100, f = 0.01, dirichlet 0.1, and the flagged shortfalls
of 0.887, whose SE is over (client, rep) pairs and so small): each client tunes lam on its own few labels, the
intervals are normal with ddof-0 variances, and a client with a single label gets lam = 0 (one point has no
covariance) and an interval of width 0, exactly as ppi_py would. The same tiny clients cost the default
per-client lam its power: in the stress cell fed_ppi is about as wide as classical, while a global lam matches
centralized.
"""


def _fmt_cov(stats: dict[str, Any] | None) -> str:
    if stats is None:
        return "–"
    mark = {"ok": "", "under": " **under**", "over": " (over)"}[stats["status"]]
    return f"{stats['coverage']:.3f} ± {stats['se']:.3f}{mark}"


def failures(result: dict[str, Any]) -> dict[str, list[str]]:
    """Per truth, the '(method) in (cell) (coverage)' strings of under-covering methods."""
    out: dict[str, list[str]] = {"population": [], "stratified": [], "client": []}
    for cell in result["cells"]:
        for name, row in cell["methods"].items():
            for truth, stats in row["coverage"].items():
                if stats["status"] == "under":
                    out[truth].append(f"{name} in [{cell['name']}] ({stats['coverage']:.3f})")
    return out


def coverage_markdown(result: dict[str, Any]) -> str:
    config, cells = result["config"], {c["name"]: c for c in result["cells"]}
    fails = failures(result)
    lines = [
        "# Fed-PPI for a mean: coverage on synthetic data",
        "",
        f"{config['reps']} repetitions per cell, D = {config['points']} points, alpha = {config['alpha']}, "
        f"population truth theta* = {config['theta']:g}. A coverage is marked **under** / (over) when it is below "
        "/ above 0.9 by more than 2 SE (SE = sqrt(c(1-c)/reps); per_client: over the (client, rep) pairs). "
        "Widths: median over reps; ratios: median over reps of the per-rep ratio (per_client: the median client "
        "width).",
        "",
        "## Summary",
        "",
    ]
    names = {"population": "the population truth theta* = 1.5", "stratified": "the stratified truth sum p_i m_i",
             "client": "each client's own m_i (per_client)"}  # fmt: skip
    for truth, items in fails.items():
        if items:
            lines.append(f"- Under-coverage against {names[truth]}: " + "; ".join(items) + ".")
        else:
            lines.append(f"- No method under-covers against {names[truth]}.")
    lines += ["", SUMMARY_NOTES.strip(), ""]
    header = ("| level | method | coverage (population) | coverage (stratified) | median width | "
              "width / classical | width / centralized |")  # fmt: skip
    sections = {**result["factors"]}
    if cell_name(STRESS_CELL) in cells:
        sections["stress"] = [cell_name(STRESS_CELL)]
    for factor, names_ in sections.items():
        lines += ["", f"## {factor}" + (" (base: " + cell_name(BASE_CELL) + ")" if factor != "stress" else ""), ""]
        lines += [header, "|---|---|---|---|---|---|---|"]
        for name in names_:
            cell = cells[name]
            level = "stress: " + name if factor == "stress" else f"{factor} = {cell['cell'][factor]}"
            for method, row in cell["methods"].items():
                cov = row["coverage"]
                pop = _fmt_cov(cov.get("population"))
                strat = _fmt_cov(cov.get("stratified", cov.get("client")))
                lines.append(f"| {level} | {LABELS[method]} | {pop} | {strat} | {row['median_width']:.4f} | "
                             f"{row['ratio_classical']:.3f} | {row['ratio_centralized']:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def coverage_plot(result: dict[str, Any], out: Path) -> Path:
    """Coverage vs each factor (top: population truth, bottom: stratified truth / per_client's own m_i),
    with the band 0.9 +- 2 SE."""
    cells = {c["name"]: c for c in result["cells"]}
    panels = dict(result["factors"])
    if cell_name(STRESS_CELL) in cells:
        panels["stress"] = [cell_name(STRESS_CELL)]
    reps = result["config"]["reps"]
    band = 2 * math.sqrt(ALPHA * (1 - ALPHA) / reps)
    fig = _figure(3.2 * len(panels), 6.4)
    axes = fig.subplots(2, len(panels), squeeze=False, sharey=True)
    for col, (factor, names) in enumerate(panels.items()):
        xs = list(range(len(names)))
        ticks = ["stress"] if factor == "stress" else [str(cells[n]["cell"][factor]) for n in names]
        for row, truth in enumerate(TRUTHS):
            ax = axes[row, col]
            ax.axhspan(1 - ALPHA - band, 1 - ALPHA + band, color="0.85")
            ax.axhline(1 - ALPHA, color="k", linewidth=0.8)
            for method in METHODS:
                key = "client" if method == "per_client" else truth
                if method == "per_client" and truth == "population":
                    continue
                ys = np.array([cells[n]["methods"][method]["coverage"][key]["coverage"] for n in names])
                shifted = np.array(xs) + SHIFT[method]
                style = {"color": COLORS[method], "marker": MARKERS[method], "markersize": 4}
                ax.plot(shifted, np.maximum(ys, FLOOR), **style, label=LABELS[method])
                for x, y in zip(shifted, ys, strict=True):
                    if y < FLOOR:  # off the scale: a marker on the floor with the value
                        ax.annotate(f"{y:.2f}", (x, FLOOR), xytext=(3, 3), textcoords="offset points", fontsize=7,
                                    color=COLORS[method])  # fmt: skip
            ax.set_xticks(xs, ticks, fontsize=8)
            ax.set_xlim(-0.5, len(names) - 0.5)
            ax.grid(True, alpha=0.3)
            ax.set_title(f"{factor} ({truth} truth)", fontsize=9)
            if col == 0:
                ax.set_ylabel("coverage (target 0.9)")
    axes[0, 0].set_ylim(FLOOR - 0.01, 1.0)
    handles, labels = axes[1, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.suptitle(f"Fed-PPI mean: 90% coverage, {reps} reps per cell (grey: 0.9 ± 2 SE; below {FLOOR}: on the "
                 "floor, value written)", fontsize=10)  # fmt: skip
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(out)
    return out


def widths_plot(result: dict[str, Any], out: Path) -> Path:
    """Median width relative to classical vs the labelled fraction and vs predictor quality."""
    cells = {c["name"]: c for c in result["cells"]}
    panels = {k: v for k, v in result["factors"].items() if k in ("fraction", "quality")} or result["factors"]
    fig = _figure(5.0 * len(panels), 4.4)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (factor, names) in zip(axes, panels.items(), strict=True):
        xs = list(range(len(names)))
        for method in METHODS:
            if method == "per_client":
                continue
            ys = [cells[n]["methods"][method]["ratio_classical"] for n in names]
            dashed = "--" if "global" in method else "-"
            ax.plot(xs, ys, dashed, marker=MARKERS[method], color=COLORS[method], label=LABELS[method])
        ax.set_xticks(xs, [str(cells[n]["cell"][factor]) for n in names])
        ax.set_xlabel("labelled fraction f" if factor == "fraction" else factor)
        ax.set_ylabel("median width / classical width")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.set_title(f"interval width vs {factor} (others at base)", fontsize=10)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    return out


def intervals_plot(out: Path, points: int = POINTS) -> Path:
    """The paper's per-node figure: one repetition of the base cell with K = 5 clients."""
    cell = {**BASE_CELL, "clients": 5}
    data = draw(cell, np.random.default_rng([SEED, 5]), points)
    ci = intervals(data["clients"])
    rows = [(f"client {i + 1} (n={len(c['y'])})", ci["per_client"][0][i], ci["per_client"][1][i], "per_client")
            for i, c in enumerate(data["clients"])]  # fmt: skip
    rows += [(LABELS[m], ci[m][0], ci[m][1], m) for m in ("centralized", "fed_ppi", "classical")]
    fig = _figure(7.0, 4.2)
    ax = fig.add_subplot()
    for i, (_, lower, upper, method) in enumerate(rows):
        ax.plot([lower, upper], [i, i], color=COLORS[method], linewidth=7, solid_capstyle="butt")
        if method == "per_client":
            ax.plot([data["m"][i]], [i], "kv", markersize=5)
    ax.axvline(THETA, color="k", linestyle="--", linewidth=1, label="theta* = 1.5")
    ax.axvline(data["stratified"], color="k", linestyle=":", linewidth=1, label="stratified truth")
    ax.plot([], [], "kv", markersize=5, label="client's own m_i")
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("mean of Y")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"90% intervals, one repetition: {cell_name(cell)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    return out


# --------------------------------------------------------------------------------------------------------
# Part 2: a model fedsim trained
# --------------------------------------------------------------------------------------------------------


def train(config: dict[str, Any], out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train with fedsim (MNIST, or digits when MNIST cannot be loaded); returns (summary, the config used)."""
    from fedsim.simulation import simulate

    rounds = config["rounds"]
    config = {**config, "checkpoint_every": rounds, "eval_every": rounds}
    try:
        return simulate(config, out=out, plots=False), config
    except Exception as error:  # MNIST not available offline: fall back to digits
        if config["dataset"] != "mnist":
            raise
        rounds = REAL_FALLBACK_ROUNDS["digits"]
        print(f"mnist failed ({error}); falling back to digits, {rounds} rounds", file=sys.stderr)
        config = {**config, "dataset": "digits", "rounds": rounds, "checkpoint_every": rounds, "eval_every": rounds}
        return simulate(config, out=out, plots=False, overwrite=True), config


def real(config: dict[str, Any], seeds: int, fractions=REAL_FRACTIONS) -> dict[str, Any]:
    from fedsim.core.errors import FedsimError
    from fedsim.ppi.run import federated_ppi, load_predictions

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        summary, config = train(config, Path(tmp) / "run")
        train_s = time.perf_counter() - started
        print(f"trained {config['dataset']}: test accuracy {summary['final_test_accuracy']:.4f} ({train_s:.0f} s)",
              file=sys.stderr)  # fmt: skip
        preds = load_predictions(Path(tmp) / "run")
    sizes = [len(labels) for labels in preds.labels]
    result: dict[str, Any] = {
        "config": config, "alpha": ALPHA, "seeds": seeds, "test_accuracy": summary["final_test_accuracy"],
        "train_wall_s": train_s, "client_sizes": sizes, "classes": None, "fractions": {},
        "variants": REAL_VARIANTS,
    }  # fmt: skip
    for fraction in fractions:
        started = time.perf_counter()
        rows: dict[str, dict[str, list[Any]]] = {m: {"covers": [], "width": []} for m in REAL_METHODS}
        truths, skipped = [], None
        for seed in range(seeds):
            try:
                with np.errstate(divide="ignore", invalid="ignore"):  # its width_ratio may meet a 0 width
                    runs = {v: federated_ppi(preds, "mean", fraction, ALPHA, seed=seed, **kw)
                            for v, kw in REAL_VARIANTS.items()}  # fmt: skip
            except FedsimError as error:
                skipped = str(error)
                break
            truths.append(runs["fed_ppi"]["truth"])
            result["classes"] = runs["fed_ppi"]["coordinates"]
            for method in REAL_METHODS:
                source, column = (method, "fed_ppi") if method in REAL_VARIANTS else ("fed_ppi", method)
                row = runs[source]["methods"][column]
                rows[method]["covers"].append(row["covers"])
                rows[method]["width"].append(row["width"])
        key = f"{fraction:g}"
        if skipped:
            print(f"f = {fraction:g}: skipped ({skipped})", file=sys.stderr)
            result["fractions"][key] = {"skipped": skipped}
            continue
        classical = np.array(rows["classical"]["width"])
        centralized = np.array(rows["centralized"]["width"])
        methods = {}
        for method, row in rows.items():
            covers, width = np.array(row["covers"], dtype=float), np.array(row["width"])
            coverage = covers.mean(axis=0)
            methods[method] = {
                "coverage": coverage.tolist(), "se": np.sqrt(coverage * (1 - coverage) / seeds).tolist(),
                "median_width": np.median(width, axis=0).tolist(),
                "ratio_classical": median_ratio(width, classical),
                "ratio_centralized": median_ratio(width, centralized),
            }  # fmt: skip
        wall = time.perf_counter() - started
        labelled = [max(0, math.floor(fraction * s)) for s in sizes]
        result["fractions"][key] = {"labelled": int(sum(labelled)), "truth": np.mean(truths, axis=0).tolist(),
                                    "methods": methods, "wall_s": wall}  # fmt: skip
        fed = methods["fed_ppi"]
        print(f"f = {fraction:g}: {wall:.0f} s, fed_ppi coverage {min(fed['coverage']):.3f}..{max(fed['coverage']):.3f}"
              f", width / classical {np.median(fed['ratio_classical']):.3f}", file=sys.stderr)  # fmt: skip
    return result


def median_ratio(width: np.ndarray, reference: np.ndarray) -> list[float | None]:
    """Per column, the median over seeds of ``width / reference``, seeds with a zero reference left out (a
    class with no labelled example gives a classical interval of width 0); None when none is left."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(reference > 0, width / reference, np.nan)
    return [None if np.isnan(col).all() else float(np.nanmedian(col)) for col in ratio.T]


REAL_NOTES = """
The truth is the prevalence in the finite set of the clients' training points, and the labelled points are
drawn from that same set without replacement, so every interval (which treats the points as a sample from an
infinite population) is conservative: with lam the tuned parameter, the error is that of a simple random sample
of ``Y - lam (D / N) Yhat``, with variance about ``(1 - n / D) var(Y - lam Yhat) / n``, while the intervals add
``lam^2 var(Yhat) / N`` and drop the finite-population factor. Coverage above 0.9 is therefore expected, and
more so as the labelled fraction grows (the imputed term becomes a larger share), for every method.
"""


def real_markdown(result: dict[str, Any]) -> str:
    config = result["config"]
    lines = [
        "# Fed-PPI on a model fedsim trained: class prevalences",
        "",
        f"{config['dataset']}, {config['clients']} clients (Dirichlet {config['partition']['alpha']}), MLP "
        f"{config['model']['hidden']}, {config['rounds']} rounds: test accuracy {result['test_accuracy']:.4f}. "
        f"Client sizes (training points): {result['client_sizes']}. {result['seeds']} seeds per labelled fraction, "
        f"alpha = {result['alpha']}; the truth is each class's prevalence over all clients' training points. "
        "Variants: fed_ppi (lam per client, averaged imputed variance), fed_ppi_pooled (pooled imputed "
        "variance), fed_ppi_global (one lam). Ratios: median over seeds of the per-seed width ratio.",
        "",
        REAL_NOTES.strip(),
        "",
        "## Summary (over classes: coverage min..max, median of the per-class median width ratios)",
        "",
        "| labelled fraction | method | coverage | width / classical | width / centralized |",
        "|---|---|---|---|---|",
    ]
    for key, block in result["fractions"].items():
        if "skipped" in block:
            lines.append(f"| {key} | skipped | – | – | – |")
            continue
        for method, row in block["methods"].items():
            ratios = [np.median([r for r in row[k] if r is not None]) for k in ("ratio_classical", "ratio_centralized")]
            lines.append(f"| {key} | {method} | {min(row['coverage']):.3f}..{max(row['coverage']):.3f} | "
                         f"{ratios[0]:.3f} | {ratios[1]:.3f} |")  # fmt: skip
    for key, block in result["fractions"].items():
        lines += ["", f"## labelled fraction {key}", ""]
        if "skipped" in block:
            lines.append(f"Skipped: {block['skipped']}")
            continue
        methods = block["methods"]
        lines.append(f"{block['labelled']} labelled points in all.")
        lines.append("")
        lines.append("| class | truth | " + " | ".join(f"cov {m}" for m in REAL_METHODS) + " | "
                     + " | ".join(f"{m} / classical | {m} / centralized" for m in REAL_VARIANTS) + " |")  # fmt: skip
        lines.append("|---|---|" + "---|" * (len(REAL_METHODS) + 2 * len(REAL_VARIANTS)))
        for j, name in enumerate(result["classes"]):
            cov = " | ".join(f"{methods[m]['coverage'][j]:.3f}" for m in REAL_METHODS)
            ratios = " | ".join(f"{methods[m]['ratio_classical'][j]:.3f} | {methods[m]['ratio_centralized'][j]:.3f}"
                                for m in REAL_VARIANTS)  # fmt: skip
            lines.append(f"| {name} | {block['truth'][j]:.4f} | {cov} | {ratios} |")
    return "\n".join(lines) + "\n"


def real_plot(result: dict[str, Any], out: Path) -> Path:
    """Per labelled fraction: coverage per class (top) and median width / classical per class (bottom)."""
    blocks = {k: b for k, b in result["fractions"].items() if "skipped" not in b}
    fig = _figure(4.6 * max(1, len(blocks)), 6.6)
    axes = fig.subplots(2, max(1, len(blocks)), squeeze=False)
    classes = result["classes"] or []
    xs = np.arange(len(classes))
    offsets = np.linspace(-0.3, 0.3, len(REAL_METHODS))
    band = 2 * math.sqrt(ALPHA * (1 - ALPHA) / result["seeds"])
    for col, (key, block) in enumerate(blocks.items()):
        top, bottom = axes[0, col], axes[1, col]
        top.axhspan(1 - ALPHA - band, 1 - ALPHA + band, color="0.85")
        top.axhline(1 - ALPHA, color="k", linewidth=0.8)
        for offset, method in zip(offsets, REAL_METHODS, strict=True):
            row = block["methods"][method]
            top.plot(xs + offset, row["coverage"], "o", markersize=4, color=COLORS[method], label=method)
            if method in REAL_VARIANTS or method == "centralized":
                bottom.plot(xs, row["ratio_classical"], marker="o", markersize=4, color=COLORS[method], label=method)
        bottom.axhline(1.0, color=COLORS["classical"], linewidth=1, label="classical")
        for ax in (top, bottom):
            ax.set_xticks(xs, [str(j) for j in range(len(classes))])
            ax.grid(True, alpha=0.3)
        top.set_ylim(min(0.8, min(min(block["methods"][m]["coverage"]) for m in REAL_METHODS) - 0.02), 1.005)
        top.set_title(f"coverage, f = {key}", fontsize=10)
        bottom.set_title(f"median width / classical, f = {key}", fontsize=10)
        bottom.set_xlabel("class")
        bottom.set_ylim(0, 1.05)
    axes[0, 0].legend(fontsize=7, loc="lower left")
    axes[1, 0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, 0.93), ncol=2)
    config = result["config"]
    fig.suptitle(f"{config['dataset']} prevalences, test accuracy {result['test_accuracy']:.3f}, "
                 f"{result['seeds']} seeds", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=1000, help="repetitions per synthetic cell")
    parser.add_argument("--seeds", type=int, default=1000, help="label draws per labelled fraction (real data)")
    parser.add_argument("--points", type=int, default=POINTS, help="points per synthetic repetition")
    parser.add_argument("--part", choices=("all", "synthetic", "real"), default="all")
    parser.add_argument("--quick", action="store_true", help="2 cells, 10 reps, 3 rounds of digits, 5 seeds")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.part in ("all", "synthetic"):
        started = time.perf_counter()
        result = synthetic(10 if args.quick else args.reps, args.quick, args.points)
        intervals_plot(args.out / "intervals.png", args.points)
        result["wall_s"] = time.perf_counter() - started
        (args.out / "coverage.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / "coverage.md").write_text(coverage_markdown(result))
        coverage_plot(result, args.out / "coverage.png")
        widths_plot(result, args.out / "widths.png")
        print(f"part 1: {result['wall_s']:.0f} s", file=sys.stderr)
    if args.part in ("all", "real"):
        started = time.perf_counter()
        config = {**REAL_BASE, "dataset": "digits", "rounds": 3} if args.quick else REAL_BASE
        result = real(config, 5 if args.quick else args.seeds)
        result["wall_s"] = time.perf_counter() - started
        (args.out / "real.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / "real.md").write_text(real_markdown(result))
        real_plot(result, args.out / "real.png")
        print(f"part 2: {result['wall_s']:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
