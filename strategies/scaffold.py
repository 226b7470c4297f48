"""SCAFFOLD (Karimireddy et al., ICML 2020), option II control variates.

Client ``k`` keeps a control variate ``c_k`` across rounds (stacked for all clients in host memory; only
the selected clients' rows travel to the device); the server keeps ``c`` and broadcasts it. Local steps
follow the corrected direction ``g - c_k + c``; after ``K_k`` steps from ``w`` to ``y_k``:

    c_k+ = c_k - c + (w - y_k) / (K_k eta)                                  (option II, the default)
    c_k+ = (1 / K_k) sum_i g_k,i                  (``control="gradient_mean"``: the mean raw
                                                   stochastic gradient along the local path; our option)
    w   <- w - eta_g * sum_k q_k (w - y_k)
    c   <- c + (|S| / N) * sum_k q_k (c_k+ - c_k)

with ``q_k`` the sample weights ``p_k`` (``weighting="samples"``, the default: FedAvg's weighting,
and with full participation ``c = sum_k p_k c_k``, what ECGR's authors' server computes) or ``1 / |S|``
(``"uniform"``, the paper's means). A client that took no step keeps its ``c_k`` (uploads ``0``).

Where the correction enters (``correction``) matters once the local optimizer has state:

- ``"after_step"`` (default; ECGR's authors' code and Flower's SCAFFOLD baseline): the optimizer steps on the
  raw gradient, then ``w <- w - eta (c - c_k)``, outside the momentum buffer;
- ``"gradient"``: ``g - c_k + c`` is the gradient handed to the optimizer, so momentum (or Adam) acts on
  the correction too (momentum amplifies it by up to ``1 / (1 - rho)``).

The two are identical for plain SGD. Uploads: the delta and ``c_k+ - c_k``; broadcast: ``w`` and ``c``. The
control variates are updated from the actual final local model even when a regulator (ECGR) rewrites the
uploaded delta, as in ECGR's code. With all control variates zero (the first round) a round is exactly
FedAvg's.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from torch import Tensor

from fedsim.core.components import option
from fedsim.core.errors import unknown
from fedsim.core.protocol import ClientAlgorithm, ClientUpdates, LocalContext, ServerState
from fedsim.core.pytree import Tree, per_client
from fedsim.core.reduction import Reduction

from .base import Strategy, apply_step, check_positive


def direction_scale(num_steps: Tensor, lr: float) -> Tensor:
    """``1 / (K_k eta)`` per client: turns a local delta into the mean local direction."""
    return 1.0 / (num_steps.clamp_min(1).double() * lr)


Control = Literal["model_difference", "gradient_mean"]
Correction = Literal["after_step", "gradient"]
CONTROLS = ("model_difference", "gradient_mean")
CORRECTIONS = ("after_step", "gradient")
WEIGHTINGS = ("samples", "uniform")


class ScaffoldClient(ClientAlgorithm):
    """Corrected local steps (``correction``: ``"after_step"`` or ``"gradient"``, scaled by ``scale``) and
    the control-variate update (``control``: option II ``"model_difference"`` or ``"gradient_mean"``)."""

    name = "scaffold"

    def __init__(self, control: str = "model_difference", correction: str = "after_step", scale: float = 1.0):
        if control not in CONTROLS:
            raise unknown("SCAFFOLD control", control, CONTROLS)
        if correction not in CORRECTIONS:
            raise unknown("SCAFFOLD correction", correction, CORRECTIONS)
        self.control, self.correction, self.scale = control, correction, scale

    def correction_term(self, ctx: LocalContext) -> Tree:
        """``scale * (c - c_k)`` per client, computed once per chunk."""
        if "corr" not in ctx.scratch:
            ctx.scratch["corr"] = True
            for key, c_k in ctx.client_state.items():
                if key.startswith("c."):
                    ctx.scratch[f"corr.{key[2:]}"] = self.scale * (ctx.broadcast[key].unsqueeze(0) - c_k)
        return {k[5:]: v for k, v in ctx.scratch.items() if k.startswith("corr.")}

    def corrected(self, grads: Tree, ctx: LocalContext) -> Tree:
        """The gradient the optimizer sees: ``g + (c - c_k)`` with ``correction="gradient"``, else ``g``;
        with ``gradient_mean`` also sums the raw gradients for the control update."""
        if self.control == "gradient_mean":
            for k, g in grads.items():
                key = f"gsum.{k}"
                ctx.scratch[key] = ctx.scratch[key] + g if key in ctx.scratch else g.clone()
        if self.correction != "gradient":
            return grads
        corr = self.correction_term(ctx)
        return {k: g + corr[k] for k, g in grads.items()}

    def after_step(self, params: Tree, ctx: LocalContext) -> Tree:
        """``w <- w - eta (c - c_k)`` after every optimizer step (``correction="after_step"``)."""
        if self.correction == "after_step":
            for k, v in self.correction_term(ctx).items():
                params[k].sub_(ctx.lr * v)
        return params

    def init_client_state(self, params: Tree) -> Tree:
        return {f"c.{k}": torch.zeros_like(v) for k, v in params.items()}

    def extra_uploads(self, params: Tree) -> Tree:
        return {f"dc.{k}": torch.zeros_like(v) for k, v in params.items()}

    def grad_transform(self, grads: Tree, params: Tree, ctx: LocalContext) -> Tree:
        return self.corrected(grads, ctx)

    def new_control(self, deltas: Tree, num_steps: Tensor, ctx: LocalContext) -> Tree:
        if self.control == "gradient_mean":
            steps = num_steps.clamp_min(1).double()
            sums = {k: ctx.scratch.get(f"gsum.{k}", torch.zeros_like(d)) for k, d in deltas.items()}
            return {k: v / per_client(steps, v) for k, v in sums.items()}
        scale = direction_scale(num_steps, ctx.lr)
        return {
            k: ctx.client_state[f"c.{k}"] - ctx.broadcast[f"c.{k}"].unsqueeze(0) + d * per_client(scale, d)
            for k, d in deltas.items()
        }

    def finish(self, deltas: Tree, num_steps: Tensor, ctx: LocalContext) -> tuple[Tree, Tree, Tree]:
        new = self.new_control(deltas, num_steps, ctx)
        stepped = num_steps > 0
        if not bool(stepped.all()):  # no local step: no information, keep c_k
            new = {k: torch.where(per_client(stepped, v) > 0, v, ctx.client_state[f"c.{k}"]) for k, v in new.items()}
        extras = {f"dc.{k}": v - ctx.client_state[f"c.{k}"] for k, v in new.items()}
        return deltas, extras, {f"c.{k}": v for k, v in new.items()}


class SCAFFOLD(Strategy):
    """SCAFFOLD's server (see the module docstring); ``server_lr`` is eta_g (default 1)."""

    name = "scaffold"
    server_state = broadcast = ("c.",)

    def __init__(
        self,
        server_lr: Annotated[float, option("global step size eta_g", gt=0)] = 1.0,
        control: Annotated[Control, option("c_k+ from the model difference (option II) or the gradient mean")] = (
            "model_difference"
        ),
        correction: Annotated[Correction, option("correction applied after the optimizer step or to the gradient")] = (
            "after_step"
        ),
        weighting: Annotated[Literal["samples", "uniform"], option("client weights q_k of the server averages")] = (
            "samples"
        ),
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_positive(server_lr=server_lr)
        if weighting not in WEIGHTINGS:
            raise unknown("SCAFFOLD weighting", weighting, WEIGHTINGS)
        self.server_lr, self.weighting = server_lr, weighting
        self.client_algorithm = ScaffoldClient(control, correction)

    def reductions(self) -> dict[str, Reduction]:
        """``sum_k q_k Delta_k`` and ``sum_k q_k (c_k+ - c_k)``, ``q_k`` sample weights or ``1 / |S|``."""
        return {"mean": Reduction(weight=self.weighting), "control": Reduction("dc.", weight=self.weighting)}

    def update_control(self, state: ServerState, updates: ClientUpdates) -> Tree:
        """``c + (|S| / N) sum_k q_k (c_k+ - c_k)``."""
        share = len(updates.client_ids) / (updates.num_clients or len(updates.client_ids))
        mean = self.reduced(updates, "control")
        return {k: v + share * mean[k[2:]] for k, v in state.extras.items() if k.startswith("c.")}

    def aggregate(self, round_: int, state: ServerState, updates: ClientUpdates) -> ServerState:
        mean_delta = self.reduced(updates, "mean")
        extras = {**state.extras, **self.update_control(state, updates)}
        return ServerState(apply_step(state.params, mean_delta, self.server_lr), extras)
