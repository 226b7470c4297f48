"""Engine benchmark suite (issue: vectorized federated engine).

Runs ``fedsim.benchmarks.engine.bench_engine`` on the cases of the engine issue and writes one JSON file with all
results plus a markdown table on stdout. Usage:

    python experiments/bench_engine.py --device cpu --out experiments/results/engine_cpu.json
    python experiments/bench_engine.py --device cuda --out experiments/results/engine_h100.json

Everything runs in one process so the ratios compare like with like; each path is warmed up and the
median of the repeats is reported.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedsim.benchmarks.engine import bench_engine

CPU_CASES = [
    dict(dataset="digits", model="mlp", clients=1000, repeats=5),
    dict(dataset="digits", model="mlp", clients=1000, repeats=5, grad_mode="vmap"),
    dict(dataset="digits", model="mlp", clients=1000, repeats=3, model_args={"hidden": [200, 200]}),
    dict(dataset="digits", model="mlp", clients=10000, repeats=3),
    dict(dataset="digits", model="lenet5", clients=1000, repeats=3),
    dict(dataset="digits", model="cnn", clients=1000, repeats=3),
]
GPU_CASES = [
    dict(dataset="mnist5k", model="cnn", clients=1000, repeats=5),
    dict(dataset="mnist5k", model="cnn", clients=1000, repeats=5, grad_mode="vmap"),
    dict(dataset="mnist5k", model="lenet5", clients=1000, repeats=5),
    dict(dataset="digits", model="mlp", clients=1000, repeats=5),
    dict(dataset="digits", model="mlp", clients=10000, repeats=3),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/engine.json"))
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    cases = GPU_CASES if args.device == "cuda" else CPU_CASES
    results = []
    print("| model | clients | grad | chunk | vectorized samples/s | x sequential | x centralized |")
    print("|---|---|---|---|---|---|---|")
    for case in cases:
        r = bench_engine(device=args.device, local_steps=args.local_steps, batch_size=args.batch_size, **case)
        results.append(r)
        seq = r.get("vectorized_over_sequential")
        name = r["model"] + (f" {case['model_args']}" if "model_args" in case else "")
        print(
            f"| {name} ({r['num_params']:,} params) | {r['clients']} | {r['grad_mode']} | {r['chunk_size']} | "
            f"{r['vectorized']['samples_per_s']:,.0f} | {seq:.1f} | {r['vectorized_over_centralized']:.2f} |",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
