"""Partition a labelled training set over clients.

Every partitioner returns ``num_clients`` sorted int64 index arrays into ``y`` that together hold every
index exactly once (no sample is ever dropped), deterministically given ``seed``. Afterwards every client is
brought up to ``min_size`` samples by :func:`repair_min_size`.

Randomness comes from ``numpy.random.default_rng((STREAM_PARTITION, seed))`` so that partitioning never
shares a stream with other uses of the same experiment seed.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np

from fedsim.core.components import option
from fedsim.core.errors import FedsimError, unknown
from fedsim.core.rng import STREAM_PARTITION

PARTITIONERS: tuple[str, ...] = ("iid", "dirichlet", "shards", "natural")

_STREAM_SPLIT_CLIENTS = 1


# --------------------------------------------------------------------------------------------------------
# Validation and helpers
# --------------------------------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_seed(seed: int) -> int:
    if not _is_int(seed) or seed < 0:
        raise FedsimError(f"seed must be an integer >= 0, got {seed!r}")
    return int(seed)


def _check_labels(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise FedsimError(f"labels must be a 1-D array, got shape {y.shape}")
    if y.size == 0:
        return y.astype(np.int64)
    if y.dtype.kind not in "iu":
        raise FedsimError(f"labels must be integers, got dtype {y.dtype}")
    if y.min() < 0:
        raise FedsimError(f"labels must be >= 0, got minimum {y.min()}")
    return y.astype(np.int64)


def _rng(seed: int, *extra: int) -> np.random.Generator:
    return np.random.default_rng((STREAM_PARTITION, seed, *extra))


def parts_from_owner(owner: np.ndarray, num_clients: int) -> list[np.ndarray]:
    """Turn an owner array (client id of each sample) into ``num_clients`` sorted index arrays."""
    order = np.argsort(owner, kind="stable").astype(np.int64)  # stable: indices stay ascending per client
    sizes = np.bincount(owner, minlength=num_clients)
    return np.split(order, np.cumsum(sizes)[:-1])


def repair_min_size(parts: list[np.ndarray], min_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Give every client at least ``min_size`` samples by moving samples from the largest clients.

    Rule: deficient clients are served in increasing id order; each takes what it lacks from the currently
    largest client (lowest id on ties), at most that client's surplus above ``min_size``, repeating with the
    next largest until satisfied; the moved samples are a seeded random subset of the donor's. Each step
    either satisfies a client or brings a donor down to ``min_size`` (it never donates again), so there are
    at most ``2 * num_clients`` steps. Requires ``sum(sizes) >= num_clients * min_size``.
    """
    parts = [np.asarray(p, dtype=np.int64) for p in parts]
    sizes = np.array([len(p) for p in parts], dtype=np.int64)
    if min_size <= 0 or sizes.min(initial=min_size) >= min_size:
        return parts
    if sizes.sum() < len(parts) * min_size:
        raise FedsimError(f"{sizes.sum()} samples cannot give {len(parts)} clients {min_size} samples each")
    for client in np.flatnonzero(sizes < min_size):
        while sizes[client] < min_size:
            donor = int(np.argmax(sizes))
            give = int(min(min_size - sizes[client], sizes[donor] - min_size))
            pick = np.zeros(sizes[donor], dtype=bool)
            pick[rng.choice(sizes[donor], size=give, replace=False)] = True
            parts[client] = np.sort(np.concatenate([parts[client], parts[donor][pick]]))
            parts[donor] = parts[donor][~pick]
            sizes[client] += give
            sizes[donor] -= give
    return parts


# --------------------------------------------------------------------------------------------------------
# Partitioners
# --------------------------------------------------------------------------------------------------------


