"""The methods every Fed-PPI estimator offers and the checks of their options.

- ``fed_ppi``: the federated estimate from per-client summaries (Luo et al. 2024), lam tuned per client
  (``lam_mode="client"``, one round) or globally (``lam_mode="global"``, one extra round of summaries).
- ``classical``: labels only, federated the same way (lam = 0).
- ``per_client``: each client's own PPI++ interval (one row per client).
- ``centralized``: ppi_py on the pooled data, the oracle that federation approximates.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

from fedsim.core.errors import FedsimError, did_you_mean
from fedsim.ppi.moments import IMPUTED_VARIANCES, VARIANCES

METHODS = ("fed_ppi", "classical", "per_client", "centralized")
LAM_MODES = ("client", "global")


def check_method(
    method: str,
    lam: float | None,
    lam_mode: str | None,
    tunable: bool = True,
    imputed_variance: str = "averaged",
    variance: str = "combined",
) -> str:
    """The lam mode to use (``"client"`` unless given); refuses options the method would ignore."""
    if not isinstance(variance, str) or variance not in VARIANCES:
        raise FedsimError(f"variance must be 'combined' or 'stratified', got {variance!r}")
    if variance != "combined" and method != "fed_ppi":
        raise FedsimError(f"variance applies to method 'fed_ppi' only, not {method!r}; drop it")
    if variance == "stratified" and imputed_variance != "averaged":
        raise FedsimError("the stratified variance uses each client's own variances; drop imputed_variance")
    if not isinstance(imputed_variance, str) or imputed_variance not in IMPUTED_VARIANCES:
        raise FedsimError(f"imputed_variance must be 'averaged' or 'pooled', got {imputed_variance!r}")
    if imputed_variance != "averaged" and method != "fed_ppi":
        raise FedsimError(f"imputed_variance applies to method 'fed_ppi' only, not {method!r}; drop it")
    if not isinstance(method, str) or method not in METHODS:
        raise FedsimError(f"unknown method {method!r}{did_you_mean(str(method), METHODS)}; one of {', '.join(METHODS)}")
    if lam is not None:
        if not tunable:
            raise FedsimError("this estimand has no power-tuning parameter; drop lam")
        if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not math.isfinite(lam) or abs(lam) > 1e6:
            raise FedsimError(f"lam must be a number with |lam| <= 1e6, or None (tuned), got {lam!r}")
        if method == "classical":
            raise FedsimError("the classical method uses the labels only (lam = 0); drop lam")
    if lam_mode is not None:
        if not isinstance(lam_mode, str) or lam_mode not in LAM_MODES:
            raise FedsimError(f"lam_mode must be 'client' or 'global', got {lam_mode!r}")
        if method != "fed_ppi":
            raise FedsimError(f"lam_mode applies to method 'fed_ppi' only, not {method!r}; drop it")
        if lam is not None:
            raise FedsimError("lam_mode chooses how lam is tuned; with a fixed lam drop it")
        if not tunable:
            raise FedsimError("this estimand has no power-tuning parameter; drop lam_mode")
    return lam_mode or "client"


def ppi_py() -> Any:
    """The ppi_py package (the centralized oracle), imported without its global ``warnings`` filter."""
    try:
        with warnings.catch_warnings():  # ppi_py calls warnings.simplefilter("ignore") at import
            import ppi_py
    except ImportError:
        raise FedsimError("method 'centralized' runs ppi_py: pip install 'fedsim[ppi]'") from None
    return ppi_py
