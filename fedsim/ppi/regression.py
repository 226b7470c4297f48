"""Fed-PPI for OLS and logistic regression coefficients (Luo et al. 2024; PPI++ of Angelopoulos et al. 2023).

Both are M-estimators with per-sample gradient ``g = x (mu(x theta) - y)`` (mu the identity for OLS, the
sigmoid for logistic) and Hessian weight ``mu'`` (1, or mu (1 - mu)).

**Point estimate** (the server solves the pooled problem from summaries, as ALGORITHMS.md says):
- OLS, ppi_py's estimator ``theta = (X_u'X_u)^-1 X_u' lam Yhat_u + (X'X)^-1 X'(Y - lam Yhat)``: each client sends
  its Gram matrices and cross-products; the server sums them and solves.
- logistic, the minimizer of the rectified loss ``lam/N sum_u l(x, yhat) + 1/n sum_l [l(x, y) - lam l(x, yhat)]``
  (convex for lam in [0, 1]): damped Newton, each step one round in which clients send their parts' value,
  gradient and Hessian at the broadcast theta.

**Interval:** at theta, client i sends D_i, its Hessian sums, the moments of ``g - lam g_hat`` (labelled) and
of ``lam g_hat_u`` (unlabelled). Server: ``H = (sum Hessian sums) / (n + N)`` (labelled only when lam = 0, as
ppi_py); ``V_l`` the pooled (parallel-formula) covariance of ``g - lam g_hat``; ``V_u`` the clients'
covariances of ``lam g_hat_u`` averaged by p_i = D_i / sum D; both ddof 1 as ppi_py;
``Sigma = H^-1 (n/N V_u + V_l) H^-1`` and ``theta -+ z_{1-alpha/2} sqrt(diag(Sigma) / n)``.

**lam** (None): PPI++'s tuning, with ppi_py's sequence ``theta(1) -> lam_a -> theta(lam_a) -> lam_b`` (the point
estimate stops at ``theta(lam_a)``, the interval uses ``lam_b``): per client on its own data
(``lam_mode="client"``, which needs each client's own problem to be solvable) or on pooled moments
(``lam_mode="global"``, a round of summaries per tuning step; with one client both equal ppi_py).

Differences from the authors' code: they average the clients' point estimates by p_i for OLS (biased when
clients' covariate distributions differ) and solve the logistic loss on the clients' raw data; they average
inverse Hessians; their clients use the pooled unlabelled predictions; they pool V_u with between-client terms.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsim.core.errors import FedsimError
from fedsim.ppi.clients import ClientData, check_clients, client_weights, pooled
from fedsim.ppi.methods import check_method, ppi_py
from fedsim.ppi.moments import (
    Moments,
    TuningMoments,
    check_alpha,
    imputed_covariance,
    normal_interval,
    pool,
    tuned_lam,
    warn_if_fractions_differ,
)

SINGULAR_CONDITION = 1e14
NEWTON_STEPS = 200


def _expit(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0, -z))


def _inverse(matrix: np.ndarray, what: str) -> np.ndarray:
    """``matrix^-1``, refusing a singular (or numerically singular) one with a line naming it."""
    if not np.all(np.isfinite(matrix)) or np.linalg.cond(matrix) > SINGULAR_CONDITION:
        raise FedsimError(f"{what} is singular (collinear covariates or too few points for {len(matrix)} coefficients)")
    return np.linalg.inv(matrix)


@dataclass(frozen=True)
class Family:
    """A GLM's mean function ``mu`` and its derivative (the Hessian weight)."""

    name: str
    mean: Callable[[np.ndarray], np.ndarray]
    weight: Callable[[np.ndarray], np.ndarray]


OLS = Family("ols", lambda z: z, lambda z: np.ones_like(z))
LOGISTIC = Family("logistic", _expit, lambda z: _expit(z) * (1 - _expit(z)))


