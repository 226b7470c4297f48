"""Runs side by side: independent runs (one per seed) in at most ``jobs`` worker processes that divide the CPUs.

Each run is a fresh process (``spawn``) started with ``OMP_NUM_THREADS = usable_cpus() // jobs``, which
:func:`fedsim.threads.thread_count` follows (a config's own ``threads`` wins), so ``jobs`` runs never ask for
more threads than the cores they share, and with ``OMP_WAIT_POLICY=PASSIVE`` (unless the environment sets one),
so runs that do share a core never spin against each other. A run's results do not depend on where it ran;
they depend on its thread count only where torch splits a reduction across threads (see
:mod:`fedsim.threads`), so with a fixed ``threads`` in the config the folders are the same as with
``jobs=1``. Round records reach the parent's ``on_round`` through a queue, in the order they arrive.

SIGINT or SIGTERM in the parent stops the running runs the way one run stops (each keeps what it wrote and can be
resumed), starts no more, and raises :class:`RunInterrupted` naming the runs that finished.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from multiprocessing import get_context
from typing import Any

from fedsim.core.errors import FedsimError, RunInterrupted
from fedsim.threads import usable_cpus

Task = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]
"""A run: a picklable module-level function, its arguments and keyword arguments (without ``on_round``)."""

GRACE_S = 1.0
"""After an interrupt, how long the parent waits for runs that got the signal themselves (a terminal's Ctrl-C
reaches the whole process group) before it sends them SIGINT."""
KILL_AFTER_S = 60.0
"""How long a signalled worker may take to keep what it wrote before it is killed."""


def check_jobs(jobs: int) -> int:
    """``jobs`` as a positive int; a one-line :class:`FedsimError` otherwise."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise FedsimError(f"jobs must be a positive integer, got {jobs!r}")
    return jobs


