"""Spectral quantities of a mixing matrix and a summary of a topology."""

from __future__ import annotations

import math

import networkx as nx
import numpy as np

from .errors import TopologyError
from .mixing import mixing_matrix

__all__ = ["analyze", "mixing_time_estimate", "spectral_gap"]


def spectral_gap(W: np.ndarray) -> float:
    """``1 - max_{k >= 2} |lambda_k(W)|``, eigenvalues sorted by decreasing modulus.

    Uses ``numpy.linalg.eigvalsh`` when W is symmetric, ``eigvals`` otherwise. For a doubly stochastic W of
    a connected graph (with positive diagonal) the gap lies in (0, 1]; it is 0 for a disconnected graph.
    A 1x1 matrix has gap 1. Float noise within 1e-12 of 0 or 1 is snapped to 0 or 1.
    """
    W = np.asarray(W, dtype=np.float64)
    if W.shape[0] <= 1:
        return 1.0
    if np.allclose(W, W.T, rtol=0.0, atol=1e-12):
        mods = np.abs(np.linalg.eigvalsh((W + W.T) / 2.0))
    else:
        mods = np.abs(np.linalg.eigvals(W))
    second = float(np.sort(mods)[-2])
    gap = 1.0 - second
    if abs(gap) < 1e-12:
        return 0.0
    if abs(gap - 1.0) < 1e-12:
        return 1.0
    return gap


def mixing_time_estimate(W: np.ndarray, eps: float = 1e-3) -> float:
    """Gossip steps to shrink the disagreement by ``eps``: ``log(1 / eps) / spectral_gap(W)``.

    From ``|lambda_2|^t <= eps`` and ``-log(1 - gap) >= gap``: an upper estimate, tight for small gaps.
    Returns ``inf`` when the gap is 0.
    """
    if not 0.0 < eps < 1.0:
        raise TopologyError(f"eps must be in (0, 1), got {eps}")
    gap = spectral_gap(W)
    return math.inf if gap <= 0.0 else math.log(1.0 / eps) / gap


def analyze(G: nx.Graph, method: str = "metropolis_hastings") -> dict[str, float | int]:
    """Summary of a connected topology.

    Keys: ``nodes``, ``edges``, ``degree_min``, ``degree_mean``, ``degree_max``, ``spectral_gap`` and
    ``mixing_time_estimate`` (of the ``method`` mixing matrix, Metropolis-Hastings by default) and
    ``diameter`` (longest shortest path, in hops). A disconnected graph raises TopologyError.
    """
    W = mixing_matrix(G, method)
    H = nx.Graph(G)
    H.remove_edges_from(list(nx.selfloop_edges(H)))
    deg = np.array([d for _, d in H.degree()], dtype=np.float64)
    return {
        "nodes": H.number_of_nodes(),
        "edges": H.number_of_edges(),
        "degree_min": int(deg.min()),
        "degree_mean": float(deg.mean()),
        "degree_max": int(deg.max()),
        "spectral_gap": spectral_gap(W),
        "mixing_time_estimate": mixing_time_estimate(W),
        "diameter": int(nx.diameter(H)) if H.number_of_nodes() > 1 else 0,
    }
