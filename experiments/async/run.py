"""Synchronous vs asynchronous FL under heterogeneous device speeds, on the virtual clock.

Digits, 100 clients (Dirichlet 0.5), MLP, 10 local SGD steps of batch 32, lr 0.05; clients' compute speed,
bandwidths and latency log-normal around phone-class medians with sigma 0 / 0.5 / 1.0 / 1.5. Methods:

- ``fedavg``: synchronous FedAvg, 10 clients per round (waits for the slowest);
- ``fedavg-deadline``: the same with ``deadline_s`` (clients slower than it are dropped);
- ``fedavg-overselect``: the same with ``over_selection: 0.3`` (13 selected, the first 10 kept);
- ``fedavg-all``: synchronous FedAvg with every client (100) each round, FedBuff's concurrency;
- ``fedasync-constant`` / ``-polynomial`` / ``-hinge``: FedAsync, 10 clients in flight, alpha 0.6;
- ``fedbuff``: FedBuff, K = 10, C = 100 (every client in flight), polynomial staleness weighting, server lr 1.

Each run reports ``time_to_accuracy`` (virtual seconds to 50/70/80/90% test accuracy) and its final accuracy;
over seeds we report the median and the min-max spread, and FedBuff's speed-up over synchronous FedAvg to
the target accuracy (Nguyen et al. 2022 claim several times less time).

    python experiments/async/run.py                       # 5 seeds, all sigmas (about 10 minutes on 2 cores)
    python experiments/async/run.py --seeds 1 --quick     # a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SIGMAS = (0.0, 0.5, 1.0, 1.5)
TARGET = "0.8"
BASE: dict[str, Any] = {
    "dataset": "digits", "clients": 100, "partition": {"name": "dirichlet", "alpha": 0.5}, "model": "mlp",
    "local_steps": 10, "batch_size": 32, "sampler": "iid", "lr": 0.05, "checkpoint_every": 0,
}  # fmt: skip
DEADLINE_S = 0.8
"""About twice the median client's round (0.44 s: 320 samples at 1 ms, the model down at 20 and up at 5 Mbit/s)."""


def methods(quick: bool = False) -> dict[str, dict[str, Any]]:
    """Each method's config (without system and seed). ``quick``: a few rounds of each."""
    sync_rounds, async_steps, buff_steps = (3, 6, 6) if quick else (60, 600, 200)
    sync = {"strategy": "fedavg", "fraction": 0.1, "rounds": sync_rounds, "eval_every": 1}
    fedasync = {"rounds": async_steps, "eval_every": 1 if quick else 5}
    return {
        "fedavg": sync,
        "fedavg-deadline": {**sync, "deadline_s": DEADLINE_S},
        "fedavg-overselect": {**sync, "over_selection": 0.3},
        "fedavg-all": {**sync, "fraction": 1.0},
        **{
            f"fedasync-{s}": {**fedasync, "strategy": {"name": "fedasync", "concurrency": 10, "staleness": s}}
            for s in ("constant", "polynomial", "hinge")
        },
        "fedbuff": {
            "strategy": {"name": "fedbuff", "buffer_size": 10, "concurrency": 100}, "rounds": buff_steps,
            "eval_every": 1 if quick else 2,
        },
    }  # fmt: skip


def run_all(seeds: int = 5, sigmas=SIGMAS, quick: bool = False, names: list[str] | None = None) -> dict[str, Any]:
    """Every (sigma, method, seed) run's summary figures, and the medians and spreads over seeds."""
    from fedsim.simulation import simulate

    chosen = {k: v for k, v in methods(quick).items() if names is None or k in names}
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        for sigma in sigmas:
            for name, config in chosen.items():
                for seed in range(seeds):
                    full = {**BASE, **config, "seed": seed, "system": {"name": "lognormal", "sigma": sigma}}
                    summary = simulate(full, Path(folder) / f"{name}-{sigma}-{seed}", plots=False)
                    runs.append({
                        "sigma": sigma, "method": name, "seed": seed,
                        "time_to_accuracy": summary["time_to_accuracy"],
                        "final_test_accuracy": summary["final_test_accuracy"],
                        "virtual_time_s": summary["virtual_time_s"],
                        "wall_s": summary["total_time_s"],
                    })  # fmt: skip
                    print(f"sigma {sigma} {name} seed {seed}: to {TARGET} in "
                          f"{summary['time_to_accuracy'][TARGET]} s, final {summary['final_test_accuracy']:.3f}",
                          file=sys.stderr)  # fmt: skip
    return {"target": TARGET, "seeds": seeds, "runs": runs, "table": table(runs)}


