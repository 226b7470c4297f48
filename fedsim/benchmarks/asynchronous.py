"""``fedsim bench async``: wall time per client update of asynchronous FedBuff against synchronous FedAvg.

Workload: digits, MLP 64-64-10, ``clients`` clients (Dirichlet 0.5), 10 SGD steps of batch 32 (i.i.d.
sampler), log-normal system speeds (``sigma``, default 1: the spread of speeds sets how many in-flight clients
wait to be trained together, ``mean_vectorized_batch``). Synchronous FedAvg trains ``concurrency`` clients per round for
``rounds`` rounds; FedBuff keeps ``concurrency`` clients in flight with a buffer of ``buffer_size`` and runs
``rounds * concurrency / buffer_size`` server steps: the same number of client updates. Both evaluate only
at the end. Timed two ways: inside ``simulate`` (median of ``repeats`` calls after one untimed call of each)
and as whole ``fedsim simulate --no-plots`` processes. The target is FedBuff at most 1.5x the synchronous
cost per client update.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from fedsim.benchmarks.versus_flower import median_processes
from fedsim.core.errors import FedsimError
from fedsim.simulation import simulate


def workloads(
    clients: int, concurrency: int, buffer_size: int, rounds: int, sigma: float = 1.0
) -> dict[str, dict[str, Any]]:
    """The synchronous and asynchronous configs (same client updates)."""
    base = {
        "dataset": "digits", "model": {"name": "mlp", "hidden": [64, 64]}, "clients": clients, "local_steps": 10,
        "batch_size": 32, "sampler": "iid", "lr": 0.05, "partition": {"name": "dirichlet", "alpha": 0.5},
        "system": {"name": "lognormal", "sigma": sigma}, "checkpoint_every": 0, "seed": 0,
    }  # fmt: skip
    steps = rounds * concurrency // buffer_size
    sync = {**base, "strategy": "fedavg", "fraction": concurrency / clients, "rounds": rounds, "eval_every": rounds}
    fedbuff = {"name": "fedbuff", "buffer_size": buffer_size, "concurrency": concurrency}
    return {"fedavg": sync, "fedbuff": {**base, "strategy": fedbuff, "rounds": steps, "eval_every": steps}}


def bench_async(
    clients: int = 200, concurrency: int = 100, buffer_size: int = 10, rounds: int = 20, repeats: int = 3,
    processes: bool = True, sigma: float = 1.0,
) -> dict[str, Any]:  # fmt: skip
    """Seconds per client update of each, and FedBuff's ratio to FedAvg (see the module docstring)."""
    if concurrency > clients:
        raise FedsimError(f"--concurrency {concurrency} exceeds --clients {clients}")
    configs = workloads(clients, concurrency, buffer_size, rounds, sigma)
    updates = rounds * concurrency
    result: dict[str, Any] = {"workloads": configs, "client_updates": updates, "repeats": repeats}
    for config in configs.values():
        simulate(config, None, plots=False)  # untimed: first-call costs
    calls: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(repeats):  # alternate, so both see the same machine
        for name, config in configs.items():
            started = time.perf_counter()
            summary = simulate(config, None, plots=False)
            calls[name].append(time.perf_counter() - started)
            result[f"{name}_final_test_accuracy"] = summary["final_test_accuracy"]
            result[f"{name}_virtual_time_s"] = summary["virtual_time_s"]
            if name == "fedbuff":
                result["mean_vectorized_batch"] = summary["mean_vectorized_batch"]
    for name in configs:
        result[f"{name}_call_s"] = statistics.median(calls[name])
        result[f"{name}_s_per_update"] = result[f"{name}_call_s"] / updates
    result["ratio_call"] = result["fedbuff_call_s"] / result["fedavg_call_s"]
    if processes:
        walls = median_processes(configs, repeats)
        for name in configs:
            result[f"{name}_process_s"] = walls[name]
        result["ratio_process"] = result["fedbuff_process_s"] / result["fedavg_process_s"]
    return result
