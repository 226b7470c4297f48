"""FedAvg (McMahan et al., 2017)."""

from __future__ import annotations

from fedsim.core.protocol import ServerState
from fedsim.core.pytree import Tree

from .base import Strategy, apply_step


class FedAvg(Strategy):
    """Federated averaging with sample weights and partial participation.

    Each round a fraction of clients trains locally from ``w``; with ``p_k = n_k / sum_{j in S} n_j``:

        w <- sum_k p_k w_k = w - sum_k p_k Delta_k,    Delta_k = w - w_k.
    """

    name = "fedavg"

    def server_update(self, round_: int, state: ServerState, mean_delta: Tree) -> ServerState:
        return ServerState(apply_step(state.params, mean_delta), state.extras)
