"""What every data source shares: the :class:`Dataset` container, where installed packages and the cache
live, and atomic cache writes. Its own module so that the sources (:mod:`fedsim.data.datasets`,
:mod:`fedsim.data.shakespeare`) import it without importing each other."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedsim.core.errors import FedsimWarning


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
# Cache of decoded sources
# --------------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Cache directory: ``$FEDSIM_CACHE_DIR``, else ``$XDG_CACHE_HOME/fedsim`` (an absolute path, as the XDG
    spec requires), else ``~/.cache/fedsim``."""
    explicit = os.environ.get("FEDSIM_CACHE_DIR")
    if not explicit and os.environ.get("FEDSIM_CACHE"):  # the variable's earlier name
        warnings.warn("FEDSIM_CACHE is now FEDSIM_CACHE_DIR (the old name still works)", FedsimWarning, stacklevel=2)
        explicit = os.environ["FEDSIM_CACHE"]
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "fedsim"
    try:
        return Path.home() / ".cache" / "fedsim"
    except RuntimeError:  # no home directory: a path that cannot be created, so nothing is cached
        return Path(os.devnull) / "fedsim"


def write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write the cache atomically (a uniquely named temporary file in the same folder, then ``os.replace``),
    so a concurrent reader sees the old file or the whole new one; any failure (read-only or missing home,
    full disk) is ignored: the caller simply has no cache."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except Exception:
        with contextlib.suppress(OSError):
            tmp.unlink()


ArraySpec = Mapping[str, tuple[str, tuple[int | None, ...]]]
"""What a cache file must hold: array name -> (dtype, shape); ``None`` in a shape matches any length."""


def conforms(arrays: Mapping[str, np.ndarray], spec: ArraySpec) -> bool:
    """Whether ``arrays`` has exactly the names of ``spec``, each array with its dtype and shape."""
    if sorted(arrays) != sorted(spec):
        return False
    for key, (dtype, shape) in spec.items():
        array = arrays[key]
        if array.dtype != np.dtype(dtype) or array.ndim != len(shape):
            return False
        if any(want is not None and want != got for want, got in zip(shape, array.shape, strict=True)):
            return False
    return True


def read_cache(path: Path, spec: ArraySpec) -> dict[str, np.ndarray] | None:
    """The arrays of the cache file ``path`` (``np.load`` with ``allow_pickle=False``) when they conform to
    ``spec``, else None: a missing, truncated, corrupt or foreign file is a cache miss, never an error."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if sorted(z.files) != sorted(spec):
                return None
            arrays = {key: z[key] for key in spec}
    except Exception:  # missing, not an npz (a .npy has no context manager), bad zip, bad member, ...
        return None
    return arrays if conforms(arrays, spec) else None
