"""Robust aggregation of client updates: coordinate-wise median, trimmed mean, (Multi-)Krum, centered clipping,
the geometric median (RFA) and the sign majority vote.

Each aggregator replaces the sample-weighted mean ``sum_k p_k Delta_k`` wherever a strategy reduces updates
over the client axis (:meth:`strategies.Strategy.reduce`). They act on the flattened stack ``[S, D]`` and are
unweighted, as in their papers (sample weights would let one large client dominate, the failure they guard
against). GAF's agreement filter lives in :mod:`strategies.gaf`.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Protocol

import torch
from torch import Tensor

from fedsim.core import components
from fedsim.core.components import option
from fedsim.core.errors import FedsimError
from fedsim.core.pytree import Tree, flatten, unflatten


class Aggregator(Protocol):
    """Combines stacked per-client updates ``{name: [S, ...]}`` (weights ``p[S]``) into one update."""

    name: ClassVar[str]

    def __call__(self, tree: Tree, weights: Tensor) -> Tree: ...


def coordinate_median(flat: Tensor) -> Tensor:
    """Coordinate-wise median of ``[S, D]`` (the mean of the two middle values for even S; Yin et al., 2018)."""
    ordered = flat.sort(dim=0).values
    s = flat.shape[0]
    return ordered[s // 2] if s % 2 else 0.5 * (ordered[s // 2 - 1] + ordered[s // 2])


def trimmed_mean(flat: Tensor, trim_fraction: float) -> Tensor:
    """Coordinate-wise trimmed mean: drop the ``b = floor(trim_fraction * S)`` largest and smallest values of
    every coordinate, average the remaining ``S - 2b`` (Yin et al., 2018)."""
    s = flat.shape[0]
    b = int(trim_fraction * s + 1e-9)
    if s - 2 * b < 1:
        raise FedsimError(f"trimmed mean with fraction {trim_fraction} leaves no update of {s}")
    return flat.sort(dim=0).values[b : s - b].mean(0)


def krum_scores(flat: Tensor, byzantine: int) -> Tensor:
    """Krum scores (Blanchard et al., 2017): ``score_i = sum of ||Delta_i - Delta_j||^2`` over the
    ``S - f - 2`` nearest other updates ``j`` (at least one)."""
    s = flat.shape[0]
    d2 = torch.cdist(flat.double(), flat.double()).pow(2)
    nearest = max(1, s - byzantine - 2)
    d2.fill_diagonal_(float("inf"))
    return d2.sort(dim=1).values[:, :nearest].sum(1)


def krum(flat: Tensor, byzantine: int = 0, select: int = 1) -> Tensor:
    """Krum (``select = 1``: the update with the lowest score) or Multi-Krum (the mean of the ``select``
    lowest-scoring updates; ties to the lower client position)."""
    s = flat.shape[0]
    if s < byzantine + 3 or select > s:
        raise FedsimError(
            f"krum with byzantine={byzantine}, select={select} needs at least "
            f"{max(byzantine + 3, select)} clients per round, got {s}"
        )
    scores = krum_scores(flat, byzantine)
    chosen = torch.sort(scores, stable=True).indices[:select]
    return flat[chosen].mean(0)


class Median:
    """Coordinate-wise median aggregator."""

    name: ClassVar[str] = "median"

    def __call__(self, tree: Tree, weights: Tensor) -> Tree:
        return unflatten(coordinate_median(flatten(tree)), _first(tree))


class TrimmedMean:
    """Coordinate-wise trimmed-mean aggregator (``fraction`` of the updates off each end)."""

    name: ClassVar[str] = "trimmed_mean"

    def __init__(self, fraction: Annotated[float, option("fraction trimmed at each end", ge=0, lt=0.5)] = 0.1):
        if not 0.0 <= fraction < 0.5:
            raise FedsimError(f"fraction must be in [0, 0.5), got {fraction}")
        self.trim_fraction = fraction

    def __call__(self, tree: Tree, weights: Tensor) -> Tree:
        return unflatten(trimmed_mean(flatten(tree), self.trim_fraction), _first(tree))


class Krum:
    """(Multi-)Krum aggregator: ``byzantine`` assumed attackers f, ``select`` updates averaged."""

    name: ClassVar[str] = "krum"

    def __init__(
        self,
        byzantine: Annotated[int, option("assumed number of attackers f", ge=0)] = 0,
        select: Annotated[int, option("updates averaged (1: Krum, more: Multi-Krum)", ge=1)] = 1,
    ):
        if byzantine < 0 or select < 1:
            raise FedsimError(f"krum needs byzantine >= 0, select >= 1; got {byzantine}, {select}")
        self.byzantine, self.select = byzantine, select

    def __call__(self, tree: Tree, weights: Tensor) -> Tree:
        return unflatten(krum(flatten(tree), self.byzantine, self.select), _first(tree))


def centered_clipping(flat: Tensor, tau: float, iterations: int, start: Tensor) -> Tensor:
    """Centered clipping (Karimireddy, He & Jaggi, ICML 2021): ``v <- v + (1/S) sum_i clip_tau(x_i - v)`` with
    ``clip_tau(d) = d min(1, tau / ||d||)``, ``iterations`` times from ``start`` (float64)."""
    x, v = flat.double(), start.double()
    for _ in range(iterations):
        diff = x - v
        scale = (tau / diff.norm(dim=1, keepdim=True).clamp_min(1e-300)).clamp(max=1.0)
        v = v + (diff * scale).mean(0)
    return v.to(flat.dtype)


def geometric_median(flat: Tensor, weights: Tensor, iterations: int, nu: float) -> Tensor:
    """The weighted geometric median by the smoothed Weiszfeld algorithm of RFA (Pillutla, Kakade & Harchaoui,
    2022): from the weighted mean, ``z <- sum_i b_i x_i / sum_i b_i`` with ``b_i = w_i / max(nu, ||x_i - z||)``
    (float64)."""
    x, w = flat.double(), weights.double().to(flat.device)
    z = (w @ x) / w.sum()
    for _ in range(iterations):
        b = w / (x - z).norm(dim=1).clamp_min(nu)
        z = (b @ x) / b.sum()
    return z.to(flat.dtype)


def sign_vote(flat: Tensor, scale: float) -> Tensor:
    """signSGD with majority vote (Bernstein et al., ICLR 2019): ``scale * sign(sum_i sign(x_i))``."""
    return scale * torch.sign(torch.sign(flat).sum(0))


class CenteredClipping:
    """Centered clipping: iterations of clipped corrections around a robust start (the coordinate median, or
    zero). The paper starts from the previous round's aggregate with server momentum; a stateless start is our
    choice (``start``), so that the aggregator needs no checkpointed state."""

    name: ClassVar[str] = "centered_clipping"

    def __init__(
        self,
        tau: Annotated[float, option("clipping radius (in the updates' units)", gt=0)] = 1.0,
        iterations: Annotated[int, option("clipping iterations L", ge=1)] = 3,
        start: Annotated[Literal["median", "zero"], option("start of the iterations: coordinate median or 0")] = (
            "median"
        ),
    ):
        self.tau, self.iterations, self.start = float(tau), int(iterations), start

    def __call__(self, tree: Tree, weights: Tensor) -> Tree:
        flat = flatten(tree)
        start = coordinate_median(flat) if self.start == "median" else torch.zeros_like(flat[0])
        return unflatten(centered_clipping(flat, self.tau, self.iterations, start), _first(tree))


class RFA:
    """RFA: the weighted (sample weights, as in the paper) geometric median by smoothed Weiszfeld."""

    name: ClassVar[str] = "rfa"

    def __init__(
        self,
        iterations: Annotated[int, option("Weiszfeld iterations", ge=1)] = 10,
        nu: Annotated[float, option("smoothing: distances below nu count as nu", gt=0)] = 1e-6,
    ):
        self.iterations, self.nu = int(iterations), float(nu)

    def __call__(self, tree: Tree, weights: Tensor) -> Tree:
        return unflatten(geometric_median(flatten(tree), weights, self.iterations, self.nu), _first(tree))


class SignVote:
    """Majority vote of the update signs, times ``scale`` (each coordinate moves by at most ``scale``)."""

    name: ClassVar[str] = "sign_vote"

    def __init__(self, scale: Annotated[float, option("step per coordinate", gt=0)] = 1e-3):
        self.scale = float(scale)

    def __call__(self, tree: Tree, weights: Tensor) -> Tree:
        return unflatten(sign_vote(flatten(tree), self.scale), _first(tree))


def _first(tree: Tree) -> Tree:
    """An unstacked template of a stacked tree (shapes without the client axis)."""
    return {k: v[0] for k, v in tree.items()}


def make_aggregator(spec=None, **options) -> Aggregator | None:
    """An aggregator from a name or spec plus ``options`` (``mean``/None gives None: the strategy's own
    weighted mean; an object is returned as it is)."""
    return components.make("aggregator", spec, **options)
