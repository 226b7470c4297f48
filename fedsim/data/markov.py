"""Markov chains over a client's sample positions: the math behind the ``markov-*`` samplers.

Decentralized Markov SGD (ALGORITHMS.md, "Decentralized Markov SGD and SGDA"): each node draws its next
sample index from a Markov chain over its local data, ``j_{t+1} ~ P(j_t, .)``. Two chains on the positions
``0..n-1`` of a client's own sample list, both with the uniform law as stationary distribution:

* **lazy ring** (slow mixing): stay with probability ``laziness`` = a, else move to ``j + 1`` or ``j - 1``
  (mod n), each with probability ``(1 - a) / 2``. ``P`` is circulant with eigenvalues
  ``lambda_k = a + (1 - a) cos(2 pi k / n)``, ``k = 0..n-1``, so the spectral gap is ``Theta(1/n^2)``.
* **random d-regular multigraph** (fast mixing), permutation model: ``d/2`` random permutations
  ``sigma_1..sigma_{d/2}`` of ``range(n)``; the ``d`` neighbour slots of ``j`` are ``sigma_r(j)`` and
  ``sigma_r^{-1}(j)``. A transition stays with probability ``a``, else picks one of the ``d`` slots uniformly:
  ``P = a I + (1 - a)/d sum_r (S_r + S_r^T)`` with ``S_r`` the permutation matrix of ``sigma_r``, symmetric and
  doubly stochastic. For ``d >= 4`` it is an expander with high probability (gap bounded away from 0);
  ``d = 2`` gives the cycles of one permutation, usually disconnected (gap 0).

Spectral gap: ``1 - max_{k >= 2} |lambda_k(P)|`` (the absolute spectral gap). Mixing time bound
(Levin, Peres & Wilmer, *Markov Chains and Mixing Times*, 2nd ed., Thm. 12.4): for a reversible chain,
``t_mix(eps) <= log(1 / (eps pi_min)) / gap``; with the uniform stationary law (``pi_min = 1/n``) and
``eps = 1/4`` this is ``log(4 n) / gap``.

All randomness comes from :mod:`fedsim.core.rng` (counter-based, keyed by seed, client, round and transition).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedsim.core import rng

# Extra keys after rng.STREAM_SAMPLER that keep the Markov draws apart from each other and from iid/shuffle.
KEY_START = 0x4D4B5354  # first position of a chain
KEY_RING = 0x4D4B5249  # ring transitions
KEY_REGULAR = 0x4D4B5247  # regular-graph transitions
KEY_GRAPH = 0x4D4B4752  # regular-graph permutations (fixed for the run)

DENSE_MAX = 1500  # above this many samples a client's gap is computed with sparse eigsh instead of eigvalsh


def start_positions(seed: int, client_ids: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """The first state of each client's chain: uniform in ``[0, n_c)``, a function of (seed, client) only."""
    return rng.randint(np.asarray(sizes, dtype=np.int64), seed, rng.STREAM_SAMPLER, KEY_START, client_ids)


def ring_walk(start: np.ndarray, u: np.ndarray, moves: np.ndarray, sizes: np.ndarray, laziness: float) -> np.ndarray:
    """States ``[C, T]`` of the lazy ring walk from ``start[C]``: transition ``t`` uses the uniform ``u[:, t]``
    (stay if ``u < a``, +1 if ``u < a + (1-a)/2``, else -1) where ``moves[:, t]``, and stays elsewhere.

    Increments are i.i.d., so the path is ``start + cumsum(increments) mod n`` (no loop).
    """
    step = np.where(u < laziness + (1.0 - laziness) / 2.0, 1, -1)
    step = np.where((u >= laziness) & moves, step, 0)
    return (start[:, None] + np.cumsum(step, axis=1)) % np.asarray(sizes, dtype=np.int64)[:, None]


