"""Fed-PPI for a quantile: rectified CDFs on a shared grid, combined across clients, and the rectified
p-value of ``F(t) = q`` at each grid point (Angelopoulos et al. 2023's PPI quantile, federated as in
Luo et al. 2024's code).

Round 1: each client sends the min and max of its Y, Yhat and Yhat_u; the server broadcasts the grid
``linspace(min, max, grid_size)`` (ppi_py's grid over the pooled values).
Round 2: client i sends D_i and, at every grid point t, the moments of ``1{Yhat_u <= t}`` (imputed) and of
``1{Y <= t} - 1{Yhat <= t}`` (rectifier), computed from sorted counts.
Server: ``F(t) = sum p_i F_imp,i(t) + sum p_i F_rect,i(t)``; variances as for the mean (imputed averaged by
p_i over N, rectifier pooled over n); ``p(t) = 2 (1 - Phi(|F(t) - q| / sd(t)))``; the interval is the
smallest and largest grid point with ``p(t) > alpha``, the point estimate the grid point nearest ``F = q``.

Differences from the authors' code: they pass a fixed grid; their clients use the pooled unlabelled
predictions; they pool the imputed variance with the parallel formula and weight by D_i (see
:mod:`fedsim.ppi.mean`). No power tuning (lam = 1, as ppi_py's ``ppi_quantile_ci``). The classical method
runs the same test on the labels' CDF alone.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsim.core.errors import FedsimError
from fedsim.ppi.clients import ClientData, check_clients, client_weights, pooled
from fedsim.ppi.methods import check_method, ppi_py
from fedsim.ppi.moments import Moments, check_alpha, estimator_variance, two_sided_p_value

GRID_SIZE = 5000


@dataclass(frozen=True)
class QuantileSummary:
    """What a client sends on the grid: D_i and the (diagonal) moments of its imputed and rectifier
    indicators, one coordinate per grid point."""

    size: int
    imputed: Moments
    rectifier: Moments


def value_range(client: ClientData) -> tuple[float, float]:
    """Round 1, client side: the smallest and largest of its Y, Yhat and Yhat_u."""
    values = np.concatenate([client.y.ravel(), client.yhat.ravel(), client.yhat_unlabeled.ravel()])
    return float(values.min()), float(values.max())


def make_grid(ranges: Sequence[tuple[float, float]], grid_size: int = GRID_SIZE) -> np.ndarray:
    """Round 1, server side: the shared grid."""
    return np.linspace(min(r[0] for r in ranges), max(r[1] for r in ranges), grid_size)


def _count(values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """``sum(1{values <= t})`` at every grid point t."""
    return np.searchsorted(np.sort(values), grid, side="right")


def quantile_summary(client: ClientData, grid: np.ndarray, classical: bool = False) -> QuantileSummary:
    """Round 2, client side. Indicators are 0/1, so their variance is ``F (1 - F)``; the rectifier
    ``1{Y <= t} - 1{Yhat <= t}`` has second moment ``F_Y + F_Yhat - 2 F_max(Y, Yhat)``. ``classical``:
    the labels' own CDF as the rectifier and no imputed part."""
    y, yhat, n = client.y[:, 0], client.yhat[:, 0], client.n
    if classical:
        f_u = np.zeros_like(grid)
        rect_mean = _count(y, grid) / n
        rect_var = rect_mean * (1 - rect_mean)
    else:
        f_u = _count(client.yhat_unlabeled[:, 0], grid) / client.big_n
        count_y, count_hat = _count(y, grid), _count(yhat, grid)
        rect_mean = (count_y - count_hat) / n
        both = _count(np.maximum(y, yhat), grid)
        rect_var = np.maximum((count_y + count_hat - 2 * both) / n - rect_mean**2, 0.0)
    return QuantileSummary(
        client.size,
        Moments.from_mean_and_variance(client.big_n, f_u, f_u * (1 - f_u)),
        Moments.from_mean_and_variance(client.n, rect_mean, rect_var),
    )


def quantile_p_values(
    summaries: Sequence[QuantileSummary], q: float, imputed_variance: str = "averaged", variance: str = "combined"
) -> tuple[np.ndarray, np.ndarray]:
    """Server side: the combined rectified CDF and the p-value of ``F(t) = q`` at each grid point."""
    p = client_weights(summaries)
    cdf = sum(w * (s.imputed.mean + s.rectifier.mean) for w, s in zip(p, summaries, strict=True))
    imputed, rectifier = [s.imputed for s in summaries], [s.rectifier for s in summaries]
    v = estimator_variance(imputed, rectifier, p, imputed_variance, variance)
    return cdf, two_sided_p_value(cdf, np.sqrt(v), q)


