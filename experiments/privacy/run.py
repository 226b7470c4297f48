"""Byzantine robustness and privacy-utility: the attack suite against the robust aggregators and DP-BREM, and
DP-FedAvg, DP-FedAvg + median and DP-BREM at epsilon in {1, 2, 4, 8, inf}.

Workload: MNIST (60,000 training images), 100 clients (Dirichlet 0.5), an MLP 784-64-10, every client every
round, one SGD step of batch 32 per round (lr 0.1), 50 rounds. DP-BREM computes one clipped gradient per
client per iteration, so every method takes one local step: the baselines are FedSGD with the aggregator in
place of the mean.

- **Robustness grid:** 20% of the clients Byzantine; attacks none, label flipping, sign flipping, IPM, ALIE and
  min-max; aggregators mean, median, trimmed mean (20% off each end), Krum (f = 20), centered clipping, RFA,
  and DP-BREM (its defaults: C = 5, R = 10, sigma = 0.02, beta = 0.9). Final test accuracy over 3 seeds.
- **Privacy-utility** at delta = 1e-5, without an attack and with ALIE:
  - DP-FedAvg: client-level, Poisson rate 0.5, update clip 0.1, central noise, z from the target epsilon;
  - DP-FedAvg + median: the same clip and z, every client adding the whole noise, coordinate median;
  - DP-BREM: record-level, sigma chosen so that its (our) accountant reaches the target epsilon.
  The units differ: DP-FedAvg protects a whole client, DP-BREM one record.

    python experiments/privacy/run.py                 # both parts, 3 seeds (about an hour on 2 cores)
    python experiments/privacy/run.py --quick         # a smoke run: 2 rounds, 1 seed, a few cells
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BASE: dict[str, Any] = {
    "dataset": "mnist", "clients": 100, "partition": {"name": "dirichlet", "alpha": 0.5},
    "model": {"name": "mlp", "hidden": [64]}, "local_steps": 1, "batch_size": 32, "lr": 0.1, "rounds": 50,
    "checkpoint_every": 0,
}  # fmt: skip
BYZANTINE = 0.2
ATTACKS = ("none", "label_flip", "sign_flip", "ipm", "alie", "minmax")
AGGREGATORS: dict[str, dict[str, Any]] = {
    "mean": {},
    "median": {"aggregator": "median"},
    "trimmed_mean": {"aggregator": {"name": "trimmed_mean", "fraction": 0.2}},
    "krum": {"aggregator": {"name": "krum", "byzantine": 20}},
    "centered_clipping": {"aggregator": "centered_clipping"},
    "rfa": {"aggregator": "rfa"},
    "dp-brem": {"privacy": "dp-brem"},
}
EPSILONS = (1.0, 2.0, 4.0, 8.0, math.inf)
DELTA = 1e-5
DP_FEDAVG_Q, DP_FEDAVG_CLIP = 0.5, 0.1


def attack(name: str) -> dict[str, Any]:
    return {} if name == "none" else {"attack": {"name": name, "fraction": BYZANTINE}}


def final_accuracy(config: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    from fedsim.simulation import simulate

    summary = simulate(config, None, plots=False)
    return summary["final_test_accuracy"], summary


def robustness(seeds: int, rounds: int, attacks=ATTACKS, aggregators=AGGREGATORS) -> list[dict[str, Any]]:
    runs = []
    for name in attacks:
        for aggregator, setting in aggregators.items():
            for seed in range(seeds):
                config = {**BASE, "rounds": rounds, "eval_every": rounds, **setting, **attack(name), "seed": seed}
                started = time.perf_counter()
                accuracy, summary = final_accuracy(config)
                runs.append({"attack": name, "aggregator": aggregator, "seed": seed, "accuracy": accuracy,
                             "epsilon": summary.get("epsilon"), "wall_s": time.perf_counter() - started})  # fmt: skip
                print(f"{name:10s} {aggregator:17s} seed {seed}: {accuracy:.4f}", file=sys.stderr)
    return runs


def dp_brem_sigma(target: float, rounds: int, seed: int) -> float:
    """The smallest DP-BREM sigma whose (our) epsilon after ``rounds`` is at most ``target`` (1e-3 relative)."""
    from fedsim.config import make_config
    from fedsim.simulation import make_simulation

    sim = make_simulation(make_config({**BASE, "rounds": rounds, "privacy": "dp-brem", "seed": seed}))
    privacy = sim.privacy
    sim.close()

    def eps(sigma: float) -> float:
        privacy.noise_multiplier = sigma
        return privacy.epsilon(1.0, rounds)

    low, high = 0.0, 0.01
    while eps(high) > target:
        low, high = high, 2 * high
    while high - low > 1e-3 * high:
        mid = (low + high) / 2
        low, high = (low, mid) if eps(mid) <= target else (mid, high)
    return high


def private_configs(target: float, rounds: int, seed: int) -> dict[str, dict[str, Any]]:
    """DP-FedAvg, DP-FedAvg + median and DP-BREM at ``target`` epsilon (inf: no noise)."""
    from fedsim.privacy import noise_for

    z = 0.0 if math.isinf(target) else noise_for(target, DP_FEDAVG_Q, rounds, DELTA)
    sigma = 0.0 if math.isinf(target) else dp_brem_sigma(target, rounds, seed)
    central = {"name": "dp-fedavg", "clip": DP_FEDAVG_CLIP, "noise_multiplier": z, "delta": DELTA}
    local = {**central, "mode": "local", "local_noise": "full"}
    return {
        "dp-fedavg": {"fraction": DP_FEDAVG_Q, "privacy": central},
        "dp-fedavg+median": {"fraction": DP_FEDAVG_Q, "privacy": local, "aggregator": "median"},
        "dp-brem": {"privacy": {"name": "dp-brem", "noise_multiplier": sigma, "delta": DELTA}},
    }


def privacy_utility(seeds: int, rounds: int, epsilons=EPSILONS, attacks=("none", "alie")) -> list[dict[str, Any]]:
    runs = []
    for target in epsilons:
        for seed in range(seeds):
            configs = private_configs(target, rounds, seed)
            for name in attacks:
                for method, setting in configs.items():
                    config = {**BASE, "rounds": rounds, "eval_every": rounds, **setting, **attack(name), "seed": seed}
                    accuracy, summary = final_accuracy(config)
                    privacy = config["privacy"]
                    runs.append({"target_epsilon": target, "attack": name, "method": method, "seed": seed,
                                 "accuracy": accuracy, "epsilon": summary.get("epsilon"),
                                 "noise_multiplier": privacy["noise_multiplier"]})  # fmt: skip
                    print(f"eps {target} {name:5s} {method:17s} seed {seed}: {accuracy:.4f} "
                          f"(epsilon {summary.get('epsilon')})", file=sys.stderr)  # fmt: skip
    return runs


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def robustness_table(runs: list[dict[str, Any]]) -> str:
    attacks = list(dict.fromkeys(r["attack"] for r in runs))
    aggregators = list(dict.fromkeys(r["aggregator"] for r in runs))
    lines = ["| aggregator | " + " | ".join(attacks) + " |", "|---|" + "---|" * len(attacks)]
    for aggregator in aggregators:
        cells = [_cell([r["accuracy"] for r in runs if r["attack"] == a and r["aggregator"] == aggregator])
                 for a in attacks]  # fmt: skip
        lines.append(f"| {aggregator} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def privacy_table(runs: list[dict[str, Any]]) -> str:
    targets = sorted({r["target_epsilon"] for r in runs})
    header = " | ".join("inf" if math.isinf(t) else f"eps {t:g}" for t in targets)
    lines = [f"| method | attack | {header} |", "|---|---|" + "---|" * len(targets)]
    for method in dict.fromkeys(r["method"] for r in runs):
        for name in dict.fromkeys(r["attack"] for r in runs):
            cells = [_cell([r["accuracy"] for r in runs if r["method"] == method and r["attack"] == name
                            and r["target_epsilon"] == t]) for t in targets]  # fmt: skip
            lines.append(f"| {method} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def heatmap(runs: list[dict[str, Any]], out: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    attacks = list(dict.fromkeys(r["attack"] for r in runs))
    aggregators = list(dict.fromkeys(r["aggregator"] for r in runs))
    grid = [[statistics.mean(r["accuracy"] for r in runs if r["attack"] == a and r["aggregator"] == g)
             for a in attacks] for g in aggregators]  # fmt: skip
    fig = Figure(figsize=(8, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(attacks)), attacks, rotation=30, ha="right")
    ax.set_yticks(range(len(aggregators)), aggregators)
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black")
    ax.set_title(f"final test accuracy, {BYZANTINE:.0%} Byzantine (mean over seeds)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(out)
    return out


def utility_plot(runs: list[dict[str, Any]], out: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    targets = sorted({r["target_epsilon"] for r in runs})
    xs = list(range(len(targets)))
    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for method in dict.fromkeys(r["method"] for r in runs):
        for name, style in (("none", "-"), ("alie", "--")):
            ys = [statistics.mean(r["accuracy"] for r in runs if r["method"] == method and r["attack"] == name
                                  and r["target_epsilon"] == t) for t in targets]  # fmt: skip
            ax.plot(xs, ys, style, marker="o", label=f"{method} ({'ALIE' if name == 'alie' else 'no attack'})")
    ax.set_xticks(xs, ["inf" if math.isinf(t) else f"{t:g}" for t in targets])
    ax.set_xlabel("epsilon (delta 1e-5; DP-FedAvg: per client, DP-BREM: per record)")
    ax.set_ylabel("final test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=BASE["rounds"])
    parser.add_argument("--part", choices=("all", "robustness", "privacy"), default="all")
    parser.add_argument("--quick", action="store_true", help="2 rounds, 1 seed, a few cells (smoke run)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    seeds, rounds = (1, 2) if args.quick else (args.seeds, args.rounds)
    if args.part in ("all", "robustness"):
        picked = {k: AGGREGATORS[k] for k in ("mean", "median", "dp-brem")} if args.quick else AGGREGATORS
        runs = robustness(seeds, rounds, ("none", "alie") if args.quick else ATTACKS, picked)
        (args.out / "robustness.json").write_text(json.dumps({"base": BASE, "rounds": rounds, "runs": runs},
                                                             indent=1) + "\n")  # fmt: skip
        (args.out / "robustness.md").write_text(robustness_table(runs) + "\n")
        heatmap(runs, args.out / "robustness.png")
        print(robustness_table(runs))
    if args.part in ("all", "privacy"):
        runs = privacy_utility(seeds, rounds, (4.0, math.inf) if args.quick else EPSILONS)
        (args.out / "privacy_utility.json").write_text(json.dumps({"base": BASE, "rounds": rounds, "runs": runs},
                                                                  indent=1) + "\n")  # fmt: skip
        (args.out / "privacy_utility.md").write_text(privacy_table(runs) + "\n")
        utility_plot(runs, args.out / "privacy_utility.png")
        print(privacy_table(runs))


if __name__ == "__main__":
    main()
