"""FedNova (Wang et al., NeurIPS 2020): normalized averaging that removes the objective inconsistency
of clients taking different numbers of local steps.

Client ``k``'s change over the round is modelled as ``w - y_k = eta sum_i a_k,i g_k,i``; FedNova
normalizes it by ``||a_k||_1`` and rescales the average by the effective step count:

    d_k = Delta_k / ||a_k||_1,     tau_eff = sum_k p_k ||a_k||_1,     w <- w - tau_eff * sum_k p_k d_k

- ``form="simplified"`` (the seed group's code, used by ECGR's FedNova host): ``||a_k||_1 = tau_k``,
  the client's local step count;
- ``"general"``: ``||a_k||_1`` of local SGD with momentum ``rho`` and a proximal term ``mu`` (FedProx
  inside FedNova), the coefficient of a constant gradient in the linear recursion
  ``b_i = rho b_{i-1} + g + mu e_i``, ``e_{i+1} = e_i - eta b_i`` (``e = y - w``), i.e. ``-e_tau / eta``
  with ``g = 1``: ``tau`` for plain SGD, ``sum_{j=1..tau} (1 - rho^j) / (1 - rho)`` with momentum,
  ``sum_{j<tau} (1 - eta mu)^j`` with the proximal term (the closed forms are tested).

Equal step counts and plain SGD give FedAvg.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from torch import Tensor

from fedsim.core.components import option
from fedsim.core.errors import FedsimError, unknown
from fedsim.core.protocol import ClientUpdates, ServerState
from fedsim.core.reduction import Reduction

from .base import Strategy, apply_step
from .fedprox import ProximalClient

FORMS = ("simplified", "general")


def general_norm(num_steps: Tensor, lr: float, momentum: float = 0.0, mu: float = 0.0) -> Tensor:
    """``||a_k||_1`` of local SGD with momentum and a proximal term, per client (float64; see the module
    docstring), by running the scalar recursion in units of ``eta`` for ``max(tau)`` steps."""
    tau = num_steps.long()
    e = torch.zeros(tau.shape, dtype=torch.float64, device=tau.device)  # e / eta
    b = torch.zeros_like(e)
    for i in range(int(tau.max()) if tau.numel() else 0):
        live = i < tau
        b_next = momentum * b + 1.0 + (lr * mu) * e
        b = torch.where(live, b_next, b)
        e = torch.where(live, e - b_next, e)
    return -e


class FedNova(Strategy):
    """FedNova's server (see the module docstring); with ``mu > 0`` clients add FedProx's proximal term."""

    name = "fednova"

    def __init__(
        self,
        form: Annotated[Literal["simplified", "general"], option("tau_k = K (simplified) or ||a_k||_1 (general)")] = (
            "simplified"
        ),
        mu: Annotated[float, option("proximal coefficient of the local objective", ge=0)] = 0.0,
        local_momentum: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if form not in FORMS:
            raise unknown("FedNova form", form, FORMS)
        if mu < 0:
            raise FedsimError(f"mu must be >= 0, got {mu}")
        self.form, self.mu, self.local_momentum = form, mu, local_momentum
        if mu > 0:
            self.client_algorithm = ProximalClient(mu)

    def norms(self, updates: ClientUpdates) -> Tensor:
        """``||a_k||_1`` per client."""
        if self.form == "simplified":
            return updates.num_steps.double()
        return general_norm(updates.num_steps, updates.lr or 0.0, self.local_momentum, self.mu)

    def reductions(self) -> dict[str, Reduction]:
        return {"direction": Reduction(scale=lambda clients: 1.0 / self.norms(clients).clamp_min(1e-12))}

    def aggregate(self, round_: int, state: ServerState, updates: ClientUpdates) -> ServerState:
        a = self.norms(updates).clamp_min(1e-12)
        direction = self.reduced(updates, "direction")  # sum_k p_k Delta_k / ||a_k||_1
        tau_eff = float((updates.weights.double() * a).sum())
        return ServerState(apply_step(state.params, direction, tau_eff), state.extras)
