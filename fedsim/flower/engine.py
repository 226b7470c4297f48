"""Flower's own strategies inside our vectorized engine (``--strategy flwr:FedAdam``).

:class:`EngineGrid` behaves like Flower's ``Grid``: its nodes are a fedsim simulation's clients (node id =
client id + 1000), and ``send_and_receive`` answers train messages by training every addressed client at once
with the simulation's executor (replies: the local model, ``num-examples``, ``num-steps``, ``train-loss``)
and evaluate messages with the received model's loss and accuracy on each client's local test split. So a
Flower strategy runs unchanged, ``strategy.start(grid=EngineGrid(sim), ...)``.

:class:`FlowerHosted` is the fedsim strategy that drives a Flower strategy round by round inside our
simulation loop (metrics, evaluation, checkpoints): ``configure`` asks the Flower strategy's
``configure_train`` which nodes train (Flower samples with Python's ``random``, seeded here from (seed,
round) so runs repeat), the engine trains them, and ``aggregate`` hands the replies to its ``aggregate_train``.
The clients run plain local training with the run's local optimizer; Flower's train config is not read.
"""

from __future__ import annotations

import inspect
import random
import typing
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedsim.core import components, rng
from fedsim.core.errors import FedsimError, unknown
from fedsim.core.protocol import ClientUpdates, Plan, ServerState
from fedsim.engine.evaluate import evaluate
from strategies.base import Strategy

from .records import ARRAYS, NUM_EXAMPLES, from_record, read_train, to_record, train_replies


def flower_strategies() -> dict[str, type]:
    """Flower's server strategies for model arrays by class name (``flwr.serverapp.strategy``), without the
    wrappers that need another strategy (differential privacy) and the XGBoost ones."""
    import flwr.serverapp.strategy as module
    from flwr.serverapp.strategy import Strategy as FlowerBase

    def standalone(cls) -> bool:
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        return all(p.default is not p.empty or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params)

    return {
        name: cls for name, cls in vars(module).items()
        if inspect.isclass(cls) and issubclass(cls, FlowerBase) and not inspect.isabstract(cls)
        and standalone(cls) and not name.startswith("FedXgb")
    }  # fmt: skip


NODE_ID_OFFSET = 1000
"""Node id of client ``k`` in an :class:`EngineGrid`: ``1000 + k`` (Flower reserves small ids for the server)."""


def _adopt_server_identity() -> None:
    """Flower messages take their run and node ids from the process's task identity, which Flower's
    ServerApp sets; in our engine, outside any Flower run, act as the server of run 0."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    if TaskIdentity._run_id is None:  # noqa: SLF001 - the public getter raises when unset
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 0, SUPERLINK_NODE_ID


class EngineGrid(Grid):
    """A Flower ``Grid`` over a fedsim :class:`~fedsim.simulation.Simulation`'s clients (see the module
    docstring). ``available``: the client ids Flower may sample this round (None: all)."""

    def __init__(self, simulation) -> None:
        _adopt_server_identity()
        self.simulation = simulation
        self.available: np.ndarray | None = None
        self._run = None
        self._pending: dict[str, Message] = {}

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:  # fmt: skip
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        clients = self.available if self.available is not None else range(self.simulation.store.num_clients)
        return [int(c) + NODE_ID_OFFSET for c in clients]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            key = f"fedsim-{len(self._pending)}-{msg.metadata.dst_node_id}"
            self._pending[key] = msg
            ids.append(key)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        messages = [self._pending.pop(i) for i in message_ids if i in self._pending]
        return self.send_and_receive(messages)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Answer every message at once: train messages (grouped by identical content) with one vectorized
        training of their clients, evaluate messages with local-test-split metrics."""
        messages = list(messages)
        replies = []
        groups: dict[int, list[Message]] = {}
        for msg in messages:
            kind = msg.metadata.message_type
            if kind.startswith(MessageType.TRAIN):
                groups.setdefault(id(msg.content), []).append(msg)
            elif kind.startswith(MessageType.EVALUATE):
                replies.append(self._evaluate(msg))
            else:
                raise FedsimError(f"EngineGrid answers train and evaluate messages, not '{kind}'")
        for group in groups.values():
            replies.extend(self._train(group))
        return replies

    def _train(self, messages: list[Message]) -> list[Message]:
        sim = self.simulation
        params, broadcast, config = read_train(messages[0].content, sim.device)
        round_ = int(config.get("server-round", 1))
        lr = float(config["lr"]) if "lr" in config else sim.lr(round_)
        by_client = {m.metadata.dst_node_id - NODE_ID_OFFSET: m for m in messages}
        ids = np.array(sorted(by_client), dtype=np.int64)
        updates = sim.executor.train(Plan(ids, broadcast), params, round_, lr)
        return train_replies(by_client, params, updates)

    def _evaluate(self, msg: Message) -> Message:
        sim, client = self.simulation, msg.metadata.dst_node_id - NODE_ID_OFFSET
        params = from_record(msg.content[ARRAYS], sim.device)
        store = sim.store
        rows = store.test_order[store.test_offsets[client] : store.test_offsets[client + 1]]
        result = {"loss": 0.0, "accuracy": 0.0}
        if len(rows):
            result = evaluate(sim.model, params, store.x[rows], store.y[rows])
        metrics = MetricRecord({NUM_EXAMPLES: len(rows), "loss": result["loss"], "accuracy": result["accuracy"]})
        return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


