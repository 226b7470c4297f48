"""Federated prediction-powered inference (Fed-PPI; Luo et al. 2024, arXiv 2409.01730): confidence intervals
for a mean, a quantile, or OLS / logistic coefficients from a few labelled points and many predictions spread
over clients, where only per-client summaries reach the server.

Every estimator takes ``clients``, a list of dicts with ``y``, ``yhat``, ``yhat_unlabeled`` (and ``x``,
``x_unlabeled`` for the regressions), and a ``method``: ``fed_ppi`` (default), ``classical`` (labels only),
``per_client`` (each client's own interval) or ``centralized`` (ppi_py on the pooled data).
"""

from __future__ import annotations

from fedsim.ppi.mean import fed_ppi_mean_ci, fed_ppi_mean_pointestimate
from fedsim.ppi.methods import LAM_MODES, METHODS
from fedsim.ppi.quantile import fed_ppi_quantile_ci, fed_ppi_quantile_pointestimate
from fedsim.ppi.regression import (
    fed_ppi_logistic_ci,
    fed_ppi_logistic_pointestimate,
    fed_ppi_ols_ci,
    fed_ppi_ols_pointestimate,
)

__all__ = [
    "LAM_MODES",
    "METHODS",
    "fed_ppi_logistic_ci",
    "fed_ppi_logistic_pointestimate",
    "fed_ppi_mean_ci",
    "fed_ppi_mean_pointestimate",
    "fed_ppi_ols_ci",
    "fed_ppi_ols_pointestimate",
    "fed_ppi_quantile_ci",
    "fed_ppi_quantile_pointestimate",
]
