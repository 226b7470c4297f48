"""Server strategies and client algorithms. One class per strategy; the update rule is in its docstring.

Every strategy, decentralized strategy, client regulator, client filter and aggregator is a component
(:mod:`fedsim.core.components`): registered here under its name, its options read from its constructor's
typed signature. ``build_strategy(name, **options)`` builds one and refuses an option it would not use.
Any federated strategy also takes a robust ``aggregator`` (:mod:`strategies.robust`, :mod:`strategies.gaf`),
a client ``regulator`` (:mod:`strategies.ecgr`, :mod:`strategies.bherd`) and a microbatch ``client_filter``
(GAF), composed around its own client algorithm (:mod:`strategies.client`).
"""

from __future__ import annotations

from fedsim.core import components
from fedsim.core.protocol import ClientAlgorithm, ClientUpdates, Plan, ServerState

from .asynchronous import FedAsync, FedBuff
from .base import Strategy, select_clients
from .bherd import BHerd
from .client import ComposedClient, compose, make_client_filter, make_regulator
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
from .robust import RFA, CenteredClipping, Krum, Median, SignVote, TrimmedMean, make_aggregator
from .scaffold import SCAFFOLD

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad, SCAFFOLD, ScaffoldM, FedNova, FedDyn, FedCM)
}
"""The synchronous (round-based) federated strategies."""
ASYNC_STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (FedAsync, FedBuff)}
"""The asynchronous strategies (:mod:`strategies.asynchronous`): they run on the virtual clock's event loop."""
for _name, _cls in {**STRATEGIES, **ASYNC_STRATEGIES}.items():
    components.register("strategy", _name, _cls)
for _name, _cls in DECENTRALIZED.items():
    components.register("decentralized", _name, _cls)
for _cls in (ECGR, BHerd):
    components.register("regulator", _cls.name, _cls)
components.register("client_filter", "gaf", GAFClientFilter)

for _cls in (Median, TrimmedMean, Krum, GAF, CenteredClipping, RFA, SignVote):
    components.register("aggregator", _cls.name, _cls)


def build_strategy(
    spec, *, aggregator=None, regulator=None, client_filter=None, fraction: float = 1.0, min_clients: int = 1,
    local_momentum: float = 0.0, simulation=None, **options,
) -> Strategy:  # fmt: skip
    """Build a federated strategy by name (registered, entry point or ``package.module:Name``) with its own
    ``options`` (an option it does not take is a :class:`~fedsim.core.errors.FedsimError`), a robust
    ``aggregator`` in place of its weighted mean, and a ``regulator``/``client_filter`` composed around its
    client algorithm. The last three are objects, names or ``{name: ..., option: ...}`` specs.
    ``simulation``: the engine, for strategies that drive it themselves (``flwr:NAME``)."""
    aggregator, regulator, client_filter = (
        make_aggregator(aggregator), make_regulator(regulator), make_client_filter(client_filter)
    )  # fmt: skip
    name, given = components.split_spec("strategy", spec)
    strategy = components.get("strategy", name).build(
        {**given, **options}, aggregator=aggregator, fraction=fraction, min_clients=min_clients,
        local_momentum=local_momentum, simulation=simulation,
    )  # fmt: skip
    strategy.client_algorithm = compose(strategy.client_algorithm, regulator, client_filter)
    return strategy


__all__ = [
    "BHerd",
    "ComposedClient",
    "ASYNC_STRATEGIES",
    "ECGR",
    "FedAsync",
    "FedBuff",
    "FedCM",
    "FedDyn",
    "FedNova",
    "GAF",
    "GAFClientFilter",
    "Krum",
    "Median",
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
]
