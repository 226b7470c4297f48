"""Synchronous rounds on the virtual clock: deadline, partial work, over-selection, dropout, time budget.

A synchronous round waits for its slowest client (:func:`fedsim.system.durations`). Production cross-device
FL does not wait forever; these policies (run-level keys, off by default) decide before training which
selected clients the server will hear from, and how many local steps each completes:

- ``time_budget_s = B``: each client runs as many of its planned local steps as fit ``B`` seconds including
  its communication, ``s_k = max{s <= S_k : fixed_k + cum_k(s) c_k <= B}`` (``fixed_k`` = latency + download
  + upload time, ``cum_k(s)`` the samples of its first ``s`` steps, ``c_k`` its seconds per sample). Clients
  with ``s_k = 0`` do not take part. Ragged local work, which the trainer masks.
- ``dropout = P``: every selected client drops out with probability ``P`` (counter-based, a pure function of
  (seed, round, client)), after a uniformly drawn share ``v`` of its steps, ``floor(v s_k)``; its work is
  wasted and it ends when it drops.
- ``deadline_s = D``: a client whose round would last longer than ``D`` misses the deadline. By default it is
  dropped, and the samples it processed by ``D`` count as wasted. With ``partial_work: true`` it keeps the
  steps it completes in time, ``s_k = max{s : fixed_k + cum_k(s) c_k <= D}`` (clients with none are dropped);
  FedNova (``--strategy fednova``) normalizes such unequal local work, FedAvg weights it as it is.
- ``over_selection = x``: the strategy's ``K`` selected clients plus ``ceil(K (1 + x)) - K`` more, drawn
  among the other (available) clients by hash (seed, round, client); the server keeps the first ``K`` to
  finish (ties: lower client id) and stops the others when the ``K``-th arrives, their work so far wasted.

Every candidate ends at a time ``e_k``: its round's duration when kept, the moment it drops out, the deadline
``D`` when it misses it, the ``K``-th arrival when over-selection stops it. The round lasts ``max_k e_k``.
When no client is kept (all dropped, or none meets the deadline) the round is empty: the model stays, the
clock advances. Wasted work is reported as ``wasted_samples``, clients not aggregated as ``dropped``.

The rules are ours, after FedScale's and FLGo's deadline and over-selection settings (Lai et al. 2022;
Bonawitz et al. 2019 for over-selection in production); which work counts as wasted is our choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedsim.core import rng
from fedsim.core.errors import FedsimError
from fedsim.system import ClientProfiles, phases

STREAM_DROPOUT = 8
STREAM_OVERSELECTION = 9


@dataclass(frozen=True)
class RoundPolicy:
    """The synchronous policies of a run (all off by default)."""

    deadline_s: float | None = None
    partial_work: bool = False
    over_selection: float = 0.0
    dropout: float = 0.0
    time_budget_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("deadline_s", "time_budget_s"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise FedsimError(f"{name} must be a finite number of seconds > 0, got {value}")
        if not (self.over_selection >= 0 and math.isfinite(self.over_selection)):
            raise FedsimError(f"over_selection must be a finite number >= 0, got {self.over_selection}")
        if not 0.0 <= self.dropout < 1.0:
            raise FedsimError(f"dropout must be a probability in [0, 1), got {self.dropout}")
        if self.partial_work and self.deadline_s is None:
            raise FedsimError("partial_work keeps the steps done by the deadline: set deadline_s too")

    @property
    def active(self) -> bool:
        return (
            self.deadline_s is not None or self.over_selection > 0 or self.dropout > 0 or self.time_budget_s is not None
        )


@dataclass
class RoundSchedule:
    """What the clock decided for one round: the clients that train and are aggregated (sorted), their step
    limits (None: every planned step), the round's virtual duration, and the work and clients lost."""

    kept: np.ndarray
    step_limit: np.ndarray | None
    round_time_s: float
    wasted_samples: float
    dropped: int
    candidates: int
    phases: dict[str, np.ndarray] | None = None
    """Per candidate (sorted ids): ``client``, ``download_s`` (latency included), ``compute_s`` and ``upload_s``
    spent, and ``status`` (``trained``, ``dropout``, ``offline``, ``late``, ``cut``, ``idle``) for the client
    timeline."""


def extra_clients(selected: np.ndarray, pool: np.ndarray, fraction: float, seed: int, round_: int) -> np.ndarray:
    """Over-selection: ``ceil(K (1 + fraction)) - K`` clients of ``pool`` not in ``selected`` (those with the
    smallest hash keys of (seed, round, client)), sorted."""
    k = len(selected)
    want = math.ceil(k * (1.0 + fraction) - 1e-12) - k
    others = np.setdiff1d(np.asarray(pool, dtype=np.int64), selected)
    if want <= 0 or len(others) == 0:
        return np.zeros(0, dtype=np.int64)
    keys = rng.hash_keys(seed, STREAM_OVERSELECTION, round_, others)
    return np.sort(others[np.argsort(keys, kind="stable")[:want]])


def steps_within(
    fixed: np.ndarray, cumulative: np.ndarray, compute: np.ndarray, budget: float | np.ndarray
) -> np.ndarray:
    """Per client, the most steps ``s`` (``0..S``) with ``fixed + cumulative[s] * compute <= budget`` (one
    budget, or one per client); ``cumulative[C, S + 1]`` holds the samples after ``s`` steps (non-decreasing)."""
    budget = np.asarray(budget, dtype=np.float64)
    fits = fixed[:, None] + cumulative * compute[:, None] <= (budget[:, None] if budget.ndim else budget)
    return fits.sum(axis=1) - 1  # cumulative[:, 0] = 0, so the fitting steps are a prefix


