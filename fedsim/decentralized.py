"""Decentralized learning over a graph: every node is a client that trains its own model, then gossips.

A round is ``local_steps`` local optimizer steps on every node at once (the vectorized trainer, nodes as
the client axis, each node keeping its local optimizer state), followed by one gossip ``X <- W X`` with the
topology's mixing matrix (see :mod:`strategies.decentralized` for combine-then-adapt vs adapt-then-combine).

Metrics per round, besides the federated ones: ``consensus_distance`` = (1/m) sum_i ||x_i - x_bar||^2 and
``spectral_gap`` of W; on evaluation rounds ``test_accuracy``/``test_loss`` of the average model x_bar,
the per-node accuracy spread (``node_accuracy_mean``/``_std``/``_worst10``, every node's model on the test
set), ``generalization_gap`` = test loss - training loss of x_bar (training loss on all nodes' data) and
``node_generalization_gap`` = mean over nodes of (test loss of x_i - loss of x_i on node i's own data).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call, vmap

import topologies
from fedsim.choco import DEFAULT_GAMMA, ChocoGossip
from fedsim.core.protocol import ClientUpdates, Plan, ServerState
from fedsim.core.pytree import Tree, flatten, stack
from fedsim.engine.evaluate import client_accuracy_spread, evaluate
from fedsim.rounds import RoundPlan, Simulation
from strategies import gossip_matrix
from topologies.schedules import Schedule


def consensus_distance(x: Tree) -> float:
    """``(1/m) sum_i ||x_i - x_bar||^2`` over the stacked node parameters."""
    flat = flatten(x).double()
    return float(((flat - flat.mean(dim=0)) ** 2).sum(dim=1).mean())


def _prefixed(prefix: str, tree: Tree) -> Tree:
    return {prefix + k: v for k, v in tree.items()}


def _unprefixed(prefix: str, tree: Tree) -> Tree:
    return {k[len(prefix) :]: v for k, v in tree.items() if k.startswith(prefix)}


class StaticSchedule(Schedule):
    """A fixed mixing matrix, as a schedule of period 1."""

    def __init__(self, w: np.ndarray) -> None:
        self.w, self.n, self.period = w, w.shape[0], 1

    def matrix(self, t: int) -> np.ndarray:
        return self.w


def mixing_schedule(config) -> Schedule:
    """The run's gossip schedule: a YAML schedule file (graph files cycled per round), or the topology file's
    graph as a static matrix (``--mixing``), or a time-varying family over its node count
    (``schedule: one_peer_exponential | random_matchings``, seeded by the run seed)."""
    path = str(config.topology)
    if path.endswith((".yaml", ".yml")):
        if config.schedule != "static":
            raise topologies.TopologyError(f"schedule '{config.schedule}' applies to a graph file, not to {path}")
        return topologies.FileSchedule(path)
    graph = topologies.load(path)
    n = graph.number_of_nodes()
    if config.schedule == "one_peer_exponential":
        return topologies.OnePeerExponential(n)
    if config.schedule == "random_matchings":
        return topologies.RandomMatchings(n, seed=config.seed)
    return StaticSchedule(topologies.mixing_matrix(graph, config.mixing))


class DecentralizedMode:
    """Every node trains from its own parameters, then the nodes gossip with the strategy's combine step.

    ``schedule``: the mixing matrices W_t (static: one matrix, prepared once). ``extras`` of the state hold
    the nodes' local optimizer state (keys ``opt.*``) and the strategy's per-node state (``strategy.*``).
    Evaluation is the task's (:meth:`evaluate_nodes`)."""

    def __init__(self, strategy, schedule: Schedule, device: torch.device) -> None:
        self.strategy, self.schedule, self.device = strategy, schedule, device
        self._static = self._gossip_step(0) if schedule.period == 1 else None
        self._matrix = schedule.matrix(0) if schedule.period == 1 else None

    def _gossip_step(self, t: int) -> tuple[Tensor, float, int]:
        """W_t on the device, its spectral gap, and the number of directed edges (messages) it uses."""
        w = self.schedule.matrix(t)
        messages = int(np.count_nonzero(w) - np.count_nonzero(np.diag(w)))
        return gossip_matrix(w, self.device), topologies.spectral_gap(w), messages

    def clients_per_round(self, sim: Simulation) -> int:
        return sim.config.clients

    def initial_state(self, sim: Simulation) -> ServerState:
        """All nodes start from the same initial model; no local optimizer state yet."""
        params = stack(sim.init_params, sim.config.clients)
        return ServerState(params, _prefixed("strategy.", self.strategy.init(params)))

    def plan(self, sim: Simulation, round_: int, state: ServerState) -> RoundPlan:
        opt_state = _unprefixed("opt.", state.extras)
        return RoundPlan(Plan(np.arange(sim.config.clients)), sim.init_params, start=state.params,
                         opt_state=opt_state or None)  # fmt: skip

    def combine(
        self, sim: Simulation, round_: int, state: ServerState, plan: Plan, updates: ClientUpdates
    ) -> tuple[ServerState, dict[str, Any]]:
        w, gap, messages = self._static or self._gossip_step(round_ - 1)
        choco = None
        if sim.uplink is not None:  # compressed gossip (CHOCO-SGD) with the nodes' public copies
            gamma = DEFAULT_GAMMA if sim.config.choco_gamma is None else sim.config.choco_gamma
            public = _unprefixed("choco.", state.extras)
            w = choco = ChocoGossip(w, sim.uplink, gamma, sim.config.seed, round_, public)
        new_params, strategy_state = self.strategy.update(
            w, state.params, updates.deltas, sim.lr(round_), _unprefixed("strategy.", state.extras)
        )
        sent = messages * self.message_bytes(sim) if choco is None else messages * sim.uplink_bytes * choco.calls
        mean_step = {k: new_params[k].mean(0) - state.params[k].mean(0) for k in new_params}
        metrics = {
            "update_norm": float(flatten(mean_step, stacked=False).norm()),
            "consensus_distance": consensus_distance(new_params),
            "spectral_gap": gap,
            "bytes_up": sent,
            "bytes_down": sent,
        }
        extras = {**_prefixed("opt.", updates.opt_state), **_prefixed("strategy.", strategy_state)}
        if choco is not None:
            extras.update(_prefixed("choco.", choco.public))
        return ServerState(new_params, extras), metrics

    def message_bytes(self, sim: Simulation) -> int:
        """Bytes one node sends one neighbour per round: a (compressed) model per gossip step of the strategy."""
        return getattr(self.strategy, "gossips", 1) * sim.uplink_bytes

    def client_bytes(
        self, sim: Simulation, round_: int, plan: Plan, updates: ClientUpdates
    ) -> tuple[np.ndarray, np.ndarray]:
        """Bytes each node receives (its messages from every in-neighbour of W_t) and sends (to every
        out-neighbour) in this round's gossip."""
        w = self.schedule.matrix(round_ - 1) if self._static is None else self._matrix
        links = (np.asarray(w) != 0) & ~np.eye(len(w), dtype=bool)  # links[i, j]: i receives from j
        return links.sum(1) * self.message_bytes(sim), links.sum(0) * self.message_bytes(sim)

    def evaluate(self, sim: Simulation, state: ServerState) -> dict[str, Any]:
        return sim.task.evaluate_nodes(sim, state.params)


