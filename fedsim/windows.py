"""Availability windows in virtual time: when each client is online (``system.availability=FILE``).

The file is a CSV ``client,start_s,end_s`` of online intervals ``[start_s, end_s)`` on the virtual clock, any
number per client (``end_s`` may be ``inf``). A client without a row is never online. A synchronous round
selects among the clients online at its start; an asynchronous server dispatches only online clients. A
client whose window closes before it finishes drops out then: its work is wasted (``wasted_samples``) and,
in a synchronous round, it does not hold the round up past that moment.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from fedsim.core.errors import FedsimError

COLUMNS = ("client", "start_s", "end_s")


class Windows:
    """Online intervals per client (arrays sorted by client, then start)."""

    def __init__(self, client: np.ndarray, start: np.ndarray, end: np.ndarray, path: str = "") -> None:
        order = np.lexsort((start, client))
        self.client, self.start, self.end = client[order], start[order], end[order]
        self.path = path

    def check_clients(self, num_clients: int) -> None:
        """Refuse a file that names a client outside the run."""
        if len(self.client) and int(self.client.max()) >= num_clients:
            raise FedsimError(
                f"availability windows {self.path} name client {int(self.client.max())}, the run has {num_clients} "
                f"(0..{num_clients - 1})"
            )

    def _open(self, t: float) -> np.ndarray:
        return (self.start <= t) & (t < self.end)

    def online(self, t: float, num_clients: int) -> np.ndarray:
        """Sorted ids of the clients online at virtual time ``t``."""
        return np.unique(self.client[self._open(t)])

    def online_until(self, clients: np.ndarray, t: float) -> np.ndarray:
        """Per client, the end of its window open at ``t`` (``t`` itself when it is offline)."""
        out = np.full(len(clients), t, dtype=np.float64)
        is_open = self._open(t)
        for i, c in enumerate(np.asarray(clients, dtype=np.int64)):
            here = is_open & (self.client == c)
            if here.any():
                out[i] = float(self.end[here].max())
        return out

    def next_start(self, t: float) -> float | None:
        """The earliest window start after ``t`` (None when no window opens again)."""
        later = self.start[self.start > t]
        return float(later.min()) if len(later) else None


def read_windows(path: str | Path) -> Windows:
    """The windows of a CSV file (see the module docstring). Refuses in one line naming the file, the line and
    the column: a missing file or column, a non-number, a negative or non-integer client, a negative or
    non-finite start, an end not after its start; and a file without rows."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise FedsimError(f"availability windows {path}: cannot read it ({err.strerror or err})") from None
    reader = csv.reader(text.splitlines())
    header = [h.strip() for h in next(reader, [])]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise FedsimError(
            f"availability windows {path}, line 1: missing column(s) {', '.join(missing)} (needs {','.join(COLUMNS)})"
        )
    index = {c: header.index(c) for c in COLUMNS}
    values: dict[str, list[float]] = {c: [] for c in COLUMNS}
    for line, row in enumerate(reader, start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        parsed = {}
        for column in COLUMNS:
            where = f"availability windows {path}, line {line}, column {column}"
            try:
                cell = row[index[column]].strip()
            except IndexError:
                raise FedsimError(f"{where}: missing value") from None
            try:
                value = float(cell)
            except ValueError:
                raise FedsimError(f"{where}: {cell!r} is not a number") from None
            if column == "client" and (not value.is_integer() or value < 0):
                raise FedsimError(f"{where}: client ids are integers >= 0, got {cell!r}")
            if column == "start_s" and not (math.isfinite(value) and value >= 0):
                raise FedsimError(f"{where}: must be finite and >= 0, got {cell!r}")
            if column == "end_s" and not value > parsed["start_s"]:
                raise FedsimError(f"{where}: must be after start_s ({parsed['start_s']:g}), got {cell!r}")
            parsed[column] = value
        for column in COLUMNS:
            values[column].append(parsed[column])
    if not values["client"]:
        raise FedsimError(f"availability windows {path}: no rows")
    return Windows(np.asarray(values["client"], dtype=np.int64), np.asarray(values["start_s"]),
                   np.asarray(values["end_s"]), str(path))  # fmt: skip
