"""GPU engine benchmark: one script, one JSON (run it through ``experiments/bench_gpu.sh``).

On a CUDA machine with torch (Ray not needed) it runs :func:`fedsim.benchmarks.engine.bench_engine` on the
workloads of the GPU issue, vectorized engine against one centralized batch of the same samples (the per-client
sequential loop is skipped: too slow at these sizes), and writes one JSON with, per workload, samples/s, the
ratio to the centralized batch and the peak GPU memory::

    bash experiments/bench_gpu.sh                       # CUDA: writes bench_gpu.json
    bash experiments/bench_gpu.sh --out results.json --time-budget 300
    bash experiments/bench_gpu.sh --dry-run --out /tmp/dry.json   # same code path on CPU, tiny sizes

Workloads (10 local steps of batch 32, SGD, warm-up then the median of the repeats): LeNet-5 and the
GroupNorm CNN at 1,000 clients on MNIST-5k (28x28), the MLP at 10,000 and 100,000 clients on the 8x8
digits, the char transformer at 100 clients on Shakespeare. ``--dry-run`` runs them on the CPU with a few
clients, 2 local steps of batch 8 and one repeat.

Without CUDA (and without ``--dry-run``) it refuses with one line. ``--time-budget`` (seconds since the start,
default 420) skips the workloads left once it is spent and aborts a workload that runs past it; both are
noted in the JSON, which is rewritten after every workload.

Data: each data set comes from ``--data-dir/<name>.npz`` when that file exists (write the files with
``--export-data DIR`` on a machine with the offline sources, then carry the folder), else from fedsim's
offline loader, else from a synthetic stand-in of the same shape (throughput does not depend on the values;
``data_source`` in the JSON says which was used). fedsim itself is imported from this checkout; it needs
numpy, pydantic, networkx and pyyaml next to torch (``PYTHONPATH`` may point at unpacked wheels).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib.util
import json
import os
import platform
import shlex
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
REQUIRED_MODULES = ("torch", "numpy", "pydantic", "networkx", "yaml")
DEFAULT_OUT = "bench_gpu.json"
DEFAULT_BUDGET_S = 420.0
TARGET_RATIO = 0.8
TARGET_CLIENTS = 1000
GPU_STEPS, GPU_BATCH = 10, 32
DRY_STEPS, DRY_BATCH, DRY_REPEATS = 2, 8, 1
SEED = 0


@dataclass(frozen=True)
class Workload:
    """One benchmark case: ``clients`` on the GPU, ``dry_clients`` in the CPU dry run."""

    name: str
    model: str
    dataset: str
    clients: int
    repeats: int
    dry_clients: int


# The 1,000-client cases (the README's target) first, the heaviest host-side case (100,000 clients) last.
WORKLOADS: tuple[Workload, ...] = (
    Workload("lenet5-1k", "lenet5", "mnist5k", 1_000, 5, 8),
    Workload("cnn-1k", "cnn", "mnist5k", 1_000, 5, 8),
    Workload("mlp-10k", "mlp", "digits", 10_000, 5, 16),
    Workload("char_transformer-100", "char_transformer", "shakespeare", 100, 5, 4),
    Workload("mlp-100k", "mlp", "digits", 100_000, 3, 160),
)

# Stand-in shapes when a data source is missing: (feature shape, classes, training samples, token data).
STAND_INS: dict[str, tuple[tuple[int, ...], int, int, bool]] = {
    "digits": ((1, 8, 8), 10, 1_437, False),
    "mnist5k": ((1, 28, 28), 10, 4_000, False),
    "shakespeare": ((80,), 81, 20_000, True),
}
EXPORT_TOKEN_WINDOWS = 20_000  # Shakespeare windows kept by --export-data (1.6 MB as uint8)


class BudgetExceeded(Exception):
    """The time budget ran out while a workload was running."""


def log(message: str) -> None:
    """One progress line on stderr."""
    print(f"bench_gpu: {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help=f"JSON to write (default {DEFAULT_OUT})")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the code path")
    parser.add_argument("--time-budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for the whole run")
    parser.add_argument("--only", default="", help="comma-separated workload names (default: all)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per path (default: per workload)")
    parser.add_argument("--data-dir", type=Path, default=None, help="folder of <dataset>.npz files to use first")
    parser.add_argument("--export-data", type=Path, default=None, help="write the data sets as npz here and exit")
    return parser.parse_args(argv)


def missing_modules() -> list[str]:
    """The required modules that cannot be imported here (checked without importing them)."""
    return [name for name in REQUIRED_MODULES if importlib.util.find_spec(name) is None]


def select_workloads(only: str) -> list[Workload]:
    """The workloads named in ``only`` (all when empty), in the default order."""
    names = {n.strip() for n in only.split(",") if n.strip()}
    unknown = names - {w.name for w in WORKLOADS}
    if unknown:
        raise SystemExit(f"bench_gpu: unknown workload(s) {', '.join(sorted(unknown))}; choose from "
                         f"{', '.join(w.name for w in WORKLOADS)}")  # fmt: skip
    return [w for w in WORKLOADS if not names or w.name in names]


# ------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------


def read_npz(path: Path, name: str) -> Any:
    """A :class:`fedsim.data.base.Dataset` from an npz written by :func:`export_data`."""
    import numpy as np

    from fedsim.data.base import Dataset

    with np.load(path, allow_pickle=False) as z:
        x = z["x_train"].astype(np.float32)
        y = z["y_train"].astype(np.int64)
        classes = int(z["num_classes"])
    return Dataset(name, x, y, x[:0], y[:0], classes)


def stand_in(name: str) -> Any:
    """Synthetic data of ``name``'s shape (fixed seed): standard normal images or uniform tokens."""
    import numpy as np

    from fedsim.data.base import Dataset

    shape, classes, n, tokens = STAND_INS[name]
    rng = np.random.default_rng(SEED)
    if tokens:
        x = rng.integers(0, classes, size=(n, *shape)).astype(np.float32)
    else:
        x = rng.standard_normal((n, *shape), dtype=np.float32)
    y = rng.integers(0, classes, size=n).astype(np.int64)
    return Dataset(name, x, y, x[:0], y[:0], classes)


