"""BHerd: a beneficial herd of local gradients (Luo et al.; from the paper's abstract, details inferred).

The abstract: map the local data's distribution to the local gradients, order the set of gradients by
herding so that the first ones keep the running mean closest to the mean of the set, and send the top
portion to the server. Everything below beyond that sentence is our inference (ALGORITHMS.md) and is an
option:

- units (``unit``): ``"step"`` (default) the local step deltas ``D_i = w_{i-1} - w_i`` (as ECGR);
  ``"microbatch"`` every step's minibatch split into ``microbatches`` equal slices, unit ``eta (n_m/n) g_m``
  with ``g_m`` the slice's gradient at the current local model (so a step's units sum to ``eta g``);
  ``"sample"`` the per-sample gradients of the round's samples at the round-start model, unit ``eta g_s / b``
  (``b`` the step's valid batch size), computed with ``vmap(grad)``;
- the same greedy as ECGR (:mod:`strategies.herding`) with the centre at the local mean of the units
  (herding's target), run until ``k = ceil(ratio * U)`` units are ordered (``U`` recorded units);
- upload ``sum_{first k} u`` (``scale="sum"``) or that sum times ``U / k`` (``"rescale"``, same expected
  magnitude as the full sum). With ``unit="step"`` and ``ratio = 1`` the upload is the host's delta exactly.

The microbatch and sample units are raw minibatch gradients: they leave out the optimizer's momentum and the
host's correction (SCAFFOLD, FedProx), which only the step unit includes.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from torch import Tensor

from fedsim.core.components import option
from fedsim.core.errors import FedsimError, unknown
from fedsim.core.protocol import TrajectorySpec
from fedsim.core.pytree import Tree, flatten

from .ecgr import ROUNDING_GUARD, TrajectoryDevice, TrajectoryDtype, check_fraction
from .herding import greedy_herding, safe_ratio

SCALES = ("sum", "rescale")
BHERD_UNITS = ("step", "microbatch", "sample")


def keep_count(ratio: float, units: Tensor) -> Tensor:
    """``max(1, ceil(ratio * n))`` per client for ``n`` recorded units (0 where a client has none)."""
    count = torch.ceil(ratio * units.double() - ROUNDING_GUARD).long().clamp_min(1)
    return torch.where(units > 0, count, torch.zeros_like(count))


class BHerd:
    """The BHerd regulator (see the module docstring)."""

    name = "bherd"

    def __init__(
        self,
        ratio: Annotated[float, option("fraction of the herding order kept", gt=0, le=1)] = 0.5,
        unit: Annotated[Literal["step", "microbatch", "sample"], option("what is herded (inferred)")] = "step",
        scale: Annotated[Literal["sum", "rescale"], option("upload the kept sum, or rescale it by K / |kept|")] = "sum",
        microbatches: Annotated[int, option("micro-batches per step with unit microbatch", ge=2)] = 4,
        trajectory_dtype: Annotated[TrajectoryDtype, option("storage dtype of the recorded units")] = "float32",
        trajectory_device: Annotated[TrajectoryDevice, option("where the recorded units live")] = "same",
    ):
        self.ratio = check_fraction("ratio", ratio)
        if unit not in BHERD_UNITS:
            raise unknown("BHerd unit", unit, BHERD_UNITS)
        if scale not in SCALES:
            raise unknown("BHerd scale", scale, SCALES)
        self.check_options({"unit": unit, "microbatches": microbatches})
        self.unit, self.scale = unit, scale
        count = microbatches if unit == "microbatch" else 1
        self.trajectory = TrajectorySpec.stored(unit, count, trajectory_dtype, trajectory_device)
        self.microbatches = microbatches if unit == "microbatch" else 1

    @staticmethod
    def check_options(options: dict) -> None:
        """``microbatches`` applies to ``unit: microbatch`` only (and is at least 2 there)."""
        unit, count = options.get("unit", "step"), options.get("microbatches", 4)
        if unit == "microbatch" and count < 2:
            raise FedsimError(f"microbatches must be >= 2, got {count}")
        if unit != "microbatch" and count != 4:
            raise FedsimError(f"option 'microbatches' applies with unit 'microbatch', not '{unit}'")

    def regulate(self, deltas: Tree, trajectory, num_steps: Tensor) -> tuple[Tree, Tree]:
        mask = trajectory.mask
        recorded = mask.sum(1)
        count = keep_count(self.ratio, recorded)
        _, kept = greedy_herding(trajectory.gram(), count, mask, "local_mean")
        total = flatten(deltas)
        if self.unit == "step":  # T minus the dropped steps: exactly T when all are kept
            dropped = mask & ~kept
            herd = total - trajectory.combine(dropped.to(total.dtype)) if bool(dropped.any()) else total
        else:
            herd = trajectory.combine(kept.to(total.dtype))
        norm_t = total.norm(dim=1)
        removed = torch.where(norm_t > 0, 1.0 - safe_ratio(herd.norm(dim=1), norm_t), torch.zeros_like(norm_t))
        if self.scale == "rescale":
            factor = recorded.to(herd.dtype) / count.clamp_min(1).to(herd.dtype)
            herd = herd * factor.unsqueeze(1)
        return trajectory.unflatten(herd), {"damped_norm_fraction": removed}
