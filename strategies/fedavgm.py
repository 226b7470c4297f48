"""FedAvgM (Hsu, Qi & Brown, 2019): FedAvg with server momentum."""

from __future__ import annotations

from typing import Annotated

from fedsim.core.components import option
from fedsim.core.protocol import ServerState
from fedsim.core.pytree import Tree, tree_map

from .base import Strategy, apply_step, check_positive


class FedAvgM(Strategy):
    """FedAvgM: server momentum on the averaged update ``Delta = sum_k p_k Delta_k``.

        v <- beta v + Delta,    w <- w - eta_s v     (v_0 = 0; beta = 0.9, eta_s = 1 by default).

    ``beta = 0`` and ``eta_s = 1`` is FedAvg.
    """

    name = "fedavgm"
    server_state = ("momentum.",)

    def __init__(
        self,
        server_lr: Annotated[float, option("server learning rate (1: plain momentum step)", gt=0)] = 1.0,
        server_momentum: Annotated[float, option("server momentum coefficient", ge=0, lt=1)] = 0.9,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_positive(server_lr=server_lr)
        self.server_lr, self.server_momentum = server_lr, server_momentum

    def server_update(self, round_: int, state: ServerState, mean_delta: Tree) -> ServerState:
        momentum = {k: state.extras[f"momentum.{k}"] for k in mean_delta}
        momentum = tree_map(lambda v, d: self.server_momentum * v + d, momentum, mean_delta)
        extras = {f"momentum.{k}": v for k, v in momentum.items()}
        return ServerState(apply_step(state.params, momentum, self.server_lr), extras)