ENGINE_DEFAULTS = {"fraction_evaluate": 0.0, "min_train_nodes": 1, "min_evaluate_nodes": 0, "min_available_nodes": 1}
"""Our defaults for Flower's strategies on our engine (evaluation is ours; any node count is enough)."""


def make_flower_strategy(name: str, fraction: float = 1.0, **options: Any):
    """Flower's strategy ``name`` (``FedAdam``, ``FedTrimmedAvg``, ``Krum``, ...) set up for our engine:
    ``fraction_train=fraction``, no federated evaluation, at least one node; ``options`` go to its
    constructor (they win over those defaults)."""
    available = flower_strategies()
    if name not in available:
        raise unknown("Flower strategy", name, sorted(available))
    cls = available[name]
    accepted = set(inspect.signature(cls.__init__).parameters)
    defaults = {"fraction_train": fraction, **ENGINE_DEFAULTS}
    unknown_options = sorted(set(options) - accepted)
    if unknown_options:
        raise FedsimError(f"Flower strategy {name} takes no option {', '.join(unknown_options)}")
    try:
        return cls(**{**{k: v for k, v in defaults.items() if k in accepted}, **options})
    except (TypeError, ValueError) as err:
        raise FedsimError(f"Flower strategy {name}: {err}") from None


class FlowerHosted(Strategy):
    """A Flower strategy as a fedsim strategy (see the module docstring): selection by its
    ``configure_train``, aggregation by its ``aggregate_train``, plain local training in between."""

    name = "flwr"

    def __init__(self, flower_strategy, grid: EngineGrid) -> None:
        super().__init__(fraction=float(getattr(flower_strategy, "fraction_train", 1.0) or 1.0))
        self.flower, self.grid = flower_strategy, grid
        self._messages: dict[int, Message] = {}

    def configure(self, round_: int, state: ServerState, num_clients: int, seed: int,
                  available: np.ndarray | None = None) -> Plan:  # fmt: skip
        self.grid.available = available
        saved = random.getstate()
        random.seed(int(rng.hash_keys(seed, rng.STREAM_SELECTION, round_, np.array([0]))[0]))
        try:
            messages = list(self.flower.configure_train(round_, to_record(state.params), ConfigRecord(), self.grid))
        finally:
            random.setstate(saved)
        self._messages = {m.metadata.dst_node_id - NODE_ID_OFFSET: m for m in messages}
        return Plan(np.array(sorted(self._messages), dtype=np.int64))

    def aggregate(self, round_: int, state: ServerState, updates: ClientUpdates) -> ServerState:
        arrays, _ = self.flower.aggregate_train(round_, train_replies(self._messages, state.params, updates))
        if arrays is None:  # the Flower strategy skipped aggregation
            return state
        device = next(iter(state.params.values())).device
        new = from_record(arrays, device)
        return ServerState({k: new[k].to(state.params[k].dtype) for k in state.params}, state.extras)


def flower_component(name: str) -> components.Component:
    """The component ``flwr:NAME`` of kind ``strategy``: options are the Flower class's constructor keywords
    (validated against its signature); building it needs the simulation it drives."""
    available = flower_strategies()
    if name not in available:
        raise unknown("Flower strategy", name, sorted(available))

    def build(*, simulation=None, fraction: float = 1.0, **options: Any) -> FlowerHosted:
        if simulation is None:
            raise FedsimError(f"strategy 'flwr:{name}' drives a fedsim simulation; use it from fedsim simulate")
        return hosted_strategy(name, simulation, fraction, **options)

    cls = available[name]
    summary = f"Flower's {name} ({cls.__module__}) on our engine."
    return components.Component(
        components.kind_of("strategy"), f"flwr:{name}", build, summary, origin="flwr", declared=_declared(cls)
    )


_SET_BY_ENGINE = ("fraction_train", "train_metrics_aggr_fn", "evaluate_metrics_aggr_fn")
"""Flower constructor keywords that are not options here: the run's ``fraction``, and callables."""


def _declared(cls: type) -> Any:
    """The options of Flower strategy ``cls``: its constructor keywords with our engine's defaults (no
    federated evaluation, one node enough), without those the engine sets."""
    hints = typing.get_type_hints(cls.__init__)
    params = [
        p.replace(default=ENGINE_DEFAULTS.get(p.name, p.default))
        for p in list(inspect.signature(cls.__init__).parameters.values())[1:]
        if p.name not in _SET_BY_ENGINE and p.kind is not p.VAR_KEYWORD
    ]

    def options(**values: Any) -> None:
        """Flower strategy options."""

    options.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    options.__annotations__ = {p.name: hints[p.name] for p in params if p.name in hints}
    return options


def hosted_strategy(name: str, simulation, fraction: float = 1.0, **options: Any) -> FlowerHosted:
    """``--strategy flwr:NAME``: Flower's strategy ``name`` driving ``simulation``'s engine."""
    return FlowerHosted(make_flower_strategy(name, fraction, **options), EngineGrid(simulation))
