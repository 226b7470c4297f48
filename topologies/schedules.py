"""Time-varying topologies: a schedule gives the mixing matrix ``W_t`` of gossip step ``t``.

Every schedule has ``n`` (nodes), ``matrix(t) -> np.ndarray [n, n]`` (doubly stochastic, nonnegative),
``graph(t)`` (the edges of ``W_t``), ``period`` (number of distinct steps before repeating, or ``None``
for random schedules) and ``union_graph()`` (the union of the graphs over one period, which must be
connected for the nodes to reach consensus).
"""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import numpy as np
import yaml

from .errors import TopologyError, validate_connected
from .io import PathLike, load
from .mixing import MIXING_METHODS, check_doubly_stochastic, mixing_matrix

__all__ = ["FileSchedule", "OnePeerExponential", "RandomMatchings", "Schedule"]


def _check_step(t: int) -> int:
    if isinstance(t, bool) or not isinstance(t, int | np.integer) or t < 0:
        raise TopologyError(f"schedule step t must be a nonnegative integer, got {t!r}")
    return int(t)


class Schedule:
    """Base class: subclasses set ``n`` and ``period`` and implement :meth:`matrix`."""

    n: int
    period: int | None

    def matrix(self, t: int) -> np.ndarray:
        """The mixing matrix ``W_t`` of step ``t``."""
        raise NotImplementedError

    def graph(self, t: int) -> nx.Graph:
        """The communication graph of step ``t``: nodes ``0..n-1``, an edge where ``W_t[i, j] > 0``, i != j."""
        W = self.matrix(t)
        G = nx.Graph()
        G.add_nodes_from(range(self.n))
        G.add_edges_from((int(i), int(j)) for i, j in np.argwhere((W > 0) | (W.T > 0)) if i < j)
        return G

    def union_graph(self) -> nx.Graph:
        """Union of :meth:`graph` over steps ``0..period-1``."""
        if self.period is None:
            raise TopologyError(f"{type(self).__name__} has no period; its union graph is undefined")
        return nx.compose_all([self.graph(t) for t in range(self.period)])

    def __call__(self, t: int) -> np.ndarray:
        return self.matrix(t)


