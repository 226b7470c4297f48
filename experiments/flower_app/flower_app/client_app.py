"""ClientApp: fedsim's SCAFFOLD client (control variate kept in ``context.state``) with ECGR re-aggregating
the recorded local trajectory, on this node's partition."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from strategies import make_regulator
from strategies.flower import FedsimClient

from .task import load_partition, make_model, settings

app = ClientApp()
_clients: dict[int, FedsimClient] = {}


@app.train()
def train(msg: Message, context: Context) -> Message:
    node = int(context.node_config["partition-id"])
    if node not in _clients:
        cfg = settings(context.run_config)
        x, y = load_partition(node, int(context.node_config["num-partitions"]), cfg["seed"], cfg["dirichlet-alpha"])
        ecgr = make_regulator("ecgr", rho=cfg["ecgr-rho"], beta=cfg["ecgr-beta"])
        _clients[node] = FedsimClient(
            make_model(cfg["seed"]), x, y, strategy="scaffold", regulator=ecgr, local_steps=cfg["local-steps"],
            batch_size=cfg["batch-size"], seed=cfg["seed"],
        )  # fmt: skip
    return _clients[node].train(msg, context)
