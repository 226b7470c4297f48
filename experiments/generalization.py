"""Generalization of decentralized learning: what the high-probability theory predicts, measured over seeds.

Sweeps (each writes ``experiments/results/<sweep>.json`` and ``<sweep>.png``):

- ``topology``: D-SGD over ring, 2-D torus, static exponential and complete graphs of m = 16 nodes: final
  generalization gap (test loss - training loss of the average model, and the mean over nodes of each node's
  own gap) and consensus distance against the spectral gap of W.
- ``nodes``: the same against the number of nodes m (n = 40 samples per node, exponential graph), with the
  ``c / sqrt(m n)`` shape fitted by least squares on the medians.
- ``samples``: against the samples per node n (m = 16 nodes).
- ``markov``: against the mixing time of the ``markov-ring`` sampler (laziness varied), for D-SGD on the
  classification task and D-SGDA (adapt-then-combine) on AUC maximization.

Every point is repeated over seeds (the seed draws the training subset, the initialization and the sample
path); the plots show the median with 10-90% and min-max bands, the quantities the high-probability bounds are
about, beside the mean. Data: the embedded digits set (1,437 training images); each run trains on a random
subset of m * n of them, split i.i.d. over the nodes, and is tested on the 360 held-out images.

    python experiments/generalization.py --sweep all            # about 10 minutes on a 2-core CPU
    python experiments/generalization.py --sweep topology --seeds 5 --rounds 20
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

# experiments/topologies/ (graph files) would shadow the installed ``topologies`` package when this script's
# folder is first on sys.path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import topologies  # noqa: E402
from fedsim.data import load_dataset  # noqa: E402
from fedsim.simulation import simulate  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
QUANTILES = {"min": 0.0, "q10": 0.1, "median": 0.5, "q90": 0.9, "max": 1.0}
METRICS = ("generalization_gap", "node_generalization_gap", "consensus_distance")


def subset_npz(folder: Path, samples: int, seed: int) -> str:
    """A random subset of ``samples`` digits training images (plus the full test set) as an npz file."""
    ds = load_dataset("digits")
    pick = np.random.default_rng(seed).permutation(len(ds.y_train))[:samples]
    path = folder / f"digits-{samples}-s{seed}.npz"
    if not path.exists():
        np.savez(path, x=ds.x_train[pick], y=ds.y_train[pick], x_test=ds.x_test, y_test=ds.y_test)
    return str(path)


def graph_file(folder: Path, family: str, m: int) -> str:
    path = folder / f"{family}{m}.graphml"
    if not path.exists():
        topologies.save(topologies.build(family, m), path)
    return str(path)


def run_once(config: dict[str, Any]) -> dict[str, Any]:
    """One run; returns the final evaluation record merged with the summary, and the mean consensus distance."""
    records: list[dict[str, Any]] = []
    summary = simulate(config, None, on_round=records.append, plots=False)
    final = {k: v for k, v in records[-1].items() if isinstance(v, (int, float)) and v is not None}
    final["mean_consensus_distance"] = float(np.mean([r["consensus_distance"] for r in records]))
    for key in ("sampler_spectral_gap", "sampler_mixing_time"):
        if summary.get(key) is not None:
            final[key] = summary[key]
    return final


def quantiles(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    out = {name: float(np.quantile(arr, q)) for name, q in QUANTILES.items()}
    out["mean"] = float(arr.mean())
    return out


def sweep_points(points: list[dict[str, Any]], seeds: int, folder: Path, common: dict[str, Any]) -> list[dict]:
    """Run every point over ``seeds`` seeds; each point is ``{"x": value, "label": ..., "m": .., "n": .., ...}``
    with config overrides under ``"config"``."""
    rows = []
    for point in points:
        finals = []
        for seed in range(seeds):
            m, n = point["m"], point["n"]
            config = {**common, **point.get("config", {}), "seed": seed, "clients": m,
                      "dataset": {"name": "npz", "path": subset_npz(folder, m * n, seed)}}  # fmt: skip
            finals.append(run_once(config))
        keys = sorted(set.intersection(*(set(f) for f in finals)))
        stats = {k: quantiles([f[k] for f in finals]) for k in keys if k not in ("round",)}
        row = {k: v for k, v in point.items() if k != "config"}
        row.update(stats=stats, seeds=seeds)
        rows.append(row)
        med = stats["generalization_gap"]["median"]
        print(f"  {point['label']:>28}: generalization gap median {med:.4f}", flush=True)
    return rows


def common_config(rounds: int) -> dict[str, Any]:
    return dict(model="mlp", partition="iid", client_test_fraction=0.0, rounds=rounds, local_steps=5,
                batch_size=8, lr=0.05, eval_every=rounds, checkpoint_every=0)  # fmt: skip


def topology_sweep(seeds: int, rounds: int, folder: Path) -> dict:
    points = []
    for family in ("ring", "torus", "exponential", "complete"):
        path = graph_file(folder, family, 16)
        gap = topologies.spectral_gap(topologies.mixing_matrix(topologies.load(path)))
        points.append({"x": gap, "label": f"{family} (gap {gap:.3f})", "m": 16, "n": 40, "family": family,
                       "config": {"topology": path}})  # fmt: skip
    return {"xlabel": "spectral gap of W", "points": sweep_points(points, seeds, folder, common_config(rounds))}


def nodes_sweep(seeds: int, rounds: int, folder: Path, values=(4, 8, 16, 32)) -> dict:
    points = [
        {"x": m, "label": f"m={m}", "m": m, "n": 40, "config": {"topology": graph_file(folder, "exponential", m)}}
        for m in values
    ]
    return {"xlabel": "nodes m (n = 40 per node)", "points": sweep_points(points, seeds, folder, common_config(rounds))}


def samples_sweep(seeds: int, rounds: int, folder: Path, values=(10, 20, 40, 80)) -> dict:
    path = graph_file(folder, "exponential", 16)
    points = [{"x": n, "label": f"n={n}", "m": 16, "n": n, "config": {"topology": path}} for n in values]
    rows = sweep_points(points, seeds, folder, common_config(rounds))
    return {"xlabel": "samples per node n (m = 16)", "points": rows}


def markov_sweep(seeds: int, rounds: int, folder: Path, laziness=(0.1, 0.5, 0.8, 0.9, 0.95)) -> dict:
    path = graph_file(folder, "ring", 16)
    out = {"xlabel": "mixing time of the markov-ring sampler (transitions)", "series": {}}
    for name, extra in (
        ("D-SGD", {"strategy": "dsgd"}),
        ("D-SGDA (AUC)", {"strategy": "dsgda-atc", "problem": "auc", "model": "logreg", "lr": 0.02}),
    ):
        points = [
            {
                "x": None,
                "label": f"{name} laziness {lz}",
                "m": 16,
                "n": 41,
                "laziness": lz,
                "config": {"topology": path, "sampler": {"name": "markov-ring", "laziness": lz}, **extra},
            }
            for lz in laziness
        ]  # fmt: skip  (n = 41: an odd ring, so even laziness 0 would be aperiodic)
        rows = sweep_points(points, seeds, folder, common_config(rounds))
        for row in rows:
            row["x"] = row["stats"]["sampler_mixing_time"]["median"]
        out["series"][name] = rows
    return out


def fit_inverse_sqrt(rows: list[dict]) -> float:
    """Least-squares ``c`` in ``median gap ~ c / sqrt(m n)``."""
    basis = np.array([1.0 / math.sqrt(r["m"] * r["n"]) for r in rows])
    target = np.array([r["stats"]["generalization_gap"]["median"] for r in rows])
    return float(basis @ target / (basis @ basis))


def plot_sweep(name: str, result: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = result.get("series") or {"D-SGD": result["points"]}
    metrics = [m for m in METRICS if m != "consensus_distance"] + ["mean_consensus_distance"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4))
    for ax, metric in zip(axes, metrics, strict=True):
        for label, rows in series.items():
            rows = sorted((r for r in rows if metric in r["stats"]), key=lambda r: r["x"])
            if not rows:
                continue
            xs = np.array([r["x"] for r in rows], dtype=float)

            def get(q: str, rows=rows, metric=metric) -> np.ndarray:
                return np.array([r["stats"][metric][q] for r in rows])

            (line,) = ax.plot(xs, get("median"), marker="o", label=f"{label} median")
            ax.plot(xs, get("mean"), ls="--", color=line.get_color(), alpha=0.7, label=f"{label} mean")
            ax.fill_between(xs, get("q10"), get("q90"), color=line.get_color(), alpha=0.25)
            ax.fill_between(xs, get("min"), get("max"), color=line.get_color(), alpha=0.1)
            if name in ("nodes", "samples") and metric == "generalization_gap":
                c = fit_inverse_sqrt(rows)
                fine = np.linspace(xs.min(), xs.max(), 100)
                mn = fine * rows[0]["n"] if name == "nodes" else rows[0]["m"] * fine
                ax.plot(fine, c / np.sqrt(mn), color="k", ls=":", label=f"{c:.2f} / sqrt(mn)")
        ax.set_title(metric.replace("_", " "))
        ax.set_xlabel(result["xlabel"])
        if name == "markov":
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{name} sweep: median, mean, 10-90% and min-max over seeds")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


SWEEPS = {"topology": topology_sweep, "nodes": nodes_sweep, "samples": samples_sweep, "markov": markov_sweep}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", choices=[*SWEEPS, "all"], default="all")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    names = list(SWEEPS) if args.sweep == "all" else [args.sweep]
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            print(f"{name} sweep ({args.seeds} seeds, {args.rounds} rounds)", flush=True)
            result = SWEEPS[name](args.seeds, args.rounds, Path(tmp))
            result.update(sweep=name, rounds=args.rounds)
            (args.out / f"generalization_{name}.json").write_text(json.dumps(result, indent=1) + "\n")
            print(f"wrote {plot_sweep(name, result, args.out / f'generalization_{name}.png')}", flush=True)


if __name__ == "__main__":
    main()
