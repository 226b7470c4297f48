"""CPU threads (fedsim.threads): the count comes from affinity and cgroup quota, the OpenMP wait policy is
passive unless the user chose one, ``--threads`` overrides, and no thread setting changes a result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedsim import threads
from fedsim.cli import main
from fedsim.core.errors import FedsimError


def _cgroup(tmp_path: Path, lines: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    proc = tmp_path / "proc_cgroup"
    proc.write_text(lines)
    return root, proc


def test_cgroup_v2_quota_is_the_smallest_along_the_path(tmp_path):
    root, proc = _cgroup(tmp_path, "0::/job/step\n", {"cpu.max": "max 100000\n", "job/cpu.max": "300000 100000\n",
                                                       "job/step/cpu.max": "150000 100000\n"})  # fmt: skip
    assert threads.cgroup_cpu_limit(root, proc) == 1.5


def test_cgroup_v2_without_quota_and_v1_quota(tmp_path):
    root, proc = _cgroup(tmp_path, "0::/\n", {"cpu.max": "max 100000\n"})
    assert threads.cgroup_cpu_limit(root, proc) is None
    root, proc = _cgroup(tmp_path / "v1", "4:cpu,cpuacct:/docker/abc\n2:memory:/docker/abc\n",
                         {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "200000\n",
                          "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
                          "cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
                          "cpu,cpuacct/cpu.cfs_period_us": "100000\n"})  # fmt: skip
    assert threads.cgroup_cpu_limit(root, proc) == 2.0


def test_unreadable_cgroup_means_no_quota(tmp_path):
    assert threads.cgroup_cpu_limit(tmp_path / "none", tmp_path / "missing") is None


def test_usable_cpus_caps_affinity_by_the_quota(monkeypatch):
    monkeypatch.setattr(threads, "affinity_cpus", lambda: 8)
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 2.5)
    assert threads.usable_cpus() == 2
    assert threads.thread_count(share=2) == 1 and threads.thread_count(5) == 5
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 0.5)
    assert threads.usable_cpus() == 1
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)
    assert threads.usable_cpus() == 8 and threads.thread_count(share=3) == 2


def test_import_fedsim_leaves_the_wait_policy_alone():
    """The policy stays OpenMP's default (spinning is 60% faster on an idle machine); the governor adapts the
    thread count instead."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = "import os, fedsim, fedsim.simulation; print(os.environ.get('OMP_WAIT_POLICY'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["None"]


class _FakeMachine:
    """Busy seconds of this process's CPUs, this process's CPU seconds and a clock, advanced by hand."""

    def __init__(self):
        self.t = self.busy = self.own = 0.0

    def run(self, seconds: float, own_cores: float, other_cores: float) -> None:
        self.t += seconds
        self.own += own_cores * seconds
        self.busy += (own_cores + other_cores) * seconds


def _governor(machine: _FakeMachine, limit: int = 2, cpus: int = 2) -> threads.ThreadGovernor:
    return threads.ThreadGovernor(limit, interval_s=0.5, busy_seconds=lambda: machine.busy,
                                  own_seconds=lambda: machine.own, clock=lambda: machine.t, cpus=cpus)  # fmt: skip


def test_governor_runs_on_the_cpus_others_leave_free():
    import torch

    machine = _FakeMachine()
    governor = _governor(machine)
    assert governor.update() == 2 and torch.get_num_threads() == 2  # nothing measured yet: the limit
    machine.run(1.0, own_cores=1.33, other_cores=0.67)  # one busy process next to our two threads
    assert governor.update() == 1 and torch.get_num_threads() == 1
    machine.run(0.2, own_cores=1.0, other_cores=0.0)  # too soon to measure again: unchanged
    assert governor.update() == 1
    machine.run(1.0, own_cores=1.0, other_cores=0.0)  # the busy process ended
    assert governor.update() == 2
    machine.run(1.0, own_cores=2.0, other_cores=0.3)  # light background load keeps both threads
    assert governor.update() == 2
    machine.run(1.0, own_cores=0.5, other_cores=3.5)  # everything busy: still one thread
    assert governor.update() == 1


def test_governor_respects_its_limit_and_unreadable_stats():
    machine = _FakeMachine()
    governor = _governor(machine, limit=3, cpus=8)  # a cgroup quota of 3 on an 8-CPU affinity
    machine.run(1.0, own_cores=3.0, other_cores=4.0)
    assert governor.update() == 3  # 4 CPUs free, but the quota allows 3
    blind = threads.ThreadGovernor(2, busy_seconds=lambda: None, cpus=2)
    assert blind.update() == 2


def test_proc_stat_reader_counts_busy_time():
    reader = threads._proc_stat_reader()
    first = reader()
    if first is None:
        pytest.skip("no /proc/stat here")
    sum(i * i for i in range(300_000))  # some CPU time
    assert reader() >= first


def test_the_thread_count_changes_no_result(tmp_path, cli):
    """--threads 1 and --threads 2 give the same metrics (dense and convolutional models), and a run resumed with
    another thread count is not refused as a changed config."""
    for model in ("mlp", "lenet5"):
        rows = []
        for n in (1, 2):
            out = tmp_path / f"{model}-{n}"
            code, _, err = cli(["simulate", "--rounds", "2", "--clients", "4", "--local-steps", "2", "--model", model,
                                "--threads", str(n), "--no-plots", "--quiet", "--out", str(out)])  # fmt: skip
            assert code == 0, err
            rows.append([{k: v for k, v in json.loads(line).items() if k != "time_s"}
                         for line in (out / "metrics.jsonl").read_text().splitlines()])  # fmt: skip
        assert rows[0] == rows[1], model
    code, _, err = cli(["simulate", "--resume", str(tmp_path / "mlp-1"), "--rounds", "3", "--threads", "2"])
    assert code == 0, err


def test_threads_flag_sets_torch_threads_for_the_run_and_gives_them_back(tmp_path, cli):
    import torch

    before = torch.get_num_threads()
    code, _, err = cli(["simulate", "--rounds", "1", "--clients", "2", "--threads", "1", "--no-plots", "--quiet",
                        "--out", str(tmp_path / "run")])  # fmt: skip
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["threads"] == 1
    assert "threads: 1" in (tmp_path / "run" / "config.yaml").read_text()
    assert torch.get_num_threads() == before  # a library caller keeps its own setting
    code, _, err = cli(["simulate", "--rounds", "1", "--clients", "2", "--threads", "adaptive", "--no-plots",
                        "--quiet", "--out", str(tmp_path / "adaptive")])  # fmt: skip
    assert code == 0, err
    assert "threads: adaptive" in (tmp_path / "adaptive" / "config.yaml").read_text()
    code, _, err = cli(["simulate", "--threads", "many", "--out", str(tmp_path / "bad")])
    assert code == 2 and "threads" in err


def test_the_default_thread_count_ignores_the_load(tmp_path, monkeypatch):
    """Without threads: adaptive no governor runs: the count is fixed for the run, whatever the load."""
    from fedsim.config import make_config
    from fedsim.simulation import make_simulation

    with make_simulation(make_config({"rounds": 1, "clients": 2})) as sim:
        assert sim.governor is None
    with make_simulation(make_config({"rounds": 1, "clients": 2, "threads": "adaptive"})) as sim:
        assert sim.governor is not None


def test_wait_policy_is_passive_only_next_to_busy_processes(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    readings = iter([10.0, 10.0])  # nobody else busy
    monkeypatch.setattr(threads, "_proc_stat_reader", lambda: lambda: next(readings))
    assert threads.choose_wait_policy(sample_s=0.0) is None and "OMP_WAIT_POLICY" not in os.environ
    readings = iter([10.0, 11.0])  # one core's worth of someone else's work over the sample
    monkeypatch.setattr(threads.time, "monotonic", iter([0.0, 1.0]).__next__)
    assert threads.choose_wait_policy(sample_s=0.0) == "PASSIVE" and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert threads.choose_wait_policy(sample_s=0.0) is None  # the user's choice stands


def test_no_plots_then_plot_standard(tmp_path, cli):
    out = tmp_path / "run"
    code, _, err = cli(["simulate", "--rounds", "2", "--clients", "3", "--no-plots", "--quiet", "--out", str(out)])
    assert code == 0, err
    assert not list(out.glob("*.png")) and (out / "summary.json").is_file()
    code, stdout, err = cli(["plot", str(out), "--standard"])
    assert code == 0, err
    assert {"convergence.png", "drift.png"} <= {p.name for p in out.glob("*.png")}
    code, _, err = cli(["plot", str(out), "--standard", "--metric", "drift"])
    assert code == 2 and "drop --metric/--out" in err
    code, _, err = cli(["plot", str(out), "--standard", "--x", "virtual_time_s"])
    assert code == 2 and "drop --metric/--out/--x" in err
    code, _, err = cli(["plot", str(out), "--x", "time", "--out", str(tmp_path / "x.png")])
    assert code == 2 and "unknown x axis 'time'" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli(["plot", str(tmp_path), "--standard"])
    assert code == 2 and "not a results folder" in err
    seeds = tmp_path / "seeds"
    code, _, err = cli(["simulate", "--seeds", "0-1", "--rounds", "2", "--clients", "3", "--no-plots", "--quiet",
                        "--out", str(seeds)])  # fmt: skip
    assert code == 0, err
    assert not list(seeds.rglob("*.png"))
    code, _, err = cli(["plot", str(seeds), "--standard"])
    assert code == 0, err
    assert (seeds / "seeds.png").is_file() and (seeds / "seed-1" / "convergence.png").is_file()
    probe = tmp_path / "probe"
    ring = Path(__file__).resolve().parents[1] / "experiments" / "topologies" / "ring16.graphml"
    code, _, err = cli(["simulate", "--topology", str(ring), "--probe", "stability", "--rounds", "2", "--no-plots",
                        "--quiet", "--out", str(probe)])  # fmt: skip
    assert code == 0, err
    code, _, err = cli(["plot", str(probe), "--standard"])
    assert code == 0, err
    assert (probe / "stability.png").is_file() and (probe / "consensus.png").is_file()


def test_bench_contention_reports_both_setups(monkeypatch, capsys):
    """The benchmark's schema (a small workload; no timing is asserted)."""
    from fedsim.benchmarks import contention

    monkeypatch.setattr(contention, "WORKLOAD", {**contention.WORKLOAD, "clients": 4, "local_steps": 2})
    code = main(["bench", "contention", "--rounds", "1", "--repeats", "1"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    assert result["fedsim"]["wait_policy_busy"] == os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    assert result["passive"]["wait_policy_idle"] == "PASSIVE"
    assert result["torch-default"]["wait_policy_busy"].startswith("unset")
    for setup in ("fedsim", "adaptive", "passive", "torch-default"):
        assert result[setup]["idle_round_s"] > 0 and result[setup]["busy_round_s"] > 0
        assert result[setup]["busy_over_idle"] > 0


def test_omp_num_threads_in_the_environment_is_the_default(monkeypatch):
    """Ray sets OMP_NUM_THREADS to a worker's num_cpus; fedsim inside such a worker keeps it."""
    monkeypatch.setattr(threads, "usable_cpus", lambda: 8)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.thread_count() == 1 and threads.thread_count(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")
    assert threads.thread_count() == 8


def test_seeds_side_by_side_write_the_same_folders(tmp_path, cli):
    """--jobs 2 runs the seeds in two worker processes with one thread each here; every seed's metrics and the
    seeds summary equal the one-at-a-time run's, and every round reaches the progress callback."""
    from fedsim.seeds import run_seeds

    base = {"rounds": 2, "clients": 4, "local_steps": 2}
    records = {1: [], 2: []}
    for jobs in (1, 2):
        run_seeds(base, [0, 1, 2], tmp_path / f"jobs{jobs}", plots=False, jobs=jobs, on_round=records[jobs].append)
    for seed in (0, 1, 2):
        rows = [[{k: v for k, v in json.loads(line).items() if k != "time_s"}
                 for line in (tmp_path / f"jobs{jobs}" / f"seed-{seed}" / "metrics.jsonl").read_text().splitlines()]
                for jobs in (1, 2)]  # fmt: skip
        assert rows[0] == rows[1]
    summaries = [json.loads((tmp_path / f"jobs{j}" / "seeds_summary.json").read_text())["final"] for j in (1, 2)]
    for key in ("final_test_accuracy", "final_train_loss"):
        assert summaries[0][key] == summaries[1][key]
    assert sorted((r["seed"], r["round"]) for r in records[2]) == sorted((r["seed"], r["round"]) for r in records[1])
    code, _, err = cli(["simulate", "--jobs", "2", "--rounds", "1", "--out", str(tmp_path / "x")])
    assert code == 2 and "--jobs runs seeds side by side; it needs --seeds" in err


def failing_task(kind, on_round=None):
    """Tasks for run_parallel's failure paths."""
    import time as _time

    if kind == "error":
        raise FedsimError("seed 3: bad config")
    if kind == "unpicklable":
        return lambda: None  # a lambda cannot be pickled
    if kind == "vanish":
        os._exit(0)  # ends without a word
    _time.sleep(30)  # "slow": must be stopped by the parent
    return kind


@pytest.mark.parametrize(
    ("kind", "error", "message"),
    [("error", FedsimError, "seed 3: bad config"), ("unpicklable", RuntimeError, "could not be sent"),
     ("vanish", RuntimeError, "ended without a result")],
)  # fmt: skip
def test_run_parallel_reports_a_failed_task_and_stops_the_others(kind, error, message):
    import time

    from fedsim import parallel

    started = time.monotonic()
    with pytest.raises(error, match=message):
        parallel.run_parallel([(failing_task, ("slow",), {}), (failing_task, (kind,), {})], jobs=2)
    assert time.monotonic() - started < 25  # the slow task was stopped, not waited for


def test_threads_with_the_ray_executor_is_refused():
    from fedsim.config import make_config

    with pytest.raises(FedsimError, match="not the Ray actors'"):
        make_config({"threads": 2, "executor": "ray"})
