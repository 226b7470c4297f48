"""The results folder: ``config.yaml``, ``metrics.jsonl``, ``summary.json``, ``label_histogram.csv``,
plots and ``checkpoint.pt``.

Writes are append-only (metrics) or atomic (replace a temporary file), so a killed run keeps every
complete line it wrote. Checkpoints hold only tensors and plain Python data and are loaded with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsim.errors import FedsimError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_FILE = "checkpoint.pt"
HISTOGRAM_FILE = "label_histogram.csv"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _clean(value: Any) -> Any:
    """JSON-safe value: non-finite floats become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class ResultsDir:
    """A run's output folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def create(cls, path: str | Path, overwrite: bool = False) -> ResultsDir:
        """Make a new results folder; an existing non-empty folder needs ``overwrite``."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise FedsimError(f"output path {path} exists and is not a folder")
        if path.is_dir() and any(path.iterdir()):
            if not overwrite:
                raise FedsimError(
                    f"results folder {path} already exists; pass --overwrite to replace it or --resume to continue it"
                )
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    @classmethod
    def open_existing(cls, path: str | Path) -> ResultsDir:
        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise FedsimError(f"cannot resume: {path} is not a results folder (no {CONFIG_FILE})")
        return cls(path)

    def file(self, name: str) -> Path:
        return self.path / name

    def write_text(self, name: str, text: str) -> None:
        _atomic_write_bytes(self.file(name), text.encode())

    def write_json(self, name: str, data: Any) -> None:
        self.write_text(name, json.dumps(data, indent=2, default=_clean) + "\n")

    def append_metrics(self, record: dict[str, Any]) -> None:
        line = json.dumps({k: _clean(v) for k, v in record.items()})
        with open(self.file(METRICS_FILE), "a") as f:
            f.write(line + "\n")
            f.flush()

    def read_metrics(self) -> list[dict[str, Any]]:
        path = self.file(METRICS_FILE)
        if not path.exists():
            return []
        records = []
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a truncated last line from a killed run
        return records

    def truncate_metrics(self, last_round: int) -> None:
        """Keep only metric lines of rounds ``<= last_round`` (used when resuming from a checkpoint)."""
        kept = [r for r in self.read_metrics() if r.get("round", 0) <= last_round]
        self.write_text(METRICS_FILE, "".join(json.dumps(r) + "\n" for r in kept))

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
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # corrupted or foreign file: refuse, never unpickle arbitrary objects
            raise FedsimError(f"cannot load checkpoint {path}: {str(e).splitlines()[0]}") from None
