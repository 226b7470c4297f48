"""FedDyn (Acar et al., ICLR 2021): federated learning with dynamic regularization.

Client ``k`` keeps ``h_k`` (its last local gradient, ``h_k = grad L_k(theta_k)`` at the previous local
optimum; zero at first) and minimizes ``L_k(theta) - <h_k, theta> + (alpha/2) ||theta - w||^2``, so its
local direction is ``g + alpha (theta - w) - h_k``. After local training to ``theta_k``:

    h_k <- h_k - alpha (theta_k - w)
    h   <- h - alpha (|P| / m) (theta_bar - w)          theta_bar = mean_{k in P} theta_k  (uniform, as the paper)
    w   <- theta_bar - h / alpha

with ``m`` all clients and ``P`` this round's. Default ``alpha = 0.01`` (the seed group's code).
"""

from __future__ import annotations

from typing import Annotated

import torch

from fedsim.core.components import option
from fedsim.core.errors import FedsimError
from fedsim.core.protocol import ClientAlgorithm, ClientUpdates, LocalContext, ServerState
from fedsim.core.pytree import Tree
from fedsim.core.reduction import Reduction

from .base import Strategy


class FedDynClient(ClientAlgorithm):
    """Local direction ``g + alpha (theta - w) - h_k``; ``h_k <- h_k + alpha Delta_k`` (``Delta_k = w - theta_k``)."""

    name = "feddyn"

    def __init__(self, alpha: float):
        self.alpha = alpha

    def init_client_state(self, params: Tree) -> Tree:
        return {f"h.{k}": torch.zeros_like(v) for k, v in params.items()}

    def grad_transform(self, grads: Tree, params: Tree, ctx: LocalContext) -> Tree:
        return {
            k: g + self.alpha * (params[k] - ctx.global_params[k].unsqueeze(0)) - ctx.client_state[f"h.{k}"]
            for k, g in grads.items()
        }

    def finish(self, deltas: Tree, num_steps, ctx: LocalContext) -> tuple[Tree, Tree, Tree]:
        state = {f"h.{k}": ctx.client_state[f"h.{k}"] + self.alpha * d for k, d in deltas.items()}
        return deltas, {}, state


class FedDyn(Strategy):
    """FedDyn's server (see the module docstring)."""

    name = "feddyn"
    server_state = ("h.",)

    def __init__(self, alpha: Annotated[float, option("dynamic regularization coefficient", gt=0)] = 0.01, **kwargs):
        super().__init__(**kwargs)
        if not alpha > 0:
            raise FedsimError(f"alpha must be > 0, got {alpha}")
        self.alpha = alpha
        self.client_algorithm = FedDynClient(alpha)

    def reductions(self) -> dict[str, Reduction]:
        return {"mean": Reduction(weight="uniform")}  # w - theta_bar

    def aggregate(self, round_: int, state: ServerState, updates: ClientUpdates) -> ServerState:
        count = len(updates.client_ids)
        mean_delta = self.reduced(updates, "mean")
        share = count / (updates.num_clients or count)
        h = {k: state.extras[f"h.{k}"] + self.alpha * share * d for k, d in mean_delta.items()}
        params = {k: state.params[k] - d - h[k] / self.alpha for k, d in mean_delta.items()}
        return ServerState(params, {f"h.{k}": v for k, v in h.items()})
