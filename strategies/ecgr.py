"""ECGR: exploratory-convergent gradient re-aggregation (Luo et al.; rule from the authors' code,
NUDTPingLuo/ECGR). A client-side regulator that wraps any host algorithm.

Local training runs unchanged (plain SGD with momentum, or the host's corrected direction). With the
recorded step deltas ``D_i = w_{i-1} - w_i``, ``i = 1..K`` (they include momentum and any host correction):

1. greedy herding (:mod:`strategies.herding`) with centre ``c`` picks ``n = max(1, floor(rho K))`` steps
   ("convergent"): ``S = 0``; ``n`` times pick the unpicked ``i`` minimizing ``||S + (D_i - c)||`` and add
   ``D_i - c`` to ``S``; the official code uses ``c = 0`` (it computes the local mean but passes ``None``);
2. ``C = sum_{picked} D_i + beta * sum_{others} D_i`` (the "exploratory" steps are damped), and
   ``T = sum_i D_i``, the plain delta the host would upload;
3. upload ``Delta = C * ||T|| / ||C||`` (norm preserved); the server aggregates as its host does.

Defaults ``rho = 0.5``, ``beta = 0.2``. ``beta = 1`` or ``rho = 1`` uploads ``T``: the host exactly (computed
as ``C = T - (1 - beta) sum_{others} D_i``, which is ``T`` bit for bit when nothing is damped). ``center`` is
``"zero"`` (official) or ``"local_mean"`` (the mean step, what the code computes but does not use; our
option). ``floor(rho K)`` is taken with a 1e-9 guard against float rounding (``0.29 * 100``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Literal

import torch
from torch import Tensor

from fedsim.core.components import option
from fedsim.core.errors import FedsimError, unknown
from fedsim.core.protocol import TrajectorySpec
from fedsim.core.pytree import Tree, flatten

from .herding import CENTERS, gram, greedy_herding, safe_ratio

TrajectoryDtype = Literal["float32", "float16", "bfloat16"]
TrajectoryDevice = Literal["same", "cpu"]

ROUNDING_GUARD = 1e-9


def check_fraction(name: str, value: float, low_open: bool = True) -> float:
    """A fraction in (0, 1] (or [0, 1] with ``low_open=False``)."""
    ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0)
    if not (ok and math.isfinite(value)):
        raise FedsimError(f"{name} must be in {'(0, 1]' if low_open else '[0, 1]'}, got {value}")
    return float(value)


def check_center(center: str) -> str:
    if center not in CENTERS:
        raise unknown("ECGR center", center, CENTERS)
    return center


def selection_count(rho: float, units: Tensor) -> Tensor:
    """``max(1, floor(rho * n))`` per client for ``n`` recorded units (0 where a client has none)."""
    n = units.double()
    count = torch.floor(rho * n + ROUNDING_GUARD).long().clamp_min(1)
    return torch.where(units > 0, count, torch.zeros_like(count))


def ecgr_combine(
    total: Tensor,
    g: Tensor,
    mask: Tensor,
    combine: Callable[[Tensor], Tensor],
    rho: float = 0.5,
    beta: float = 0.2,
    center: str = "zero",
) -> tuple[Tensor, Tensor]:
    """ECGR on flattened per-client data: ``total[C, D]`` the plain deltas ``T``, ``g[C, U, U]`` the Gram
    matrices of the units, ``mask[C, U]`` the recorded units and ``combine(coeffs[C, U]) -> [C, D]`` the
    weighted sum of units. Returns the uploads ``[C, D]`` and the damped norm fraction ``1 - ||C|| / ||T||``."""
    _, selected = greedy_herding(g, selection_count(rho, mask.sum(1)), mask, center)
    others = mask & ~selected
    if beta == 1.0 or not bool(others.any()):
        combined = total
    else:
        combined = total - (1.0 - beta) * combine(others.to(total.dtype))
    norm_t = total.norm(dim=1)
    norm_c = combined.norm(dim=1)
    damped = torch.where(norm_t > 0, 1.0 - safe_ratio(norm_c, norm_t), torch.zeros_like(norm_t))
    return combined * safe_ratio(norm_t, norm_c).unsqueeze(1), damped


def reaggregate(deltas: Tensor, rho: float = 0.5, beta: float = 0.2, center: str = "zero") -> Tensor:
    """ECGR's upload from flattened step deltas: ``[K, D] -> [D]`` or batched ``[C, K, D] -> [C, D]``
    (exactly the greedy of the module docstring; Gram form)."""
    check_fraction("rho", rho)
    check_fraction("beta", beta, low_open=False)
    check_center(center)
    if deltas.dim() not in (2, 3):
        raise FedsimError(f"deltas must be [K, D] or [C, K, D], got shape {tuple(deltas.shape)}")
    batched = deltas.dim() == 3
    d = deltas if batched else deltas.unsqueeze(0)
    mask = torch.ones(d.shape[:2], dtype=torch.bool, device=d.device)
    combine = lambda coeffs: torch.bmm(coeffs.unsqueeze(1), d).squeeze(1)  # noqa: E731
    upload, _ = ecgr_combine(d.sum(1), gram(d).double(), mask, combine, rho, beta, center)
    return upload if batched else upload[0]


class ECGR:
    """The ECGR regulator (see the module docstring): records local step deltas, uploads the re-aggregated,
    norm-preserved delta. Wraps any host's client algorithm (:class:`strategies.client.ComposedClient`)."""

    name = "ecgr"

    def __init__(
        self,
        rho: Annotated[float, option("fraction of the K local steps selected by herding", gt=0, le=1)] = 0.5,
        beta: Annotated[float, option("weight of the unselected steps (1: the host unchanged)", ge=0, le=1)] = 0.2,
        center: Annotated[Literal["zero", "local_mean"], option("herding centre c (zero: the authors' code)")] = "zero",
        trajectory_dtype: Annotated[TrajectoryDtype, option("storage dtype of the recorded steps")] = "float32",
        trajectory_device: Annotated[TrajectoryDevice, option("where the recorded steps live")] = "same",
    ):
        self.rho = check_fraction("rho", rho)
        self.beta = check_fraction("beta", beta, low_open=False)
        self.center = check_center(center)
        self.trajectory = TrajectorySpec.stored("step", 1, trajectory_dtype, trajectory_device)

    def regulate(self, deltas: Tree, trajectory, num_steps: Tensor) -> tuple[Tree, Tree]:
        total = flatten(deltas)
        upload, damped = ecgr_combine(
            total, trajectory.gram(), trajectory.mask, trajectory.combine, self.rho, self.beta, self.center
        )
        return trajectory.unflatten(upload), {"damped_norm_fraction": damped}
