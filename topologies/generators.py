"""Static topology generators, one function per family, networkx-generators style.

Every generator returns an undirected ``nx.Graph`` whose nodes are ``0..n-1`` in order. Random families take
a ``seed`` and are deterministic in it; they retry with ``seed + 1, seed + 2, ...`` (up to ``max_tries``)
until the sample is connected, then raise :class:`TopologyError`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable

import networkx as nx

from fedsim.core.errors import did_you_mean

from .errors import TopologyError

__all__ = [
    "GENERATORS",
    "barabasi_albert",
    "build",
    "complete",
    "erdos_renyi",
    "exponential",
    "hypercube",
    "path",
    "random_regular",
    "ring",
    "star",
    "torus",
    "watts_strogatz",
]


def _check_n(n: int, family: str, minimum: int = 1) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < minimum:
        raise TopologyError(f"topology {family!r} needs an integer node count n >= {minimum}, got {n!r}")
    return n


def _graph(n: int, edges: Iterable[tuple[int, int]]) -> nx.Graph:
    """A graph on nodes ``0..n-1`` (in order) with the given edges, self-loops dropped, edges sorted."""
    G = nx.Graph()
    G.add_nodes_from(range(n))
    G.add_edges_from(sorted({(min(u, v), max(u, v)) for u, v in edges if u != v}))
    return G


def _connected_sample(family: str, sample: Callable[[int], nx.Graph], seed: int, max_tries: int) -> nx.Graph:
    for s in range(seed, seed + max_tries):
        G = sample(s)
        if nx.is_connected(G):
            return _graph(G.number_of_nodes(), G.edges())
    raise TopologyError(
        f"topology {family!r}: no connected sample for seeds {seed}..{seed + max_tries - 1}; "
        "raise the density (p, degree, k) or max_tries"
    )


def ring(n: int) -> nx.Graph:
    """Cycle: node i is connected to ``i - 1`` and ``i + 1`` (mod n). Degree 2 for n >= 3 (n = 2: one edge)."""
    _check_n(n, "ring")
    return _graph(n, ((i, (i + 1) % n) for i in range(n)))


def path(n: int) -> nx.Graph:
    """Path: node i is connected to ``i + 1`` for ``i < n - 1``."""
    _check_n(n, "path")
    return _graph(n, ((i, i + 1) for i in range(n - 1)))


def star(n: int) -> nx.Graph:
    """Star: node 0 (the hub) is connected to every other node."""
    _check_n(n, "star")
    return _graph(n, ((0, i) for i in range(1, n)))


def complete(n: int) -> nx.Graph:
    """Complete graph: every pair of distinct nodes is connected."""
    _check_n(n, "complete")
    return _graph(n, ((i, j) for i in range(n) for j in range(i + 1, n)))


def _near_square(n: int) -> tuple[int, int]:
    rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
    return rows, n // rows


def torus(n: int, rows: int | None = None, cols: int | None = None) -> nx.Graph:
    """2-D torus (periodic grid) with ``rows * cols == n``; node ``r * cols + c`` sits at (r, c).

    Node (r, c) is connected to ``((r +- 1) mod rows, c)`` and ``(r, (c +- 1) mod cols)``. Degree 4 when
    rows, cols >= 3. Without rows/cols the most square factorization is used (a prime n gives a 1 x n ring).
    """
    _check_n(n, "torus")
    if rows is None and cols is None:
        rows, cols = _near_square(n)
    elif rows is None:
        rows = n // cols if cols and n % cols == 0 else 0
    elif cols is None:
        cols = n // rows if rows and n % rows == 0 else 0
    if not rows or not cols or rows < 1 or cols < 1 or rows * cols != n:
        raise TopologyError(f"topology 'torus': rows={rows} x cols={cols} does not give n={n} nodes")
    edges = []
    for r in range(rows):
        for c in range(cols):
            v = r * cols + c
            edges.append((v, ((r + 1) % rows) * cols + c))
            edges.append((v, r * cols + (c + 1) % cols))
    return _graph(n, edges)


def hypercube(n: int) -> nx.Graph:
    """Hypercube on ``n = 2^k`` nodes: i and j are connected when their binary labels differ in one bit.

    Degree ``log2(n)``.
    """
    _check_n(n, "hypercube")
    if n & (n - 1):
        raise TopologyError(f"topology 'hypercube' needs n a power of 2, got n={n}")
    bits = n.bit_length() - 1
    return _graph(n, ((i, i ^ (1 << b)) for i in range(n) for b in range(bits)))


def exponential(n: int) -> nx.Graph:
    """Static exponential graph: i is connected to ``(i +- 2^k) mod n`` for ``k = 0..floor(log2(n - 1))``.

    For ``n = 2^m`` the degree is ``2m - 1`` (the offsets ``+2^(m-1)`` and ``-2^(m-1)`` coincide).
    """
    _check_n(n, "exponential")
    if n == 1:
        return _graph(1, [])
    ks = range((n - 1).bit_length())  # k = 0..floor(log2(n - 1))
    return _graph(n, ((i, (i + s * 2**k) % n) for i in range(n) for k in ks for s in (1, -1)))


def random_regular(n: int, degree: int = 3, seed: int = 0, max_tries: int = 100) -> nx.Graph:
    """Uniform random ``degree``-regular graph (``n * degree`` even, ``degree < n``), resampled until connected."""
    _check_n(n, "random_regular", 2)
    if not 1 <= degree < n or (n * degree) % 2:
        raise TopologyError(
            f"topology 'random_regular' needs 1 <= degree < n and n*degree even, got n={n}, degree={degree}"
        )
    return _connected_sample("random_regular", lambda s: nx.random_regular_graph(degree, n, seed=s), seed, max_tries)


def erdos_renyi(n: int, p: float | None = None, seed: int = 0, max_tries: int = 100) -> nx.Graph:
    """G(n, p): every pair is an edge independently with probability p, resampled until connected.

    Default ``p = min(1, 2 ln(n) / n)``, twice the connectivity threshold.
    """
    _check_n(n, "erdos_renyi")
    if p is None:
        p = min(1.0, 2.0 * math.log(n) / n) if n > 1 else 1.0
    if not 0.0 <= p <= 1.0:
        raise TopologyError(f"topology 'erdos_renyi' needs 0 <= p <= 1, got p={p}")
    return _connected_sample("erdos_renyi", lambda s: nx.gnp_random_graph(n, p, seed=s), seed, max_tries)


def watts_strogatz(n: int, k: int = 4, p: float = 0.1, seed: int = 0, max_tries: int = 100) -> nx.Graph:
    """Watts-Strogatz small world: a ring where each node links to its k nearest neighbours (k/2 per side),
    then each edge is rewired with probability p; resampled until connected."""
    _check_n(n, "watts_strogatz", 3)
    if not 2 <= k < n or not 0.0 <= p <= 1.0:
        raise TopologyError(f"topology 'watts_strogatz' needs 2 <= k < n and 0 <= p <= 1, got n={n}, k={k}, p={p}")
    return _connected_sample("watts_strogatz", lambda s: nx.watts_strogatz_graph(n, k, p, seed=s), seed, max_tries)


def barabasi_albert(n: int, m: int = 2, seed: int = 0) -> nx.Graph:
    """Barabasi-Albert preferential attachment: each new node attaches to m existing nodes with probability
    proportional to their degree (always connected)."""
    _check_n(n, "barabasi_albert", 2)
    if not 1 <= m < n:
        raise TopologyError(f"topology 'barabasi_albert' needs 1 <= m < n, got n={n}, m={m}")
    G = nx.barabasi_albert_graph(n, m, seed=seed)
    return _graph(n, G.edges())


#: Topology families by name, for :func:`build`.
GENERATORS: dict[str, Callable[..., nx.Graph]] = {
    "ring": ring,
    "path": path,
    "star": star,
    "complete": complete,
    "torus": torus,
    "hypercube": hypercube,
    "exponential": exponential,
    "random_regular": random_regular,
    "erdos_renyi": erdos_renyi,
    "watts_strogatz": watts_strogatz,
    "barabasi_albert": barabasi_albert,
}


def build(name: str, n: int, **kw: object) -> nx.Graph:
    """Build topology ``name`` on ``n`` nodes; ``kw`` are the family's keyword arguments (e.g. ``seed``).

    Names are case-insensitive and ``-`` is read as ``_``. An unknown name or argument raises TopologyError.
    """
    key = str(name).strip().lower().replace("-", "_")
    if key not in GENERATORS:
        raise TopologyError(
            f"unknown topology {name!r}{did_you_mean(key, GENERATORS)}; choose from: {', '.join(sorted(GENERATORS))}"
        )
    fn = GENERATORS[key]
    params = list(inspect.signature(fn).parameters)[1:]
    bad = sorted(set(kw) - set(params))
    if bad:
        takes = ", ".join(params) or "no arguments"
        raise TopologyError(f"topology {key!r} does not take {', '.join(bad)}; it takes: {takes}")
    try:
        return fn(n, **kw)
    except TypeError as e:  # e.g. a string where a number is expected
        args = ", ".join(f"{k}={v!r}" for k, v in kw.items())
        raise TopologyError(f"topology {key!r}: bad argument value(s) n={n!r}, {args}: {e}") from None
