"""Test helper: small Fashion-MNIST-like IDX files (the format of /usr/share/datasets/fashion-mnist)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np


def idx_bytes(arr: np.ndarray, code: int = 0x08, dtype: str = "u1") -> bytes:
    """An IDX file: magic (two zero bytes, the type code, the number of dimensions), big-endian sizes, data."""
    header = bytes([0, 0, code, arr.ndim]) + np.array(arr.shape, dtype=">u4").tobytes()
    return header + arr.astype(dtype).tobytes()


def write_fashion(
    root: Path, n_train: int = 30, n_test: int = 10, hw: int = 6, gz: bool = True, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The four Fashion-MNIST files (gzipped or not) with random images and labels ``i % 10``; returns the
    training images and labels."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    data = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, hw, hw)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, hw, hw)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    for name, arr in data.items():
        raw = idx_bytes(arr)
        if gz:
            (root / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (root / name).write_bytes(raw)
    return data["train-images-idx3-ubyte"], data["train-labels-idx1-ubyte"]
