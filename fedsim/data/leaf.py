"""LEAF's JSON format, read from a local path (never downloaded).

LEAF's preprocessing (Caldas et al. 2018, github.com/TalwalkarLab/leaf) writes each split as JSON files of

    {"users": ["f0000_14", ...], "num_samples": [37, ...],
     "user_data": {"f0000_14": {"x": [[...], ...], "y": [4, ...]}, ...}}

(FEMNIST: ``x`` rows of 784 pixel values, ``y`` class ids; synthetic: feature vectors). ``path`` is one such file,
a folder of them, or a LEAF data folder with ``train/`` and ``test/`` subfolders (as ``leaf/data/femnist/data``).
Every user becomes a natural client (``--partition natural``), numbered in order of first appearance (files
read in name order). Without a test split a fixed 20% of the samples is held out (as for ``npz``).
Features that are a square number of pixels per sample (784 = 28 x 28) are read as one-channel images.

Only numeric features are read: Shakespeare's and Sent140's text and CelebA's image file names are refused
with a message that says so (fedsim's own ``shakespeare`` dataset covers next-character prediction).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import numpy as np

from fedsim.core.components import option
from fedsim.core.errors import FedsimError

from .base import Dataset
from .datasets import standardize, stratified_split


def _error(path: Path, problem: str) -> FedsimError:
    return FedsimError(f"LEAF data '{path}': {problem}")


def _json_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix == ".json" and p.is_file())
    if not files:
        raise _error(folder, "no .json files in this folder")
    return files


def leaf_files(path: str | Path) -> tuple[list[Path], list[Path]]:
    """The (train, test) JSON files of ``path``: a file, a folder of files, or a folder with ``train/`` and
    ``test/`` (test may be empty: then the loader holds out a split)."""
    path = Path(path)
    if not path.exists():
        raise _error(path, "no such file or folder")
    if path.is_file():
        return [path], []
    train, test = path / "train", path / "test"
    if train.is_dir():
        return _json_files(train), _json_files(test) if test.is_dir() else []
    return _json_files(path), []


def _read(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _error(file, f"not readable as JSON ({str(exc).splitlines()[0]})") from None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("users"), list)
        or not isinstance(data.get("user_data"), dict)
    ):
        raise _error(file, "expected an object with 'users' (a list) and 'user_data' (an object), as LEAF writes")
    return data


def read_leaf(files: list[Path], users: dict[str, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, labels and user numbers of every sample in ``files`` (``users`` maps names to numbers and is
    extended in order of appearance)."""
    xs, ys, owners = [], [], []
    for file in files:
        data = _read(file)
        counts = data.get("num_samples")
        if counts is not None and (not isinstance(counts, list) or len(counts) != len(data["users"])):
            size = len(counts) if isinstance(counts, list) else type(counts).__name__
            raise _error(file, f"'num_samples' has {size} entries but 'users' has {len(data['users'])}")
        for position, name in enumerate(data["users"]):
            record = data["user_data"].get(name)
            if not isinstance(record, dict) or "x" not in record or "y" not in record:
                raise _error(file, f"user {name!r} has no 'x' and 'y' in 'user_data'")
            x, y = record["x"], record["y"]
            if len(x) != len(y):
                raise _error(file, f"user {name!r} has {len(x)} samples in 'x' but {len(y)} labels in 'y'")
            if counts is not None and counts[position] != len(y):
                raise _error(file, f"user {name!r} has {len(y)} samples but 'num_samples' says {counts[position]}")
            if x and (isinstance(x[0], str) or (isinstance(x[0], list) and any(isinstance(v, str) for v in x[0]))):
                raise _error(
                    file,
                    "features are text or file names (Shakespeare, Sent140, CelebA); only numeric features "
                    "(FEMNIST, synthetic) are read; use --dataset shakespeare for next-character prediction",
                )
            try:
                features = np.asarray(x, dtype=np.float32)
                labels = np.asarray(y, dtype=np.float64)
            except (TypeError, ValueError):
                raise _error(file, f"user {name!r}: 'x' must be rows of numbers of one length, 'y' numbers") from None
            if len(labels) and (labels.ndim != 1 or np.any(labels < 0) or np.any(labels != np.round(labels))):
                raise _error(file, f"user {name!r}: labels must be non-negative integers")
            if len(features) and features.ndim != 2:
                raise _error(file, f"user {name!r}: 'x' must be a list of feature rows")
            xs.append(features.reshape(len(features), -1))
            ys.append(labels.astype(np.int64))
            owners.append(np.full(len(labels), users.setdefault(name, len(users)), dtype=np.int64))
    if not xs or sum(len(y) for y in ys) == 0:
        raise _error(files[0].parent, "no samples")
    widths = {x.shape[1] for x in xs if len(x)}
    if len(widths) > 1:
        raise _error(files[0].parent, f"samples have different feature lengths: {sorted(widths)}")
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(owners)


def as_images(x: np.ndarray) -> np.ndarray:
    """Rows of a square number of values (784) as one-channel images ``[N, 1, s, s]``; others unchanged."""
    side = math.isqrt(x.shape[1])
    return x.reshape(len(x), 1, side, side) if side * side == x.shape[1] and side >= 8 else x


def load_leaf(path: str | Path) -> Dataset:
    """A LEAF data set from ``path`` (see the module docstring), one natural client per user."""
    train_files, test_files = leaf_files(path)
    users: dict[str, int] = {}
    x, y, owner = read_leaf(train_files, users)
    if test_files:
        x_test, y_test, _ = read_leaf(test_files, users)
        if x_test.shape[1] != x.shape[1]:
            raise _error(Path(path), f"test samples have {x_test.shape[1]} features, training samples {x.shape[1]}")
    else:
        train, test = stratified_split(y, 0.2)
        x, y, owner, x_test, y_test = x[train], y[train], owner[train], x[test], y[test]
    x, x_test = standardize(as_images(x), as_images(x_test))
    num_classes = int(max(y.max(), y_test.max() if len(y_test) else 0)) + 1
    # natural client ids are renumbered 0..K-1 over the users that have training samples
    _, client = np.unique(owner, return_inverse=True)
    return Dataset("leaf", x, y, x_test, y_test, num_classes=num_classes, client_train=client.astype(np.int64))


def leaf(
    path: Annotated[str, option("a LEAF JSON file, a folder of them, or a folder with train/ and test/")],
) -> Dataset:
    """LEAF's JSON format (FEMNIST, synthetic; numeric features), one natural client per user."""
    return load_leaf(path)
