"""``fedsim bench privacy``: what differential privacy costs in wall time.

Workload: digits, MLP 64-64-10, ``clients`` clients (Dirichlet 0.5), all of them every round, 10 local steps of
batch 32, ``rounds`` rounds, evaluation only at the end. Four runs:

- ``fedavg``: the plain local step (shuffled batches of 32);
- ``dp_sgd``: record-level DP-SGD (Poisson batches of expected size 32, per-sample gradients clipped and
  noised at every step); the target is at most 3x ``fedavg``;
- ``fedavg_q`` and ``dp_fedavg``: FedAvg at ``fraction`` 0.5 and client-level DP-FedAvg (clipped, noised
  mean of Poisson-sampled clients, rate 0.5); the target is at most 1.1x.

Timed inside ``simulate`` (median of ``repeats`` calls after one untimed call of each, alternating) and as
whole ``fedsim simulate --no-plots`` processes.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from fedsim.benchmarks.versus_flower import median_processes
from fedsim.simulation import simulate


def workloads(clients: int, rounds: int) -> dict[str, dict[str, Any]]:
    """The four configs (see the module docstring)."""
    base = {
        "dataset": "digits", "model": {"name": "mlp", "hidden": [64, 64]}, "clients": clients, "local_steps": 10,
        "batch_size": 32, "lr": 0.05, "partition": {"name": "dirichlet", "alpha": 0.5}, "rounds": rounds,
        "eval_every": rounds, "checkpoint_every": 0, "seed": 0,
    }  # fmt: skip
    dp_sgd = {"name": "dp-sgd", "clip": 1.0, "noise_multiplier": 1.0}
    dp_fedavg = {"name": "dp-fedavg", "clip": 1.0, "noise_multiplier": 1.0}
    return {
        "fedavg": base,
        "dp_sgd": {**base, "privacy": dp_sgd},
        "fedavg_q": {**base, "fraction": 0.5},
        "dp_fedavg": {**base, "fraction": 0.5, "privacy": dp_fedavg},
    }


PAIRS = {"dp_sgd": "fedavg", "dp_fedavg": "fedavg_q"}


def bench_privacy(clients: int = 100, rounds: int = 5, repeats: int = 3, processes: bool = True) -> dict[str, Any]:
    """Seconds per call of each run and the private runs' ratios to their plain twins."""
    configs = workloads(clients, rounds)
    result: dict[str, Any] = {"workloads": configs, "repeats": repeats}
    for config in configs.values():
        simulate(config, None, plots=False)  # untimed: first-call costs
    calls: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(repeats):
        for name, config in configs.items():
            started = time.perf_counter()
            summary = simulate(config, None, plots=False)
            calls[name].append(time.perf_counter() - started)
            result[f"{name}_final_test_accuracy"] = summary["final_test_accuracy"]
    for name in configs:
        result[f"{name}_call_s"] = statistics.median(calls[name])
    for private, plain in PAIRS.items():
        result[f"{private}_ratio_call"] = result[f"{private}_call_s"] / result[f"{plain}_call_s"]
    if processes:
        walls = median_processes(configs, repeats)
        for name in configs:
            result[f"{name}_process_s"] = walls[name]
        for private, plain in PAIRS.items():
            result[f"{private}_ratio_process"] = result[f"{private}_process_s"] / result[f"{plain}_process_s"]
    return result