@dataclass(frozen=True)
class RegressionSummary:
    """What a client sends at the broadcast theta: D_i, lam_i, its labelled and unlabelled Hessian sums and
    counts, the moments of ``g - lam g_hat`` and ``lam g_hat_u``, and the tuning moments."""

    size: int
    lam: float
    hessian_labelled: np.ndarray
    hessian_unlabelled: np.ndarray
    rectifier: Moments
    imputed: Moments
    tuning: TuningMoments


def regression_summary(family: Family, client: ClientData, theta: np.ndarray, lam: float) -> RegressionSummary:
    """Client side: gradients and Hessian sums at ``theta``."""
    x, x_u = client.x, client.x_unlabeled
    z, z_u = x @ theta, x_u @ theta
    mu, mu_u = family.mean(z), family.mean(z_u)
    g = x * (mu - client.y[:, 0])[:, None]
    g_hat = x * (mu - client.yhat[:, 0])[:, None]
    g_hat_u = x_u * (mu_u - client.yhat_unlabeled[:, 0])[:, None]
    return RegressionSummary(
        client.size, lam,
        (x * family.weight(z)[:, None]).T @ x, (x_u * family.weight(z_u)[:, None]).T @ x_u,
        Moments.of(g - lam * g_hat), Moments.of(lam * g_hat_u), TuningMoments.of(g, g_hat, g_hat_u),
    )  # fmt: skip


def pooled_hessian(summaries: Sequence[RegressionSummary], unlabelled: bool) -> np.ndarray:
    """``H``: the Hessian sums over labelled (and, when ``unlabelled``, unlabelled) rows, averaged."""
    total = sum(s.hessian_labelled for s in summaries)
    count = sum(s.rectifier.count for s in summaries)
    if unlabelled:
        total = total + sum(s.hessian_unlabelled for s in summaries)
        count += sum(s.imputed.count for s in summaries)
    return total / count


def regression_server(
    summaries: Sequence[RegressionSummary], theta: np.ndarray, alpha: float, imputed_variance: str = "averaged"
) -> tuple[np.ndarray, np.ndarray]:
    """Server side: the sandwich interval ``(lower, upper)`` around ``theta`` from the summaries alone."""
    unlabelled = any(s.lam != 0 for s in summaries)
    inv_h = _inverse(pooled_hessian(summaries, unlabelled), "the pooled Hessian")
    n = sum(s.rectifier.count for s in summaries)
    big_n = sum(s.imputed.count for s in summaries)
    if n < 2 or big_n < 2:
        raise FedsimError(
            f"a regression interval needs at least 2 labelled and 2 unlabelled points, got {n} and {big_n}"
        )
    warn_if_fractions_differ([s.rectifier.count for s in summaries], [s.imputed.count for s in summaries],
                             "the pooled estimate then weights the clients unlike the mean's p_i")  # fmt: skip
    v_l = pool([s.rectifier for s in summaries]).covariance(ddof=1)
    v_u = imputed_covariance([s.imputed for s in summaries], client_weights(summaries), imputed_variance, ddof=1)
    sigma = inv_h @ (n / big_n * v_u + v_l) @ inv_h
    return normal_interval(theta, np.sqrt(np.diag(sigma) / n), alpha)


def tune(summaries: Sequence[RegressionSummary]) -> float:
    """Server side: PPI++'s lam from pooled tuning moments (the Hessian over all rows, as ppi_py)."""
    inv_h = _inverse(pooled_hessian(summaries, True), "the pooled Hessian")
    return tuned_lam([s.tuning for s in summaries], inv_h)


# --- the point estimate ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GramSummary:
    """OLS point estimate, what a client sends: ``X_u'X_u``, ``X_u' lam Yhat_u``, ``X'X``, ``X'(Y - lam Yhat)``."""

    gram_unlabelled: np.ndarray
    cross_unlabelled: np.ndarray
    gram_labelled: np.ndarray
    cross_labelled: np.ndarray