def _spread(values: list[float | None]) -> dict[str, Any]:
    reached = [v for v in values if v is not None]
    if not reached:
        return {"median": None, "min": None, "max": None, "reached": 0, "of": len(values)}
    # a run that never reached the target counts as infinitely slow in the median
    ordered = sorted(reached) + [float("inf")] * (len(values) - len(reached))
    median = statistics.median(ordered)
    return {"median": None if median == float("inf") else median, "min": min(reached), "max": max(reached),
            "reached": len(reached), "of": len(values)}  # fmt: skip


def table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (sigma, method): time to the target (median, min, max over seeds; runs that never reach it count
    as infinitely slow), final accuracy (median), and the speed-up of the median over synchronous FedAvg."""
    out = []
    for sigma in sorted({r["sigma"] for r in runs}):
        here = [r for r in runs if r["sigma"] == sigma]
        sync = _spread([r["time_to_accuracy"][TARGET] for r in here if r["method"] == "fedavg"])["median"]
        for method in dict.fromkeys(r["method"] for r in here):
            mine = [r for r in here if r["method"] == method]
            t = _spread([r["time_to_accuracy"][TARGET] for r in mine])
            out.append({
                "sigma": sigma, "method": method, "time_to_target_s": t,
                "final_accuracy_median": statistics.median(r["final_test_accuracy"] for r in mine),
                "speedup_vs_fedavg": (sync / t["median"]) if sync and t["median"] else None,
            })  # fmt: skip
    return out


def markdown(result: dict[str, Any]) -> str:
    """The README table: virtual seconds to the target accuracy, median [min-max] over seeds."""
    methods_seen = list(dict.fromkeys(row["method"] for row in result["table"]))
    sigmas = sorted({row["sigma"] for row in result["table"]})
    lines = ["| method | " + " | ".join(f"sigma {s:g}" for s in sigmas) + " |",
             "|---|" + "---|" * len(sigmas)]  # fmt: skip
    for method in methods_seen:
        cells = []
        for sigma in sigmas:
            row = next(r for r in result["table"] if r["method"] == method and r["sigma"] == sigma)
            t = row["time_to_target_s"]
            if t["median"] is None:
                cells.append(f"not reached ({t['reached']}/{t['of']})")
                continue
            cell = f"{t['median']:.1f} [{t['min']:.1f}-{t['max']:.1f}]"
            if t["reached"] < t["of"]:
                cell += f" ({t['reached']}/{t['of']})"
            if row["speedup_vs_fedavg"] and method != "fedavg":
                cell += f", {row['speedup_vs_fedavg']:.1f}x"
            cells.append(cell)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict[str, Any], out: Path) -> Path:
    """Median virtual time to the target accuracy per method against sigma (log y)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for method in dict.fromkeys(r["method"] for r in result["table"]):
        rows = [r for r in result["table"] if r["method"] == method and r["time_to_target_s"]["median"]]
        if rows:
            xs = [r["sigma"] for r in rows]
            ax.plot(xs, [r["time_to_target_s"]["median"] for r in rows], marker="o", label=method)
            ax.fill_between(xs, [r["time_to_target_s"]["min"] for r in rows],
                            [r["time_to_target_s"]["max"] for r in rows], alpha=0.12)  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("log-normal sigma of client speeds")
    ax.set_ylabel(f"virtual seconds to {float(result['target']):.0%} test accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a few rounds of each method (smoke run)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    result = run_all(args.seeds, quick=args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "table.md").write_text(markdown(result) + "\n")
    plot(result, args.out / "time_to_accuracy.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
