"""Server strategies and client algorithms. One class per strategy; the update rule is in its docstring.

``build_strategy(name, **options)`` builds one by name and ignores options the strategy does not take; the
config layer refuses a changed option that the chosen strategy does not use (e.g. ``mu`` with ``fedavg``).
"""

from __future__ import annotations

import inspect

from fedsim.engine.protocol import ClientAlgorithm, ClientUpdates, Plan, ServerState
from fedsim.errors import unknown

from .base import Strategy, select_clients
from .decentralized import DECENTRALIZED, DSGD, DSGDA, DSGDAATC, DSGDATC, DSGT, gossip, gossip_matrix
from .fedavg import FedAvg
from .fedavgm import FedAvgM
from .fedopt import FedAdagrad, FedAdam, FedOpt, FedYogi
from .fedprox import FedProx, ProximalClient

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad)
}


def strategy_options(name: str) -> set[str]:
    """Keyword options a strategy's constructor accepts (including the base ones)."""
    if name in DECENTRALIZED:
        return set()
    cls = STRATEGIES[name]
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            names |= {p for p in inspect.signature(klass.__init__).parameters if p not in ("self", "kwargs")}
    return names


def build_strategy(name: str, **options) -> Strategy:
    """Build a strategy by registry name with the options it accepts."""
    if name not in STRATEGIES:
        raise unknown("strategy", name, STRATEGIES)
    accepted = strategy_options(name)
    return STRATEGIES[name](**{k: v for k, v in options.items() if k in accepted})


__all__ = [
    "ClientAlgorithm",
    "ClientUpdates",
    "DECENTRALIZED",
    "DSGD",
    "DSGDA",
    "DSGDAATC",
    "DSGDATC",
    "DSGT",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedOpt",
    "FedProx",
    "FedYogi",
    "Plan",
    "ProximalClient",
    "STRATEGIES",
    "ServerState",
    "Strategy",
    "build_strategy",
    "gossip",
    "gossip_matrix",
    "select_clients",
    "strategy_options",
]