def gram_summary(client: ClientData, lam: float) -> GramSummary:
    x, x_u = client.x, client.x_unlabeled
    return GramSummary(x_u.T @ x_u, x_u.T @ (lam * client.yhat_unlabeled[:, 0]), x.T @ x,
                       x.T @ (client.y[:, 0] - lam * client.yhat[:, 0]))  # fmt: skip


def ols_server(summaries: Sequence[GramSummary]) -> np.ndarray:
    """Server side: ``theta = (sum X_u'X_u)^-1 sum X_u' lam Yhat_u + (sum X'X)^-1 sum X'(Y - lam Yhat)``."""
    imputed = np.zeros(len(summaries[0].cross_labelled))
    if any(np.any(s.cross_unlabelled != 0) for s in summaries):
        gram_u = sum(s.gram_unlabelled for s in summaries)
        imputed = _inverse(gram_u, "X_u'X_u of the unlabelled covariates") @ sum(s.cross_unlabelled for s in summaries)
    gram_l = _inverse(sum(s.gram_labelled for s in summaries), "X'X of the labelled covariates")
    return imputed + gram_l @ sum(s.cross_labelled for s in summaries)


@dataclass(frozen=True)
class NewtonSummary:
    """Logistic point estimate, one Newton round: a client's unlabelled part ``lam sum_u l(x, yhat)`` and
    labelled part ``sum_l [l(x, y) - lam l(x, yhat)]``, each as (value, gradient, Hessian), with counts."""

    unlabelled: tuple[float, np.ndarray, np.ndarray]
    labelled: tuple[float, np.ndarray, np.ndarray]
    counts: tuple[int, int]


