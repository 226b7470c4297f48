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
from fedsim.core import components
from fedsim.core.protocol import Plan, ServerState
from fedsim.core.pytree import Tree, flatten, stack
from fedsim.engine.evaluate import client_accuracy_spread, evaluate
from fedsim.simulation import Simulation
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


class DecentralizedSimulation(Simulation):
    """D-SGD and relatives over the topology file of the config (static mixing matrix)."""

    def __init__(self, config):
        self.schedule = mixing_schedule(config)
        if self.schedule.n != config.clients:
            raise topologies.TopologyError(f"topology has {self.schedule.n} nodes but --clients is {config.clients}")
        super().__init__(config)
        self._static = None
        if self.schedule.period == 1:  # static: one matrix for the whole run
            self._static = self._gossip_step(0)

    def _gossip_step(self, t: int) -> tuple[Tensor, float, int]:
        """W_t on the device, its spectral gap, and the number of directed edges (messages) it uses."""
        w = self.schedule.matrix(t)
        messages = int(np.count_nonzero(w) - np.count_nonzero(np.diag(w)))
        return gossip_matrix(w, self.device), topologies.spectral_gap(w), messages

    def make_strategy(self):
        return components.build("decentralized", self.config.strategy)

    @staticmethod
    def correct(outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-sample 0/1 correctness of the node models' outputs (classification: argmax)."""
        return outputs.argmax(-1) == targets

    def clients_per_round(self) -> int:
        return self.config.clients

    def initial_state(self) -> ServerState:
        """All nodes start from the same initial model; no local optimizer state yet. ``extras`` holds the
        nodes' local optimizer state (keys ``opt.*``) and the strategy's per-node state (``strategy.*``)."""
        params = stack(self.init_params, self.config.clients)
        return ServerState(params, _prefixed("strategy.", self.strategy.init(params)))

    def round(self, round_: int, state: ServerState) -> tuple[ServerState, dict[str, Any]]:
        nodes = np.arange(self.config.clients)
        lr = self.lr(round_)
        opt_state = _unprefixed("opt.", state.extras)
        updates = self.executor.train(
            Plan(nodes), self.init_params, round_, lr, start=state.params, opt_state=opt_state or None
        )
        w, gap, messages = self._static or self._gossip_step(round_ - 1)
        new_params, strategy_state = self.strategy.update(
            w, state.params, updates.deltas, lr, _unprefixed("strategy.", state.extras)
        )
        mean_step = {k: new_params[k].mean(0) - state.params[k].mean(0) for k in new_params}
        record = {
            "round": round_,
            "lr": self.lr(round_),
            "clients": len(nodes),
            "train_loss": float((updates.train_loss.double() * updates.weights.to(torch.float64)).sum()),
            "drift": updates.drift(),
            "update_norm": float(flatten(mean_step, stacked=False).norm()),
            "consensus_distance": consensus_distance(new_params),
            "spectral_gap": gap,
            "bytes_up": messages * self.model_bytes,
            "bytes_down": messages * self.model_bytes,
        }
        extras = {**_prefixed("opt.", updates.opt_state), **_prefixed("strategy.", strategy_state)}
        return ServerState(new_params, extras), record

    def evaluate_state(self, state: ServerState) -> dict[str, Any]:
        nodes = state.params
        average = {k: v.mean(0) for k, v in nodes.items()}
        test = evaluate(self.model, average, self.x_test, self.y_test)
        train = evaluate(self.model, average, *self.train_data())
        node_test_loss, node_test_acc = self._node_scores(nodes, self.x_test, self.y_test)
        node_train_loss = self._own_data_loss(nodes)
        record = {
            "test_accuracy": test["accuracy"],
            "test_loss": test["loss"],
            "generalization_gap": test["loss"] - train["loss"],
            "node_generalization_gap": float((node_test_loss - node_train_loss).mean()),
        }
        spread = client_accuracy_spread(node_test_acc.cpu().numpy())
        record.update({k.replace("client_", "node_"): v for k, v in spread.items()})
        return record

    def train_data(self) -> tuple[Tensor, Tensor]:
        """All nodes' training samples (the data set whose loss the generalization gap subtracts)."""
        return self.store.x[self.store.order], self.store.y[self.store.order]

    @torch.no_grad()
    def _node_scores(self, nodes: Tree, x: Tensor, y: Tensor, chunk: int = 64) -> tuple[Tensor, Tensor]:
        """Mean loss and accuracy of every node's model on the same data ``(x, y)``."""
        forward = vmap(lambda p, xb: functional_call(self.model, p, (xb,)), in_dims=(0, None))
        losses, accs = [], []
        for first in range(0, self.config.clients, chunk):
            part = {k: v[first : first + chunk] for k, v in nodes.items()}
            outputs = forward(part, x)  # [c, N, outputs]
            c = outputs.shape[0]
            flat, targets = outputs.reshape(-1, outputs.shape[-1]), y.repeat(c)
            losses.append(self.loss_fn(flat, targets).reshape(c, -1).double().mean(1))
            accs.append(self.correct(flat, targets).reshape(c, -1).double().mean(1))
        return torch.cat(losses), torch.cat(accs)

    @torch.no_grad()
    def _own_data_loss(self, nodes: Tree, chunk: int = 64) -> Tensor:
        """Loss of node i's model on node i's own training samples, for a chunk of nodes at a time (padded)."""
        sizes = self.store.sizes
        width = np.arange(sizes.max())[None, :]
        forward = vmap(lambda p, xb: functional_call(self.model, p, (xb,)))
        losses = []
        for first in range(0, self.config.clients, chunk):
            ids = np.arange(first, min(first + chunk, self.config.clients))
            positions = np.minimum(width, sizes[ids, None] - 1)
            mask = torch.as_tensor(width < sizes[ids, None], device=self.device)
            index = self.store.global_index(ids, positions)
            logits = forward({k: v[ids] for k, v in nodes.items()}, self.store.x[index])
            loss = self.loss_fn(logits.reshape(-1, logits.shape[-1]), self.store.y[index].reshape(-1))
            loss = loss.reshape(mask.shape).double() * mask
            losses.append(loss.sum(1) / mask.sum(1))
        return torch.cat(losses)


class MinimaxSimulation(DecentralizedSimulation):
    """Decentralized SGDA (``strategy: dsgda``) on a min-max problem of :mod:`fedsim.minimax`.

    Evaluation reports, for the average model ``(x_bar, y_bar)``: ``primal_dual_gap`` on all nodes' training
    data, ``test_loss``/``train_loss`` as the objective ``f`` on the test/training set,
    ``generalization_gap`` (their difference), ``node_generalization_gap`` (per node, on its own data),
    ``test_accuracy``, and the problem's own metric (``test_auc`` for AUC maximization,
    ``worst_class_accuracy`` for robust logistic regression).
    """

    def __init__(self, config):
        self.problem = components.build("problem", config.problem)
        self.loss_fn = self.problem.loss
        self.correct = self.problem.correct
        super().__init__(config)

    def make_model(self, ds) -> torch.nn.Module:
        from fedsim.models import build_model
        from fedsim.simulation import init_seed

        c = self.config
        self.problem.fit(self.store.y[self.store.order], ds.num_classes)
        outputs = self.problem.output_classes(ds.num_classes)
        base = build_model(c.model, ds.feature_shape, outputs, seed=init_seed(c.seed))
        return self.problem.wrap(base)  # the problem's own variables start at fixed values

    def make_strategy(self):
        from fedsim.minimax import DescentAscentClient

        ratio = (self.config.strategy.get("dual_lr") or self.config.lr) / self.config.lr
        return components.build(
            "decentralized", self.config.strategy, client_algorithm=DescentAscentClient(self.problem, ratio)
        )

    def evaluate_state(self, state: ServerState) -> dict[str, Any]:
        nodes = state.params
        average = {k: v.mean(0) for k, v in nodes.items()}
        x_train, y_train = self.train_data()
        problem, model = self.problem, self.model
        test_loss = problem.objective(model, average, self.x_test, self.y_test)
        train_loss = problem.objective(model, average, x_train, y_train)
        node_test_loss, node_test_acc = self._node_scores(nodes, self.x_test, self.y_test)
        record = {
            "test_accuracy": self._accuracy(average),
            "test_loss": test_loss,
            "generalization_gap": test_loss - train_loss,
            "node_generalization_gap": float((node_test_loss - self._own_data_loss(nodes)).mean()),
            "primal_dual_gap": problem.primal_dual_gap(model, average, x_train, y_train),
        }
        record.update(problem.metrics(model, average, self.x_test, self.y_test))
        spread = client_accuracy_spread(node_test_acc.cpu().numpy())
        record.update({k.replace("client_", "node_"): v for k, v in spread.items()})
        return record

    @torch.no_grad()
    def _accuracy(self, params) -> float:
        outputs = functional_call(self.model, params, (self.x_test,))
        return float(self.correct(outputs, self.y_test).double().mean())