@functools.cache
def load_data(name: str, clients: int, data_dir: Path | None) -> tuple[Any, str]:
    """``(dataset, source)``: ``data_dir/<name>.npz``, else fedsim's offline loader, else a stand-in."""
    from fedsim.core.errors import DataSourceMissing
    from fedsim.data import load_dataset

    path = data_dir / f"{name}.npz" if data_dir else None
    if path is not None and path.is_file():
        return read_npz(path, name), f"npz {path}"
    try:
        return load_dataset(name, num_clients=clients), "fedsim offline loader"
    except (DataSourceMissing, ImportError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log(f"{name}: source missing ({reason}); using a synthetic stand-in of the same shape")
        return stand_in(name), f"synthetic stand-in ({reason})"


def register_data(dataset: Any, name: str) -> str:
    """Register ``dataset`` as a fedsim dataset component so ``bench_engine`` loads it; returns its name."""
    from fedsim.core import components

    component = f"bench-gpu-{name}"

    def factory() -> Any:
        """The benchmark's preloaded data set."""
        return dataset

    components.register("dataset", component, factory)
    return component


def export_data(folder: Path) -> None:
    """Write each benchmark data set (as fedsim loads it for the GPU workloads) to ``folder/<name>.npz``:
    images as float32, Shakespeare's character indices as uint8 (its first windows only)."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    for name in dict.fromkeys(w.dataset for w in WORKLOADS):
        clients = max(w.clients for w in WORKLOADS if w.dataset == name)
        ds, source = load_data(name, clients if name == "shakespeare" else 0, None)
        x, y = ds.x_train, ds.y_train
        if STAND_INS[name][3]:
            x, y = x[:EXPORT_TOKEN_WINDOWS].astype(np.uint8), y[:EXPORT_TOKEN_WINDOWS]
        path = folder / f"{name}.npz"
        np.savez_compressed(path, x_train=x, y_train=y, num_classes=np.int64(ds.num_classes))
        log(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {len(y):,} samples, from {source})")


# ------------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise :class:`BudgetExceeded` in the block once ``seconds`` have passed (SIGALRM; main thread)."""

    def expire(signum: int, frame: Any) -> None:
        raise BudgetExceeded

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def release_memory(device: Any) -> None:
    """Drop what a finished workload left behind and reset the peak-memory counter."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def empty_row(w: Workload, args: argparse.Namespace) -> dict[str, Any]:
    """A workload's JSON row before it runs: its sizes (GPU or dry run), the measurements None."""
    clients = w.dry_clients if args.dry_run else w.clients
    steps, batch = (DRY_STEPS, DRY_BATCH) if args.dry_run else (GPU_STEPS, GPU_BATCH)
    repeats = args.repeats or (DRY_REPEATS if args.dry_run else w.repeats)
    return {
        "name": w.name, "model": w.model, "dataset": w.dataset, "data_source": None, "clients": clients,
        "local_steps": steps, "batch_size": batch, "repeats": repeats, "chunk_size": None, "num_params": None,
        "grad_mode": None, "samples_per_s": None, "centralized_samples_per_s": None, "ratio_to_centralized": None,
        "vectorized_s": None, "centralized_s": None, "peak_gpu_memory_bytes": None, "wall_s": None,
        "status": "pending", "note": None,
    }  # fmt: skip


def run_workload(w: Workload, args: argparse.Namespace, device: Any, remaining: float) -> dict[str, Any]:
    """Run one workload through ``bench_engine`` (no sequential loop) within ``remaining`` seconds."""
    import torch

    from fedsim.benchmarks.engine import bench_engine

    row = empty_row(w, args)
    clients, steps, batch, repeats = row["clients"], row["local_steps"], row["batch_size"], row["repeats"]
    t0 = time.perf_counter()
    try:
        with deadline(remaining):
            ds, row["data_source"] = load_data(w.dataset, clients if w.dataset == "shakespeare" else 0, args.data_dir)
            release_memory(device)
            torch.manual_seed(SEED)
            r = bench_engine(
                dataset=register_data(ds, w.dataset), model=w.model, clients=clients, local_steps=steps,
                batch_size=batch, repeats=repeats, device=device.type, sequential=False,
            )  # fmt: skip
            if device.type == "cuda":  # the vectorized path's own peak (bench_engine resets it per path)
                row["peak_gpu_memory_bytes"] = r["vectorized"]["peak_memory_bytes"]
    except BudgetExceeded:
        row.update(status="aborted", note=f"time budget reached after {time.perf_counter() - t0:.1f} s")
    except torch.cuda.OutOfMemoryError as exc:
        row.update(status="error", note=f"out of GPU memory: {str(exc).splitlines()[0]}")
    else:
        row.update(
            status="ok", chunk_size=r["chunk_size"], num_params=r["num_params"], grad_mode=r["grad_mode"],
            samples_per_s=r["vectorized"]["samples_per_s"], centralized_samples_per_s=r["centralized"]["samples_per_s"],
            ratio_to_centralized=r["vectorized_over_centralized"], vectorized_s=r["vectorized"]["seconds"],
            centralized_s=r["centralized"]["seconds"],
        )  # fmt: skip
    row["wall_s"] = time.perf_counter() - t0
    release_memory(device)
    return row


def describe(row: dict[str, Any]) -> str:
    """A workload's progress line."""
    head = f"{row['name']} ({row['clients']:,} clients): {row['wall_s']:.1f} s"
    if row["status"] != "ok":
        return f"{head}, {row['status']}: {row['note']}"
    peak = row["peak_gpu_memory_bytes"]
    memory = f", peak {peak / 2**30:.2f} GiB" if peak is not None else ""
    return (f"{head}, {row['samples_per_s']:,.0f} samples/s, {row['ratio_to_centralized']:.2f} of centralized "
            f"(chunk {row['chunk_size']}){memory}")  # fmt: skip


def environment(device: Any) -> dict[str, Any]:
    """Device, versions and numeric settings of this run."""
    import torch

    cuda = device.type == "cuda"
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine()),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
    }


