"""Our local training inside a Flower ``ClientApp``: client algorithms (SCAFFOLD's correction, FedDyn,
FedProx, ...), regulators (ECGR, BHerd on the recorded trajectory) and our local optimizers (FOAM, GWT,
MoLS-style, SGD-SaI, ...) with the engine's own code.

:class:`FedsimClient` trains one node's data with :class:`~fedsim.engine.executor.LocalExecutor` (a chunk
of one client), so its numbers are the engine's: batches depend only on (seed, round, client id), and the
persistent client state (SCAFFOLD's ``c_k``, FedDyn's ``h_k``; under ``fedsim.client_state.<algorithm>``)
and a Markov sampler's state live in the node's ``context.state`` between rounds. Records as in
:mod:`fedsim.flower.records`::

    client = FedsimClient(model, x, y, strategy="scaffold", regulator=make_regulator("ecgr"), local_steps=10)
    app = ClientApp()

    @app.train()
    def train(msg, context):
        return client.train(msg, context)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message
from torch import nn

import strategies as ours
from fedsim.core.errors import FedsimError
from fedsim.core.protocol import ClientAlgorithm, Plan
from fedsim.data.samplers import Sampler, make_sampler
from fedsim.engine.executor import LocalExecutor
from fedsim.engine.store import ClientStore
from fedsim.engine.trainer import LossFn, cross_entropy
from fedsim.optim import make_optimizer

from .records import CLIENT_STATE, SAMPLER_STATE, from_record, read_train, to_record, train_replies


class FedsimClient:
    """One Flower node's local training with fedsim's engine.

    ``x``/``y``: the node's training samples. ``strategy``: a fedsim strategy name or object whose client
    algorithm runs here (``"scaffold"``, ``"feddyn"``, ...) or a :class:`ClientAlgorithm`; ``regulator``/
    ``client_filter``: objects from :func:`strategies.make_regulator` / :func:`strategies.make_client_filter`
    composed around it. ``optimizer``: a name of :func:`fedsim.optim.make_optimizer` (with
    ``optimizer_options``) or a functional optimizer. ``client_id``: the id that seeds the batches (default:
    the node's ``partition-id``). The learning rate and round come from the message's config (``lr``,
    ``server-round``). ``strategy_options`` are the named strategy's own options; any option that would not
    be used (an unknown one, one of another component, or options with an already built strategy) raises
    :class:`FedsimError`.
    """

    def __init__(
        self,
        model: nn.Module,
        x: np.ndarray | torch.Tensor,
        y: np.ndarray | torch.Tensor,
        *,
        strategy: str | ours.Strategy | ClientAlgorithm = "fedavg",
        regulator=None,
        client_filter=None,
        optimizer: str | Any = "sgd",
        optimizer_options: dict[str, Any] | None = None,
        sampler: str | Sampler = "shuffle",
        local_steps: int | None = 10,
        local_epochs: int | None = None,
        batch_size: int = 32,
        seed: int = 0,
        client_id: int | None = None,
        grad_mode: str = "sum",
        loss_fn: LossFn = cross_entropy,
        device: torch.device | str = "cpu",
        **strategy_options: Any,
    ) -> None:
        if not isinstance(strategy, str | dict) and strategy_options:
            raise FedsimError(
                f"FedsimClient: options {', '.join(sorted(strategy_options))} apply to a strategy given by name, "
                f"not to an already built {type(strategy).__name__}"
            )
        if isinstance(optimizer, str | dict):
            optimizer = make_optimizer(optimizer, **(optimizer_options or {}))
        elif optimizer_options:
            raise FedsimError("FedsimClient: optimizer_options apply to an optimizer given by name")
        if isinstance(sampler, str | dict):
            sampler = make_sampler(sampler)
        if isinstance(strategy, str | dict):
            strategy = ours.build_strategy(strategy, regulator=regulator, client_filter=client_filter,
                                           **strategy_options)  # fmt: skip
            algorithm = strategy.client_algorithm
        elif isinstance(strategy, ours.Strategy):
            algorithm = ours.compose(
                strategy.client_algorithm, ours.make_regulator(regulator), ours.make_client_filter(client_filter)
            )
        else:
            algorithm = ours.compose(strategy, ours.make_regulator(regulator), ours.make_client_filter(client_filter))
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.x, self.y = torch.as_tensor(x), torch.as_tensor(y).long()
        if len(self.x) == 0:
            raise FedsimError("FedsimClient: the node has no training samples")
        self.algorithm = algorithm
        self.optimizer, self.sampler = optimizer, sampler
        self.settings = dict(seed=seed, local_steps=None if local_epochs else local_steps, local_epochs=local_epochs,
                             batch_size=batch_size, grad_mode=grad_mode, loss_fn=loss_fn)  # fmt: skip
        self.client_id = client_id
        self._stores: dict[int, ClientStore] = {}

    @property
    def state_key(self) -> str:
        """Where the node keeps this client algorithm's state: ``fedsim.client_state.<algorithm name>`` (a node
        that serves several algorithms keeps each one's state apart)."""
        return f"{CLIENT_STATE}.{self.algorithm.name}"

    def _store(self, client: int) -> ClientStore:
        """This node's samples as client ``client`` of a store (other ids empty), on the device."""
        if client not in self._stores:
            offsets = np.concatenate([np.zeros(client + 1, dtype=np.int64), [len(self.x)]])
            data = {"x": self.x.numpy() if self.x.device.type == "cpu" else self.x.cpu().numpy(),
                    "y": self.y.cpu().numpy(), "offsets": offsets}  # fmt: skip
            self._stores[client] = ClientStore.from_shard(data, self.device)
        return self._stores[client]

    def train(self, msg: Message, context: Context) -> Message:
        """Train on the message's global model; reply with the local model, metrics and upload extras."""
        client = self.client_id if self.client_id is not None else int(context.node_config["partition-id"])
        params, broadcast, config = read_train(msg.content, self.device)
        params = {n: params[n] for n, _ in self.model.named_parameters()}
        executor = LocalExecutor(self.model, self._store(client), self.sampler, self.optimizer, self.algorithm,
                                 clients=np.array([client]), **self.settings)  # fmt: skip
        self._load_state(executor, context, params)
        updates = executor.train(Plan(np.array([client]), broadcast), params, int(config["server-round"]),
                                 float(config["lr"]))  # fmt: skip
        self._save_state(executor, context)
        return train_replies({client: msg}, params, updates)[0]

    def _load_state(self, executor: LocalExecutor, context: Context, params) -> None:
        """Client state and sampler state from the node's ``context.state`` (fresh on the first round)."""
        state, key = context.state, self.state_key
        if key in state.array_records:
            executor.client_state = {k: v.unsqueeze(0) for k, v in from_record(state[key]).items()}
        else:
            executor.init_client_state(params)
        if SAMPLER_STATE in state.array_records:
            executor.sampler_state = {k: v.numpy() for k, v in from_record(state[SAMPLER_STATE]).items()}

    def _save_state(self, executor: LocalExecutor, context: Context) -> None:
        if executor.client_state:
            context.state[self.state_key] = to_record({k: v[0] for k, v in executor.client_state.items()})
        if executor.sampler_state:
            sampler = {k: torch.as_tensor(v) for k, v in executor.sampler_state.items()}
            context.state[SAMPLER_STATE] = ArrayRecord(sampler)
