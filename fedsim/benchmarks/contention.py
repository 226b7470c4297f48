"""``fedsim bench contention``: the round time of the benchmark workload alone and next to one CPU-bound process.

Each measurement is a fresh Python process, as a user's run is, in one of four set-ups:

- ``fedsim``: what ``fedsim simulate`` does by default (:mod:`fedsim.threads`): a thread count fixed for the run
  (the CPUs the process may use), and idle threads that spin, unless other processes already keep the CPUs busy
  when the run starts (then they sleep: ``OMP_WAIT_POLICY=PASSIVE``);
- ``adaptive``: ``--threads adaptive``: the thread count follows the CPUs other processes leave free, round by
  round (may change the last bits of results);
- ``passive``: ``OMP_WAIT_POLICY=PASSIVE`` always, fixed thread count;
- ``torch-default``: torch's defaults (threads spin before they sleep; torch's own thread count).

Each runs the same rounds alone and then next to a busy loop (one process spinning on a core, started before
the run). The report gives each set-up's median round time in both conditions and the ratios to its own idle
time and to fedsim's; the busy process is stopped before a result is printed.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from fedsim.benchmarks.versus_flower import WORKLOAD  # the Flower comparison's workload

_WORKER = r"""
import json, os, sys, time, warnings
setup, rounds, repeats, threads, workload = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
if setup == "passive":
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
elif setup == "torch-default":
    os.environ.pop("OMP_WAIT_POLICY", None)
else:  # fedsim, adaptive: as the CLI does before torch loads
    from fedsim.threads import choose_wait_policy
    choose_wait_policy()
policy = os.environ.get("OMP_WAIT_POLICY")  # what OpenMP starts with
import torch
from fedsim.config import make_config
from fedsim.simulation import make_simulation
from fedsim.threads import usable_cpus
warnings.simplefilter("ignore")
if setup == "torch-default":
    threads = str(torch.get_num_threads())
elif setup == "passive" and threads == "auto":
    threads = str(usable_cpus())
elif setup == "adaptive":
    threads = "adaptive"
values = {**json.loads(workload), "rounds": rounds, "eval_every": rounds}
if threads != "auto":
    values["threads"] = threads
sim = make_simulation(make_config(values))
sim.run()  # warm-up
times, counts = [], []
for _ in range(repeats):
    start = time.perf_counter()
    sim.run()
    times.append((time.perf_counter() - start) / rounds)
    counts.append(torch.get_num_threads())
print(json.dumps({"round_s": sorted(times)[len(times) // 2], "threads": counts[-1],
                  "wait_policy": policy or "unset (spin, then sleep)"}))
"""


SETUPS = ("fedsim", "adaptive", "passive", "torch-default")


def _busy_loop() -> subprocess.Popen:
    """One CPU-bound process (a Python busy loop), stopped by the caller."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def _measure(setup: str, rounds: int, repeats: int, threads: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", _WORKER, setup, str(rounds), str(repeats), threads, json.dumps(WORKLOAD)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"benchmark worker ({setup}) failed: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def bench_contention(rounds: int = 10, repeats: int = 3, trials: int = 1, threads: str = "auto") -> dict[str, Any]:
    """Median round time of each set-up alone and next to one busy process (``trials`` alternations of the two
    conditions, medians over them); ratios busy/idle per set-up and against fedsim's idle time."""
    rows: dict[str, dict[str, list[float]]] = {s: {"idle": [], "busy": []} for s in SETUPS}
    info: dict[str, Any] = {}
    started = time.perf_counter()
    for _ in range(trials):
        for setup in rows:
            idle = _measure(setup, rounds, repeats, threads)
            rows[setup]["idle"].append(idle["round_s"])
            busy_process = _busy_loop()
            try:
                time.sleep(0.2)  # the busy loop is running
                busy = _measure(setup, rounds, repeats, threads)
            finally:
                busy_process.kill()
                busy_process.wait()
            rows[setup]["busy"].append(busy["round_s"])
            info[setup] = {
                "threads_idle": idle["threads"], "threads_busy": busy["threads"],
                "wait_policy_idle": idle["wait_policy"], "wait_policy_busy": busy["wait_policy"],
            }  # fmt: skip
    result: dict[str, Any] = {"workload": WORKLOAD, "rounds": rounds, "repeats": repeats, "trials": trials,
                              "cpus": os.cpu_count()}  # fmt: skip
    fedsim_idle = statistics.median(rows["fedsim"]["idle"])
    for setup, times in rows.items():
        idle, busy = statistics.median(times["idle"]), statistics.median(times["busy"])
        result[setup] = {**info[setup], "idle_round_s": idle, "busy_round_s": busy, "busy_over_idle": busy / idle,
                         "busy_over_fedsim_idle": busy / fedsim_idle}  # fmt: skip
    result["wall_s"] = time.perf_counter() - started
    return result
