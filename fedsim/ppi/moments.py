"""Per-client summaries that pool exactly: counts, means and centered scatter (the parallel-variance formula),
PPI++'s power-tuning parameter from pooled summaries, and normal intervals and p-values.

Pooling (Chan, Golub and LeVeque 1979; the formula of the Fed-PPI paper, applied to all parts at once):
``n = sum n_i``, ``m = sum n_i m_i / n``, ``S = sum S_i + sum n_i (m_i - m)(m_i - m)^T``, so that
``S / (n - ddof)`` is the covariance of the concatenated data. Pairwise this is
``v = (n1 v1 + n2 v2 + n1 n2 (m1 - m2)^2 / (n1 + n2)) / (n1 + n2)``.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr, ndtri

from fedsim.core.errors import FedsimError, FedsimWarning


@dataclass(frozen=True)
class Moments:
    """``count`` rows with mean ``mean`` (d,) and centered scatter ``scatter``: (d, d), or (d,) when
    ``diagonal`` (per-coordinate sums of squares only, for wide vectors such as a CDF on a grid)."""

    count: int
    mean: np.ndarray
    scatter: np.ndarray
    diagonal: bool = False

    @classmethod
    def of(cls, values: np.ndarray, diagonal: bool = False) -> Moments:
        """The moments of the rows of ``values`` (n, d)."""
        values = np.asarray(values, dtype=np.float64)
        mean = values.mean(axis=0)
        centered = values - mean
        scatter = (centered * centered).sum(axis=0) if diagonal else centered.T @ centered
        return cls(len(values), mean, scatter, diagonal)

    @classmethod
    def from_mean_and_variance(cls, count: int, mean: np.ndarray, variance: np.ndarray) -> Moments:
        """Diagonal moments from a mean and a (ddof 0) variance per coordinate."""
        return cls(int(count), np.asarray(mean, dtype=np.float64), count * np.asarray(variance, np.float64), True)

    def covariance(self, ddof: int = 0) -> np.ndarray:
        """``scatter / (count - ddof)``: the covariance (or the variances, when diagonal)."""
        return self.scatter / (self.count - ddof)

    def variance(self, ddof: int = 0) -> np.ndarray:
        """Per-coordinate variances."""
        cov = self.covariance(ddof)
        return cov if self.diagonal else np.diag(cov).copy()


def pool(parts: Sequence[Moments]) -> Moments:
    """The moments of the concatenation of the parts' rows, from the parts' moments alone."""
    parts = [p for p in parts if p.count > 0]
    if not parts:
        raise FedsimError("nothing to pool: every part is empty")
    diagonal = parts[0].diagonal
    count = sum(p.count for p in parts)
    mean = sum(p.count * p.mean for p in parts) / count
    scatter = sum(p.scatter for p in parts)
    for p in parts:
        gap = p.mean - mean
        scatter = scatter + p.count * (gap * gap if diagonal else np.outer(gap, gap))
    return Moments(count, mean, scatter, diagonal)


def weighted_covariance(parts: Sequence[Moments], weights: np.ndarray, ddof: int = 0) -> np.ndarray:
    """``sum_i p_i S_i / n_i``, rescaled by ``n / (n - ddof)`` (n = sum n_i): the clients' own (within)
    covariances averaged by the weights p_i, with no between-client term. One part gives its covariance
    with ``ddof``."""
    count = sum(p.count for p in parts)
    within = sum(w * p.scatter / p.count for w, p in zip(weights, parts, strict=True))
    return within * count / (count - ddof)


IMPUTED_VARIANCES = ("averaged", "pooled")


def imputed_covariance(parts: Sequence[Moments], weights: np.ndarray, rule: str, ddof: int = 0) -> np.ndarray:
    """The imputed terms' covariance: ``"averaged"`` (the issue's rule) is the clients' own covariances
    averaged by p_i, right when clients are fixed populations (strata) with their own distributions;
    ``"pooled"`` (the authors' code) adds the between-client differences of the means (the covariance of the
    concatenated terms), right when the clients' data are one population split unevenly (label skew), where
    "averaged" is too small. With one client the two agree."""
    if rule == "pooled":
        return pool(parts).covariance(ddof)
    return weighted_covariance(parts, weights, ddof)


VARIANCES = ("combined", "stratified")
UNEQUAL_FRACTIONS = 2.0  # max / min of the clients' labelled fractions that draws a warning


def warn_if_fractions_differ(labelled: Sequence[int], unlabelled: Sequence[int], remedy: str) -> None:
    """A :class:`FedsimWarning` when the clients label very different fractions of their data (max / min of
    ``n_i / D_i`` above 2): the combined variance assumes ``n_i / n = N_i / N = p_i``."""
    fractions = [n / (n + big_n) for n, big_n in zip(labelled, unlabelled, strict=True)]
    if max(fractions) > UNEQUAL_FRACTIONS * min(fractions):
        warnings.warn(
            f"the clients label different fractions of their data ({min(fractions):.3g} to {max(fractions):.3g}); "
            f"the interval assumes equal fractions and can under-cover: {remedy}",
            FedsimWarning,
            stacklevel=4,
        )


def estimator_variance(
    imputed: Sequence[Moments], rectifier: Sequence[Moments], weights: np.ndarray, imputed_variance: str,
    variance: str = "combined",
) -> np.ndarray:  # fmt: skip
    """The variance of ``theta = sum p_i theta_i``.

    ``combined`` (the issue's rule, Luo et al.): ``v_imp / N + v_rect / n``, v_imp by ``imputed_variance``
    and v_rect the pooled (parallel-formula) variance of the rectifiers. It assumes every client labels the
    same fraction (``n_i / n = N_i / N = p_i``) and warns otherwise. ``stratified`` (our inference): the exact
    variance of the weighted sum of independent clients' estimates, ``sum p_i^2 (v_imp,i / N_i + v_rect,i /
    n_i)``, with each client's own (ddof 0) variances, for any fractions (no between-client terms).
    """
    if variance == "stratified":
        return sum(w * w * (i.variance() / i.count + r.variance() / r.count)
                   for w, i, r in zip(weights, imputed, rectifier, strict=True))  # fmt: skip
    warn_if_fractions_differ([r.count for r in rectifier], [i.count for i in imputed], "pass variance='stratified'")
    big_n, n = sum(i.count for i in imputed), sum(r.count for r in rectifier)
    return imputed_covariance(imputed, weights, imputed_variance) / big_n + pool(rectifier).variance() / n


@dataclass(frozen=True)
class TuningMoments:
    """What power tuning needs from one client at the current point estimate: the joint moments of the
    labelled gradients ``[g, g_hat]`` (2d) and the moments of the unlabelled ``g_hat``."""

    labelled: Moments
    unlabelled: Moments

    @classmethod
    def of(cls, grads: np.ndarray, grads_hat: np.ndarray, grads_hat_unlabelled: np.ndarray) -> TuningMoments:
        return cls(Moments.of(np.concatenate([grads, grads_hat], axis=1)), Moments.of(grads_hat_unlabelled))


def tuned_lam(parts: Sequence[TuningMoments], inv_hessian: np.ndarray) -> float:
    """PPI++'s power-tuning parameter (Angelopoulos, Duchi and Zrnic 2023, ppi_py's ``_calc_lam_glm``,
    clipped to [0, 1]) from pooled moments:

    ``lam = tr(H^-1 (C + C^T) H^-1) / (2 (1 + n/N) tr(H^-1 V H^-1))``, with C the (ddof 0) cross-covariance
    of g and g_hat on the labelled rows and V the (ddof 1) covariance of g_hat on all rows. When V is zero
    (constant predictions) lam is 0: the predictions carry no information.
    """
    labelled = pool([p.labelled for p in parts])
    unlabelled = pool([p.unlabelled for p in parts])
    d = inv_hessian.shape[0]
    n, big_n = labelled.count, unlabelled.count
    cross = labelled.scatter[:d, d:] / n
    hat_only = Moments(n, labelled.mean[d:], labelled.scatter[d:, d:])
    v = pool([hat_only, unlabelled]).covariance(ddof=1)
    num = np.trace(inv_hessian @ (cross + cross.T) @ inv_hessian)
    denom = 2 * (1 + n / big_n) * np.trace(inv_hessian @ v @ inv_hessian)
    if not denom > 0:
        return 0.0
    return float(np.clip(num / denom, 0.0, 1.0))


def z_value(alpha: float) -> float:
    """``z_{1 - alpha/2}``."""
    return float(ndtri(1 - alpha / 2))


def normal_interval(center: np.ndarray, std: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """``center -+ z_{1-alpha/2} std``."""
    z = z_value(alpha)
    if not (np.all(np.isfinite(center)) and np.all(np.isfinite(std))):
        raise FedsimError("the interval is not finite (degenerate data: too few points, or an extreme lam)")
    return center - z * std, center + z * std


def two_sided_p_value(estimate: np.ndarray, std: np.ndarray, null: float) -> np.ndarray:
    """``2 (1 - Phi(|estimate - null| / std))``, std floored at 1e-16 (as ppi_py's rectified p-value)."""
    return 2 * ndtr(-np.abs(estimate - null) / np.maximum(std, 1e-16))


def check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 < alpha < 1:
        raise FedsimError(f"alpha must be in (0, 1), got {alpha!r}")
    return float(alpha)