def iid_partition(n: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A random permutation of ``0..n-1`` cut into ``num_clients`` parts whose sizes differ by at most 1."""
    return [np.sort(p) for p in np.array_split(rng.permutation(n).astype(np.int64), num_clients)]


def sample_dirichlet(alpha: float, k: int, rng: np.random.Generator) -> np.ndarray:
    """One draw of ``Dir(alpha * 1_k)``, computed in log space so that tiny ``alpha`` cannot underflow.

    ``p_i = G_i / sum(G)`` with ``G_i ~ Gamma(alpha, 1)``; ``log G_i = log Gamma(alpha + 1, 1) + log(U_i) /
    alpha`` (U uniform on (0, 1]), which is exact and finite even when ``G_i`` itself would underflow to 0
    (alpha = 0.001). Should the result still be non-finite, it falls back to a one-hot on the largest
    ``log G_i``.
    """
    log_g = np.log(rng.gamma(alpha + 1.0, 1.0, k)) + np.log1p(-rng.random(k)) / alpha
    top = int(np.argmax(log_g))
    p = np.exp(log_g - log_g[top])
    total = p.sum()
    if not np.isfinite(total) or total <= 0:
        p = np.zeros(k)
        p[top] = 1.0
        return p
    return p / total


def dirichlet_partition(y: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Label skew: for every class c, ``p_c ~ Dir(alpha * 1)`` over clients; the class's samples, shuffled,
    are cut at ``floor(cumsum(p_c) * n_c)``, so client i receives about ``p_c[i] * n_c`` of them.
    Small alpha concentrates each class on few clients; large alpha approaches an even split.
    """
    owner = np.empty(len(y), dtype=np.int64)
    clients = np.arange(num_clients, dtype=np.int64)
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        p = sample_dirichlet(alpha, num_clients, rng)
        cuts = np.minimum(np.floor(np.cumsum(p)[:-1] * len(members)).astype(np.int64), len(members))
        counts = np.diff(np.concatenate([[0], cuts, [len(members)]]))
        owner[members] = np.repeat(clients, counts)
    return parts_from_owner(owner, num_clients)


def shard_classes(classes: np.ndarray, num_clients: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Classes held by each client, ``[num_clients, k]``: with ``perm`` a seeded shuffle of the classes,
    client i holds ``perm[(i * k + j) mod C]`` for ``j < k`` -- k distinct classes (k <= C), and every
    class is held by someone since ``num_clients * k >= C`` consecutive positions cover all residues.
    """
    perm = rng.permutation(classes)
    pos = (np.arange(num_clients)[:, None] * k + np.arange(k)[None, :]) % len(classes)
    return perm[pos]


def shards_partition(y: np.ndarray, num_clients: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Pathological non-IID: each client holds exactly ``k`` classes (see :func:`shard_classes`); every
    class's samples, shuffled, are split evenly (sizes differing by at most 1) among the clients holding it.
    A client holds fewer than k classes only if some class has fewer samples than holders.
    """
    classes = np.unique(y)
    if not 1 <= k <= len(classes):
        raise FedsimError(f"classes_per_client must be between 1 and the number of classes ({len(classes)}), got {k}")
    if num_clients * k < len(classes):
        raise FedsimError(
            f"shards: {num_clients} clients x {k} classes per client cannot cover all "
            f"{len(classes)} classes; "
            f"use at least {-(-len(classes) // k)} clients or more classes per client"
        )
    held = shard_classes(classes, num_clients, k, rng)
    owner = np.empty(len(y), dtype=np.int64)
    for c in classes:
        holders = np.flatnonzero((held == c).any(axis=1))
        members = rng.permutation(np.flatnonzero(y == c))
        counts = np.full(len(holders), len(members) // len(holders), dtype=np.int64)
        counts[: len(members) % len(holders)] += 1
        owner[members] = np.repeat(rng.permutation(holders), counts)
    return parts_from_owner(owner, num_clients)


def natural_partition(natural: np.ndarray | None, n: int, num_clients: int) -> list[np.ndarray]:
    """The dataset's own clients: ids are remapped to ``0..K-1`` in sorted id order; K must equal
    ``num_clients``."""
    if natural is None:
        raise FedsimError("partition 'natural': dataset has no natural partition (no client id per sample)")
    natural = np.asarray(natural)
    if natural.ndim != 1 or len(natural) != n:
        raise FedsimError(f"partition 'natural': expected {n} client ids, got shape {natural.shape}")
    if natural.dtype.kind not in "iu":
        raise FedsimError(f"partition 'natural': client ids must be integers, got dtype {natural.dtype}")
    ids, owner = np.unique(natural, return_inverse=True)
    if len(ids) != num_clients:
        raise FedsimError(
            f"partition 'natural': the dataset has {len(ids)} natural clients, "
            f"but num_clients is {num_clients}; "
            f"set num_clients to {len(ids)}"
        )
    return parts_from_owner(owner.reshape(-1).astype(np.int64), num_clients)


def partition(
    name: str,
    y: np.ndarray,
    num_clients: int,
    *,
    seed: int = 0,
    alpha: float = 0.5,
    min_size: int = 1,
    classes_per_client: int = 2,
    natural: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Split the indices of ``y`` over ``num_clients`` clients with one of :data:`PARTITIONERS`.

    Returns ``num_clients`` sorted int64 index arrays covering ``0..len(y)-1`` exactly once. Every client
    ends with at least ``min_size`` samples (:func:`repair_min_size`; a no-op for ``natural`` unless a
    natural client is smaller than ``min_size``). Raises :class:`FedsimError` for bad arguments, including
    ``len(y) < num_clients * min_size``.
    """
    key = str(name).strip().lower()
    if key not in PARTITIONERS:
        raise unknown("partitioner", str(name), PARTITIONERS)
    y = _check_labels(y)
    seed = _check_seed(seed)
    if not _is_int(num_clients) or num_clients < 1:
        raise FedsimError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if not _is_int(min_size) or min_size < 0:
        raise FedsimError(f"min_size must be an integer >= 0, got {min_size!r}")
    num_clients, min_size = int(num_clients), int(min_size)
    if len(y) < num_clients * min_size:
        raise FedsimError(
            f"partition '{key}': {len(y)} samples are too few for {num_clients} clients "
            f"with min_size {min_size} "
            f"(need at least {num_clients * min_size})"
        )
    rng = _rng(seed)
    if key == "iid":
        parts = iid_partition(len(y), num_clients, rng)
    elif key == "dirichlet":
        if not isinstance(alpha, (int, float, np.number)) or not np.isfinite(alpha) or alpha <= 0:
            raise FedsimError(f"dirichlet alpha must be a finite number > 0, got {alpha!r}")
        parts = dirichlet_partition(y, num_clients, float(alpha), rng)
    elif key == "shards":
        if not _is_int(classes_per_client):
            raise FedsimError(f"classes_per_client must be an integer, got {classes_per_client!r}")
        parts = shards_partition(y, num_clients, int(classes_per_client), rng)
    else:
        parts = natural_partition(natural, len(y), num_clients)
    return repair_min_size(parts, min_size, rng)


# --------------------------------------------------------------------------------------------------------
# Summaries and per-client splits
# --------------------------------------------------------------------------------------------------------


def label_histogram(y: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """``h[i, c]`` = number of samples of class c held by client i; int64 ``[num_clients, num_classes]``."""
    y = _check_labels(y)
    if y.size and y.max() >= num_classes:
        raise FedsimError(f"label {y.max()} is out of range for num_classes={num_classes}")
    sizes = np.array([len(p) for p in parts], dtype=np.int64)
    if not len(parts):
        return np.zeros((0, num_classes), dtype=np.int64)
    flat = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])
    client = np.repeat(np.arange(len(parts), dtype=np.int64), sizes)
    counts = np.bincount(client * num_classes + y[flat], minlength=len(parts) * num_classes)
    return counts.reshape(len(parts), num_classes).astype(np.int64)


def split_clients(
    parts: list[np.ndarray], test_fraction: float, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Split every client's indices into (local train, local test).

    A client with n samples sends ``floor(test_fraction * n)`` of them -- but at least 1 when n >= 2 and
    ``test_fraction > 0`` -- chosen by a seeded shuffle, to its test list. ``test_fraction == 0`` gives empty
    test lists. Returns ``(train_parts, test_parts)``, both lists of sorted int64 arrays.
    """
    if not isinstance(test_fraction, (int, float, np.number)) or not 0 <= test_fraction < 1:
        raise FedsimError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    rng = _rng(_check_seed(seed), _STREAM_SPLIT_CLIENTS)
    train_parts, test_parts = [], []
    for part in parts:
        part = np.asarray(part, dtype=np.int64)
        n = len(part)
        n_test = int(np.floor(test_fraction * n))
        if test_fraction > 0 and n >= 2:
            n_test = min(max(n_test, 1), n - 1)
        shuffled = rng.permutation(part)
        test_parts.append(np.sort(shuffled[:n_test]))
        train_parts.append(np.sort(shuffled[n_test:]))
    return train_parts, test_parts


# Partitioner components (kind ``partitioner``): the engine supplies the labels and the run's settings.


def iid(*, y: np.ndarray, num_clients: int, seed: int = 0, min_size: int = 1, natural=None) -> list[np.ndarray]:
    """Uniformly random, equal-sized shards."""
    return partition("iid", y, num_clients, seed=seed, min_size=min_size)


def dirichlet(
    alpha: Annotated[float, option("Dirichlet concentration: smaller is more label skew", gt=0)] = 0.5,
    *,
    y: np.ndarray,
    num_clients: int,
    seed: int = 0,
    min_size: int = 1,
    natural=None,
) -> list[np.ndarray]:
    """Label skew: each class split over clients by proportions drawn from Dirichlet(alpha)."""
    return partition("dirichlet", y, num_clients, seed=seed, alpha=alpha, min_size=min_size)


def shards(
    classes_per_client: Annotated[int, option("label shards (classes) per client", ge=1)] = 2,
    *,
    y: np.ndarray,
    num_clients: int,
    seed: int = 0,
    min_size: int = 1,
    natural=None,
) -> list[np.ndarray]:
    """Sorted-label shards, ``classes_per_client`` per client (McMahan et al.)."""
    return partition("shards", y, num_clients, seed=seed, classes_per_client=classes_per_client, min_size=min_size)


def natural(
    *, y: np.ndarray, num_clients: int, seed: int = 0, min_size: int = 1, natural: np.ndarray | None = None
) -> list[np.ndarray]:
    """The data set's own clients (synthetic users, Shakespeare speakers, an npz ``client`` array)."""
    return partition("natural", y, num_clients, seed=seed, min_size=min_size, natural=natural)
