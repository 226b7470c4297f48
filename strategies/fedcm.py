"""Client-level momentum broadcast by the server: FedCM (Xu et al., 2021), which Cheng et al. (2023,
"Momentum benefits non-IID federated learning simply and provably") call FedAvg-M, and their SCAFFOLD-M.

The server keeps a momentum ``m`` (the last round's mean local direction) and broadcasts it; every local
step mixes it into the client's direction:

    FedCM:       v = beta * g + (1 - beta) * m
    SCAFFOLD-M:  v = beta * (g - c_k + c) + (1 - beta) * m       (control variates as in SCAFFOLD)

After the round, with ``Delta_k = w - y_k`` over ``K_k`` local steps at learning rate ``eta``:

    m <- sum_k p_k Delta_k / (K_k eta)          w <- w - eta_g * sum_k p_k Delta_k

(``m_0 = 0``). The papers write the global step as ``w <- w - gamma m`` with ``gamma = eta_g K eta``; the
two agree for equal ``K_k``, and ours keeps ``eta_g = 1`` equal to FedAvg's step. ``beta = 1`` is FedAvg
(FedCM) or SCAFFOLD (SCAFFOLD-M) exactly. Defaults: ``beta = 0.1`` (FedCM's alpha), ``eta_g = 1``.
SCAFFOLD-M's control variates default to the mean raw local gradient (Cheng et al.'s update; option II's
model difference would fold the momentum into them); ``control`` switches.
"""

from __future__ import annotations

from typing import Annotated

from fedsim.core.components import option
from fedsim.core.errors import FedsimError
from fedsim.core.protocol import ClientAlgorithm, ClientUpdates, LocalContext, ServerState
from fedsim.core.pytree import Tree
from fedsim.core.reduction import Reduction

from .base import Strategy, apply_step, check_positive
from .scaffold import SCAFFOLD, Control, Correction, ScaffoldClient, direction_scale


def mix_momentum(direction: Tree, ctx: LocalContext, beta: float) -> Tree:
    """``beta * direction + (1 - beta) * m`` with the broadcast momentum ``m`` (``direction`` when beta = 1)."""
    if beta == 1.0:
        return direction
    return {k: beta * d + (1.0 - beta) * ctx.broadcast[f"m.{k}"].unsqueeze(0) for k, d in direction.items()}


def check_beta(beta: float) -> float:
    if not 0.0 < beta <= 1.0:
        raise FedsimError(f"beta must be in (0, 1], got {beta}")
    return float(beta)


class MomentumClient(ClientAlgorithm):
    """FedCM's local direction ``beta g + (1 - beta) m``."""

    name = "fedcm"

    def __init__(self, beta: float):
        self.beta = beta

    def grad_transform(self, grads: Tree, params: Tree, ctx: LocalContext) -> Tree:
        return mix_momentum(grads, ctx, self.beta)


class ScaffoldMomentumClient(ScaffoldClient):
    """SCAFFOLD-M's local direction ``beta (g - c_k + c) + (1 - beta) m`` (with ``correction="after_step"``
    the optimizer sees ``beta g + (1 - beta) m`` and ``beta (c - c_k)`` is applied after the step)."""

    name = "scaffold-m"

    def __init__(self, beta: float, control: str = "gradient_mean", correction: str = "after_step"):
        super().__init__(control, correction, scale=beta if correction == "after_step" else 1.0)
        self.beta = beta

    def grad_transform(self, grads: Tree, params: Tree, ctx: LocalContext) -> Tree:
        return mix_momentum(self.corrected(grads, ctx), ctx, self.beta)


MOMENTUM = Reduction(
    scale=lambda clients: direction_scale(clients.num_steps, clients.lr or 1.0),
    rows=lambda clients: clients.num_steps > 0,
)
"""The new server momentum ``sum_k p_k Delta_k / (K_k eta)`` over the clients that took a local step (weights
renormalized over them)."""


def momentum_of(strategy: Strategy, updates: ClientUpdates) -> Tree:
    """The new server momentum (:data:`MOMENTUM`, through the strategy's reduction; the old one if no client
    took a step)."""
    momentum = strategy.reduced(updates, "momentum")
    return {f"m.{k}": v for k, v in momentum.items()} if momentum is not None else {}


class FedCM(Strategy):
    """FedCM / FedAvg-M (see the module docstring)."""

    name = "fedcm"
    server_state = broadcast = ("m.",)

    def __init__(
        self,
        beta: Annotated[float, option("weight of the fresh gradient (1: FedAvg)", gt=0, le=1)] = 0.1,
        server_lr: Annotated[float, option("server learning rate", gt=0)] = 1.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_positive(server_lr=server_lr)
        self.beta, self.server_lr = check_beta(beta), server_lr
        self.client_algorithm = MomentumClient(self.beta)

    def reductions(self) -> dict[str, Reduction]:
        return {"mean": Reduction(), "momentum": MOMENTUM}

    def aggregate(self, round_: int, state: ServerState, updates: ClientUpdates) -> ServerState:
        mean_delta = self.reduced(updates, "mean")
        extras = {**state.extras, **momentum_of(self, updates)}
        return ServerState(apply_step(state.params, mean_delta, self.server_lr), extras)


class ScaffoldM(SCAFFOLD):
    """SCAFFOLD-M (see the module docstring): SCAFFOLD's control variates plus FedCM's momentum."""

    name = "scaffold-m"
    server_state = broadcast = ("c.", "m.")

    def __init__(
        self,
        beta: Annotated[float, option("weight of the fresh corrected gradient (1: SCAFFOLD)", gt=0, le=1)] = 0.1,
        control: Annotated[Control, option("how c_k is refreshed")] = "gradient_mean",
        correction: Annotated[Correction, option("where the correction enters local training")] = "after_step",
        **kwargs,
    ):
        super().__init__(control=control, correction=correction, **kwargs)
        self.beta = check_beta(beta)
        self.client_algorithm = ScaffoldMomentumClient(self.beta, control, correction)

    def reductions(self) -> dict[str, Reduction]:
        return {**super().reductions(), "momentum": MOMENTUM}

    def aggregate(self, round_: int, state: ServerState, updates: ClientUpdates) -> ServerState:
        new = super().aggregate(round_, state, updates)
        new.extras.update(momentum_of(self, updates))
        return new
