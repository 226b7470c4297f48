"""The results folder: ``config.yaml``, ``metrics.jsonl``, ``summary.json``, ``label_histogram.csv``,
``client_accuracy.npy``, plots and ``checkpoint.pt``.

Writes are append-only (metrics) or atomic (replace a temporary file), so a killed run keeps every
complete line it wrote. Checkpoints hold only tensors and plain Python data and are loaded with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsim.core.errors import FedsimError, FedsimWarning

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CLIENT_ACCURACY_FILE = "client_accuracy.npy"
CHECKPOINT_FILE = "checkpoint.pt"
HISTOGRAM_FILE = "label_histogram.csv"
SEEDS_FILE = "seeds_config.yaml"  # marks a folder of repeated runs (fedsim.seeds)
STABILITY_FILE = "stability.csv"  # per-node twin distances of a stability-probe run (fedsim.probes)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _clean(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _looks_like_results(path: Path) -> bool:
    """A single run's folder, or a folder of repeated runs over seeds (marked by ``SEEDS_FILE``)."""
    return any((path / name).is_file() for name in (CONFIG_FILE, METRICS_FILE, SEEDS_FILE))


def _run_dir(run_dir: str | Path) -> Path:
    path = Path(run_dir)
    if not path.is_dir():
        raise FedsimError(f"run directory '{path}' does not exist")
    return path


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Parse ``RUN/metrics.jsonl`` into one dict per round, in file order.

    Blank lines are skipped. A final line that is not a valid JSON object is ignored (the run may still
    be appending to the file); a malformed line anywhere else raises :class:`FedsimError` naming the file
    and the 1-based line number. A missing folder or file also raises :class:`FedsimError`.
    """
    path = _run_dir(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FedsimError(f"run directory '{path.parent}' has no {METRICS_FILE}")
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise FedsimError(f"cannot read {path}: {exc.strerror or exc}") from exc
    numbered = [(i, line) for i, line in enumerate(text.splitlines(), start=1) if line.strip()]
    records: list[dict] = []
    for pos, (lineno, line) in enumerate(numbered):
        is_last = pos == len(numbered) - 1
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if is_last:
                break  # truncated line of a file still being written
            raise FedsimError(f"{path}:{lineno}: malformed JSON line ({exc.msg})") from exc
        if not isinstance(record, dict):
            if is_last:
                break
            raise FedsimError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def writable(folder: Path) -> bool:
    """Whether files can be created in ``folder`` (a read-only file system refuses even root)."""
    return os.access(folder, os.W_OK)


LOCK_FILE = ".lock"


class FolderLock:
    """An exclusive lock on a results folder for the whole run (``flock`` on ``OUT/.lock``, which holds the
    owner's pid). The operating system releases it when the process ends, however it ends; a lock file left
    by a dead process is taken over with a warning."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_FILE
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = self.holder()
            os.close(self.fd)
            raise FedsimError(
                f"results folder {folder} is in use by process {holder} (another run is writing it); wait for it, "
                "or choose another --out"
            ) from None
        previous = self.holder()
        if previous and previous != os.getpid():
            warnings.warn(
                f"results folder {folder}: taking over the lock of process {previous}, which is no longer running",
                FedsimWarning,
                stacklevel=3,
            )
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    def holder(self) -> int | None:
        text = os.pread(self.fd, 32, 0).decode(errors="replace").strip()
        return int(text) if text.isdigit() else None

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


class ResultsDir:
    """A run's output folder, locked for the run (:class:`FolderLock`) once created or opened to resume;
    :meth:`close` (or the end of the process) releases it."""

    def __init__(self, path: str | Path, lock: bool = False):
        self.path = Path(path)
        self._lock = FolderLock(self.path) if lock else None

    def close(self) -> None:
        """Release the folder's lock."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __del__(self) -> None:  # a folder object dropped without close(): release its lock with it
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()

    def __enter__(self) -> ResultsDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def check_new(path: str | Path, overwrite: bool = False) -> None:
        """Raise unless ``path`` can become a new results folder: it must not exist, be empty, or (with
        ``overwrite``) be an earlier results folder. Other folders are never deleted."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise FedsimError(f"output path {path} exists and is not a folder")
        if path.is_dir() and any(p.name != LOCK_FILE for p in path.iterdir()):
            if not overwrite:
                raise FedsimError(
                    f"results folder {path} already exists; pass --overwrite to replace it or --resume to continue it"
                )
            if not _looks_like_results(path):
                raise FedsimError(f"refusing to overwrite {path}: it is not a fedsim results folder")
        existing = next(p for p in (path, *path.absolute().parents) if p.exists())
        if not writable(existing):
            raise FedsimError(f"cannot write results to {path}: {existing} is not writable")

    @classmethod
    def create(cls, path: str | Path, overwrite: bool = False) -> ResultsDir:
        """Make a new results folder (see :meth:`check_new`), locked for the run; ``overwrite`` replaces an
        earlier one. The lock is taken before anything in the folder is looked at again or removed, so two
        runs started at once on one folder cannot both write it."""
        path = Path(path)
        cls.check_new(path, overwrite)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FedsimError(f"cannot create results folder {path}: {e.strerror or e}") from None
        folder = cls(path, lock=True)
        try:
            cls.check_new(path, overwrite)  # again, now that no other run can change it
            for child in path.iterdir():
                if child.name != LOCK_FILE:
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        except OSError as e:
            folder.close()
            raise FedsimError(f"cannot clear results folder {path}: {e.strerror or e}") from None
        except FedsimError:
            folder.close()
            raise
        return folder

    @classmethod
    def open_existing(cls, path: str | Path) -> ResultsDir:
        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise FedsimError(f"cannot resume: {path} is not a results folder (no {CONFIG_FILE})")
        if (path / STABILITY_FILE).is_file():
            raise FedsimError(f"cannot resume {path}: a stability-probe run keeps no checkpoint of its twin; rerun it")
        return cls(path, lock=True)

    def file(self, name: str) -> Path:
        return self.path / name

    def write_text(self, name: str, text: str) -> None:
        try:
            _atomic_write_bytes(self.file(name), text.encode())
        except OSError as e:
            raise FedsimError(f"cannot write {self.file(name)}: {e.strerror or e}") from None

    def write_json(self, name: str, data: Any) -> None:
        self.write_text(name, json.dumps(_clean(data), indent=2, allow_nan=False) + "\n")

    def append_metrics(self, record: dict[str, Any]) -> None:
        line = json.dumps(_clean(record), allow_nan=False)
        with open(self.file(METRICS_FILE), "a") as f:
            f.write(line + "\n")
            f.flush()

    def read_metrics(self) -> list[dict[str, Any]]:
        """Metric records so far (a truncated last line is ignored; a damaged earlier line is an error)."""
        return read_metrics(self.path) if self.file(METRICS_FILE).exists() else []

    def truncate_metrics(self, last_round: int) -> None:
        """Keep only metric lines of rounds ``<= last_round`` (used when resuming from a checkpoint)."""
        kept = [r for r in self.read_metrics() if r.get("round", 0) <= last_round]
        self.write_text(METRICS_FILE, "".join(json.dumps(r) + "\n" for r in kept))

    def write_client_accuracy(self, accuracy: np.ndarray) -> None:
        """``client_accuracy.npy``: every client's test accuracy at the last evaluation (float32, replaced)."""
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(accuracy, dtype=np.float32), allow_pickle=False)
        _atomic_write_bytes(self.file(CLIENT_ACCURACY_FILE), buffer.getvalue())

    def write_histogram(self, counts: np.ndarray) -> None:
        header = "client," + ",".join(f"class_{j}" for j in range(counts.shape[1]))
        rows = [f"{i}," + ",".join(str(int(c)) for c in row) for i, row in enumerate(counts)]
        self.write_text(HISTOGRAM_FILE, "\n".join([header, *rows]) + "\n")

    def save_checkpoint(self, payload: dict[str, Any]) -> None:
        tmp = self.file(CHECKPOINT_FILE + ".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, self.file(CHECKPOINT_FILE))

    def load_checkpoint(self) -> dict[str, Any] | None:
        path = self.file(CHECKPOINT_FILE)
        if not path.exists():
            return None
        if path.stat().st_size == 0:
            raise FedsimError(f"cannot load checkpoint {path}: it is empty (0 bytes); start over with --overwrite")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # corrupted or foreign file: refuse, never unpickle arbitrary objects
            detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise FedsimError(f"cannot load checkpoint {path}: {detail}") from None
