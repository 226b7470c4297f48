"""``fedsim bench flower``: fedsim against Flower 1.41's simulation engine on one workload, timed two ways.

The workload (README "Performance"): digits, MLP 64-64-10, 100 clients with Dirichlet(0.5) label skew, 20
rounds of 10 SGD steps on batches of 32 drawn with replacement, lr 0.05, every client trained and the global
model evaluated every round. Flower's side is :mod:`fedsim.benchmarks.flower_baseline`: the workload as a
Flower user writes it (``ClientApp`` with ``torch.optim.SGD``, ``FedAvg``, ``run_simulation``), on the same
partition and initial model.

- **inside the call**: the wall time of ``fedsim.simulate(...)`` (median of ``repeats`` calls in one process,
  after one untimed call) against ``run_flower(...)`` (Ray's start included, as a Flower user waits for it);
- **whole process**: ``fedsim simulate ...`` as a user types it (with its plots, and with ``--no-plots``)
  against a Python process that runs the Flower baseline, from start to exit.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedsim.simulation import simulate

WORKLOAD: dict[str, Any] = {
    "dataset": "digits", "model": {"name": "mlp", "hidden": [64, 64]}, "clients": 100, "rounds": 20,
    "local_steps": 10, "batch_size": 32, "sampler": "iid", "lr": 0.05,
    "partition": {"name": "dirichlet", "alpha": 0.5}, "eval_every": 1, "checkpoint_every": 0, "seed": 0,
}  # fmt: skip

_FLOWER_PROCESS = """
import json, sys, time
from fedsim.benchmarks.flower_baseline import run_flower
result = run_flower(json.loads(sys.argv[1]), cpus_per_client=float(sys.argv[2]))
print(json.dumps(result))
"""


def cli_flags(workload: dict[str, Any]) -> list[str]:
    """``fedsim simulate`` flags for ``workload`` (components with options through ``--set``)."""
    flags: list[str] = []
    for key, value in workload.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, dict):
            flags += [flag, value["name"]]
            for option, option_value in value.items():
                if option != "name":
                    flags += ["--set", f"{key}.{option}={json.dumps(option_value)}"]
        else:
            flags += [flag, str(value)]
    return flags


def _timed_process(argv: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} ... failed: {done.stderr.strip().splitlines()[-1:]}")
    return wall, done.stdout


def median_processes(configs: dict[str, dict[str, Any]], repeats: int) -> dict[str, float]:
    """Median wall seconds of whole ``fedsim simulate --quiet --no-plots`` processes of each config, the
    configs alternating in every repeat (so all see the same machine)."""
    walls: dict[str, list[float]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as folder:
        for i in range(repeats):
            for name, config in configs.items():
                argv = [sys.executable, "-m", "fedsim.cli", "simulate", *cli_flags(config), "--quiet", "--no-plots",
                        "--out", str(Path(folder) / f"{name}-{i}")]  # fmt: skip
                walls[name].append(_timed_process(argv)[0])
    return {name: statistics.median(values) for name, values in walls.items()}


def bench_flower(repeats: int = 3, flower: bool = True, cpus_per_client: float = 1.0,
                 workload: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Both ratios (Flower's time over fedsim's) on ``workload`` (default :data:`WORKLOAD`). ``flower=False``
    times fedsim alone (no Flower installed)."""
    workload = dict(workload or WORKLOAD)
    result: dict[str, Any] = {"workload": workload, "repeats": repeats}
    simulate(workload, None, plots=False)  # untimed: first-call costs (data cache, kernels)
    calls = []
    for _ in range(repeats):
        started = time.perf_counter()
        summary = simulate(workload, None, plots=False)
        calls.append(time.perf_counter() - started)
    result["fedsim_call_s"] = statistics.median(calls)
    result["fedsim_final_test_accuracy"] = summary["final_test_accuracy"]
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "fedsim.cli", "simulate", *cli_flags(workload), "--quiet"]
        for name, extra in (("fedsim_process_s", []), ("fedsim_process_no_plots_s", ["--no-plots"])):
            walls = []
            for i in range(repeats):
                out = Path(folder) / f"{name}-{i}"
                walls.append(_timed_process([*command, *extra, "--out", str(out)])[0])
            result[name] = statistics.median(walls)
    if flower:
        wall, stdout = _timed_process([sys.executable, "-c", _FLOWER_PROCESS, json.dumps(workload),
                                       str(cpus_per_client)])  # fmt: skip
        inside = json.loads(stdout.strip().splitlines()[-1])
        result["flower_call_s"], result["flower_process_s"] = inside["wall_s"], wall
        result["flower_final_test_accuracy"] = inside["final_test_accuracy"]
        result["ratio_call"] = result["flower_call_s"] / result["fedsim_call_s"]
        result["ratio_process"] = result["flower_process_s"] / result["fedsim_process_s"]
        result["ratio_process_no_plots"] = result["flower_process_s"] / result["fedsim_process_no_plots_s"]
    return result