def schedule_round(
    policy: RoundPolicy,
    profiles: ClientProfiles,
    candidates: np.ndarray,
    target: int,
    step_samples: np.ndarray,
    bytes_down: float,
    bytes_up: float,
    *,
    seed: int,
    round_: int,
    online_for: np.ndarray | None = None,
) -> RoundSchedule:
    """Apply ``policy`` to the sorted ``candidates`` (``target`` = K, the strategy's selection size) whose
    planned steps process ``step_samples[C, S]`` samples (see the module docstring for the rules).
    ``online_for``: seconds each candidate stays online from the round's start (availability windows); one
    that would finish later goes offline then, like a dropout."""
    ids = np.asarray(candidates, dtype=np.int64)
    n = len(ids)
    p = profiles
    down, _, up = phases(p, ids, np.full(n, float(bytes_down)), np.full(n, float(bytes_up)), np.zeros(n))
    compute = p.compute_s_per_sample[ids]
    cumulative = np.concatenate([np.zeros((n, 1)), np.cumsum(step_samples, axis=1, dtype=np.float64)], axis=1)
    planned = (step_samples > 0).sum(axis=1)
    steps = planned.copy()
    if policy.time_budget_s is not None:
        steps = np.minimum(steps, steps_within(down + up, cumulative, compute, policy.time_budget_s))
    rows = np.arange(n)
    duration = lambda s: down + up + cumulative[rows, s] * compute  # noqa: E731
    kept = steps > 0
    # A client without a step that fits its budget does not start: it ends with its download, or at the budget.
    end = np.where(kept, duration(steps), np.minimum(down, policy.time_budget_s or np.inf))
    wasted = np.zeros(n)
    if policy.dropout > 0:
        u = rng.uniform(seed, STREAM_DROPOUT, round_, ids, 0)
        v = rng.uniform(seed, STREAM_DROPOUT, round_, ids, 1)
        drops = kept & (u < policy.dropout)
        done_dropout = np.floor(v * steps).astype(np.int64)
        wasted = np.where(drops, cumulative[rows, done_dropout], wasted)
        end = np.where(drops, down + cumulative[rows, done_dropout] * compute, end)
        kept &= ~drops
    offline = gone_done = None
    if online_for is not None:
        offline = kept & (end > online_for)
        gone_done = np.minimum(steps, steps_within(down, cumulative, compute, online_for))
        wasted = np.where(offline, cumulative[rows, gone_done], wasted)
        end = np.where(offline, np.minimum(end, online_for), end)
        kept &= ~offline
    deadline = policy.deadline_s
    late = by_deadline = cut = cut_done = None
    if deadline is not None:
        late = kept & (end > deadline)
        if policy.partial_work:
            in_time = np.minimum(steps, steps_within(down + up, cumulative, compute, deadline))
            steps = np.where(late, in_time, steps)
            kept &= steps > 0
            late &= ~kept
            end = np.where(kept, duration(steps), end)
        by_deadline = np.minimum(steps, steps_within(down, cumulative, compute, deadline))
        wasted = np.where(late, cumulative[rows, by_deadline], wasted)
        end = np.where(late, deadline, end)
        kept &= ~late
    if policy.over_selection > 0 and kept.sum() > target:
        order = np.lexsort((ids, np.where(kept, end, np.inf)))
        first = order[:target]
        stop = float(end[first[-1]])
        cut = kept.copy()
        cut[first] = False
        cut_done = np.minimum(steps, steps_within(down, cumulative, compute, stop))
        wasted = np.where(cut, cumulative[rows, cut_done], wasted)
        end = np.where(cut, stop, end)
        kept &= ~cut
    computed = np.where(kept, cumulative[rows, steps], 0.0) * compute
    status = np.full(n, "trained", dtype=object)
    status[steps == 0] = "idle"
    computed = np.where(status == "idle", 0.0, computed)
    if policy.dropout > 0:
        status[drops] = "dropout"
        computed = np.where(drops, cumulative[rows, done_dropout] * compute, computed)
    if offline is not None:
        status[offline] = "offline"
        computed = np.where(offline, cumulative[rows, gone_done] * compute, computed)
    if deadline is not None:
        status[late] = "late"
        computed = np.where(late, cumulative[rows, by_deadline] * compute, computed)
    if cut_done is not None:
        status[cut] = "cut"
        computed = np.where(cut, cumulative[rows, cut_done] * compute, computed)
    spans = {"client": ids, "download_s": down, "compute_s": computed,
             "upload_s": np.where(kept, up, 0.0), "status": status}  # fmt: skip
    limit = steps[kept]
    limited = bool((limit < planned[kept]).any())
    return RoundSchedule(
        kept=ids[kept],
        step_limit=limit if limited else None,
        round_time_s=float(end.max()) if n else 0.0,
        wasted_samples=float(wasted.sum()),
        dropped=int(n - kept.sum()),
        candidates=n,
        phases=spans,
    )


def check_reachable(policy: RoundPolicy, profiles: ClientProfiles, bytes_down: float, bytes_up: float) -> None:
    """Refuse a deadline or time budget that no client can meet even with a single one-sample step."""
    p = profiles
    fastest = p.latency_s + bytes_down * 8 / (p.down_mbps * 1e6) + bytes_up * 8 / (p.up_mbps * 1e6)
    fastest = fastest + p.compute_s_per_sample
    best = float(fastest.min())
    for name in ("deadline_s", "time_budget_s"):
        limit = getattr(policy, name)
        if limit is not None and best > limit:
            raise FedsimError(
                f"{name}={limit:g}: no client can finish a round within it (the fastest needs {best:.4g} s for its "
                "communication and one sample); raise it"
            )