class OnePeerExponential(Schedule):
    """One-peer exponential graph on ``n = 2^m`` nodes (``n >= 2``), period ``m = log2 n``.

    At step t, with ``k = t mod m``, node i averages with the single peer ``(i + 2^k) mod n``:
    ``W_t[i, i] = W_t[i, (i + 2^k) mod n] = 1/2``, i.e. ``W_t = (I + P_k) / 2`` with ``P_k`` the cyclic
    shift by ``2^k``. Each row and each column has exactly two entries 1/2, so ``W_t`` is doubly
    stochastic, but it is NOT symmetric (node i receives from i + 2^k and sends to i - 2^k), except at
    ``2^k = n/2``. The union over one period is the static exponential graph (connected). The product
    ``W_{m-1} ... W_0`` is exactly the averaging matrix ``11^T / n``.
    """

    def __init__(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 2 or n & (n - 1):
            raise TopologyError(f"OnePeerExponential needs n a power of 2 with n >= 2, got n={n!r}")
        self.n = n
        self.period = n.bit_length() - 1
        validate_connected(self.union_graph(), "union of the one-peer exponential schedule")

    def peer(self, i: int, t: int) -> int:
        """The node that node ``i`` pulls from at step ``t``: ``(i + 2^(t mod log2 n)) mod n``."""
        return (i + 2 ** (_check_step(t) % self.period)) % self.n

    def matrix(self, t: int) -> np.ndarray:
        """``W_t = (I + P_k) / 2`` with ``P_k[i, (i + 2^k) mod n] = 1``, ``k = t mod log2 n``."""
        k = _check_step(t) % self.period
        idx = np.arange(self.n)
        W = np.zeros((self.n, self.n))
        W[idx, idx] += 0.5
        W[idx, (idx + 2**k) % self.n] += 0.5
        return W


class RandomMatchings(Schedule):
    """Random matchings on ``n`` nodes: at step t, a uniformly random maximal matching of the complete
    graph (a perfect matching, one node left out when n is odd); matched pairs average with weight 1/2,
    ``W_t[i, i] = W_t[i, j] = W_t[j, i] = W_t[j, j] = 1/2``, unmatched nodes keep ``W_t[i, i] = 1``.

    The matching is a function of ``(seed, t)`` only: the random permutation of
    ``numpy.random.default_rng((seed, t))`` is cut into consecutive pairs, so there is no hidden generator
    state and steps can be queried in any order. ``period`` is ``None``; :meth:`union_graph` is the
    complete graph (every pair is matched with positive probability).
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise TopologyError(f"RandomMatchings needs an integer n >= 1, got n={n!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise TopologyError(f"RandomMatchings needs a nonnegative integer seed, got seed={seed!r}")
        self.n, self.seed, self.period = n, seed, None

    def matching(self, t: int) -> list[tuple[int, int]]:
        """The matched pairs ``(i, j)``, ``i < j``, of step ``t``."""
        perm = np.random.default_rng((self.seed, _check_step(t))).permutation(self.n)
        return sorted((int(min(a, b)), int(max(a, b))) for a, b in zip(perm[0::2], perm[1::2], strict=False))

    def matrix(self, t: int) -> np.ndarray:
        """``W_t``: 1/2 on the diagonal and on matched pairs; 1 on the diagonal of an unmatched node."""
        W = np.eye(self.n)
        for i, j in self.matching(t):
            W[i, i] = W[j, j] = W[i, j] = W[j, i] = 0.5
        return W

    def union_graph(self) -> nx.Graph:
        """The complete graph on ``n`` nodes: the support of the matching distribution."""
        return nx.complete_graph(self.n)


class FileSchedule(Schedule):
    """A cycle of graph files, listed in a YAML file, one per step (step t uses file ``t mod period``).

    The YAML is either a list of paths or a mapping ``{graphs: [paths], method: <mixing method>}``
    (``files:`` is accepted for ``graphs:``); paths are relative to the YAML file. Each graph is turned into
    a mixing matrix with :func:`mixing_matrix` (default ``metropolis_hastings``); a single step's graph may be
    disconnected, but the union over one period must be connected. All files must have the same nodes:
    nodes are matched by ``name`` to the first file's order. ``n``, when given, is checked.
    """

    def __init__(self, path: PathLike, n: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise TopologyError(f"{self.path}: schedule file not found")
        try:
            spec = yaml.safe_load(self.path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise TopologyError(f"{self.path}{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
        method = "metropolis_hastings"
        if isinstance(spec, dict):
            unknown = sorted(set(spec) - {"graphs", "files", "method"})
            if unknown:
                raise TopologyError(f"{self.path}: unknown key(s) {', '.join(map(str, unknown))}; use graphs, method")
            method = spec.get("method", method)
            spec = spec.get("graphs", spec.get("files"))
        if not isinstance(spec, list) or not spec or not all(isinstance(p, str) for p in spec):
            raise TopologyError(f"{self.path}: expected a non-empty list of graph file paths (or a 'graphs:' list)")
        if method not in MIXING_METHODS:
            raise TopologyError(
                f"{self.path}: unknown mixing method {method!r}; choose from: {', '.join(MIXING_METHODS)}"
            )
        self.method = method
        self.files = [self.path.parent / p for p in spec]
        self.graphs = [load(f) for f in self.files]
        ref = [self.graphs[0].nodes[v]["name"] for v in self.graphs[0].nodes]
        self.n = len(ref)
        for k, (f, G) in enumerate(zip(self.files, self.graphs, strict=True)):
            names = [G.nodes[v]["name"] for v in G.nodes]
            if sorted(map(str, names)) != sorted(map(str, ref)):
                raise TopologyError(
                    f"{self.path}: {f.name} has {len(names)} nodes that differ from the {self.n} nodes of "
                    f"{self.files[0].name}; every graph of a schedule needs the same node names"
                )
            pos = {str(x): i for i, x in enumerate(ref)}
            self.graphs[k] = nx.relabel_nodes(G, {v: pos[str(G.nodes[v]["name"])] for v in G.nodes})
            H = nx.Graph()
            H.add_nodes_from((i, self.graphs[k].nodes[i]) for i in range(self.n))
            H.add_edges_from(self.graphs[k].edges(data=True))
            self.graphs[k] = H
        if n is not None and n != self.n:
            raise TopologyError(f"{self.path}: schedule has {self.n} nodes but n is {n}")
        self.period = len(self.graphs)
        self._W = [mixing_matrix(G, method, require_connected=False) for G in self.graphs]
        for f, W in zip(self.files, self._W, strict=True):
            try:
                check_doubly_stochastic(W)
            except TopologyError as e:
                raise TopologyError(f"{f}: {e}") from None
        union = nx.compose_all(self.graphs)
        validate_connected(union, f"{self.path}: union of the {self.period} graphs over one period")

    def matrix(self, t: int) -> np.ndarray:
        """The mixing matrix of file ``t mod period`` (a copy)."""
        return self._W[_check_step(t) % self.period].copy()

    def union_graph(self) -> nx.Graph:
        """Union of the schedule's graphs (nodes ``0..n-1`` in the first file's order)."""
        return nx.compose_all(self.graphs)
