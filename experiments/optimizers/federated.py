"""Federated comparison: FedAvg on Shakespeare by speaker with local Adam, FOAM and GWT.

``fedsim simulate`` runs (one per optimizer, same seed, data, client sampling and initialization) of the
``char_transformer`` with one client per speaker; every client's local optimizer state is fresh each round
and stacked over the clients of a round in the vectorized engine. Reports test accuracy and loss curves and
the optimizer state held per client and summed over all clients (``optimizer_state_bytes_per_client`` /
``optimizer_state_bytes_all_clients`` of the run summaries).

Writes ``experiments/results/optimizers/federated.{json,md,png}``; the runs themselves go to
``experiments/optimizers/runs/`` (ignored by git).

    python experiments/optimizers/federated.py                  # about 15-30 minutes on 2 CPU cores
    python experiments/optimizers/federated.py --rounds 3       # a quick look
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedsim.simulation import simulate

HERE = Path(__file__).resolve().parent
OUT = HERE.parents[1] / "experiments" / "results" / "optimizers"
OPTIMIZERS = {"Adam": "adam", "FOAM": "foam", "GWT": "gwt"}


def base_config(args) -> dict:
    return {
        "dataset": {"name": "shakespeare", "max_samples": args.max_samples}, "model": "char_transformer",
        "partition": "natural", "clients": args.clients, "fraction": args.fraction, "rounds": args.rounds,
        "local_steps": args.local_steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
        "eval_every": args.eval_every, "checkpoint_every": 0,
    }  # fmt: skip


def read_curve(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [
        {"round": r["round"], "test_accuracy": r["test_accuracy"], "test_loss": r["test_loss"]}
        for r in rows
        if r.get("test_accuracy") is not None
    ]


def write(results: dict, config: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "federated.json").write_text(json.dumps({"config": config, "results": results}, indent=1))
    adam = results["Adam"]
    lines = [
        "# Memory-efficient local optimizers in FedAvg: Shakespeare by speaker",
        "",
        f"Config (`fedsim simulate`, plus `optimizer`): {json.dumps(config)}.",
        "",
        "| local optimizer | final test acc | best test acc | final test loss | state per client (MB) | "
        "all clients (MB) | vs Adam |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        s = r["summary"]
        lines.append(
            f"| {name} | {s['final_test_accuracy']:.4f} | {s['best_test_accuracy']:.4f} | "
            f"{s['final_test_loss']:.4f} | {s['optimizer_state_bytes_per_client'] / 1e6:.3f} | "
            f"{s['optimizer_state_bytes_all_clients'] / 1e6:.1f} | "
            f"{s['optimizer_state_bytes_all_clients'] / adam['summary']['optimizer_state_bytes_all_clients']:.3f} |"
        )
    (out / "federated.md").write_text("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in results.items():
        rounds = [c["round"] for c in r["curve"]]
        axes[0].plot(rounds, [c["test_accuracy"] for c in r["curve"]], marker="o", label=name)
        axes[1].plot(rounds, [c["test_loss"] for c in r["curve"]], marker="o", label=name)
    for ax, label in zip(axes, ("test accuracy", "test loss"), strict=True):
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"FedAvg, Shakespeare, {config['clients']} speakers, local optimizer compared")
    fig.tight_layout()
    fig.savefig(out / "federated.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-samples", type=int, default=250, help="windows per speaker (train + test)")
    parser.add_argument("--eval-every", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--runs", type=Path, default=HERE / "runs")
    args = parser.parse_args()
    config = base_config(args)
    results = {}
    for name, optimizer in OPTIMIZERS.items():
        run = args.runs / f"{optimizer}-r{args.rounds}-s{args.seed}"
        summary = simulate({**config, "optimizer": optimizer}, run, overwrite=True, plots=False)
        results[name] = {"summary": summary, "curve": read_curve(run)}
        print(f"{name}: final accuracy {summary['final_test_accuracy']:.4f}", flush=True)
    write(results, config, args.out)


if __name__ == "__main__":
    main()
