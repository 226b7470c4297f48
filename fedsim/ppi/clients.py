"""A Fed-PPI client's data, checked: labelled ``y`` and ``yhat``, unlabelled ``yhat_unlabeled`` and, for the
regressions, covariates ``x`` and ``x_unlabeled``. Arrays may be numpy or torch, 1-D or 2-D; they become
float64 numpy. Every problem is one :class:`FedsimError` line naming the client."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsim.core.errors import FedsimError

PREDICTION_KEYS = ("y", "yhat", "yhat_unlabeled")
COVARIATE_KEYS = ("x", "x_unlabeled")


@dataclass(frozen=True)
class ClientData:
    """One client's checked arrays: ``y``, ``yhat`` (n, k), ``yhat_unlabeled`` (N, k); ``x`` (n, d) and
    ``x_unlabeled`` (N, d) for the regressions (else None)."""

    y: np.ndarray
    yhat: np.ndarray
    yhat_unlabeled: np.ndarray
    x: np.ndarray | None = None
    x_unlabeled: np.ndarray | None = None

    @property
    def n(self) -> int:
        """Labelled points."""
        return len(self.y)

    @property
    def big_n(self) -> int:
        """Unlabelled points."""
        return len(self.yhat_unlabeled)

    @property
    def size(self) -> int:
        """All the client's points, D_i = n_i + N_i (the weight p_i = D_i / sum D)."""
        return self.n + self.big_n


def _array(value: Any, key: str, i: int) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    kind = np.asarray(value).dtype.kind
    if kind not in "biuf":
        raise FedsimError(f"client {i}: {key} must hold real numbers, got dtype {np.asarray(value).dtype}")
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise FedsimError(f"client {i}: {key} is not a numeric array") from None
    if array.ndim not in (1, 2):
        raise FedsimError(f"client {i}: {key} must be 1-D or 2-D, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise FedsimError(f"client {i}: {key} has NaN or infinite values")
    return array


def _as_2d(array: np.ndarray) -> np.ndarray:
    return array.reshape(-1, 1) if array.ndim == 1 else array


def check_clients(clients: Sequence[Mapping[str, Any]], covariates: bool = False) -> list[ClientData]:
    """The clients' data, checked: a non-empty list of dicts with exactly the keys the estimand uses
    (``y``, ``yhat``, ``yhat_unlabeled``; plus ``x``, ``x_unlabeled`` when ``covariates``), matching
    lengths, at least one labelled and one unlabelled point each, no NaN."""
    if isinstance(clients, Mapping) or not isinstance(clients, Sequence) or not clients:
        raise FedsimError("clients must be a non-empty list of dicts (one per client)")
    keys = PREDICTION_KEYS + (COVARIATE_KEYS if covariates else ())
    checked = []
    for i, client in enumerate(clients):
        if not isinstance(client, Mapping):
            raise FedsimError(f"client {i} is a {type(client).__name__}, not a dict of arrays")
        missing = [k for k in keys if k not in client]
        if missing:
            raise FedsimError(f"client {i} lacks {', '.join(missing)} (needs {', '.join(keys)})")
        extra = sorted(set(client) - set(keys))
        if extra:
            what = "the regressions" if set(extra) <= set(COVARIATE_KEYS) else "any estimand"
            raise FedsimError(f"client {i}: {', '.join(extra)} is not used here (only by {what}); drop it")
        arrays = {k: _array(client[k], k, i) for k in keys}
        y, yhat, yhat_u = (_as_2d(arrays[k]) for k in PREDICTION_KEYS)
        if y.shape[1] == 0:
            raise FedsimError(f"client {i}: y has no columns")
        if len(y) == 0:
            raise FedsimError(f"client {i} has no labelled points (y is empty)")
        if len(yhat_u) == 0:
            raise FedsimError(f"client {i} has no unlabelled predictions (yhat_unlabeled is empty)")
        if len(yhat) != len(y):
            raise FedsimError(f"client {i}: y has {len(y)} rows but yhat has {len(yhat)}")
        if yhat.shape[1] != y.shape[1] or yhat_u.shape[1] != y.shape[1]:
            raise FedsimError(
                f"client {i}: y, yhat and yhat_unlabeled must have the same columns, got "
                f"{y.shape[1]}, {yhat.shape[1]} and {yhat_u.shape[1]}"
            )
        x = x_u = None
        if covariates:
            if y.shape[1] != 1:
                raise FedsimError(f"client {i}: a regression needs a 1-D y, got {y.shape[1]} columns")
            x, x_u = _as_2d(arrays["x"]), _as_2d(arrays["x_unlabeled"])
            if len(x) != len(y):
                raise FedsimError(f"client {i}: y has {len(y)} rows but x has {len(x)}")
            if len(x_u) != len(yhat_u):
                raise FedsimError(f"client {i}: yhat_unlabeled has {len(yhat_u)} rows but x_unlabeled has {len(x_u)}")
            if x.shape[1] == 0:
                raise FedsimError(f"client {i}: x has no columns (put a column of ones in x for an intercept)")
            if x_u.shape[1] != x.shape[1]:
                raise FedsimError(f"client {i}: x has {x.shape[1]} columns but x_unlabeled has {x_u.shape[1]}")
        checked.append(ClientData(y, yhat, yhat_u, x, x_u))
    widths = {c.y.shape[1] for c in checked}
    if len(widths) > 1:
        raise FedsimError(f"clients disagree on the columns of y: {sorted(widths)}")
    if covariates and len({c.x.shape[1] for c in checked}) > 1:
        raise FedsimError("clients disagree on the number of covariates (columns of x)")
    return checked


def client_weights(clients: Sequence[Any]) -> np.ndarray:
    """``p_i = D_i / sum_j D_j`` with D_i a client's labelled plus unlabelled points (``size``)."""
    sizes = np.array([c.size for c in clients], dtype=np.float64)
    return sizes / sizes.sum()


def pooled(clients: Sequence[ClientData]) -> ClientData:
    """All clients' data concatenated (the centralized oracle's input; never used by the federated path)."""
    cat = lambda key: None if getattr(clients[0], key) is None else np.concatenate([getattr(c, key) for c in clients])  # noqa: E731
    return ClientData(*(cat(k) for k in PREDICTION_KEYS + COVARIATE_KEYS))
