"""FedProx (Li et al., 2020): FedAvg with a proximal term in every client's local objective."""

from __future__ import annotations

from typing import Annotated

from fedsim.core.components import option
from fedsim.core.errors import FedsimError
from fedsim.core.protocol import ClientAlgorithm, LocalContext
from fedsim.core.pytree import Tree

from .fedavg import FedAvg


class ProximalClient(ClientAlgorithm):
    """Local objective ``f_k(w) + (mu / 2) ||w - w_global||^2``: the local direction is
    ``grad f_k(w) + mu (w - w_global)``."""

    name = "fedprox"

    def __init__(self, mu: float):
        self.mu = mu

    def grad_transform(self, grads: Tree, params: Tree, ctx: LocalContext) -> Tree:
        return {k: g + self.mu * (params[k] - ctx.global_params[k].unsqueeze(0)) for k, g in grads.items()}


class FedProx(FedAvg):
    """FedAvg aggregation, proximal local training: clients minimize ``f_k(w) + (mu/2)||w - w_t||^2``
    (``mu = 0.01`` by default; the ECGR code uses 0.1). ``mu = 0`` is FedAvg."""

    name = "fedprox"

    def __init__(self, mu: Annotated[float, option("proximal coefficient (0: FedAvg)", ge=0)] = 0.01, **kwargs):
        super().__init__(**kwargs)
        if mu < 0:
            raise FedsimError(f"mu must be >= 0, got {mu}")
        self.mu = mu
        self.client_algorithm = ProximalClient(mu)
