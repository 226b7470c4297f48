"""The executor benchmark's baseline: the same federated workload written the way a Flower user writes it
(flwr 1.41 Message API), run by Flower's simulation engine (``flwr.simulation.run_simulation``, Ray
backend, one ``ClientApp`` call per client, ``num_cpus`` per client).

Every client trains a plain ``torch.nn.Module`` with ``torch.optim.SGD`` for ``local-steps`` minibatches
drawn uniformly with replacement from its own samples (the partition of the fedsim run with the same
config, so the data are identical); the server runs Flower's ``FedAvg`` and evaluates the global model on
the test set every round. Needs the ``flower`` extra.
"""

from __future__ import annotations

import json
import time
from functools import cache
from typing import Any

import torch

from fedsim.config import make_config
from fedsim.core.errors import FedsimError
from fedsim.engine.evaluate import evaluate
from fedsim.simulation import make_simulation

FLOWER_EXTRA = "pip install 'fedsim[flower]'"


def _flwr():
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise FedsimError(f"the Flower baseline needs Flower, which is not installed: {FLOWER_EXTRA}") from None


@cache
def _simulation(config_json: str):
    """The fedsim simulation of a config (data, partition, model), built once per Flower worker process."""

    return make_simulation(make_config(json.loads(config_json)))


def _train(msg, context):
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    cfg = msg.content["config"]
    sim = _simulation(cfg["fedsim-config"])
    client = int(context.node_config["partition-id"])
    store = sim.store
    rows = store.order[store.offsets[client] : store.offsets[client + 1]]
    x, y = store.x[rows], store.y[rows]
    model = sim.model
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=float(cfg["lr"]))
    generator = torch.Generator().manual_seed(int(cfg["server-round"]) * 100003 + client)
    total = 0.0
    for _ in range(int(cfg["local-steps"])):
        batch = torch.randint(len(x), (int(cfg["batch-size"]),), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += loss.item()
    metrics = MetricRecord({"train_loss": total / int(cfg["local-steps"]), "num-examples": len(x)})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


def make_client_app():
    from flwr.clientapp import ClientApp

    app = ClientApp()
    app.train()(_train)
    return app


def run_flower(config: dict[str, Any], cpus_per_client: float = 1.0) -> dict[str, Any]:
    """Run ``config`` (a fedsim config mapping: digits-like data, ``local_steps``, ``batch_size``, ``lr``,
    ``rounds``, full participation) through Flower's simulation engine; returns the wall time (startup
    included) and the final test accuracy."""
    _flwr()
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    config_json = json.dumps(config, sort_keys=True)
    sim = _simulation(config_json)
    clients, rounds = sim.store.num_clients, int(config["rounds"])
    history: dict[int, float] = {}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        params = {k: v.to(sim.device) for k, v in arrays.to_torch_state_dict().items()}
        result = evaluate(sim.model, params, sim.x_test, sim.y_test)
        history[server_round] = result["accuracy"]
        return MetricRecord({"accuracy": result["accuracy"], "loss": result["loss"]})

    server = ServerApp()

    @server.main()
    def main(grid, context) -> None:
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=clients,
                          min_available_nodes=clients)  # fmt: skip
        train_config = ConfigRecord({
            "fedsim-config": config_json, "lr": float(config["lr"]), "local-steps": int(config["local_steps"]),
            "batch-size": int(config["batch_size"]),
        })  # fmt: skip
        strategy.start(grid=grid, initial_arrays=ArrayRecord(sim.model.state_dict()), num_rounds=rounds,
                       train_config=train_config, evaluate_fn=evaluate_fn)  # fmt: skip

    started = time.perf_counter()
    run_simulation(
        server_app=server, client_app=make_client_app(), num_supernodes=clients,
        backend_config={"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
                        "init_args": {"include_dashboard": False, "logging_level": "error"}},
    )  # fmt: skip
    wall = time.perf_counter() - started
    if len(history) < rounds + 1:
        raise FedsimError(f"the Flower simulation ended after {max(history, default=0)} of {rounds} rounds")
    return {"wall_s": wall, "final_test_accuracy": history[rounds]}