def quantile_server(
    summaries: Sequence[QuantileSummary],
    grid: np.ndarray,
    q: float,
    alpha: float,
    imputed_variance: str = "averaged",
    variance: str = "combined",
) -> tuple[float, float, float]:
    """Server side: ``(point estimate, lower, upper)``. When no grid point has ``p > alpha`` (discrete data
    whose CDF jumps across q at one value with little uncertainty; ppi_py fails there) the interval is that
    value alone: the first grid point where the combined CDF reaches q."""
    cdf, p_values = quantile_p_values(summaries, q, imputed_variance, variance)
    kept = grid[p_values > alpha]
    if len(kept) == 0:
        kept = grid[np.argmax(cdf >= q)] if np.any(cdf >= q) else grid[-1:]
        kept = np.atleast_1d(kept)
    return float(grid[np.argmin(np.abs(cdf - q))]), float(kept[0]), float(kept[-1])


def _checked(
    clients: Sequence[Mapping[str, Any]],
    q: float,
    method: str,
    grid_size: int,
    imputed_variance: str = "averaged",
    variance: str = "combined",
) -> list[ClientData]:
    if isinstance(q, bool) or not isinstance(q, numbers.Real) or not 0 < q < 1:
        raise FedsimError(f"q must be in (0, 1), got {q!r}")
    check_method(method, None, None, tunable=False, imputed_variance=imputed_variance, variance=variance)
    if isinstance(grid_size, bool) or not isinstance(grid_size, int) or grid_size < 2:
        raise FedsimError(f"grid_size must be an integer >= 2, got {grid_size!r}")
    if method == "centralized" and grid_size != GRID_SIZE:
        raise FedsimError(f"ppi_py's grid has {GRID_SIZE} points; drop grid_size with method 'centralized'")
    data = check_clients(clients)
    if data[0].y.shape[1] != 1:
        raise FedsimError(f"a quantile needs a 1-D y, got {data[0].y.shape[1]} columns")
    return data


def _federated(data: list[ClientData], classical: bool, grid_size: int) -> tuple[list[QuantileSummary], np.ndarray]:
    grid = make_grid([value_range(c) for c in data], grid_size)
    return [quantile_summary(c, grid, classical) for c in data], grid


def fed_ppi_quantile_ci(
    clients: Sequence[Mapping[str, Any]],
    q: float,
    alpha: float = 0.1,
    *,
    method: str = "fed_ppi",
    grid_size: int = GRID_SIZE,
    imputed_variance: str = "averaged",
    variance: str = "combined",
) -> tuple[Any, Any]:
    """``(lower, upper)`` of the 1 - alpha interval for the q-quantile of Y across the clients (arrays of
    one row per client for ``method="per_client"``; ppi_py's ``ppi_quantile_ci`` for ``"centralized"``);
    ``imputed_variance`` and ``variance`` as for the mean."""
    alpha = check_alpha(alpha)
    data = _checked(clients, q, method, grid_size, imputed_variance, variance)
    if method == "centralized":
        whole = pooled(data)
        try:
            lower, upper = ppi_py().ppi_quantile_ci(
                whole.y[:, 0], whole.yhat[:, 0], whole.yhat_unlabeled[:, 0], q, alpha
            )
        except IndexError:  # no grid point has p > alpha (discrete data): the one-client rule on the pooled data
            _, lower, upper = quantile_server(*_federated([whole], False, grid_size), q, alpha)
        return float(lower), float(upper)
    if method == "per_client":
        rows = [quantile_server(*_federated([c], False, grid_size), q, alpha)[1:] for c in data]
        return np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
    summaries, grid = _federated(data, method == "classical", grid_size)
    _, lower, upper = quantile_server(summaries, grid, q, alpha, imputed_variance, variance)
    return lower, upper


def fed_ppi_quantile_pointestimate(
    clients: Sequence[Mapping[str, Any]], q: float, *, method: str = "fed_ppi", grid_size: int = GRID_SIZE
) -> Any:
    """The point estimate of :func:`fed_ppi_quantile_ci`: the grid point where the combined rectified CDF is
    nearest q (one per client for ``per_client``)."""
    data = _checked(clients, q, method, grid_size)
    if method == "centralized":
        whole = pooled(data)
        return float(ppi_py().ppi_quantile_pointestimate(whole.y[:, 0], whole.yhat[:, 0],
                                                         whole.yhat_unlabeled[:, 0], q))  # fmt: skip

    def nearest(summaries: list[QuantileSummary], grid: np.ndarray) -> float:
        return float(grid[np.argmin(np.abs(quantile_p_values(summaries, q)[0] - q))])

    if method == "per_client":
        return np.array([nearest(*_federated([c], False, grid_size)) for c in data])
    return nearest(*_federated(data, method == "classical", grid_size))
