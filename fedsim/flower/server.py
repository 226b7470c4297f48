"""Our strategies as Flower server strategies (``flwr.serverapp.strategy.Strategy``, flwr 1.41).

:class:`FlowerStrategy` turns any fedsim strategy into a Flower strategy. It subclasses Flower's ``FedAvg``
for what is the same (federated evaluation, ``summary``, ``start``) and replaces training:

- ``configure_train``: our strategy picks the clients (the same (seed, round) hash as in our engine; client
  ``k`` is the ``k``-th node of ``client_nodes``, by default the sorted node ids) and sends the global model,
  ``config`` with ``server-round`` and the local ``lr``, and the strategy's broadcast extras in the ArrayRecord
  ``fedsim.broadcast`` (see :mod:`fedsim.flower.records`);
- ``aggregate_train``: the replies become our ``ClientUpdates`` (checked: a reply without its records is an
  error naming the client) and our strategy's ``aggregate`` runs on them, server state included.

The server state lives in :attr:`FlowerStrategy.state` and travels as records with :meth:`state_record`.
:class:`SCAFFOLD`, :class:`FedNova`, :class:`FedDyn` and :class:`FedCM` are the strategies Flower does not
have, with their fedsim options as keywords; their clients are :class:`strategies.flower.FedsimClient`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

import strategies as ours
from fedsim.core.errors import FedsimError
from fedsim.core.protocol import ClientUpdates, ServerState

from .records import ARRAYS, from_record, to_record, train_content, updates_from_replies

DEFAULT_LR = 0.05
"""The clients' learning rate when neither ``FlowerStrategy(lr=...)`` nor the train config gives one."""


