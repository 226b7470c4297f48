"""CPU threads: how many torch uses, and how its idle threads wait, without collapsing on a busy machine.

torch's OpenMP threads spin-wait between the many small parallel regions of a round. When another process holds
one of the cores, a spinning thread and the thread it waits for share that core: on 2 cores the benchmark round
(MLP, 100 clients) takes 0.044 s alone and 0.54 s next to one CPU-bound process, 12x. Letting idle threads sleep
(``OMP_WAIT_POLICY=PASSIVE``) removes the collapse but costs 68% on free cores (0.075 s), because this workload
is many small parallel regions. The thread count, on the other hand, can change results: torch splits large
reductions (sums over more than 32,768 values, convolution weight gradients, long matrix products) into one
partial result per thread, so a different count changes the last bits. Hence:

- **the thread count is fixed for a run** (results stay a function of seed, config and machine): ``threads: N``
  (``--threads N``), else ``$OMP_NUM_THREADS`` when the environment sets it (Ray sets it in its workers), else
  the CPUs this process may use (:func:`usable_cpus`: its affinity, capped by a cgroup CPU quota as in
  containers, Slurm and Kubernetes). ``summary.json`` records it;
- **the wait policy follows the machine at start** (:func:`choose_wait_policy`, called by the CLI before torch
  loads): passive when other processes already keep the CPUs busy, spinning otherwise. It decides only how idle
  threads wait, never a result. An ``OMP_WAIT_POLICY`` in the environment is respected; Ray actors, which share
  cores by design, always start passive;
- ``threads: adaptive`` (``--threads adaptive``) also handles load that appears mid-run: a
  :class:`ThreadGovernor` re-reads before each round, at most every half second, how many of this process's CPUs
  other processes kept busy (``/proc/stat`` minus this process's own CPU time) and runs on the rest. It never
  collapses and is as fast as spinning on free cores, but its results may differ in the last bits from run to
  run (for the models and sizes whose reductions split across threads).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

WAIT_POLICY = "OMP_WAIT_POLICY"
CGROUP_ROOT = Path("/sys/fs/cgroup")


def choose_wait_policy(sample_s: float = 0.04) -> str | None:
    """Before torch loads: ``OMP_WAIT_POLICY=PASSIVE`` when other processes keep at least half a core of this
    process's CPUs busy (measured over ``sample_s`` from ``/proc/stat``), so a run started next to a busy process
    does not spin against it; the spinning default otherwise (it is 40% faster on free cores). An environment
    that sets a policy is respected. The policy only decides how idle threads wait: it changes no result.
    Returns the policy set, or None."""
    if os.environ.get(WAIT_POLICY):
        return None
    busy = _proc_stat_reader()
    own, start, before = time.process_time(), time.monotonic(), busy()
    if before is None:
        return None
    time.sleep(sample_s)
    after, elapsed = busy(), time.monotonic() - start
    others = ((after or before) - before - (time.process_time() - own)) / max(elapsed, 1e-9)
    if others >= 0.5:
        os.environ[WAIT_POLICY] = "PASSIVE"
        return "PASSIVE"
    return None


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
    "thread_count",
    "usable_cpus",
]