def evaluate_classification_nodes(sim: Simulation, nodes: Tree) -> dict[str, Any]:
    """Test/training loss and accuracy of the average model x_bar, the generalization gaps and every node's
    accuracy spread (see the module docstring)."""
    average = {k: v.mean(0) for k, v in nodes.items()}
    test = evaluate(sim.model, average, sim.x_test, sim.y_test)
    train = evaluate(sim.model, average, *train_data(sim))
    node_test_loss, node_test_acc = node_scores(sim, nodes, sim.x_test, sim.y_test)
    node_train_loss = own_data_loss(sim, nodes)
    record = {
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "generalization_gap": test["loss"] - train["loss"],
        "node_generalization_gap": float((node_test_loss - node_train_loss).mean()),
    }
    record.update(node_spread(node_test_acc))
    sim.client_accuracy = node_test_acc.cpu().numpy()
    return record


def node_spread(node_accuracy: Tensor) -> dict[str, Any]:
    """``node_accuracy_mean``/``_std``/``_worst10`` of the nodes' test accuracies."""
    spread = client_accuracy_spread(node_accuracy.cpu().numpy())
    return {k.replace("client_", "node_"): v for k, v in spread.items()}


def train_data(sim: Simulation) -> tuple[Tensor, Tensor]:
    """All nodes' training samples (the data set whose loss the generalization gap subtracts)."""
    return sim.store.x[sim.store.order], sim.store.y[sim.store.order]


@torch.no_grad()
def node_scores(sim: Simulation, nodes: Tree, x: Tensor, y: Tensor, chunk: int = 64) -> tuple[Tensor, Tensor]:
    """Mean loss and accuracy of every node's model on the same data ``(x, y)``."""
    forward = vmap(lambda p, xb: functional_call(sim.model, p, (xb,)), in_dims=(0, None))
    losses, accs = [], []
    for first in range(0, sim.config.clients, chunk):
        part = {k: v[first : first + chunk] for k, v in nodes.items()}
        outputs = forward(part, x)  # [c, N, outputs]
        c = outputs.shape[0]
        flat, targets = outputs.reshape(-1, outputs.shape[-1]), y.repeat(c)
        losses.append(sim.loss_fn(flat, targets).reshape(c, -1).double().mean(1))
        accs.append(sim.correct(flat, targets).reshape(c, -1).double().mean(1))
    return torch.cat(losses), torch.cat(accs)


@torch.no_grad()
def own_data_loss(sim: Simulation, nodes: Tree, chunk: int = 64) -> Tensor:
    """Loss of node i's model on node i's own training samples, for a chunk of nodes at a time (padded)."""
    store = sim.store
    sizes = store.sizes
    width = np.arange(sizes.max())[None, :]
    forward = vmap(lambda p, xb: functional_call(sim.model, p, (xb,)))
    losses = []
    for first in range(0, sim.config.clients, chunk):
        ids = np.arange(first, min(first + chunk, sim.config.clients))
        positions = np.minimum(width, sizes[ids, None] - 1)
        mask = torch.as_tensor(width < sizes[ids, None], device=sim.device)
        index = store.global_index(ids, positions)
        logits = forward({k: v[ids] for k, v in nodes.items()}, store.x[index])
        loss = sim.loss_fn(logits.reshape(-1, logits.shape[-1]), store.y[index].reshape(-1))
        loss = loss.reshape(mask.shape).double() * mask
        losses.append(loss.sum(1) / mask.sum(1))
    return torch.cat(losses)
