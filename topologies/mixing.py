"""Mixing (gossip) matrices of a graph: W doubly stochastic, W_ij > 0 only on edges or the diagonal.

Rows and columns follow ``list(G.nodes)``. Degrees ``d_i`` count neighbours other than ``i`` itself
(self-loops are ignored: every method sets its own diagonal).
"""

from __future__ import annotations

from collections.abc import Callable

import networkx as nx
import numpy as np

from fedsim.core.errors import did_you_mean

from .errors import TopologyError, _name, validate_connected

__all__ = ["MIXING_METHODS", "check_doubly_stochastic", "mixing_matrix"]

#: Absolute tolerance of the doubly-stochastic and nonnegativity checks.
TOL = 1e-9


def _setup(G: nx.Graph) -> tuple[dict[object, int], list[tuple[int, int]], np.ndarray]:
    """Index of each node, the edges as index pairs (no self-loops), and the degrees."""
    index = {v: i for i, v in enumerate(G.nodes)}
    pairs = {(min(index[u], index[v]), max(index[u], index[v])) for u, v in G.edges() if u != v}
    deg = np.zeros(len(index), dtype=np.int64)
    for i, j in pairs:
        deg[i] += 1
        deg[j] += 1
    return index, sorted(pairs), deg


def _fill_diagonal(W: np.ndarray) -> np.ndarray:
    """Set ``W_ii = 1 - sum_{j != i} W_ij``."""
    np.fill_diagonal(W, 0.0)
    np.fill_diagonal(W, 1.0 - W.sum(axis=1))
    return W


def _metropolis_hastings(G: nx.Graph) -> np.ndarray:
    """``W_ij = 1 / (1 + max(d_i, d_j))`` on edges, ``W_ii = 1 - sum_{j != i} W_ij``."""
    _, edges, deg = _setup(G)
    W = np.zeros((len(deg), len(deg)))
    for i, j in edges:
        W[i, j] = W[j, i] = 1.0 / (1.0 + max(deg[i], deg[j]))
    return _fill_diagonal(W)


def _max_degree(G: nx.Graph) -> np.ndarray:
    """``W_ij = 1 / (1 + d_max)`` on edges, ``W_ii = 1 - d_i / (1 + d_max)``."""
    _, edges, deg = _setup(G)
    W = np.zeros((len(deg), len(deg)))
    dmax = int(deg.max(initial=0))
    for i, j in edges:
        W[i, j] = W[j, i] = 1.0 / (1.0 + dmax)
    return _fill_diagonal(W)


def _uniform(G: nx.Graph) -> np.ndarray:
    """For a d-regular graph: ``W_ij = 1 / (d + 1)`` on edges and on the diagonal."""
    _, edges, deg = _setup(G)
    if len(deg) and deg.min() != deg.max():
        raise TopologyError(
            f"mixing method 'uniform' needs a regular graph, but degrees range from {deg.min()} to {deg.max()}; "
            "use 'metropolis_hastings' or 'max_degree'"
        )
    d = int(deg[0]) if len(deg) else 0
    W = np.zeros((len(deg), len(deg)))
    for i, j in edges:
        W[i, j] = W[j, i] = 1.0 / (d + 1.0)
    return _fill_diagonal(W)


def _laplacian(G: nx.Graph) -> np.ndarray:
    """``W = I - L / lambda_max(L)`` with ``L = D - A`` the graph Laplacian (``W = I`` when there are no edges).

    Off-diagonal entries are ``1 / lambda_max`` on edges; the diagonal ``1 - d_i / lambda_max`` is positive
    because ``lambda_max(L) >= d_max + 1`` for any graph with an edge. W is symmetric, doubly stochastic
    (L 1 = 0), and its eigenvalues ``1 - mu_k / lambda_max`` lie in [0, 1]: the largest uniform edge weight
    that makes W positive semidefinite (for algorithms that need W >= 0). It is never larger than the
    max-degree weight ``1 / (1 + d_max)``, so it mixes no faster; ``I - L / (1 + d_max)`` IS ``max_degree``.
    """
    _, edges, deg = _setup(G)
    n = len(deg)
    A = np.zeros((n, n))
    for i, j in edges:
        A[i, j] = A[j, i] = 1.0
    if not edges:
        return np.eye(n)
    L = np.diag(A.sum(axis=1)) - A
    lam = float(np.linalg.eigvalsh(L)[-1])
    W = A / lam
    return _fill_diagonal(W)


