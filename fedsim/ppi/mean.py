"""Fed-PPI for a (d-dimensional) mean (Luo et al. 2024, arXiv 2409.01730; code NUDTPingLuo/Fed_PPI).

Client i, with power-tuning parameter lam (PPI++, Angelopoulos et al. 2023):
``theta_i = mean(lam Yhat_u) + mean(Y - lam Yhat)``; it sends theta_i, D_i = n_i + N_i and the moments of
its imputed terms ``lam Yhat_u`` and rectifier terms ``Y - lam Yhat``.

Server: ``p_i = D_i / sum D``, ``theta = sum p_i theta_i``;
``v_imp = sum p_i var_i(lam Yhat_u) / N`` (the clients' variances averaged by p_i, over the unlabelled total);
``v_rect = var(Y - lam Yhat over all clients) / n`` (pooled with the parallel-variance formula, which includes
the between-client mean differences, over the labelled total); ``theta -+ z_{1-alpha/2} sqrt(v_imp + v_rect)``.
Variances are ddof 0, as ppi_py's ``ppi_mean_ci``.

Where we differ from the authors' code (labelled in the README too):
- their clients use the pooled unlabelled predictions of all clients; ours use only their own;
- they pool the imputed variance with the parallel formula as well (adding between-client differences of the
  mean prediction); the issue's rule, ours, averages the clients' own variances by p_i;
- they weight the pooled rectifier variance by D_i; we pool over the labelled rows (the variance of the
  concatenated rectifiers), identical when every client labels the same fraction;
- ``lam_mode="global"`` is ours: one extra round of summaries tunes a single lam on pooled moments (exactly
  the centralized PPI++ lam); their code tunes lam per client.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsim.ppi.clients import ClientData, check_clients, client_weights, pooled
from fedsim.ppi.methods import check_method, ppi_py
from fedsim.ppi.moments import Moments, TuningMoments, check_alpha, estimator_variance, normal_interval, tuned_lam


@dataclass(frozen=True)
class MeanSummary:
    """What a client sends for the mean: D_i, its lam, theta_i and the moments of its imputed and
    rectifier terms (their size does not grow with the client's data)."""

    size: int
    lam: float
    theta: np.ndarray
    imputed: Moments
    rectifier: Moments


def mean_tuning(client: ClientData) -> TuningMoments:
    """The summaries for tuning lam: gradients of the squared loss are ``Y - theta`` etc.; centering
    removes theta, so the raw values serve."""
    return TuningMoments.of(client.y, client.yhat, client.yhat_unlabeled)


def client_lam(client: ClientData) -> float:
    """The client's own PPI++ lam (ppi_py's tuning with the identity Hessian)."""
    return tuned_lam([mean_tuning(client)], np.eye(client.y.shape[1]))


def global_lam(tuning: Sequence[TuningMoments]) -> float:
    """One lam for all clients from their pooled tuning moments (server side)."""
    return tuned_lam(tuning, np.eye(tuning[0].unlabelled.mean.shape[0]))


def mean_summary(client: ClientData, lam: float | None) -> MeanSummary:
    """Client side: theta_i and the moments of its two terms (lam None: the client tunes its own)."""
    lam = client_lam(client) if lam is None else float(lam)
    imputed = lam * client.yhat_unlabeled
    rectifier = client.y - lam * client.yhat
    theta = imputed.mean(axis=0) + rectifier.mean(axis=0)
    return MeanSummary(client.size, lam, theta, Moments.of(imputed, True), Moments.of(rectifier, True))


def mean_server(
    summaries: Sequence[MeanSummary], alpha: float, imputed_variance: str = "averaged", variance: str = "combined"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Server side: ``(theta, lower, upper)`` from the summaries alone."""
    p = client_weights(summaries)
    theta = sum(w * s.theta for w, s in zip(p, summaries, strict=True))
    imputed, rectifier = [s.imputed for s in summaries], [s.rectifier for s in summaries]
    v = estimator_variance(imputed, rectifier, p, imputed_variance, variance)
    lower, upper = normal_interval(theta, np.sqrt(v), alpha)
    return theta, lower, upper


def _federated(data: list[ClientData], lam: float | None, lam_mode: str) -> list[MeanSummary]:
    if lam is None and lam_mode == "global":
        lam = global_lam([mean_tuning(c) for c in data])
    return [mean_summary(c, lam) for c in data]


def _shape(clients: Sequence[Mapping[str, Any]], value: np.ndarray) -> Any:
    """A float for 1-D ``y``, else the (d,) array."""
    return float(value[0]) if all(np.ndim(c["y"]) == 1 for c in clients) else value


def fed_ppi_mean_ci(
    clients: Sequence[Mapping[str, Any]],
    alpha: float = 0.1,
    lam: float | None = None,
    *,
    method: str = "fed_ppi",
    lam_mode: str | None = None,
    imputed_variance: str = "averaged",
    variance: str = "combined",
) -> tuple[Any, Any]:
    """``(lower, upper)`` of the 1 - alpha interval for the mean of Y across the clients.

    ``lam``: None tunes it (per client, or with ``lam_mode="global"`` one for all); 0 gives the classical
    interval, 1 plain PPI. ``method``: fed_ppi, classical, per_client (one row per client) or centralized
    (ppi_py on the pooled data). ``imputed_variance``: averaged (default) or pooled
    (:func:`fedsim.ppi.moments.imputed_covariance`); ``variance``: combined (default, the issue's rule, for
    equal labelled fractions) or stratified (any fractions; :func:`fedsim.ppi.moments.estimator_variance`).
    Floats for a 1-D y, arrays (d,) otherwise ((k,) / (k, d) per client).
    """
    alpha = check_alpha(alpha)
    lam_mode = check_method(method, lam, lam_mode, imputed_variance=imputed_variance, variance=variance)
    data = check_clients(clients)
    if method == "centralized":
        whole = pooled(data)
        lower, upper = ppi_py().ppi_mean_ci(whole.y, whole.yhat, whole.yhat_unlabeled, alpha=alpha, lam=lam)
        return _shape(clients, np.atleast_1d(lower)), _shape(clients, np.atleast_1d(upper))
    if method == "per_client":
        rows = [mean_server([mean_summary(c, lam)], alpha) for c in data]
        lower, upper = np.array([r[1] for r in rows]), np.array([r[2] for r in rows])
        return (lower[:, 0], upper[:, 0]) if all(np.ndim(c["y"]) == 1 for c in clients) else (lower, upper)
    summaries = _federated(data, 0.0 if method == "classical" else lam, lam_mode)
    _, lower, upper = mean_server(summaries, alpha, imputed_variance, variance)
    return _shape(clients, lower), _shape(clients, upper)


def fed_ppi_mean_pointestimate(
    clients: Sequence[Mapping[str, Any]],
    lam: float | None = None,
    *,
    method: str = "fed_ppi",
    lam_mode: str | None = None,
) -> Any:
    """The point estimate of :func:`fed_ppi_mean_ci` (``sum p_i theta_i``; per client: one row each)."""
    lam_mode = check_method(method, lam, lam_mode)
    data = check_clients(clients)
    if method == "centralized":
        whole = pooled(data)
        return _shape(clients, np.atleast_1d(ppi_py().ppi_mean_pointestimate(
            whole.y, whole.yhat, whole.yhat_unlabeled, lam=lam)))  # fmt: skip
    if method == "per_client":
        thetas = np.array([mean_summary(c, lam).theta for c in data])
        return thetas[:, 0] if all(np.ndim(c["y"]) == 1 for c in clients) else thetas
    summaries = _federated(data, 0.0 if method == "classical" else lam, lam_mode)
    p = client_weights(summaries)
    return _shape(clients, sum(w * s.theta for w, s in zip(p, summaries, strict=True)))
