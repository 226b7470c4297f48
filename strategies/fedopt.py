"""Adaptive server optimizers (Reddi et al., "Adaptive Federated Optimization", ICLR 2021).

The pseudo-gradient is ``Delta_t = -sum_k p_k Delta_k`` (the averaged model change). With
``m_0 = 0`` and ``v_0 = tau^2``:

    m <- b1 m + (1 - b1) Delta_t
    v <- v + Delta_t^2                                     (FedAdagrad)
    v <- v - (1 - b2) Delta_t^2 sign(v - Delta_t^2)        (FedYogi)
    v <- b2 v + (1 - b2) Delta_t^2                         (FedAdam)
    w <- w + eta m / (sqrt(v) + tau)

No bias correction, as in the paper's Algorithm 2. Defaults follow Flower's implementations
(eta 0.1, b1 0.9, b2 0.99, tau 1e-9; FedYogi eta 0.01, tau 1e-3).
"""

from __future__ import annotations

import torch

from fedsim.core.protocol import ServerState
from fedsim.core.pytree import Tree

from .base import Strategy, check_positive


class FedOpt(Strategy):
    """Shared state handling of the adaptive server optimizers; subclasses define :meth:`second_moment`."""

    name = "fedopt"

    def __init__(self, server_lr: float = 0.1, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-9, **kwargs):
        super().__init__(**kwargs)
        check_positive(server_lr=server_lr, tau=tau)
        self.server_lr, self.beta1, self.beta2, self.tau = server_lr, beta1, beta2, tau

    def init(self, params: Tree) -> ServerState:
        state = super().init(params)
        for k, v in params.items():
            state.extras[f"m.{k}"] = torch.zeros_like(v)
            state.extras[f"v.{k}"] = torch.full_like(v, self.tau**2)
        return state

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def server_update(self, round_: int, state: ServerState, mean_delta: Tree) -> ServerState:
        params, extras = {}, {}
        for k, delta in mean_delta.items():
            pseudo_grad = -delta
            m = self.beta1 * state.extras[f"m.{k}"] + (1 - self.beta1) * pseudo_grad
            v = self.second_moment(state.extras[f"v.{k}"], pseudo_grad * pseudo_grad)
            params[k] = state.params[k] + self.server_lr * m / (v.sqrt() + self.tau)
            extras[f"m.{k}"], extras[f"v.{k}"] = m, v
        return ServerState(params, extras)


class FedAdagrad(FedOpt):
    """FedAdagrad: ``v <- v + Delta_t^2`` (see module docstring)."""

    name = "fedadagrad"

    def second_moment(self, v, d2):
        return v + d2


class FedYogi(FedOpt):
    """FedYogi: ``v <- v - (1 - b2) Delta_t^2 sign(v - Delta_t^2)`` (see module docstring)."""

    name = "fedyogi"

    def __init__(self, server_lr: float = 0.01, tau: float = 1e-3, **kwargs):
        super().__init__(server_lr=server_lr, tau=tau, **kwargs)

    def second_moment(self, v, d2):
        return v - (1 - self.beta2) * d2 * torch.sign(v - d2)


class FedAdam(FedOpt):
    """FedAdam: ``v <- b2 v + (1 - b2) Delta_t^2`` (see module docstring)."""

    name = "fedadam"

    def second_moment(self, v, d2):
        return self.beta2 * v + (1 - self.beta2) * d2
