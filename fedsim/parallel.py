"""Runs side by side: independent runs (one per seed) in ``jobs`` worker processes that divide the CPUs.

Each worker is a fresh process (``spawn``) whose torch uses ``usable_cpus() // jobs`` threads (through
``OMP_NUM_THREADS``, which :func:`fedsim.threads.thread_count` follows; a config's own ``threads`` wins), so
``jobs`` runs never ask for more threads than the cores they share. A run's results do not depend on where it
ran or on its thread count: the folders are the same as with ``jobs=1``. Round records reach the parent's
``on_round`` through a queue, in the order they arrive.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from multiprocessing import get_context
from typing import Any

from fedsim.core.errors import FedsimError
from fedsim.threads import usable_cpus

Task = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]
"""A run: a picklable module-level function, its arguments and keyword arguments (without ``on_round``)."""

_RECORDS: Any = None  # the worker's end of the records queue


def check_jobs(jobs: int) -> int:
    """``jobs`` as a positive int; a one-line :class:`FedsimError` otherwise."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise FedsimError(f"jobs must be a positive integer, got {jobs!r}")
    return jobs


def run_parallel(tasks: Sequence[Task], jobs: int, on_round: Callable[[dict], None] | None = None) -> list[Any]:
    """Run ``tasks`` in ``jobs`` worker processes (in this process when ``jobs`` is 1); returns their results
    in task order. Each task's ``on_round`` records (tagged with the task's position as ``"task"``) go to
    ``on_round`` here. The first task that fails cancels the ones not started and its error is raised."""
    check_jobs(jobs)
    if jobs == 1 or len(tasks) <= 1:
        return [fn(*args, **kwargs, on_round=_tagged(on_round, i)) for i, (fn, args, kwargs) in enumerate(tasks)]
    context = get_context("spawn")
    manager = context.Manager()
    records = manager.Queue()
    threads = str(max(1, usable_cpus() // jobs))
    stop = threading.Event()
    drain = threading.Thread(target=_drain, args=(records, on_round, stop), daemon=True)
    drain.start()
    try:
        with ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=context, initializer=_start_worker,
                                 initargs=(records, threads)) as pool:  # fmt: skip
            futures = [pool.submit(_run_task, i, fn, args, kwargs) for i, (fn, args, kwargs) in enumerate(tasks)]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in done if f.exception() is not None]
            if failed:
                for future in futures:
                    future.cancel()
                raise failed[0].exception()
            return [f.result() for f in futures]
    finally:
        stop.set()
        drain.join()
        manager.shutdown()


def _tagged(on_round: Callable[[dict], None] | None, task: int) -> Callable[[dict], None] | None:
    return None if on_round is None else (lambda record: on_round({**record, "task": task}))


def _start_worker(records: Any, threads: str) -> None:
    """In a fresh worker, before torch loads: its share of the threads, and the queue for round records."""
    global _RECORDS
    os.environ["OMP_NUM_THREADS"] = threads
    _RECORDS = records


def _run_task(index: int, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return fn(*args, **kwargs, on_round=lambda record: _RECORDS.put({**record, "task": index}))


def _drain(records: Any, on_round: Callable[[dict], None] | None, stop: threading.Event) -> None:
    """Hand the workers' round records to ``on_round`` until ``stop`` is set and the queue is empty."""
    while True:
        try:
            record = records.get(timeout=0.1)
        except queue.Empty:
            if stop.is_set():
                return
            continue
        except (EOFError, OSError):  # the manager is gone
            return
        if on_round is not None:
            on_round(record)
