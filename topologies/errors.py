"""The topology error type and the two graph checks every other module relies on."""

from __future__ import annotations

import re

import networkx as nx

from fedsim.core.errors import FedsimError

__all__ = ["TopologyError", "check_nodes", "validate_connected"]


class TopologyError(FedsimError):
    """A bad topology: disconnected graph, invalid weights, wrong node count, unreadable file.

    A :class:`fedsim.core.errors.FedsimError`, hence a :class:`ValueError`. The message is always one line:
    any newline in it is folded into a single space.
    """

    def __init__(self, message: str) -> None:
        super().__init__(re.sub(r"\s*[\r\n]+\s*", " ", str(message)).strip())


def _name(G: nx.Graph, v: object) -> object:
    """The user-facing name of node ``v``: its ``name`` attribute when present, else the node itself."""
    return G.nodes[v].get("name", v)


def validate_connected(G: nx.Graph, what: str = "graph") -> None:
    """Raise :class:`TopologyError` unless ``G`` is non-empty and connected (directed graphs: weakly).

    The message names the number of components and their sizes, largest first, and a few nodes of the
    smallest component, e.g. ``graph is disconnected: 3 components of sizes 10, 4, 2 (smallest: 7, 9)``.
    """
    if G.number_of_nodes() == 0:
        raise TopologyError(f"{what} has no nodes")
    H = G.to_undirected(as_view=True) if G.is_directed() else G
    comps = sorted(nx.connected_components(H), key=len, reverse=True)
    if len(comps) > 1:
        sizes = ", ".join(str(len(c)) for c in comps)
        order = {v: i for i, v in enumerate(G.nodes)}
        smallest = sorted(comps[-1], key=order.__getitem__)[:5]
        names = ", ".join(repr(_name(G, v)) for v in smallest) + (", ..." if len(comps[-1]) > 5 else "")
        raise TopologyError(
            f"{what} is disconnected: {len(comps)} components of sizes {sizes} (smallest component: {names})"
        )


def check_nodes(G: nx.Graph, n: int, what: str = "--clients") -> None:
    """Raise :class:`TopologyError` unless ``G`` has exactly ``n`` nodes.

    ``what`` names where ``n`` came from: ``topology has 12 nodes but --clients is 16``.
    """
    m = G.number_of_nodes()
    if m != n:
        raise TopologyError(f"topology has {m} nodes but {what} is {n}")
