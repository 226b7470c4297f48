"""Hugging Face ``datasets`` on disk: a dataset written with ``save_to_disk``, or a folder of parquet files (as the
Hub stores them), read from a local path and never downloaded.

``path`` is

- a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (``state.json`` /
  ``dataset_dict.json``), read with ``datasets.load_from_disk`` (memory-mapped Arrow, no pickle);
- a ``.parquet`` file, or a folder of them: a file belongs to the test split when a folder on its path or its
  name's first part is ``test_split`` (``test/part-0.parquet``, ``data/test-00000-of-00001.parquet``), to the
  training split likewise for ``train_split``, and to the training split when no file names a split.

Columns are mapped by options (``--set dataset.x=COL --set dataset.y=COL``):

- ``x``: one column of images (the ``Image`` feature: encoded bytes, decoded with Pillow) or of fixed-length
  numeric lists / arrays, or a comma list of numeric scalar columns (tabular data, one feature each);
- ``y``: integer labels (``ClassLabel``), or strings / booleans numbered in sorted order over both splits;
- ``client`` (optional): a natural client id per sample (``writer_id``, ``speaker``), any type, for
  ``--partition natural`` or ``flwr:NaturalIdPartitioner``.

Without a test split a fixed (seed 0) 20% is held out, as for ``npz``. Images become ``[N, C, H, W]``;
everything is standardized with the training split's statistics like every other source.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Annotated

import numpy as np

from fedsim.core.components import option
from fedsim.core.errors import FedsimError

from .base import Dataset
from .datasets import standardize, stratified_split


def _error(path: Path, problem: str) -> FedsimError:
    return FedsimError(f"Hugging Face data '{path}': {problem}")


def _columns(spec: str | list[str]) -> list[str]:
    names = [c.strip() for c in (spec.split(",") if isinstance(spec, str) else spec)]
    if not names or not all(names):
        raise FedsimError(f"expected column names, got {spec!r}")
    return names


# --------------------------------------------------------------------------------------------------------
# Splits as Arrow tables
# --------------------------------------------------------------------------------------------------------


def _saved_splits(path: Path, train_split: str, test_split: str) -> tuple[object, object | None]:
    """(train, test or None) Arrow tables of a ``save_to_disk`` folder."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # never a network call
    try:
        import datasets
    except ImportError:
        raise _error(path, "save_to_disk folders need the datasets package (pip install fedsim[hf])") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # corrupt or foreign files: datasets raises many types
        raise _error(path, f"not readable with datasets.load_from_disk ({str(exc).splitlines()[0]})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if train_split not in loaded:
            raise _error(path, f"no split {train_split!r} (splits: {', '.join(loaded)}); set dataset.train_split")
        test = loaded[test_split].data.table if test_split in loaded else None
        return loaded[train_split].data.table, test
    return loaded.data.table, None


def _split_of(file: Path, root: Path, split: str) -> bool:
    parts = file.relative_to(root).parts if file != root else (file.name,)
    return any(p == split for p in parts[:-1]) or parts[-1].split("-")[0].split(".")[0].split("_")[0] == split


def _parquet_splits(path: Path, train_split: str, test_split: str, columns: list[str]) -> tuple[object, object | None]:
    """(train, test or None) Arrow tables of a parquet file or folder, only ``columns`` read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    if not files:
        raise _error(path, "no .parquet files and no save_to_disk dataset (state.json / dataset_dict.json) here")
    root = path.parent if path.is_file() else path
    test = [f for f in files if _split_of(f, root, test_split)]
    train = [f for f in files if f not in test and (_split_of(f, root, train_split) or not any(
        _split_of(g, root, train_split) for g in files))]  # fmt: skip
    if not train:
        raise _error(path, f"no parquet file of the {train_split!r} split")

    def read(group: list[Path]):
        tables = []
        for file in group:
            try:
                schema = pq.read_schema(file)
            except (OSError, pa.ArrowException) as exc:
                raise _error(file, f"not a readable parquet file ({str(exc).splitlines()[0]})") from None
            missing = [c for c in columns if c not in schema.names]
            if missing:
                raise _error(file, f"no column {', '.join(map(repr, missing))} (columns: {', '.join(schema.names)})")
            tables.append(pq.read_table(file, columns=columns))
        try:
            return pa.concat_tables(tables)
        except pa.ArrowInvalid as exc:
            raise _error(path, f"parquet files disagree on their columns' types ({exc})") from None

    return read(train), read(test) if test else None


# --------------------------------------------------------------------------------------------------------
# Columns as arrays
# --------------------------------------------------------------------------------------------------------


def _decode_images(path: Path, name: str, column) -> np.ndarray:
    from PIL import Image

    images = []
    for cell in column.to_pylist():
        if not cell or cell.get("bytes") is None:
            raise _error(path, f"column {name!r} has an image without embedded bytes (only a file path)")
        with Image.open(io.BytesIO(cell["bytes"])) as image:
            images.append(np.asarray(image))
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise _error(path, f"column {name!r} holds images of different sizes: {sorted(shapes)[:3]}")
    x = np.stack(images)
    return x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # [N, H, W(, C)] -> [N, C, H, W]


def _features(path: Path, table, names: list[str]) -> np.ndarray:
    import pyarrow as pa

    for name in names:
        if name not in table.column_names:
            raise _error(path, f"no column {name!r} (columns: {', '.join(table.column_names)}); set dataset.x")
    if len(names) > 1:  # tabular: one numeric scalar per column
        cols = []
        for name in names:
            kind = table.schema.field(name).type
            if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
                raise _error(path, f"column {name!r} is {kind}, not a number (a comma list of x columns is tabular)")
            cols.append(table.column(name).to_numpy(zero_copy_only=False).astype(np.float32))
        return np.stack(cols, axis=1)
    name = names[0]
    column, kind = table.column(name), table.schema.field(name).type
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        return _decode_images(path, name, column)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        raise _error(path, f"column {name!r} holds text; only numbers and images are read as features")
    try:
        x = np.asarray(column.to_pylist(), dtype=np.float32)
    except (TypeError, ValueError):
        raise _error(path, f"column {name!r} must hold numbers, images or equal-length numeric lists") from None
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim == 3:  # [N, H, W] grayscale arrays
        x = x[:, None]
    if not np.all(np.isfinite(x)):
        raise _error(path, f"column {name!r} contains NaN or infinite values")
    return x


def _values(path: Path, table, name: str, option_name: str) -> np.ndarray:
    if name not in table.column_names:
        raise _error(path, f"no column {name!r} (columns: {', '.join(table.column_names)}); set dataset.{option_name}")
    values = np.asarray(table.column(name).to_pylist())
    if values.ndim != 1 or values.dtype == object:
        raise _error(path, f"column {name!r} must hold one scalar per sample")
    return values


def _labels(path: Path, name: str, train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if train.dtype.kind in "iub":
        if len(train) and (train.min() < 0 or (len(test) and test.min() < 0)):
            raise _error(path, f"column {name!r} has negative labels")
        return train.astype(np.int64), test.astype(np.int64)
    if train.dtype.kind in "US":
        classes = np.unique(np.concatenate([train, test]))
        return np.searchsorted(classes, train).astype(np.int64), np.searchsorted(classes, test).astype(np.int64)
    raise _error(path, f"column {name!r} holds {train.dtype} values; labels must be integers, strings or booleans")


# --------------------------------------------------------------------------------------------------------
# Loader and component
# --------------------------------------------------------------------------------------------------------


def load_huggingface(
    path: str | Path,
    x: str | list[str] = "image",
    y: str = "label",
    client: str | None = None,
    train_split: str = "train",
    test_split: str = "test",
) -> Dataset:
    """The dataset at ``path`` (see the module docstring) with features ``x``, labels ``y`` and optional natural
    client ids from column ``client``."""
    path = Path(path)
    if not path.exists():
        raise _error(path, "no such file or folder")
    x_names = _columns(x)
    wanted = [*x_names, y, *([client] if client else [])]
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        train, test = _saved_splits(path, train_split, test_split)
    else:
        train, test = _parquet_splits(path, train_split, test_split, list(dict.fromkeys(wanted)))
    if train.num_rows == 0:
        raise _error(path, "the training split has no rows")
    x_train = _features(path, train, x_names)
    y_train = _values(path, train, y, "y")
    owner = _values(path, train, client, "client") if client else None
    if test is not None:
        x_test, y_test = _features(path, test, x_names), _values(path, test, y, "y")
        if x_test.shape[1:] != x_train.shape[1:]:
            raise _error(path, f"test samples have shape {x_test.shape[1:]}, training samples {x_train.shape[1:]}")
    y_train, y_test = _labels(path, y, y_train, y_test if test is not None else y_train[:0])
    if test is None:
        keep, held = stratified_split(y_train, 0.2)
        x_test, y_test = x_train[held], y_train[held]
        x_train, y_train = x_train[keep], y_train[keep]
        owner = owner[keep] if owner is not None else None
    natural = np.unique(owner, return_inverse=True)[1].reshape(-1).astype(np.int64) if owner is not None else None
    x_train, x_test = standardize(x_train, x_test)
    num_classes = int(max(y_train.max(), y_test.max() if len(y_test) else 0)) + 1
    return Dataset("hf", x_train, y_train, x_test, y_test, num_classes=num_classes, client_train=natural)


def hf(
    path: Annotated[str, option("a save_to_disk folder, or a .parquet file or folder of them")],
    x: Annotated[str, option("feature column (images or numeric lists), or a comma list of numeric columns")] = "image",
    y: Annotated[str, option("label column (integers, strings or booleans)")] = "label",
    client: Annotated[str | None, option("natural client id column, for --partition natural")] = None,
    train_split: Annotated[str, option("name of the training split")] = "train",
    test_split: Annotated[str, option("name of the test split (absent: 20% held out)")] = "test",
) -> Dataset:
    """A Hugging Face dataset on disk (save_to_disk or parquet), columns mapped by options."""
    return load_huggingface(path, x, y, client, train_split, test_split)
