"""CPU threads: how many torch may use here, adapted to what other processes leave free.

torch's OpenMP threads spin-wait between parallel regions. When another process holds one of the cores, a
spinning thread and the thread it waits for share that core: on 2 cores the benchmark round (MLP, 100
clients) takes 0.047 s alone and 0.65 s next to one CPU-bound process, 14x. Making idle threads sleep
(``OMP_WAIT_POLICY=PASSIVE``) removes the collapse (0.078 s busy) but costs 60% on an idle machine (0.074 s),
because this workload is many small parallel regions. So the choice is adaptive:

- the wait policy stays OpenMP's default (spin, then sleep), unless the environment sets one;
- the thread count starts at the CPUs this process may use (:func:`usable_cpus`: its affinity, capped by a
  cgroup CPU quota; or ``$OMP_NUM_THREADS`` where the environment sets it, as Ray does in its workers), and
  a :class:`ThreadGovernor` re-reads, every half second of a run, how many of this
  process's CPUs other processes kept busy (``/proc/stat`` minus this process's own CPU time) and runs on the
  rest (at least one thread). A thread never waits for a core someone else holds, and an idle machine keeps
  every thread spinning;
- ``--threads N`` (``threads: N``) fixes the count and turns the governor off;
- Ray actors, which share cores by design (fractional ``cpus_per_actor``), start with the passive policy
  and ``cpus_per_actor`` threads.

None of this changes results: the kernels fedsim uses give the same numbers for every thread count (tested
for dense and convolutional models), and the wait policy only decides what idle threads do.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

WAIT_POLICY = "OMP_WAIT_POLICY"
CGROUP_ROOT = Path("/sys/fs/cgroup")


def prepare_openmp(policy: str = "PASSIVE") -> None:
    """Set the OpenMP wait policy (``OMP_WAIT_POLICY``) unless the environment sets one. Must run before torch
    is imported to take effect (Ray actors, which share cores, get ``PASSIVE`` this way)."""
    os.environ.setdefault(WAIT_POLICY, policy)


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
    """``threads`` when given; else ``$OMP_NUM_THREADS`` when the environment sets it (a scheduler or Ray's
    workers, which get their ``num_cpus``); else this process's share of :func:`usable_cpus` among ``share``
    parallel runs."""
    if threads is not None:
        return threads
    given = os.environ.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) >= 1:
        return int(given)
    return max(1, usable_cpus() // max(1, share))


def configure(threads: int | None = None, share: int = 1) -> int:
    """Set torch's intra-op thread count to :func:`thread_count` and return it."""
    import torch

    count = thread_count(threads, share)
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count


class ThreadGovernor:
    """Keeps torch's thread count at the CPUs other processes leave free, between 1 and ``limit``.

    :meth:`update` (called once per round) samples, at most every ``interval_s`` seconds, the busy time of
    this process's CPUs from ``/proc/stat`` and subtracts this process's own CPU time: what is left is the
    average number of cores other processes used, and ``round(cpus - others)`` threads run next. Where
    ``/proc/stat`` cannot be read it keeps ``limit``."""

    def __init__(
        self, limit: int, interval_s: float = 0.5,
        busy_seconds: Callable[[], float | None] | None = None, own_seconds: Callable[[], float] = time.process_time,
        clock: Callable[[], float] = time.monotonic, cpus: int | None = None,
    ) -> None:  # fmt: skip
        self.limit, self.interval_s = max(1, limit), interval_s
        self.cpus = cpus if cpus is not None else affinity_cpus()
        self._busy = busy_seconds or _proc_stat_reader()
        self._own, self._clock = own_seconds, clock
        self.threads = self.limit
        self._last = self._sample()

    def _sample(self) -> tuple[float, float | None, float]:
        return self._clock(), self._busy(), self._own()

    def others(self) -> float | None:
        """Cores used by other processes since the last sample (None: not measurable here, or too soon)."""
        now = self._sample()
        (t0, busy0, own0), (t1, busy1, own1) = self._last, now
        if t1 - t0 < self.interval_s:
            return None
        self._last = now
        if busy0 is None or busy1 is None:
            return None
        return max(0.0, ((busy1 - busy0) - (own1 - own0)) / (t1 - t0))

    def update(self) -> int:
        """Re-measure (when ``interval_s`` has passed), set torch's thread count, and return it."""
        others = self.others()
        if others is not None:
            self.threads = max(1, min(self.limit, math.floor(self.cpus - others + 0.5)))
        import torch

        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        return self.threads


def _proc_stat_reader() -> Callable[[], float | None]:
    """A function returning the busy seconds (user, nice, system, irq, softirq, steal) of this process's CPUs
    since boot, from ``/proc/stat``; it returns None where that file cannot be read."""
    wanted = {f"cpu{i}" for i in os.sched_getaffinity(0)} if hasattr(os, "sched_getaffinity") else None
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def busy_seconds() -> float | None:
        try:
            lines = Path("/proc/stat").read_text().splitlines()
        except OSError:
            return None
        total = 0
        for line in lines:
            name, _, rest = line.partition(" ")
            if name.startswith("cpu") and name != "cpu" and (wanted is None or name in wanted):
                fields = [int(v) for v in rest.split()]
                total += sum(fields[:3]) + sum(fields[5:8])  # user nice system | irq softirq steal
        return total / tick

    return busy_seconds


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


__all__ = [
    "ThreadGovernor",
    "affinity_cpus",
    "cgroup_cpu_limit",
    "configure",
    "prepare_openmp",
    "thread_count",
    "usable_cpus",
]
