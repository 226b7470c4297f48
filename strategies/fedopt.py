"""Adaptive server optimizers FedAdagrad, FedYogi, FedAdam (Reddi et al., "Adaptive Federated Optimization",
ICLR 2021), each in two variants of the update rule.

The pseudo-gradient of round t is ``Delta_t = -sum_k p_k Delta_k = sum_k p_k w_k - w_{t-1}`` (the weighted
mean of the client models minus the global model; ``Delta_k = w_{t-1} - w_k``, ``p_k = n_k / sum_j n_j``).

``variant="reddi"`` (the default): the paper's Algorithm 2, with ``m_0 = 0``, ``v_0 = tau^2`` and no bias
correction::

    m_t = b1 m_{t-1} + (1 - b1) Delta_t
    v_t = v_{t-1} + Delta_t^2                                         (FedAdagrad)
    v_t = v_{t-1} - (1 - b2) Delta_t^2 sign(v_{t-1} - Delta_t^2)      (FedYogi)
    v_t = b2 v_{t-1} + (1 - b2) Delta_t^2                             (FedAdam)
    w_t = w_{t-1} + eta m_t / (sqrt(v_t) + tau)

``variant="flower"``: Flower 1.41's rule (``flwr/serverapp/strategy/fedopt.py``, ``fedadagrad.py``,
``fedyogi.py``, ``fedadam.py``; the legacy ``flwr/server/strategy/`` classes apply the same rule), where
``m_0 = 0`` and ``v_0 = 0`` (Flower creates both as zeros at the first aggregation)::

    FedAdagrad:  m_t = Delta_t                      (Flower fixes beta_1 = 0: no server momentum; beta1 unused)
                 v_t = v_{t-1} + Delta_t^2
                 w_t = w_{t-1} + eta m_t / (sqrt(v_t) + tau)
    FedYogi:     m_t = b1 m_{t-1} + (1 - b1) Delta_t
                 v_t = v_{t-1} - (1 - b2) Delta_t^2 sign(v_{t-1} - Delta_t^2)
                 w_t = w_{t-1} + eta m_t / (sqrt(v_t) + tau)
    FedAdam:     m_t = b1 m_{t-1} + (1 - b1) Delta_t
                 v_t = b2 v_{t-1} + (1 - b2) Delta_t^2
                 eta_t = eta sqrt(1 - b2^(t+1)) / (1 - b1^(t+1))
                 w_t = w_{t-1} + eta_t m_t / (sqrt(v_t) + tau)

FedAdam's bias correction is folded into the step size (Kingma & Ba's ``alpha_t`` form: ``tau`` is not
rescaled) with Flower's exponent ``server_round + 1``: ``t`` is the round number handed to :meth:`aggregate`
(1 in the first round, as Flower's ``server_round``), so the first round already uses ``b^2``.

Defaults. Ours are eta 0.1, b1 0.9, b2 0.99, tau 1e-9 (FedYogi: eta 0.01, tau 1e-3). These are the defaults
of Flower's *legacy* strategies (``flwr.server.strategy``: FedAdam eta 1e-1, beta_1 0.9, beta_2 0.99,
tau 1e-9; FedAdagrad eta 1e-1, tau 1e-9; FedYogi eta 1e-2, beta_1 0.9, beta_2 0.99, tau 1e-3), except that
Flower's FedAdagrad has no beta_1/beta_2 at all (fixed to 0), so our FedAdagrad's b1 = 0.9 (used by the
``reddi`` variant only) is not Flower's. Flower's *Message-API* strategies (``flwr.serverapp.strategy``)
default tau to 1e-3 for all three (eta: FedAdam 1e-1, FedAdagrad 1e-1, FedYogi 1e-2; beta_1 0.9, beta_2 0.99
for FedAdam and FedYogi). Flower's client-side ``eta_l`` (1e-1; FedYogi 0.0316) is only logged by Flower;
here the clients use the run's ``lr``. Neither Flower API uses the paper's ``v_0 = tau^2`` nor omits
FedAdam's bias correction: the default update rule is the paper's, not Flower's. ``variant`` changes no
default; ``variant="flower", tau=1e-3`` reproduces ``flwr.serverapp.strategy`` with its defaults.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch

from fedsim.core.components import option
from fedsim.core.errors import FedsimError
from fedsim.core.protocol import ServerState
from fedsim.core.pytree import Tree

from .base import Strategy, check_positive

VARIANTS = ("reddi", "flower")
ServerLR = Annotated[float, option("server learning rate eta", gt=0)]
Tau = Annotated[float, option("adaptivity tau (also v_0 = tau^2 in the reddi variant)", gt=0)]
Beta2 = Annotated[float, option("second-moment coefficient", ge=0, lt=1)]
Variant = Literal["reddi", "flower"]


class FedOpt(Strategy):
    """Shared state handling of the adaptive server optimizers; subclasses define :meth:`second_moment`.

    ``variant``: ``"reddi"`` (Reddi et al. 2021, Algorithm 2: ``v_0 = tau^2``, no bias correction) or
    ``"flower"`` (flwr 1.41 ``flwr/serverapp/strategy/fed{adagrad,yogi,adam}.py``: ``v_0 = 0``, FedAdam's
    bias-corrected step, no momentum in FedAdagrad); the equations are in the module docstring.
    """

    name = "fedopt"
    flower_beta1: float | None = None
    """The server momentum Flower's class fixes (FedAdagrad: 0), used instead of ``beta1`` by the flower variant."""

    def __init__(
        self,
        server_lr: ServerLR = 0.1,
        beta1: Annotated[float, option("first-moment (server momentum) coefficient", ge=0, lt=1)] = 0.9,
        tau: Tau = 1e-9,
        variant: Annotated[
            Variant, option("update rule: reddi (the paper's Algorithm 2) or flower (flwr 1.41's strategies)")
        ] = "reddi",
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_positive(server_lr=server_lr, tau=tau)
        if variant not in VARIANTS:
            raise FedsimError(f"variant must be one of {', '.join(map(repr, VARIANTS))}, got {variant!r}")
        if variant == "flower" and self.flower_beta1 is not None and beta1 != 0.9:
            raise FedsimError(
                f"{self.name}'s flower variant fixes beta_1 = {self.flower_beta1} (as Flower does); beta1 is unused"
            )
        self.server_lr, self.beta1, self.tau = server_lr, beta1, tau
        self.variant = variant

    def init(self, params: Tree) -> ServerState:
        state = super().init(params)
        v0 = self.tau**2 if self.variant == "reddi" else 0.0
        for k, v in params.items():
            state.extras[f"m.{k}"] = torch.zeros_like(v)
            state.extras[f"v.{k}"] = torch.full_like(v, v0)
        return state

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def momentum(self) -> float:
        """The first-moment coefficient: ``beta1``, or Flower's fixed one with the flower variant."""
        if self.variant == "flower" and self.flower_beta1 is not None:
            return self.flower_beta1
        return self.beta1

    def step_size(self, round_: int) -> float:
        """The server learning rate of round ``round_`` (``eta``; FedAdam's flower variant corrects it)."""
        return self.server_lr

    def server_update(self, round_: int, state: ServerState, mean_delta: Tree) -> ServerState:
        params, extras = {}, {}
        beta1, lr = self.momentum(), self.step_size(round_)
        for k, delta in mean_delta.items():
            pseudo_grad = -delta
            m = beta1 * state.extras[f"m.{k}"] + (1 - beta1) * pseudo_grad
            v = self.second_moment(state.extras[f"v.{k}"], pseudo_grad * pseudo_grad)
            params[k] = state.params[k] + lr * m / (v.sqrt() + self.tau)
            extras[f"m.{k}"], extras[f"v.{k}"] = m, v
        return ServerState(params, extras)


class FedAdagrad(FedOpt):
    """FedAdagrad: ``v <- v + Delta_t^2``; ``m <- b1 m + (1 - b1) Delta_t`` (reddi) or ``m = Delta_t``
    (flower, whose FedAdagrad fixes beta_1 = 0; ``beta1`` and ``beta2`` are then unused). See the module
    docstring."""

    name = "fedadagrad"
    flower_beta1 = 0.0

    def second_moment(self, v, d2):
        return v + d2


class FedYogi(FedOpt):
    """FedYogi: ``v <- v - (1 - b2) Delta_t^2 sign(v - Delta_t^2)``, the same in both variants apart from
    ``v_0`` (``tau^2`` reddi, 0 flower). See the module docstring."""

    name = "fedyogi"

    def __init__(self, server_lr: ServerLR = 0.01, tau: Tau = 1e-3, beta2: Beta2 = 0.99, **kwargs):
        super().__init__(server_lr=server_lr, tau=tau, **kwargs)
        self.beta2 = beta2

    def second_moment(self, v, d2):
        return v - (1 - self.beta2) * d2 * torch.sign(v - d2)


class FedAdam(FedOpt):
    """FedAdam: ``v <- b2 v + (1 - b2) Delta_t^2``; the flower variant steps with
    ``eta_t = eta sqrt(1 - b2^(t+1)) / (1 - b1^(t+1))`` (``t``: the round number) and starts from
    ``v_0 = 0``. See the module docstring."""

    name = "fedadam"

    def __init__(self, beta2: Beta2 = 0.99, **kwargs):
        super().__init__(**kwargs)
        self.beta2 = beta2

    def second_moment(self, v, d2):
        return self.beta2 * v + (1 - self.beta2) * d2

    def step_size(self, round_: int) -> float:
        if self.variant == "reddi":
            return self.server_lr
        t = float(round_) + 1.0  # flwr: np.power(beta, server_round + 1.0)
        return self.server_lr * math.sqrt(1 - self.beta2**t) / (1 - self.beta1**t)