def _logistic_parts(x: np.ndarray, y: np.ndarray, theta: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    z = x @ theta
    mu = _expit(z)
    return float(np.sum(np.logaddexp(0, z) - y * z)), x.T @ (mu - y), (x * (mu * (1 - mu))[:, None]).T @ x


def newton_summary(client: ClientData, theta: np.ndarray, lam: float) -> NewtonSummary:
    u = _logistic_parts(client.x_unlabeled, client.yhat_unlabeled[:, 0], theta)
    ly = _logistic_parts(client.x, client.y[:, 0], theta)
    lh = _logistic_parts(client.x, client.yhat[:, 0], theta)
    return NewtonSummary(
        tuple(lam * part for part in u), tuple(a - lam * b for a, b in zip(ly, lh, strict=True)),
        (client.big_n, client.n),
    )  # fmt: skip


def _objective(summaries: Sequence[NewtonSummary]) -> tuple[float, np.ndarray, np.ndarray]:
    big_n = sum(s.counts[0] for s in summaries)
    n = sum(s.counts[1] for s in summaries)
    return tuple(sum(s.unlabelled[k] for s in summaries) / big_n + sum(s.labelled[k] for s in summaries) / n
                 for k in range(3))  # fmt: skip


def logistic_server(round_: Callable[[np.ndarray], Sequence[NewtonSummary]], dim: int) -> np.ndarray:
    """Server side: damped Newton on the summed rectified loss; ``round_(theta)`` asks every client for its
    :class:`NewtonSummary` at theta (one communication round)."""
    theta = np.zeros(dim)
    value, grad, hess = _objective(round_(theta))
    for _ in range(NEWTON_STEPS):
        step = _inverse(hess, "the Hessian of the rectified logistic loss (or the classes are separable)") @ grad
        if float(grad @ step) < 1e-26:  # the Newton decrement: scale-free, so separable data never stops here
            return theta
        size, decrease = 1.0, float(grad @ step)
        while True:
            trial = _objective(round_(theta - size * step))
            if trial[0] <= value - 1e-4 * size * decrease or size < 1e-10:
                break
            size /= 2
        theta, (value, grad, hess) = theta - size * step, trial
        if np.max(np.abs(size * step)) <= 1e-15 * (1 + np.max(np.abs(theta))) and float(grad @ step) < 1e-20:
            return theta
    raise FedsimError("the logistic estimate did not converge (are the classes separable by the covariates?)")


# --- the protocol ----------------------------------------------------------------------------------------


def solve(family: Family, data: Sequence[ClientData], lams: Sequence[float]) -> np.ndarray:
    """The pooled point estimate for per-client ``lams`` (rounds of summaries; the server sees no raw data)."""
    if family is OLS:
        return ols_server([gram_summary(c, lam) for c, lam in zip(data, lams, strict=True)])
    return logistic_server(
        lambda theta: [newton_summary(c, theta, lam) for c, lam in zip(data, lams, strict=True)], data[0].x.shape[1]
    )


def _summaries(family: Family, data: Sequence[ClientData], theta: np.ndarray, lams: Sequence[float]):
    return [regression_summary(family, c, theta, lam) for c, lam in zip(data, lams, strict=True)]


def tuned_lams(family: Family, data: Sequence[ClientData], stages: int, lam_mode: str) -> list[float]:
    """ppi_py's tuning sequence, ``stages`` steps (1: the point estimate's lam, 2: the interval's), per
    client on its own data or globally on pooled summaries."""
    if lam_mode == "global":
        lam = 1.0
        for _ in range(stages):
            lam = tune(_summaries(family, data, solve(family, data, [lam] * len(data)), [lam] * len(data)))
        return [lam] * len(data)
    lams = []
    for i, client in enumerate(data):
        try:
            lams.append(tuned_lams(family, [client], stages, "global")[0])
        except FedsimError as e:
            hint = " (lam_mode='global' tunes lam on all clients' summaries)" if len(data) > 1 else ""
            raise FedsimError(f"client {i}: {e}{hint}") from None
    return lams


def _lams(family: Family, data: Sequence[ClientData], lam: float | None, lam_mode: str, stages: int) -> list[float]:
    return tuned_lams(family, data, stages, lam_mode) if lam is None else [float(lam)] * len(data)


def _federated_ci(family, data, lam, lam_mode, alpha, imputed_variance="averaged") -> tuple[np.ndarray, np.ndarray]:
    lams = _lams(family, data, lam, lam_mode, 2)
    theta = solve(family, data, lams)
    return regression_server(_summaries(family, data, theta, lams), theta, alpha, imputed_variance)


def _per_client(fn: Callable[[list[ClientData]], Any], data: Sequence[ClientData]) -> list[Any]:
    rows = []
    for i, client in enumerate(data):
        try:
            rows.append(fn([client]))
        except FedsimError as e:
            raise FedsimError(f"client {i}: {e}") from None
    return rows


def _checked(family: Family, clients, lam, lam_mode, method, imputed_variance="averaged"):
    lam_mode = check_method(method, lam, lam_mode, imputed_variance=imputed_variance)
    if family is LOGISTIC and lam is not None and not 0 <= lam <= 1:
        raise FedsimError(f"logistic lam must be in [0, 1] (the rectified loss is convex only there), got {lam}")
    data = check_clients(clients, covariates=True)
    if family is LOGISTIC:
        for i, c in enumerate(data):
            for key in ("y", "yhat", "yhat_unlabeled"):
                if np.any(getattr(c, key) < 0) or np.any(getattr(c, key) > 1):
                    raise FedsimError(
                        f"client {i}: logistic regression needs {key} in [0, 1] (labels 0/1, probabilities)"
                    )
    return data, lam_mode


CENTRAL_OPTIONS = {"ftol": 1e-15, "gtol": 1e-12, "maxiter": 100000, "maxls": 100}


def _centralized(family: Family, data: Sequence[ClientData], name: str, lam: float | None, **kw) -> Any:
    whole = pooled(data)
    extra = {"optimizer_options": dict(CENTRAL_OPTIONS)} if family is LOGISTIC else {}
    fn = getattr(ppi_py(), f"ppi_{family.name}_{name}")
    with warnings.catch_warnings():  # ppi_py's scikit-learn call warns about a deprecated argument
        warnings.simplefilter("ignore", FutureWarning)
        y, yhat, yhat_u = whole.y[:, 0], whole.yhat[:, 0], whole.yhat_unlabeled[:, 0]
        return fn(whole.x, y, yhat, whole.x_unlabeled, yhat_u, lam=lam, **kw, **extra)


def _ci(family: Family, clients, alpha, lam, method, lam_mode, imputed_variance) -> tuple[np.ndarray, np.ndarray]:
    alpha = check_alpha(alpha)
    data, lam_mode = _checked(family, clients, lam, lam_mode, method, imputed_variance)
    if method == "centralized":
        lower, upper = _centralized(family, data, "ci", lam, alpha=alpha)
        return np.asarray(lower), np.asarray(upper)
    if method == "per_client":
        rows = _per_client(lambda one: _federated_ci(family, one, lam, "global", alpha), data)
        return np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
    return _federated_ci(family, data, 0.0 if method == "classical" else lam, lam_mode, alpha, imputed_variance)


def _pointestimate(family: Family, clients, lam, method, lam_mode) -> np.ndarray:
    data, lam_mode = _checked(family, clients, lam, lam_mode, method)
    if method == "centralized":
        return np.asarray(_centralized(family, data, "pointestimate", lam))
    estimate = lambda one, mode: solve(family, one, _lams(family, one, lam, mode, 1))  # noqa: E731
    if method == "per_client":
        return np.array(_per_client(lambda one: estimate(one, "global"), data))
    if method == "classical":
        return solve(family, data, [0.0] * len(data))
    return estimate(data, lam_mode)


def fed_ppi_ols_ci(
    clients: Sequence[Mapping[str, Any]],
    alpha: float = 0.1,
    lam: float | None = None,
    *,
    method: str = "fed_ppi",
    lam_mode: str | None = None,
    imputed_variance: str = "averaged",
) -> tuple[np.ndarray, np.ndarray]:
    """``(lower[d], upper[d])`` of the 1 - alpha intervals for the OLS coefficients of Y on x across the
    clients (no intercept is added: put a column of ones in x). Methods, lam and ``imputed_variance`` (V_u) as
    :func:`fed_ppi_mean_ci`."""
    return _ci(OLS, clients, alpha, lam, method, lam_mode, imputed_variance)


def fed_ppi_ols_pointestimate(
    clients: Sequence[Mapping[str, Any]], lam: float | None = None, *, method: str = "fed_ppi",
    lam_mode: str | None = None,
) -> np.ndarray:  # fmt: skip
    """The OLS coefficients' Fed-PPI point estimate (one row per client for ``per_client``)."""
    return _pointestimate(OLS, clients, lam, method, lam_mode)


def fed_ppi_logistic_ci(
    clients: Sequence[Mapping[str, Any]],
    alpha: float = 0.1,
    lam: float | None = None,
    *,
    method: str = "fed_ppi",
    lam_mode: str | None = None,
    imputed_variance: str = "averaged",
) -> tuple[np.ndarray, np.ndarray]:
    """``(lower[d], upper[d])`` of the 1 - alpha intervals for the logistic-regression coefficients of a
    binary Y on x (Yhat may be a probability); lam in [0, 1]."""
    return _ci(LOGISTIC, clients, alpha, lam, method, lam_mode, imputed_variance)


def fed_ppi_logistic_pointestimate(
    clients: Sequence[Mapping[str, Any]], lam: float | None = None, *, method: str = "fed_ppi",
    lam_mode: str | None = None,
) -> np.ndarray:  # fmt: skip
    """The logistic coefficients' Fed-PPI point estimate (one row per client for ``per_client``)."""
    return _pointestimate(LOGISTIC, clients, lam, method, lam_mode)
