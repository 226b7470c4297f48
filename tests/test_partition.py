"""Tests for fedsim.data.partition."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.core.errors import FedsimError
from fedsim.data import PARTITIONERS, label_histogram, partition, split_clients
from fedsim.data.partition import repair_min_size, sample_dirichlet


def labels(n: int = 2000, num_classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_classes, n).astype(np.int64)


def natural_ids(n: int, num_clients: int, seed: int = 0) -> np.ndarray:
    """Every client id 0..num_clients-1 present, scrambled to non-contiguous values."""
    rng = np.random.default_rng(seed)
    ids = np.concatenate([np.arange(num_clients), rng.integers(0, num_clients, n - num_clients)])
    return rng.permutation(ids) * 7 + 3


def run(name: str, y: np.ndarray, num_clients: int, **kw) -> list[np.ndarray]:
    if name == "natural" and "natural" not in kw:
        kw["natural"] = natural_ids(len(y), num_clients)
    return partition(name, y, num_clients, **kw)


def assert_exact_cover(parts: list[np.ndarray], n: int, num_clients: int) -> None:
    assert len(parts) == num_clients
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0), "indices must be sorted and unique"
    flat = np.sort(np.concatenate(parts))
    np.testing.assert_array_equal(flat, np.arange(n))


# --------------------------------------------------------------------------------------------------------
# Properties shared by all partitioners
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PARTITIONERS)
def test_exact_cover_and_client_count(name):
    y = labels()
    parts = run(name, y, 20, seed=3)
    assert_exact_cover(parts, len(y), 20)


@pytest.mark.parametrize("name", PARTITIONERS)
def test_deterministic_for_equal_seed(name):
    y = labels()
    a = run(name, y, 20, seed=5)
    b = run(name, y, 20, seed=5)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))


@pytest.mark.parametrize("name", ["iid", "dirichlet", "shards"])
def test_different_seeds_differ(name):
    y = labels()
    a = run(name, y, 20, seed=1)
    b = run(name, y, 20, seed=2)
    assert any(not np.array_equal(p, q) for p, q in zip(a, b, strict=True))


@pytest.mark.parametrize("name", PARTITIONERS)
def test_min_size_honoured(name):
    y = labels(500)
    parts = run(name, y, 50, seed=0, alpha=0.05, min_size=5, classes_per_client=1)
    assert_exact_cover(parts, len(y), 50)
    assert min(len(p) for p in parts) >= 5


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 300),
    num_clients=st.integers(1, 40),
    num_classes=st.integers(1, 12),
    alpha=st.floats(1e-4, 100.0),
    min_size=st.integers(0, 4),
    seed=st.integers(0, 2**31),
    name=st.sampled_from(["iid", "dirichlet", "shards"]),
)
def test_partition_properties(n, num_clients, num_classes, alpha, min_size, seed, name):
    y = labels(n, num_classes, seed=seed % 1000)
    k = min(2, len(np.unique(y)))
    try:
        parts = partition(name, y, num_clients, seed=seed, alpha=alpha, min_size=min_size, classes_per_client=k)
    except FedsimError:
        # Only the documented infeasible cases may raise.
        too_few = n < num_clients * min_size
        uncovered = name == "shards" and num_clients * k < len(np.unique(y))
        assert too_few or uncovered
        return
    assert_exact_cover(parts, n, num_clients)
    assert min(len(p) for p in parts) >= min_size


# --------------------------------------------------------------------------------------------------------
# iid
# --------------------------------------------------------------------------------------------------------


def test_iid_sizes_near_equal():
    parts = partition("iid", labels(1003), 10, seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


# --------------------------------------------------------------------------------------------------------
# dirichlet
# --------------------------------------------------------------------------------------------------------


def test_dirichlet_tiny_alpha_many_clients_terminates():
    y = labels(60_000)
    parts = partition("dirichlet", y, 1000, seed=0, alpha=0.001, min_size=1)
    assert_exact_cover(parts, len(y), 1000)
    assert min(len(p) for p in parts) >= 1
    parts = partition("dirichlet", y, 1000, seed=1, alpha=0.001, min_size=20)
    assert_exact_cover(parts, len(y), 1000)
    assert min(len(p) for p in parts) >= 20


def max_class_fraction(y: np.ndarray, parts: list[np.ndarray], num_classes: int) -> float:
    hist = label_histogram(y, parts, num_classes)
    return float(np.mean(hist.max(axis=1) / hist.sum(axis=1)))


def test_dirichlet_small_alpha_is_skewed():
    y = labels(10_000)
    parts = partition("dirichlet", y, 50, seed=0, alpha=0.01)
    assert max_class_fraction(y, parts, 10) > 0.9


def test_dirichlet_large_alpha_is_near_uniform():
    y = labels(10_000)
    parts = partition("dirichlet", y, 10, seed=0, alpha=1000.0)
    assert max_class_fraction(y, parts, 10) < 0.15
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() > 0.8 * sizes.mean()


@pytest.mark.parametrize("alpha", [1e-8, 1e-4, 0.5, 1e4])
def test_sample_dirichlet_is_a_distribution(alpha):
    rng = np.random.default_rng(0)
    for k in (1, 2, 1000):
        p = sample_dirichlet(alpha, k, rng)
        assert p.shape == (k,)
        assert np.all(np.isfinite(p)) and np.all(p >= 0)
        assert p.sum() == pytest.approx(1.0)


def test_sample_dirichlet_tiny_alpha_is_one_hot_like():
    rng = np.random.default_rng(0)
    p = sample_dirichlet(1e-6, 50, rng)
    assert p.max() == pytest.approx(1.0)


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan"), float("inf")])
def test_dirichlet_bad_alpha(alpha):
    with pytest.raises(FedsimError, match="alpha"):
        partition("dirichlet", labels(), 10, alpha=alpha)


def test_repair_moves_from_largest():
    parts = [np.arange(10), np.array([], dtype=np.int64), np.array([], dtype=np.int64), np.array([10, 11])]
    out = repair_min_size(parts, 3, np.random.default_rng(0))
    # clients 1 and 2 take 3 each from client 0 (10 -> 7 -> 4), client 3 takes 1 (4 -> 3)
    assert [len(p) for p in out] == [3, 3, 3, 3]
    np.testing.assert_array_equal(np.sort(np.concatenate(out)), np.arange(12))
    assert {10, 11} <= set(out[3].tolist())


def test_repair_exact_rule():
    parts = [np.arange(10), np.array([], dtype=np.int64), np.array([10]), np.arange(11, 16)]
    out = repair_min_size(parts, 3, np.random.default_rng(0))
    # client 1 takes 3 from client 0 (largest, 10 -> 7); client 2 takes 2 from client 0 (7 -> 5)
    assert [len(p) for p in out] == [5, 3, 3, 5]
    np.testing.assert_array_equal(out[3], np.arange(11, 16))
    assert 10 in out[2]
    np.testing.assert_array_equal(np.sort(np.concatenate(out)), np.arange(16))


# --------------------------------------------------------------------------------------------------------
# shards
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_clients", "k"), [(20, 2), (7, 3), (10, 1), (4, 10)])
def test_shards_exactly_k_classes(num_clients, k):
    y = labels(3000)
    parts = partition("shards", y, num_clients, seed=4, classes_per_client=k)
    assert_exact_cover(parts, len(y), num_clients)
    hist = label_histogram(y, parts, 10)
    np.testing.assert_array_equal((hist > 0).sum(axis=1), np.full(num_clients, k))
    assert np.all(hist.sum(axis=0) > 0), "every class is held by some client"


def test_shards_splits_each_class_evenly():
    y = np.repeat(np.arange(10), 100)
    parts = partition("shards", y, 20, seed=0, classes_per_client=2)
    hist = label_histogram(y, parts, 10)
    for c in range(10):
        held = hist[:, c][hist[:, c] > 0]
        assert held.max() - held.min() <= 1


@pytest.mark.parametrize("k", [0, 11, -1])
def test_shards_bad_k(k):
    with pytest.raises(FedsimError, match="classes_per_client"):
        partition("shards", labels(), 10, classes_per_client=k)


def test_shards_too_few_clients_to_cover_classes():
    with pytest.raises(FedsimError, match="cannot cover all 10 classes"):
        partition("shards", labels(), 4, classes_per_client=2)


def test_shards_more_clients_than_samples():
    with pytest.raises(FedsimError, match="too few"):
        partition("shards", labels(5), 10, classes_per_client=1)


# --------------------------------------------------------------------------------------------------------
# natural
# --------------------------------------------------------------------------------------------------------


def test_natural_remaps_ids_in_sorted_order():
    y = np.zeros(6, dtype=np.int64)
    natural = np.array([10, 10, 3, 7, 3, 10])
    parts = partition("natural", y, 3, natural=natural)
    assert [p.tolist() for p in parts] == [[2, 4], [3], [0, 1, 5]]


def test_natural_wrong_client_count():
    with pytest.raises(FedsimError, match="has 3 natural clients"):
        partition("natural", np.zeros(6, dtype=np.int64), 5, natural=np.array([10, 10, 3, 7, 3, 10]))


def test_natural_missing():
    with pytest.raises(FedsimError, match="dataset has no natural partition"):
        partition("natural", labels(), 10)


def test_natural_length_mismatch():
    with pytest.raises(FedsimError, match="client ids"):
        partition("natural", labels(10), 2, natural=np.array([0, 1]))


# --------------------------------------------------------------------------------------------------------
# Errors common to all partitioners
# --------------------------------------------------------------------------------------------------------


def test_unknown_partitioner_suggests():
    with pytest.raises(FedsimError, match="did you mean 'dirichlet'"):
        partition("dirichlett", labels(), 10)


def test_too_few_samples_for_min_size():
    with pytest.raises(FedsimError, match="too few"):
        partition("dirichlet", labels(50), 10, min_size=6)


def test_iid_more_clients_than_samples():
    with pytest.raises(FedsimError, match="too few"):
        partition("iid", labels(5), 10)


def test_min_size_zero_allows_empty_clients():
    parts = partition("iid", labels(5), 10, min_size=0)
    assert_exact_cover(parts, 5, 10)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_clients": 0}, "num_clients"),
        ({"num_clients": 2.5}, "num_clients"),
        ({"min_size": -1}, "min_size"),
        ({"seed": -3}, "seed"),
        ({"y": np.array([0, -1, 2])}, "labels must be >= 0"),
        ({"y": np.array([0.5, 1.0])}, "labels must be integers"),
        ({"y": np.zeros((4, 2), dtype=np.int64)}, "1-D"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"y": labels(100), "num_clients": 5, **kwargs}
    y, num_clients = args.pop("y"), args.pop("num_clients")
    with pytest.raises(FedsimError, match=match):
        partition("iid", y, num_clients, **args)


# --------------------------------------------------------------------------------------------------------
# label_histogram and split_clients
# --------------------------------------------------------------------------------------------------------


def test_label_histogram():
    y = np.array([0, 1, 1, 2, 2, 2])
    hist = label_histogram(y, [np.array([0, 1]), np.array([2, 3, 4, 5]), np.array([], dtype=np.int64)], 4)
    assert hist.dtype == np.int64
    np.testing.assert_array_equal(hist, [[1, 1, 0, 0], [0, 1, 3, 0], [0, 0, 0, 0]])


def test_label_histogram_label_out_of_range():
    with pytest.raises(FedsimError, match="out of range"):
        label_histogram(np.array([0, 5]), [np.array([0, 1])], 3)


def test_split_clients_fractions():
    parts = [np.arange(0, 10), np.arange(10, 12), np.arange(12, 13), np.arange(13, 113)]
    train, test = split_clients(parts, 0.2, seed=0)
    assert [len(t) for t in test] == [2, 1, 0, 20]
    for p, tr, te in zip(parts, train, test, strict=True):
        assert not set(tr) & set(te)
        np.testing.assert_array_equal(np.sort(np.concatenate([tr, te])), p)
        assert np.all(np.diff(tr) > 0) and np.all(np.diff(te) > 0)


def test_split_clients_small_fraction_gives_one_test_sample():
    _, test = split_clients([np.arange(5)], 0.01, seed=0)
    assert len(test[0]) == 1


def test_split_clients_zero_fraction():
    parts = [np.arange(5), np.arange(5, 9)]
    train, test = split_clients(parts, 0.0, seed=0)
    assert all(len(t) == 0 for t in test)
    assert all(np.array_equal(a, b) for a, b in zip(train, parts, strict=True))


def test_split_clients_deterministic_and_seeded():
    parts = partition("iid", labels(1000), 5)
    a = split_clients(parts, 0.3, seed=1)
    b = split_clients(parts, 0.3, seed=1)
    c = split_clients(parts, 0.3, seed=2)
    assert all(np.array_equal(p, q) for p, q in zip(a[1], b[1], strict=True))
    assert any(not np.array_equal(p, q) for p, q in zip(a[1], c[1], strict=True))


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_split_clients_bad_fraction(fraction):
    with pytest.raises(FedsimError, match="test_fraction"):
        split_clients([np.arange(5)], fraction, seed=0)
