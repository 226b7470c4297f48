"""System heterogeneity on a virtual clock: every client's compute speed, bandwidths and latency.

A system model (component kind ``system``) gives each client ``k`` a profile: ``compute_s_per_sample``
(seconds of local training per processed sample), ``down_mbps`` and ``up_mbps`` (Mbit/s) and ``latency_s``
(seconds per round trip). The virtual duration of client ``k``'s round is exactly

    latency_s + bytes_down_k * 8 / (down_mbps * 1e6) + samples_k * compute_s_per_sample
              + bytes_up_k * 8 / (up_mbps * 1e6)

with ``samples_k`` the samples the client actually processed (:func:`durations`). A synchronous round lasts
as long as its slowest selected client; ``virtual_time_s`` in every metrics row is the cumulative sum.

Models:

- :func:`uniform` (the default): every client equal. The default figures (a phone-class device: 1 ms per
  sample, 20 Mbit/s down, 5 Mbit/s up, 50 ms latency) are our choice; only the time fields depend on them.
- :func:`lognormal`: each quantity drawn per client from a log-normal with the given median and ``sigma``
  (of the underlying normal): ``median * exp(sigma * z)``; slow compute and slow links are independent.
- :func:`pareto`: heavy tails: each quantity is its median times (compute, latency) or divided by
  (bandwidths) a Pareto slowdown ``f = U^(-1/shape) / 2^(1/shape)`` (median 1, so the median client is the
  median profile; ``P(f > x) = (x 2^(1/shape))^(-shape)``).
- :func:`trace`: a CSV file ``client, compute_s_per_sample, down_mbps, up_mbps, latency_s``, one row per
  client of the run.

Draws are counter-based (:mod:`fedsim.core.rng`, stream ``STREAM_SYSTEM``): a pure function of (seed,
quantity, client), so a client's profile does not depend on the number of clients or on the executor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np

from fedsim.core import components, rng
from fedsim.core.components import option
from fedsim.core.csv_table import numeric_rows, where
from fedsim.core.errors import FedsimError
from fedsim.windows import Windows, read_windows

QUANTITIES = ("compute_s_per_sample", "down_mbps", "up_mbps", "latency_s")
"""The per-client quantities, in the trace file's column order (after ``client``)."""


@dataclass(frozen=True)
class ClientProfiles:
    """Per-client system quantities, ``[N]`` float64 arrays indexed by client id."""

    compute_s_per_sample: np.ndarray
    down_mbps: np.ndarray
    up_mbps: np.ndarray
    latency_s: np.ndarray

    def __post_init__(self) -> None:
        for name in QUANTITIES:
            values = getattr(self, name)
            bad = ~np.isfinite(values) | ((values < 0) if name == "latency_s" else (values <= 0))
            if bad.any():
                client = int(np.flatnonzero(bad)[0])
                rule = ">= 0" if name == "latency_s" else "> 0"
                raise FedsimError(f"system: {name} of client {client} must be finite and {rule}, got {values[client]}")

    @property
    def num_clients(self) -> int:
        return len(self.latency_s)


