"""``--backend flower``: the same experiment with every client run as a Flower ``ClientApp`` by Flower's
simulation engine (``flwr.simulation.run_simulation``, Ray backend; flwr 1.41).

The server side is our simulation loop (selection, aggregation, metrics, evaluation, results folder) running
inside Flower's ``ServerApp``; its executor, :class:`GridExecutor`, sends each selected client a train
message through Flower's ``Grid`` and turns the replies back into ``ClientUpdates``. Each node trains with
:class:`strategies.flower.FedsimClient` on its own partition (node ``partition-id`` = client id, learned by a
query round at the start), keeping its client state in ``context.state``. Batches depend only on (seed,
round, client), so the metrics equal the in-process engine's up to float rounding (the local model travels
instead of the delta). Client state lives on the nodes, so these runs write no checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
from functools import cache
from typing import Any

import numpy as np

from fedsim.config import make_config
from fedsim.core.errors import FedsimError
from fedsim.core.protocol import ClientUpdates, Plan
from fedsim.core.pytree import Tree
from fedsim.engine.store import shard_arrays
from fedsim.flower import FedsimClient
from fedsim.flower.records import require_flower, to_record, train_content, updates_from_replies
from fedsim.simulation import make_simulation


@cache
def _node_simulation(config_json: str):
    """The run's data, model and client settings, built once per Flower worker process."""

    config = {k: v for k, v in json.loads(config_json).items() if k != "backend"}
    return make_simulation(make_config(config))


@cache
def _node_client(config_json: str, client: int):

    sim = _node_simulation(config_json)
    local = sim.executor
    data = shard_arrays(sim.store, np.array([client]))
    return FedsimClient(
        sim.model, data["x"], data["y"], strategy=local.algorithm, optimizer=local.optimizer, sampler=local.sampler,
        local_steps=local.local_steps, local_epochs=local.local_epochs, batch_size=local.batch_size,
        seed=local.seed, client_id=client, grad_mode=local.trainer.grad_mode, loss_fn=local.loss_fn,
        device=sim.device,
    )  # fmt: skip


def make_client_app(config_json: str):
    """The ClientApp of a ``--backend flower`` run: ``train`` with :class:`FedsimClient`, ``query`` answers
    the node's partition id."""
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg, context):
        client = int(context.node_config["partition-id"])
        return _node_client(config_json, client).train(msg, context)

    app.query()(answer_partition_query)
    return app


def answer_partition_query(msg, context):
    """A node's answer to :func:`client_nodes`: its ``partition-id``."""
    from flwr.app import ConfigRecord, Message, RecordDict

    pid = int(context.node_config["partition-id"])
    return Message(content=RecordDict({"node": ConfigRecord({"partition-id": pid})}), reply_to=msg)


def client_nodes(grid, num_clients: int) -> list[int]:
    """Node id of every client id, from one query message to every node (replies carry ``partition-id``)."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict
    from flwr.serverapp.strategy.strategy_utils import sample_nodes

    _, connected = sample_nodes(grid, num_clients, 0)  # waits until every node is connected, as Flower does
    nodes = sorted(connected)
    messages = [Message(RecordDict({"q": ConfigRecord({})}), node, MessageType.QUERY) for node in nodes]
    mapping: dict[int, int] = {}
    for reply in grid.send_and_receive(messages):
        if reply.has_error():
            raise FedsimError(f"Flower node {reply.metadata.src_node_id} did not answer: {reply.error.reason}")
        mapping[int(reply.content["node"]["partition-id"])] = reply.metadata.src_node_id
    missing = sorted(set(range(num_clients)) - set(mapping))
    if missing:
        raise FedsimError(f"no Flower node serves client(s) {missing[:5]}")
    return [mapping[c] for c in range(num_clients)]


class GridExecutor:
    """Trains a plan's clients as Flower nodes through a Flower ``Grid`` (see the module docstring)."""

    checkpoints = False

    def __init__(self, grid, nodes: list[int], local) -> None:
        self.grid, self.nodes = grid, nodes
        self.sampler, self.chunk_size, self.device = local.sampler, 1, local.device
        self.batch_size = local.batch_size
        self.num_clients = len(nodes)
        self.client_state: Tree = {}
        self.sampler_state = None

    def train(self, plan: Plan, params: Tree, round_: int, lr: float, start=None, opt_state=None) -> ClientUpdates:
        from flwr.app import ConfigRecord, Message, MessageType

        config = ConfigRecord({"server-round": round_, "lr": lr})
        record = train_content(to_record(params), config, plan.broadcast)
        ids = [int(c) for c in plan.client_ids]
        messages = [Message(record, self.nodes[c], MessageType.TRAIN, group_id=str(round_)) for c in ids]
        replies = self.grid.send_and_receive(messages)
        return updates_from_replies(
            replies,
            {self.nodes[c]: c for c in ids},
            params,
            lr=lr,
            num_clients=self.num_clients,
            batch_size=self.batch_size,
        )

    def close(self) -> None:
        pass


def run_with_flower(sim, results, on_round, *, cpus_per_client: float = 1.0) -> dict[str, Any]:
    """Run ``sim`` (a federated :class:`~fedsim.simulation.Simulation`) with its clients on Flower's
    simulation engine; returns the summary. Errors inside the ServerApp are raised here."""
    require_flower()
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    config_json = json.dumps(_plain(sim.config), sort_keys=True)
    outcome: dict[str, Any] = {}
    server = ServerApp()

    @server.main()
    def main(grid, context) -> None:
        try:
            sim.executor = GridExecutor(grid, client_nodes(grid, sim.store.num_clients), sim.executor)
            outcome["summary"] = sim.run(results, on_round=on_round)
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = err

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        run_simulation(
            server_app=server, client_app=make_client_app(config_json), num_supernodes=sim.store.num_clients,
            backend_config={
                "client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
                "init_args": {"include_dashboard": False, "logging_level": "error", "log_to_driver": False},
            },
        )  # fmt: skip
    finally:
        logger.setLevel(level)
    if "error" in outcome:
        raise outcome["error"]
    if "summary" not in outcome:
        raise FedsimError("the Flower simulation ended without running the experiment's ServerApp")
    return outcome["summary"]


def _plain(config) -> dict[str, Any]:
    """The config as JSON-able data (what every Flower worker rebuilds the run from)."""
    return json.loads(config.model_dump_json(exclude_unset=True))
