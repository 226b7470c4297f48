"""Availability windows in virtual time: when each client is online (``system.availability=FILE``).

The file is a CSV ``client,start_s,end_s`` of online intervals ``[start_s, end_s)`` on the virtual clock, any
number per client (``end_s`` may be ``inf``). A client without a row is never online. A synchronous round
selects among the clients online at its start; an asynchronous server dispatches only online clients. A
client whose window closes before it finishes drops out then: its work is wasted (``wasted_samples``) and,
in a synchronous round, it does not hold the round up past that moment.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from fedsim.core.csv_table import numeric_rows, where
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
    what = "availability windows"
    values: dict[str, list[float]] = {c: [] for c in COLUMNS}
    for line, row in numeric_rows(path, COLUMNS, what):
        client, start, end = row["client"], row["start_s"], row["end_s"]
        if not client.is_integer() or client < 0:
            raise FedsimError(f"{where(what, path, line, 'client')}: client ids are integers >= 0, got {client:g}")
        if not (math.isfinite(start) and start >= 0):
            raise FedsimError(f"{where(what, path, line, 'start_s')}: must be finite and >= 0, got {start:g}")
        if not end > start:
            raise FedsimError(f"{where(what, path, line, 'end_s')}: must be after start_s ({start:g}), got {end:g}")
        for column in COLUMNS:
            values[column].append(row[column])
    if not values["client"]:
        raise FedsimError(f"availability windows {path}: no rows")
    return Windows(np.asarray(values["client"], dtype=np.int64), np.asarray(values["start_s"]),
                   np.asarray(values["end_s"]), str(path))  # fmt: skip