def phases(
    profiles: ClientProfiles, clients: np.ndarray, bytes_down: np.ndarray, bytes_up: np.ndarray, samples: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each client's ``(download_s, compute_s, upload_s)``: ``latency_s + bytes_down * 8 / (down_mbps * 1e6)``
    (the latency counts with the download), ``samples * compute_s_per_sample`` and
    ``bytes_up * 8 / (up_mbps * 1e6)``; float64."""
    c = np.asarray(clients, dtype=np.int64)
    p = profiles
    download = p.latency_s[c] + np.asarray(bytes_down, dtype=np.float64) * 8 / (p.down_mbps[c] * 1e6)
    compute = np.asarray(samples, dtype=np.float64) * p.compute_s_per_sample[c]
    upload = np.asarray(bytes_up, dtype=np.float64) * 8 / (p.up_mbps[c] * 1e6)
    return download, compute, upload


def durations(
    profiles: ClientProfiles, clients: np.ndarray, bytes_down: np.ndarray, bytes_up: np.ndarray, samples: np.ndarray
) -> np.ndarray:
    """Virtual seconds of each client's round (see the module docstring), float64, one per entry of ``clients``:
    ``latency_s + bytes_down * 8 / (down_mbps * 1e6) + samples * compute_s_per_sample
    + bytes_up * 8 / (up_mbps * 1e6)``, summed left to right (:func:`phases`)."""
    download, compute, upload = phases(profiles, clients, bytes_down, bytes_up, samples)
    return download + compute + upload


class SystemModel:
    """A system model: :meth:`profiles` of ``num_clients`` clients (computed once per size)."""

    name = "system"

    def __init__(self, availability: str | None = None) -> None:
        self._cache: dict[int, ClientProfiles] = {}
        self.availability = availability
        self.windows: Windows | None = read_windows(availability) if availability else None
        """Online intervals in virtual time (:mod:`fedsim.windows`), or None: always online."""

    def profiles(self, num_clients: int) -> ClientProfiles:
        if num_clients not in self._cache:
            self._cache[num_clients] = ClientProfiles(**self.draw(num_clients))
        return self._cache[num_clients]

    def draw(self, num_clients: int) -> dict[str, np.ndarray]:
        raise NotImplementedError


class Uniform(SystemModel):
    """Every client has the same profile."""

    name = "uniform"

    def __init__(self, medians: dict[str, float], availability: str | None = None) -> None:
        super().__init__(availability)
        self.medians = medians

    def draw(self, num_clients: int) -> dict[str, np.ndarray]:
        return {q: np.full(num_clients, float(self.medians[q])) for q in QUANTITIES}


class LogNormal(SystemModel):
    """``median * exp(sigma * z)`` per client and quantity, ``z`` standard normal (Box-Muller on counter-based
    uniforms)."""

    name = "lognormal"

    def __init__(self, medians: dict[str, float], sigma: float, seed: int, availability: str | None = None) -> None:
        super().__init__(availability)
        if not (sigma >= 0 and math.isfinite(sigma)):
            raise FedsimError(f"lognormal sigma must be a finite number >= 0, got {sigma}")
        self.medians, self.sigma, self.seed = medians, float(sigma), int(seed)

    def draw(self, num_clients: int) -> dict[str, np.ndarray]:
        clients = np.arange(num_clients)
        out = {}
        for i, q in enumerate(QUANTITIES):
            u1 = rng.uniform(self.seed, rng.STREAM_SYSTEM, i, clients, 0)
            u2 = rng.uniform(self.seed, rng.STREAM_SYSTEM, i, clients, 1)
            z = np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)
            out[q] = float(self.medians[q]) * np.exp(self.sigma * z)
        return out


class Pareto(SystemModel):
    """Heavy-tailed slowdowns ``f = U^(-1/shape) / 2^(1/shape)`` (median 1) per client and quantity: compute
    time and latency are multiplied by ``f``, bandwidths divided by it."""

    name = "pareto"

    def __init__(self, medians: dict[str, float], shape: float, seed: int, availability: str | None = None) -> None:
        super().__init__(availability)
        if not (shape > 0 and math.isfinite(shape)):
            raise FedsimError(f"pareto shape must be a finite number > 0, got {shape}")
        self.medians, self.shape, self.seed = medians, float(shape), int(seed)

    def draw(self, num_clients: int) -> dict[str, np.ndarray]:
        clients = np.arange(num_clients)
        out = {}
        for i, q in enumerate(QUANTITIES):
            u = 1.0 - rng.uniform(self.seed, rng.STREAM_SYSTEM, i, clients, 0)  # in (0, 1]
            slowdown = u ** (-1.0 / self.shape) / 2.0 ** (1.0 / self.shape)
            median = float(self.medians[q])
            out[q] = median / slowdown if q.endswith("mbps") else median * slowdown
        return out


class Trace(SystemModel):
    """Profiles read from a CSV file (see :func:`read_trace`)."""

    name = "trace"

    def __init__(self, path: str, availability: str | None = None) -> None:
        super().__init__(availability)
        self.path = path
        self.rows = read_trace(path)

    def draw(self, num_clients: int) -> dict[str, np.ndarray]:
        have = len(self.rows["client"])
        if have != num_clients:
            raise FedsimError(f"system trace {self.path} has {have} clients (0..{have - 1}), the run has {num_clients}")
        return {q: self.rows[q] for q in QUANTITIES}


def read_trace(path: str | Path) -> dict[str, np.ndarray]:
    """The rows of a trace CSV (header ``client,compute_s_per_sample,down_mbps,up_mbps,latency_s``; one row
    per client ``0..N-1``, any order), as arrays indexed by client id. Refuses, in one line naming the file,
    the line and the column: a missing file or column, a non-number, a non-finite, negative or zero speed or
    bandwidth, a negative latency, a repeated or missing client."""
    path = Path(path)
    expected = ("client", *QUANTITIES)
    values: dict[str, list[float]] = {c: [] for c in expected}
    seen: dict[int, int] = {}
    for line, row in numeric_rows(path, expected, "system trace"):
        for column in expected:
            value, at = row[column], where("system trace", path, line, column)
            if column == "client":
                if not value.is_integer() or value < 0:
                    raise FedsimError(f"{at}: client ids are integers >= 0, got {value:g}")
                if int(value) in seen:
                    raise FedsimError(f"{at}: client {int(value)} already on line {seen[int(value)]}")
                seen[int(value)] = line
            elif not math.isfinite(value) or value < 0 or (value == 0 and column != "latency_s"):
                rule = ">= 0" if column == "latency_s" else "> 0"
                raise FedsimError(f"{at}: must be finite and {rule}, got {value:g}")
            values[column].append(value)
    if not seen:
        raise FedsimError(f"system trace {path}: no client rows")
    ids = np.asarray(values["client"], dtype=np.int64)
    absent = sorted(set(range(int(ids.max()) + 1)) - set(ids.tolist()))
    if absent:
        raise FedsimError(f"system trace {path}: no row for client {absent[0]} (clients are 0..N-1, one row each)")
    order = np.argsort(ids)
    return {"client": ids[order], **{q: np.asarray(values[q], dtype=np.float64)[order] for q in QUANTITIES}}


Compute = Annotated[float, option("median seconds of local training per processed sample", gt=0)]
Down = Annotated[float, option("median downlink bandwidth, Mbit/s", gt=0)]
Up = Annotated[float, option("median uplink bandwidth, Mbit/s", gt=0)]
Latency = Annotated[float, option("median latency per round trip, seconds", ge=0)]
Availability = Annotated[
    str | None, option("CSV of online windows in virtual time: client,start_s,end_s (default: always online)")
]


def _medians(compute_s_per_sample: float, down_mbps: float, up_mbps: float, latency_s: float) -> dict[str, float]:
    return dict(compute_s_per_sample=compute_s_per_sample, down_mbps=down_mbps, up_mbps=up_mbps, latency_s=latency_s)


def uniform(
    compute_s_per_sample: Compute = 1e-3,
    down_mbps: Down = 20.0,
    up_mbps: Up = 5.0,
    latency_s: Latency = 0.05,
    availability: Availability = None,
) -> Uniform:
    """Every client equal (the default: results are those of a run without a system model)."""
    return Uniform(_medians(compute_s_per_sample, down_mbps, up_mbps, latency_s), availability)


def lognormal(
    sigma: Annotated[float, option("sigma of the underlying normal (0: uniform)", ge=0)] = 1.0,
    compute_s_per_sample: Compute = 1e-3,
    down_mbps: Down = 20.0,
    up_mbps: Up = 5.0,
    latency_s: Latency = 0.05,
    availability: Availability = None,
    *,
    seed: int = 0,
) -> LogNormal:
    """Each quantity log-normal per client around its median: ``median * exp(sigma * z)``."""
    return LogNormal(_medians(compute_s_per_sample, down_mbps, up_mbps, latency_s), sigma, seed, availability)


def pareto(
    shape: Annotated[float, option("Pareto tail index (smaller: heavier tail)", gt=0)] = 1.5,
    compute_s_per_sample: Compute = 1e-3,
    down_mbps: Down = 20.0,
    up_mbps: Up = 5.0,
    latency_s: Latency = 0.05,
    availability: Availability = None,
    *,
    seed: int = 0,
) -> Pareto:
    """Heavy-tailed slowdowns per client and quantity (median 1) around the medians."""
    return Pareto(_medians(compute_s_per_sample, down_mbps, up_mbps, latency_s), shape, seed, availability)


def trace(
    path: Annotated[str, option("CSV: client,compute_s_per_sample,down_mbps,up_mbps,latency_s")],
    availability: Availability = None,
) -> Trace:
    """Per-client profiles from a trace file (one row per client of the run)."""
    return Trace(path, availability)


components.register("system", "uniform", uniform)
components.register("system", "lognormal", lognormal)
components.register("system", "pareto", pareto)
components.register("system", "trace", trace)