class FlowerStrategy(FedAvg):
    """A fedsim strategy (an instance, or a name for :func:`strategies.build_strategy` with ``options``)
    behind Flower's strategy interface; ``lr``: the clients' local learning rate (a number or a function of
    the round) sent in every train config; ``seed``: the run seed of client selection. An option the named
    strategy does not take is refused. A learning rate in the ``train_config`` that Flower's ``start`` passes
    wins when ``lr`` is not given, and is refused when it disagrees with ``lr`` (never replaced silently);
    with neither, the clients get :data:`DEFAULT_LR`."""

    required_extras: tuple[str, ...] = ()
    """Upload prefixes every reply must carry in ``fedsim.extras`` (SCAFFOLD: ``dc.``)."""

    def __init__(
        self,
        strategy: ours.Strategy | str = "fedavg",
        *,
        lr: float | Callable[[int], float] | None = None,
        seed: int = 0,
        client_nodes: Sequence[int] | None = None,
        fraction_evaluate: float = 0.0,
        min_available_nodes: int = 1,
        **options,
    ) -> None:
        if isinstance(strategy, str):
            strategy = ours.build_strategy(strategy, **options)
        elif options:
            raise FedsimError(f"options {sorted(options)} apply to a strategy given by name, not to an instance")
        super().__init__(
            fraction_train=strategy.fraction, fraction_evaluate=fraction_evaluate, min_train_nodes=1,
            min_evaluate_nodes=1, min_available_nodes=min_available_nodes, weighted_by_key="num-examples",
        )  # fmt: skip
        self.strategy, self.lr, self.seed = strategy, lr, seed
        self.client_nodes = list(client_nodes) if client_nodes is not None else None
        self.state: ServerState | None = None
        self.last_updates: ClientUpdates | None = None
        self._sent: tuple[dict[int, int], dict, float, int] | None = None

    def local_lr(self, server_round: int, config: ConfigRecord | None = None) -> float:
        """This round's local learning rate: ``lr`` or the train config's ``lr`` (they must agree when both
        are given), else :data:`DEFAULT_LR`."""
        ours = None if self.lr is None else float(self.lr(server_round) if callable(self.lr) else self.lr)
        theirs = None if config is None or "lr" not in config else float(config["lr"])
        if ours is not None and theirs is not None and ours != theirs:
            raise FedsimError(
                f"the train config's lr {theirs} disagrees with FlowerStrategy(lr={ours}) in round {server_round}; "
                "give the learning rate in one place"
            )
        return next((v for v in (ours, theirs) if v is not None), DEFAULT_LR)

    def nodes(self, grid: Grid) -> list[int]:
        """Node id of every client id (waits for ``min_available_nodes`` as Flower's strategies do)."""
        if self.client_nodes is not None:
            return self.client_nodes
        _, connected = sample_nodes(grid, self.min_available_nodes, 0)
        return sorted(connected)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        params = from_record(arrays)
        self.state = self.strategy.init(params) if self.state is None else ServerState(params, self.state.extras)
        nodes = self.nodes(grid)
        plan = self.strategy.configure(server_round, self.state, len(nodes), self.seed)
        lr = self.local_lr(server_round, config)
        config = ConfigRecord({**config, "server-round": server_round, "lr": lr})  # the caller's record untouched
        selected = [nodes[int(i)] for i in plan.client_ids]
        self._sent = ({nodes[int(i)]: int(i) for i in plan.client_ids}, params, lr, len(nodes))
        return self._construct_messages(train_content(arrays, config, plan.broadcast), selected, MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        client_of, params, lr, count = self._sent
        updates = updates_from_replies(
            replies, client_of, params, lr=lr, num_clients=count, required_extras=self.required_extras
        )
        self.state = self.strategy.aggregate(server_round, self.state, updates)
        self.last_updates = updates
        weights = updates.weights.double()
        metrics = MetricRecord({
            "train-loss": float((updates.train_loss.double() * weights).sum()),
            "num-examples": int(updates.num_samples.sum()),
        })  # fmt: skip
        return to_record(self.state.params), metrics

    def state_record(self) -> RecordDict:
        """The server state as records: ``arrays`` (the global model) and ``fedsim.server_state`` (extras)."""
        if self.state is None:
            return RecordDict()
        return RecordDict({ARRAYS: to_record(self.state.params), "fedsim.server_state": to_record(self.state.extras)})

    def summary(self) -> None:
        from flwr.common.logger import log

        log(INFO, "\t├──> fedsim strategy: %s", type(self.strategy).__name__)
        super().summary()


class SCAFFOLD(FlowerStrategy):
    """SCAFFOLD (:class:`strategies.SCAFFOLD`) for Flower: broadcasts ``c``, expects ``dc.*`` uploads."""

    required_extras = ("dc.",)

    def __init__(self, *, server_lr: float = 1.0, weighting: str = "samples", fraction_train: float = 1.0,
                 **kwargs) -> None:  # fmt: skip
        strategy = ours.SCAFFOLD(server_lr=server_lr, weighting=weighting, fraction=fraction_train)
        super().__init__(strategy, **kwargs)


class FedNova(FlowerStrategy):
    """FedNova (:class:`strategies.FedNova`) for Flower: normalizes by each reply's ``num-steps``."""

    def __init__(self, *, form: str = "simplified", mu: float = 0.0, local_momentum: float = 0.0,
                 fraction_train: float = 1.0, **kwargs) -> None:  # fmt: skip
        strategy = ours.FedNova(form=form, mu=mu, local_momentum=local_momentum, fraction=fraction_train)
        super().__init__(strategy, **kwargs)


class FedDyn(FlowerStrategy):
    """FedDyn (:class:`strategies.FedDyn`) for Flower (clients keep ``h_k`` in their ``context.state``)."""

    def __init__(self, *, alpha: float = 0.01, fraction_train: float = 1.0, **kwargs) -> None:
        super().__init__(ours.FedDyn(alpha=alpha, fraction=fraction_train), **kwargs)


class FedCM(FlowerStrategy):
    """FedCM / FedAvg-M (:class:`strategies.FedCM`) for Flower: broadcasts the momentum ``m``."""

    def __init__(self, *, beta: float = 0.1, server_lr: float = 1.0, fraction_train: float = 1.0,
                 **kwargs) -> None:  # fmt: skip
        super().__init__(ours.FedCM(beta=beta, server_lr=server_lr, fraction=fraction_train), **kwargs)