def run_parallel(
    tasks: Sequence[Task], jobs: int, on_round: Callable[[dict], None] | None = None,
    labels: Sequence[str] | None = None,
) -> list[Any]:  # fmt: skip
    """Run ``tasks`` with at most ``jobs`` at once in worker processes (in this process when ``jobs`` is 1);
    returns their results in task order. Each task's round records, tagged with its position as ``"task"``,
    go to ``on_round`` here. The first task that fails stops the others (as an interrupt does) and its error is
    raised."""
    check_jobs(jobs)
    if jobs == 1 or len(tasks) <= 1:
        return [fn(*args, **kwargs, on_round=_tagged(on_round, i)) for i, (fn, args, kwargs) in enumerate(tasks)]
    pool = _Pool(get_context("spawn"), str(max(1, usable_cpus() // jobs)), on_round)
    waiting = list(enumerate(tasks))
    try:
        while waiting or pool.running:
            while waiting and len(pool.running) < jobs:
                pool.start(*waiting.pop(0))
            pool.receive(timeout=0.1)
            if pool.failed is not None:
                raise pool.failed
    except KeyboardInterrupt:
        pool.stop()
        finished = [(labels or [str(i) for i in range(len(tasks))])[i] for i in sorted(pool.results)]
        raise RunInterrupted(
            f"interrupted; finished: {', '.join(finished) or 'none'} of {len(tasks)} runs (the others kept what "
            "they wrote: resume each with fedsim simulate --resume FOLDER)"
        ) from None
    except BaseException:  # a task failed, or the parent did: no worker is left behind
        pool.stop()
        raise
    return [pool.results[i] for i in range(len(tasks))]


class _Pool:
    """The running worker processes, the queue they report on, and what they reported."""

    def __init__(self, context: Any, threads: str, on_round: Callable[[dict], None] | None) -> None:
        self.context, self.threads, self.on_round = context, threads, on_round
        self.messages, self.stop_flag = context.Queue(), context.Event()
        self.running: dict[int, Any] = {}
        self.results: dict[int, Any] = {}
        self.failed: BaseException | None = None
        self.stopping = False

    def start(self, index: int, task: Task) -> None:
        process = self.context.Process(target=_run_task, args=(index, task, self.messages, self.stop_flag),
                                       daemon=True)  # fmt: skip
        # the child reads its thread share and wait policy (passive: the workers share the cores, as Ray actors
        # do) before it imports torch, and ignores SIGINT until its task starts
        policy = os.environ.get("OMP_WAIT_POLICY") or "PASSIVE"
        with _environment(OMP_NUM_THREADS=self.threads, OMP_WAIT_POLICY=policy), _sigint_ignored():
            process.start()
        self.running[index] = process

    def receive(self, timeout: float) -> None:
        """Handle one message (a round record or a run's outcome), or notice a worker that died silently."""
        try:
            kind, index, payload = self.messages.get(timeout=timeout)
        except queue.Empty:  # a worker that ended without an outcome (killed, or its report was lost) failed
            for index, process in list(self.running.items()):
                if not process.is_alive():
                    self.running.pop(index)
                    if not self.stopping:
                        self.failed = self.failed or RuntimeError(
                            f"run {index} ended without a result (exit code {process.exitcode})"
                        )
            return
        if kind == "record":
            if self.on_round is not None:
                self.on_round(payload)
            return
        self.running.pop(index).join()
        if kind == "result":
            self.results[index] = payload
        elif self.failed is None and not self.stopping:  # an interrupted run while stopping is expected
            self.failed = payload

    def stop(self) -> None:
        """Let the running workers end (SIGINT to those still running after :data:`GRACE_S`) and collect what
        they report."""
        self.stopping = True
        self.stop_flag.set()  # a worker still starting up does not begin its task
        started = time.monotonic()
        signalled = False
        while self.running:
            waited = time.monotonic() - started
            if not signalled and waited > GRACE_S:
                for process in self.running.values():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(process.pid, signal.SIGINT)
                signalled = True
            if waited > GRACE_S + KILL_AFTER_S:
                for process in self.running.values():
                    process.kill()
            with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C must not leave workers behind
                self.receive(timeout=0.1)


def _tagged(on_round: Callable[[dict], None] | None, task: int) -> Callable[[dict], None] | None:
    return None if on_round is None else (lambda record: on_round({**record, "task": task}))


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored while a child is started (an ignored signal stays ignored across exec)."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupt_once(signum: int, frame: Any) -> None:
    """SIGINT or SIGTERM in a worker stops its run like Ctrl-C stops one run; later signals are ignored, so the
    run can keep what it wrote."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def _report(messages: Any, kind: str, index: int, payload: Any) -> None:
    """Put a message for the parent; a payload that cannot be pickled is sent as a RuntimeError describing it."""
    try:
        pickle.loads(pickle.dumps(payload))  # our own bytes, round-tripped: can the parent rebuild it?
    except Exception as err:  # noqa: BLE001 - anything unpicklable must still reach the parent
        what = f"{type(payload).__name__}: {payload}" if isinstance(payload, BaseException) else type(payload).__name__
        payload = RuntimeError(f"run {index}'s {kind} could not be sent ({what}; {err})")
        kind = "error"
    messages.put((kind, index, payload))


def _run_task(index: int, task: Task, messages: Any, stop_flag: Any) -> None:
    """A worker: run the task, report its round records and its outcome (result or exception)."""
    signal.signal(signal.SIGINT, _interrupt_once)  # from here on SIGINT/SIGTERM stop the run
    signal.signal(signal.SIGTERM, _interrupt_once)
    fn, args, kwargs = task
    try:
        if stop_flag.is_set():
            raise RunInterrupted("not started: the parent was interrupted")
        result = fn(*args, **kwargs, on_round=lambda record: messages.put(("record", index, {**record, "task": index})))
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which raises it
        _report(messages, "error", index, err)
    else:
        _report(messages, "result", index, result)