def _weights(G: nx.Graph) -> np.ndarray:
    """``W_ij`` from the edge attribute ``weight``; ``W_ii`` from the node attribute ``self_weight`` when
    present, else ``1 - sum_{j != i} W_ij``. Every edge needs a weight; the result is validated to be
    nonnegative and doubly stochastic."""
    index = {v: i for i, v in enumerate(G.nodes)}
    n = len(index)
    W = np.zeros((n, n))
    for u, v, data in G.edges(data=True):
        if u == v:
            continue
        if "weight" not in data:
            raise TopologyError(
                f"mixing method 'weights' needs a 'weight' on every edge; edge ({_name(G, u)!r}, {_name(G, v)!r}) "
                "has none"
            )
        try:
            w = float(data["weight"])
        except (TypeError, ValueError):
            raise TopologyError(
                f"edge ({_name(G, u)!r}, {_name(G, v)!r}) has a non-numeric weight {data['weight']!r}"
            ) from None
        if not np.isfinite(w) or w < 0:
            raise TopologyError(f"edge ({_name(G, u)!r}, {_name(G, v)!r}) has a negative or non-finite weight {w}")
        W[index[u], index[v]] = W[index[v], index[u]] = w
    for v, i in index.items():
        if "self_weight" in G.nodes[v]:
            W[i, i] = float(G.nodes[v]["self_weight"])
        else:
            W[i, i] = 1.0 - (W[i].sum() - W[i, i])
    names = [_name(G, v) for v in G.nodes]
    off = W.sum(axis=1) - np.diag(W)
    worst = int(np.argmax(off))
    if off.size and off[worst] > 1.0 + TOL:
        raise TopologyError(
            f"mixing matrix is not doubly stochastic: worst row of node {names[worst]!r} has edge weights "
            f"summing to {off[worst]:.6g} > 1 before its self-weight"
        )
    check_doubly_stochastic(W, names=names)
    return W


_METHODS: dict[str, Callable[[nx.Graph], np.ndarray]] = {
    "metropolis_hastings": _metropolis_hastings,
    "max_degree": _max_degree,
    "uniform": _uniform,
    "laplacian": _laplacian,
    "weights": _weights,
}

#: The accepted ``method`` names of :func:`mixing_matrix`.
MIXING_METHODS: tuple[str, ...] = tuple(_METHODS)


def check_doubly_stochastic(W: np.ndarray, names: list[object] | None = None, tol: float = TOL) -> None:
    """Raise :class:`TopologyError` unless ``W`` is square, finite, nonnegative and doubly stochastic.

    The message names the most negative entry, or the row/column whose sum is farthest from 1.
    """
    W = np.asarray(W, dtype=np.float64)
    if W.ndim != 2 or W.shape[0] != W.shape[1]:
        raise TopologyError(f"mixing matrix must be square, got shape {W.shape}")
    names = list(range(W.shape[0])) if names is None else names
    if not np.all(np.isfinite(W)):
        i, j = np.argwhere(~np.isfinite(W))[0]
        raise TopologyError(f"mixing matrix has a non-finite entry W[{names[i]!r}, {names[j]!r}] = {W[i, j]}")
    if W.size and W.min() < -tol:
        i, j = np.unravel_index(int(np.argmin(W)), W.shape)
        what = f"self-weight of node {names[i]!r}" if i == j else f"weight on edge ({names[i]!r}, {names[j]!r})"
        raise TopologyError(f"mixing matrix has a negative {what}: {W[i, j]:.6g}")
    rows, cols = W.sum(axis=1), W.sum(axis=0)
    r, c = int(np.argmax(np.abs(rows - 1))), int(np.argmax(np.abs(cols - 1)))
    if W.size and max(abs(rows[r] - 1), abs(cols[c] - 1)) > tol:
        if abs(rows[r] - 1) >= abs(cols[c] - 1):
            worst = f"row of node {names[r]!r} sums to {rows[r]:.6g}"
        else:
            worst = f"column of node {names[c]!r} sums to {cols[c]:.6g}"
        raise TopologyError(f"mixing matrix is not doubly stochastic: worst {worst} (must be 1 within {tol:g})")


def mixing_matrix(G: nx.Graph, method: str = "metropolis_hastings", *, require_connected: bool = True) -> np.ndarray:
    """The dense float64 mixing matrix of ``G`` (rows/columns in ``list(G.nodes)`` order).

    Methods (``d_i`` = degree of node i, ``d_max`` = maximum degree):

    - ``metropolis_hastings``: ``W_ij = 1 / (1 + max(d_i, d_j))`` on edges, ``W_ii = 1 - sum_{j != i} W_ij``.
    - ``max_degree``: ``W_ij = 1 / (1 + d_max)`` on edges, ``W_ii = 1 - d_i / (1 + d_max)``.
    - ``uniform``: d-regular graphs only: ``W_ij = 1 / (d + 1)`` on edges and the diagonal.
    - ``laplacian``: ``W = I - L / lambda_max(L)``, ``L = D - A`` (see :func:`_laplacian`).
    - ``weights``: edge attribute ``weight``, diagonal from node attribute ``self_weight`` or
      ``1 - row sum``; validated nonnegative and doubly stochastic.

    All methods give a symmetric, nonnegative, doubly stochastic W with ``W_ij > 0`` only on edges or the
    diagonal. A disconnected graph is refused (:func:`validate_connected`) unless ``require_connected`` is
    False (used for the per-step graphs of a time-varying schedule). Directed graphs are treated as undirected.
    """
    if method not in _METHODS:
        raise TopologyError(
            f"unknown mixing method {method!r}{did_you_mean(str(method), MIXING_METHODS)}; "
            f"choose from: {', '.join(MIXING_METHODS)}"
        )
    if G.is_directed() or G.is_multigraph():
        H = nx.Graph()
        H.add_nodes_from(G.nodes(data=True))
        H.add_edges_from((u, v, d) for u, v, d in G.edges(data=True))
        G = H
    if require_connected:
        validate_connected(G)
    elif G.number_of_nodes() == 0:
        raise TopologyError("graph has no nodes")
    return _METHODS[method](G)
