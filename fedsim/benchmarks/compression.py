"""``fedsim bench compression``: what compressing the uplink costs per round.

Workload: mnist5k, the default MLP (784-100-10), ``clients`` clients (Dirichlet 0.5), all of them every round, 10
local steps of batch 32, on CPU. One run per compressor: ``none``, ``topk`` (ratio 0.01, error feedback),
``qsgd`` (16 levels), ``sign``, ``int8`` and ``powersgd`` (rank 4, error feedback). The issue's target: top-k,
QSGD and sign at most 1.2x an uncompressed round.

Timed inside the engine: ``Simulation.round`` (training, compression, aggregation; no evaluation), median over
``rounds`` rounds after one untimed round, the compressors alternating round by round so all see the same
machine. And as whole ``fedsim simulate --no-plots`` processes of ``rounds`` rounds (median of ``repeats``).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from fedsim.benchmarks.versus_flower import median_processes
from fedsim.config import make_config
from fedsim.simulation import make_simulation

UPLINKS: dict[str, Any] = {
    "none": "none",
    "topk": {"name": "topk", "ratio": 0.01, "feedback": "ef"},
    "qsgd": {"name": "qsgd", "levels": 16},
    "sign": "sign",
    "int8": "int8",
    "powersgd": {"name": "powersgd", "rank": 4},
}
TARGETS = ("topk", "qsgd", "sign")
"""The compressors the issue's 20% target names."""


def workloads(clients: int, rounds: int) -> dict[str, dict[str, Any]]:
    """One config per compressor (see the module docstring)."""
    base = {
        "dataset": "mnist5k", "clients": clients, "local_steps": 10, "batch_size": 32, "lr": 0.05,
        "partition": {"name": "dirichlet", "alpha": 0.5}, "rounds": rounds, "eval_every": rounds,
        "checkpoint_every": 0, "seed": 0, "device": "cpu",
    }  # fmt: skip
    return {name: {**base, "uplink": uplink} for name, uplink in UPLINKS.items()}


def bench_compression(clients: int = 100, rounds: int = 10, repeats: int = 3, processes: bool = True) -> dict[str, Any]:
    """Median seconds per round of each compressor and its ratio to the uncompressed round."""
    configs = workloads(clients, rounds)
    result: dict[str, Any] = {"workloads": configs, "rounds": rounds, "repeats": repeats}
    sims = {name: make_simulation(make_config(config)) for name, config in configs.items()}
    states = {name: sim.initial_state() for name, sim in sims.items()}
    seconds: dict[str, list[float]] = {name: [] for name in configs}
    for r in range(1, rounds + 2):  # round 1 untimed
        for name, sim in sims.items():
            started = time.perf_counter()
            states[name], _ = sim.round(r, states[name])
            if r > 1:
                seconds[name].append(time.perf_counter() - started)
    for name, sim in sims.items():
        result[f"{name}_round_s"] = statistics.median(seconds[name])
        result[f"{name}_ratio_round"] = result[f"{name}_round_s"] / statistics.median(seconds["none"])
        result[f"{name}_compression_ratio"] = sim.model_bytes / sim.uplink_bytes
        sim.close()
    if processes:
        walls = median_processes(configs, repeats)
        for name in configs:
            result[f"{name}_process_s"] = walls[name]
            result[f"{name}_ratio_process"] = walls[name] / walls["none"]
    result["within_target"] = all(result[f"{name}_ratio_round"] <= 1.2 for name in TARGETS)
    return result
