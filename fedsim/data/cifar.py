"""CIFAR-10 and CIFAR-100 from the *binary* version (Krizhevsky 2009), read from a local path, never downloaded and
never unpickled.

``path`` is the archive (``cifar-10-binary.tar.gz`` / ``cifar-100-binary.tar.gz``, read in memory, nothing
extracted) or a folder holding the ``.bin`` files (``cifar-10-batches-bin/``, ``cifar-100-binary/``). A record is
raw bytes: CIFAR-10 ``<label><3072 pixels>``, CIFAR-100 ``<coarse label><fine label><3072 pixels>``; the pixels
are the red, green and blue 32 x 32 planes in row-major order. Training files: ``data_batch_1..5.bin``
(CIFAR-10), ``train.bin`` (CIFAR-100); test: ``test_batch.bin``, ``test.bin``. Images become float32
``[N, 3, 32, 32]`` standardized with the training split's scalar mean and standard deviation, like every other
image source.

The Python version of CIFAR (``cifar-10-python.tar.gz``: pickled batches) is refused by default, because loading a
pickle can run any code its author put in it. With ``allow_pickle: true`` it is read, and even then only through
:func:`fedsim.data.datasets.restricted_load`, which rebuilds numpy arrays and nothing else.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Annotated, Literal

import numpy as np

from fedsim.core.components import option
from fedsim.core.errors import FedsimError

from .base import Dataset
from .datasets import restricted_load, standardize

PIXELS = 3 * 32 * 32
LAYOUT = {
    "cifar10": (("data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin",
                 "data_batch_5.bin"), ("test_batch.bin",), 1, 10),
    "cifar100": (("train.bin",), ("test.bin",), 2, 100),
}  # fmt: skip
"""name -> (training files, test files, label bytes per record, classes)."""
PICKLED = {
    "cifar10": (("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"), ("test_batch",)),
    "cifar100": (("train",), ("test",)),
}
"""name -> (training files, test files) of the pickled Python version."""


def _error(path: Path, problem: str) -> FedsimError:
    return FedsimError(f"CIFAR data '{path}': {problem}")


def _read_files(path: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    """The bytes of the files ``names`` inside the archive or folder ``path`` (matched by base name)."""
    found: dict[str, bytes] = {}
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            if file.name in names and file.name not in found:
                found[file.name] = file.read_bytes()
    elif path.is_file():
        try:
            with tarfile.open(path, "r:*") as archive:
                for member in archive.getmembers():
                    name = Path(member.name).name
                    if member.isfile() and name in names and name not in found:
                        found[name] = archive.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise _error(path, f"not a readable tar archive ({exc})") from None
    else:
        raise _error(path, "no such file or folder")
    return found


def _records(path: Path, name: str, data: bytes, label_bytes: int, classes: int, label: int) -> tuple:
    record = label_bytes + PIXELS
    if len(data) == 0 or len(data) % record:
        raise _error(path, f"{name} has {len(data)} bytes, not a whole number of {record}-byte records")
    rows = np.frombuffer(data, dtype=np.uint8).reshape(-1, record)
    y = rows[:, label].astype(np.int64)
    if y.max() >= classes:
        raise _error(path, f"{name} has label {int(y.max())}, but this data set has {classes} classes")
    return rows[:, label_bytes:].reshape(-1, 3, 32, 32), y


def _unpickled(path: Path, file: str, data: bytes, key: str, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of one pickled batch (a dict of ``data`` and ``key``), numpy arrays only."""
    batch = restricted_load(io.BytesIO(data))
    if not isinstance(batch, dict):
        raise _error(path, f"{file} is not a pickled CIFAR batch (a dict)")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or key not in batch:
        raise _error(path, f"{file} has no 'data' and '{key}' entries")
    x, y = np.asarray(batch["data"]), np.asarray(batch[key], dtype=np.int64)
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != PIXELS or len(y) != len(x):
        raise _error(path, f"{file}: expected uint8 data of shape [N, {PIXELS}] and N labels, got {x.shape}")
    if len(y) and (y.min() < 0 or y.max() >= classes):
        raise _error(path, f"{file} has label {int(y.max())}, but this data set has {classes} classes")
    return x.reshape(-1, 3, 32, 32), y


def load_cifar(name: str, path: str | Path, label: str = "fine", allow_pickle: bool = False) -> Dataset:
    """CIFAR-10 (``name="cifar10"``) or CIFAR-100 (``"cifar100"``, ``label`` fine (100) or coarse (20)); the
    pickled Python version only with ``allow_pickle``."""
    path = Path(path)
    train_names, test_names, label_bytes, classes = LAYOUT[name]
    if name == "cifar100" and label == "coarse":
        classes = 20
    found = _read_files(path, train_names + test_names)
    missing = [n for n in train_names + test_names if n not in found]
    if missing:
        py_train, py_test = PICKLED[name]
        pickled = _read_files(path, py_train + py_test)
        if len(pickled) < len(py_train + py_test):
            raise _error(path, f"missing {', '.join(missing)} (the binary version of {name})")
        if not allow_pickle:
            problem = "this is the pickled Python version, which is refused (loading a pickle can run code)"
            raise _error(path, f"{problem}; use the binary version, or set allow_pickle: true if you trust the file")
        key = "labels" if name == "cifar10" else f"{label}_labels"
        splits = []
        for names in (py_train, py_test):
            parts = [_unpickled(path, n, pickled[n], key, classes) for n in names]
            splits.append((np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])))
        (x_train, y_train), (x_test, y_test) = splits
        x_train, x_test = standardize(x_train, x_test)
        return Dataset(name, x_train, y_train, x_test, y_test, num_classes=classes)
    label_index = 1 if name == "cifar100" and label == "fine" else 0
    splits = []
    for names in (train_names, test_names):
        parts = [_records(path, n, found[n], label_bytes, classes, label_index) for n in names]
        splits.append((np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])))
    (x_train, y_train), (x_test, y_test) = splits
    x_train, x_test = standardize(x_train, x_test)
    return Dataset(name, x_train, y_train, x_test, y_test, num_classes=classes)


DataPath = Annotated[str, option("cifar-*-binary.tar.gz, or the folder of its .bin files")]
AllowPickle = Annotated[bool, option("read the pickled Python version (a pickle can run code: trusted files only)")]


def cifar10(path: DataPath, allow_pickle: AllowPickle = False) -> Dataset:
    """CIFAR-10 (50,000 + 10,000 32x32 colour images, 10 classes) from the binary version on disk."""
    return load_cifar("cifar10", path, allow_pickle=allow_pickle)


def cifar100(
    path: DataPath,
    label: Annotated[Literal["fine", "coarse"], option("fine (100 classes) or coarse (20 superclasses)")] = "fine",
    allow_pickle: AllowPickle = False,
) -> Dataset:
    """CIFAR-100 (50,000 + 10,000 32x32 colour images, 100 classes) from the binary version on disk."""
    return load_cifar("cifar100", path, label, allow_pickle)