def ring_transition_matrix(n: int, laziness: float) -> np.ndarray:
    """The explicit ``n x n`` transition matrix of the lazy ring (for n = 1, 2 the moves coincide)."""
    p = np.zeros((n, n))
    j = np.arange(n)
    np.add.at(p, (j, j), laziness)
    np.add.at(p, (j, (j + 1) % n), (1.0 - laziness) / 2.0)
    np.add.at(p, (j, (j - 1) % n), (1.0 - laziness) / 2.0)
    return p


def ring_spectral_gaps(sizes: np.ndarray, laziness: float) -> np.ndarray:
    """Closed form: ``1 - max_{k=1..n-1} |a + (1-a) cos(2 pi k / n)|``, attained at ``k = 1`` or
    ``k = floor(n/2)``; 1 for ``n = 1`` (no second eigenvalue). Periodic (gap 0) for ``a = 0`` and even n."""
    n = np.maximum(np.asarray(sizes, dtype=np.float64), 1.0)
    near = laziness + (1.0 - laziness) * np.cos(2.0 * np.pi / n)
    far = laziness + (1.0 - laziness) * np.cos(2.0 * np.pi * np.floor(n / 2.0) / n)
    gap = 1.0 - np.maximum(np.abs(near), np.abs(far))
    return np.where(n <= 1, 1.0, _snap(gap))


def regular_neighbours(seed: int, client_ids: np.ndarray, sizes: np.ndarray, degree: int) -> np.ndarray:
    """Neighbour table ``[sum_c n_c, degree]`` of the permutation-model d-regular multigraphs of the clients,
    stacked by client (client ``c`` owns rows ``offset_c .. offset_c + n_c - 1``; values are local positions).

    Column ``2r`` holds ``sigma_r(j)``, column ``2r + 1`` holds ``sigma_r^{-1}(j)``. The permutations sort
    counter-based keys hashed from (seed, client, r, j) inside each (client, r) segment, so a client's graph is
    fixed for the run and independent of the other clients.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    client_ids = np.asarray(client_ids, dtype=np.int64)
    half = degree // 2
    row_offset = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    lengths = sizes * half
    seg_offset = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    owner = np.repeat(np.arange(len(sizes)), lengths)
    local = np.arange(int(lengths.sum())) - seg_offset[owner]
    r, j = local // sizes[owner], local % sizes[owner]
    keys = rng.hash_keys(seed, rng.STREAM_SAMPLER, KEY_GRAPH, client_ids[owner], r, j)
    segment = seg_offset[owner] + r * sizes[owner]  # non-decreasing: sorting keeps every entry in its segment
    sigma = j[np.lexsort((keys, segment))]  # sigma_r(j) at flat position segment + j
    inverse = np.empty_like(sigma)
    inverse[segment + sigma] = j
    table = np.empty((int(sizes.sum()), degree), dtype=np.int64)
    rows = row_offset[owner] + j
    table[rows, 2 * r] = sigma
    table[rows, 2 * r + 1] = inverse
    return table


def regular_walk(
    start: np.ndarray, u: np.ndarray, moves: np.ndarray, table: np.ndarray, row_offset: np.ndarray, laziness: float
) -> np.ndarray:
    """States ``[C, T]`` of the lazy walk on the clients' regular multigraphs (``table`` from
    :func:`regular_neighbours`, ``row_offset[c]`` the first row of client c): transition ``t`` stays if
    ``u < a``, else takes neighbour slot ``floor((u - a) / (1 - a) * d)``; where ``moves`` is False it stays.
    One vectorized gather over the clients per transition."""
    degree = table.shape[1]
    slot = np.minimum(((u - laziness) / (1.0 - laziness) * degree).astype(np.int64), degree - 1)
    go = moves & (u >= laziness)
    path = np.empty(u.shape, dtype=np.int64)
    pos = np.asarray(start, dtype=np.int64).copy()
    for t in range(u.shape[1]):
        nxt = table[row_offset + pos, np.maximum(slot[:, t], 0)]
        pos = np.where(go[:, t], nxt, pos)
        path[:, t] = pos
    return path


def regular_transition_matrix(neighbours: np.ndarray, laziness: float) -> np.ndarray:
    """The dense ``n x n`` transition matrix of one client's walk (``neighbours``: its ``[n, d]`` table)."""
    n, degree = neighbours.shape
    p = laziness * np.eye(n)
    np.add.at(p, (np.repeat(np.arange(n), degree), neighbours.ravel()), (1.0 - laziness) / degree)
    return p


