"""CPU threads: how many torch may use here, and an OpenMP wait policy that does not collapse on a busy machine.

torch's OpenMP threads spin-wait between parallel regions by default. When another process holds one of the
cores, a spinning thread and the thread it waits for share that core, and a round that takes 0.08 s alone
takes 1.5 s next to one CPU-bound process. Two remedies, both applied unless the user chose otherwise:

- ``OMP_WAIT_POLICY=PASSIVE`` (:func:`prepare_openmp`): idle threads sleep instead of spinning. OpenMP reads it
  once, when torch loads its runtime, so it is set by ``import fedsim`` (hence by the CLI and by every Ray
  worker, which imports fedsim to unpickle its actor) before torch is imported. A process that imported torch
  before fedsim keeps the policy it started with.
- the thread count (:func:`configure`): the CPUs this process may actually use, that is its CPU affinity,
  capped by a cgroup CPU quota (containers, Slurm, Kubernetes), divided among parallel runs
  (``share``), or exactly ``threads`` when given (``--threads N``).

Neither changes results: the kernels fedsim uses give the same numbers for every thread count on this
machine (tested), and the wait policy only decides what idle threads do.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

WAIT_POLICY = "OMP_WAIT_POLICY"
CGROUP_ROOT = Path("/sys/fs/cgroup")


def prepare_openmp() -> None:
    """Make idle OpenMP threads sleep (``OMP_WAIT_POLICY=PASSIVE``) unless the environment sets a policy. Must
    run before torch is imported to take effect."""
    os.environ.setdefault(WAIT_POLICY, "PASSIVE")


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (all CPUs where the platform has no affinity)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (``quota / period``, the smallest along the cgroup path),
    or None without one. Reads cgroup v2 ``cpu.max`` and cgroup v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``."""
    limits = []
    for directory in _cgroup_dirs(root, proc_cgroup):
        limit = _v2_limit(directory / "cpu.max")
        if limit is None:
            limit = _v1_limit(directory / "cpu.cfs_quota_us", directory / "cpu.cfs_period_us")
        if limit is not None:
            limits.append(limit)
    return min(limits) if limits else None


def usable_cpus() -> int:
    """CPUs this process may use: its affinity, capped by its cgroup quota (rounded down, at least 1)."""
    cpus = affinity_cpus()
    limit = cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, max(1, math.floor(limit)))
    return cpus


def thread_count(threads: int | None = None, share: int = 1) -> int:
    """``threads`` when given, else this process's share of :func:`usable_cpus` among ``share`` parallel runs."""
    if threads is not None:
        return threads
    return max(1, usable_cpus() // max(1, share))


def configure(threads: int | None = None, share: int = 1) -> int:
    """Set torch's intra-op thread count to :func:`thread_count` and return it."""
    import torch

    count = thread_count(threads, share)
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count


def _cgroup_dirs(root: Path, proc_cgroup: Path) -> list[Path]:
    """The cgroup folders of this process and their parents (v2 unified path; v1 cpu controller mounts)."""
    dirs: list[Path] = []
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2
            mounts = [root]
        elif "cpu" in controllers.split(","):  # v1
            mounts = [root / name for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu")]
        else:
            continue
        relative = Path(path.lstrip("/"))
        for mount in mounts:
            current = mount / relative
            while True:
                if current.is_dir():
                    dirs.append(current)
                if current == mount:
                    break
                current = current.parent
    return dirs


def _v2_limit(path: Path) -> float | None:
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return _ratio(quota, period)


def _v1_limit(quota_path: Path, period_path: Path) -> float | None:
    try:
        quota, period = quota_path.read_text().strip(), period_path.read_text().strip()
    except OSError:
        return None
    return _ratio(quota, period)


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


__all__ = ["affinity_cpus", "cgroup_cpu_limit", "configure", "prepare_openmp", "thread_count", "usable_cpus"]
