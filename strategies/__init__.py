"""Server strategies and client algorithms. One class per strategy; the update rule is in its docstring.

``build_strategy(name, **options)`` builds one by name and ignores options the strategy does not take; the
config layer refuses a changed option that the chosen strategy does not use (e.g. ``mu`` with ``fedavg``).
Any federated strategy also takes a robust ``aggregator`` (:mod:`strategies.robust`, :mod:`strategies.gaf`),
a client ``regulator`` (:mod:`strategies.ecgr`, :mod:`strategies.bherd`) and a microbatch ``client_filter``
(GAF), composed around its own client algorithm (:mod:`strategies.client`).
"""

from __future__ import annotations

import inspect

from fedsim.core.errors import unknown
from fedsim.core.protocol import ClientAlgorithm, ClientUpdates, Plan, ServerState

from .base import Strategy, select_clients
from .bherd import BHerd
from .client import CLIENT_FILTERS, REGULATORS, ComposedClient, compose, make_client_filter, make_regulator
from .decentralized import DECENTRALIZED, DSGD, DSGDA, DSGDAATC, DSGDATC, DSGT, gossip, gossip_matrix
from .ecgr import ECGR, reaggregate
from .fedavg import FedAvg
from .fedavgm import FedAvgM
from .fedcm import FedCM, ScaffoldM
from .feddyn import FedDyn
from .fednova import FedNova
from .fedopt import FedAdagrad, FedAdam, FedOpt, FedYogi
from .fedprox import FedProx, ProximalClient
from .gaf import GAF, GAFClientFilter
from .robust import AGGREGATORS, Krum, Median, TrimmedMean, make_aggregator
from .scaffold import SCAFFOLD

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad, SCAFFOLD, ScaffoldM, FedNova, FedDyn, FedCM)
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
    return names - {"aggregator", "args"}


def build_strategy(name: str, *, aggregator=None, regulator=None, client_filter=None, **options) -> Strategy:
    """Build a strategy by registry name with the options it accepts, a robust ``aggregator`` in place of
    its weighted mean, and a ``regulator``/``client_filter`` composed around its client algorithm (objects
    from :func:`make_aggregator`, :func:`make_regulator`, :func:`make_client_filter`, or None)."""
    if name not in STRATEGIES:
        raise unknown("strategy", name, STRATEGIES)
    accepted = strategy_options(name)
    strategy = STRATEGIES[name](aggregator=aggregator, **{k: v for k, v in options.items() if k in accepted})
    strategy.client_algorithm = compose(strategy.client_algorithm, regulator, client_filter)
    return strategy


__all__ = [
    "AGGREGATORS",
    "BHerd",
    "CLIENT_FILTERS",
    "ComposedClient",
    "ECGR",
    "FedCM",
    "FedDyn",
    "FedNova",
    "GAF",
    "GAFClientFilter",
    "Krum",
    "Median",
    "REGULATORS",
    "SCAFFOLD",
    "ScaffoldM",
    "TrimmedMean",
    "compose",
    "make_aggregator",
    "make_client_filter",
    "make_regulator",
    "reaggregate",
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