def target_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether each 1,000-client workload (a few clients in the dry run) reached ``TARGET_RATIO`` of the
    centralized throughput."""
    names = {w.name for w in WORKLOADS if w.clients == TARGET_CLIENTS}
    met = {
        r["name"]: r["ratio_to_centralized"] >= TARGET_RATIO for r in rows if r["status"] == "ok" and r["name"] in names
    }
    return {"min_ratio_to_centralized": TARGET_RATIO, "clients": TARGET_CLIENTS, "met": met}


def write_json(path: Path, result: dict[str, Any]) -> None:
    """Write ``result`` atomically (a partial run still leaves a valid file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)


def run(args: argparse.Namespace, started: float) -> dict[str, Any]:
    """Run the selected workloads within the time budget, rewriting the JSON after each one."""
    import torch

    device = torch.device("cpu" if args.dry_run else "cuda")
    workloads = select_workloads(args.only)
    result: dict[str, Any] = {
        "benchmark": "engine-gpu", "dry_run": bool(args.dry_run), **environment(device),
        "command": os.environ.get("BENCH_GPU_COMMAND") or shlex.join([Path(sys.executable).name, *sys.argv]),
        "time_budget_s": args.time_budget, "total_wall_s": None, "workloads": [], "skipped": [], "target": None,
    }  # fmt: skip
    log(f"{result['device_name']} ({device}), torch {result['torch']}, {len(workloads)} workloads, "
        f"budget {args.time_budget:g} s{' (dry run)' if args.dry_run else ''}")  # fmt: skip
    for i, w in enumerate(workloads, 1):
        remaining = args.time_budget - (time.perf_counter() - started)
        if remaining <= 0:
            row = {
                **empty_row(w, args),
                "status": "skipped",
                "note": "time budget spent before it started",
                "wall_s": 0.0,
            }
        else:
            row = run_workload(w, args, device, remaining)
        if row["status"] in ("skipped", "aborted"):
            result["skipped"].append(w.name)
        result["workloads"].append(row)
        log(f"[{i}/{len(workloads)}] {describe(row)}; {time.perf_counter() - started:.0f} s used")
        result["total_wall_s"] = time.perf_counter() - started
        result["target"] = target_summary(result["workloads"])
        write_json(args.out, result)
    return result


def main(argv: list[str] | None = None) -> int:
    """Entry point: checks, then the export or the benchmark; returns the exit status."""
    started = time.perf_counter()
    args = parse_args(argv)
    missing = missing_modules()
    if missing:
        log(f"missing Python packages: {', '.join(missing)} (install them or put them on PYTHONPATH)")
        return 2
    sys.path.insert(0, str(ROOT))  # fedsim from this checkout, installed or not
    import torch

    if args.export_data:
        export_data(args.export_data)
        return 0
    if not args.dry_run and not torch.cuda.is_available():
        log("CUDA is not available here; run on a GPU machine, or pass --dry-run for the CPU dry run")
        return 2
    result = run(args, started)
    failed = [r["name"] for r in result["workloads"] if r["status"] == "error"]
    log(f"wrote {args.out} in {result['total_wall_s']:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