def regular_spectral_gap(neighbours: np.ndarray, laziness: float, dense_max: int = DENSE_MAX) -> float:
    """Gap of one client's regular walk: dense ``eigvalsh`` up to ``dense_max`` samples, else ``eigsh`` (largest
    modulus) on ``P - J/n`` (P symmetric with ``P 1 = 1``, so removing the uniform direction leaves the
    second-largest modulus on top)."""
    n, degree = neighbours.shape
    if n <= 1:
        return 1.0
    if n <= dense_max:
        mods = np.abs(np.linalg.eigvalsh(regular_transition_matrix(neighbours, laziness)))
        return float(_snap(1.0 - np.sort(mods)[-2]))
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import LinearOperator, eigsh

    rows = np.concatenate([np.arange(n), np.repeat(np.arange(n), degree)])
    cols = np.concatenate([np.arange(n), neighbours.ravel()])
    vals = np.concatenate([np.full(n, laziness), np.full(n * degree, (1.0 - laziness) / degree)])
    p = coo_matrix((vals, (rows, cols)), shape=(n, n)).tocsr()
    op = LinearOperator((n, n), matvec=lambda x: p @ x - x.mean(), dtype=np.float64)
    v0 = np.cos(np.arange(n) * 0.7 + 0.3)  # deterministic start vector
    top = eigsh(op, k=1, which="LM", v0=v0, return_eigenvectors=False, tol=1e-10)
    return float(_snap(1.0 - abs(top[0])))


def mixing_time(gap: np.ndarray | float, n: np.ndarray | int) -> np.ndarray:
    """Upper bound on the mixing time ``t_mix(1/4) <= log(4 n) / gap`` of a reversible chain with uniform
    stationary law on n states (Levin, Peres & Wilmer, 2nd ed., Thm. 12.4, ``log(1/(eps pi_min)) / gap``); ``inf``
    where the gap is 0 (the chain does not mix: disconnected or periodic)."""
    gap = np.asarray(gap, dtype=np.float64)
    bound = np.log(4.0 * np.asarray(n, dtype=np.float64))
    with np.errstate(divide="ignore"):
        return np.where(gap > 0, bound / np.where(gap > 0, gap, 1.0), np.inf)


def chain_report(sampler: Any, sizes: np.ndarray, seed: int) -> dict[str, float | None]:
    """``sampler_spectral_gap`` (minimum over the clients: the slowest chain) and ``sampler_mixing_time`` (the
    largest per-client bound :func:`mixing_time`) of a sampler with ``spectral_gaps``; both None otherwise."""
    gaps_of = getattr(sampler, "spectral_gaps", None)
    if gaps_of is None or len(sizes) == 0:
        return {"sampler_spectral_gap": None, "sampler_mixing_time": None}
    sizes = np.asarray(sizes, dtype=np.int64)
    gaps = np.asarray(gaps_of(sizes, np.arange(len(sizes)), seed), dtype=np.float64)
    return {
        "sampler_spectral_gap": float(gaps.min()),
        "sampler_mixing_time": float(mixing_time(gaps, sizes).max()),
    }


def _snap(gap: np.ndarray | float) -> np.ndarray:
    """Clip float noise: gaps within 1e-12 of 0 or 1 become exactly 0 or 1."""
    gap = np.clip(np.asarray(gap, dtype=np.float64), 0.0, 1.0)
    gap = np.where(gap < 1e-12, 0.0, gap)
    return np.where(gap > 1.0 - 1e-12, 1.0, gap)
