"""What every data source shares: the :class:`Dataset` container, where installed packages and the cache
live, and atomic cache writes. Its own module so that the sources (:mod:`fedsim.data.datasets`,
:mod:`fedsim.data.shakespeare`) import it without importing each other."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Dataset:
    """A train/test split, standardized, with an optional natural client id per training sample."""

    name: str
    x_train: np.ndarray  # float32 [N, *feature_shape] (token datasets: character indices, not standardized)
    y_train: np.ndarray  # int64 [N]
    x_test: np.ndarray  # float32 [M, *feature_shape]
    y_test: np.ndarray  # int64 [M]
    num_classes: int
    client_train: np.ndarray | None = None  # int64 [N] natural client id of each training sample

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """Shape of one sample, e.g. ``(1, 28, 28)`` for MNIST or ``(60,)`` for synthetic."""
        return tuple(int(d) for d in self.x_train.shape[1:])


def package_dir(package: str) -> Path | None:
    """Directory of an installed package, found with ``importlib.util.find_spec`` WITHOUT importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        return Path(loc)
    return None


# --------------------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Cache directory: ``$FEDSIM_CACHE`` or ``~/.cache/fedsim``."""
    return Path(os.environ.get("FEDSIM_CACHE") or Path.home() / ".cache" / "fedsim")


def write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write the cache atomically; any failure (read-only home, full disk) is ignored."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except Exception:
        with contextlib.suppress(OSError):
            tmp.unlink()
