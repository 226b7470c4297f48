"""The learning task of a run: what a sample's loss and correctness are, how the model is shaped, and how
decentralized nodes are evaluated. :class:`ClassificationTask` is the default; a min-max problem is
:class:`fedsim.minimax.MinimaxTask`."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from fedsim.core.pytree import Tree
from fedsim.decentralized import evaluate_classification_nodes
from fedsim.engine.trainer import cross_entropy


class ClassificationTask:
    """Supervised classification: per-sample cross-entropy, argmax correctness, the model as built."""

    loss_fn = staticmethod(cross_entropy)

    @staticmethod
    def correct(outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-sample 0/1 correctness (argmax)."""
        return outputs.argmax(-1) == targets

    def output_classes(self, num_classes: int) -> int:
        return num_classes

    def prepare(self, y_train: Tensor, num_classes: int) -> None:
        """Learn what the task needs from the training labels (nothing here)."""

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def client_algorithm(self, lr: float, strategy_options: dict[str, Any]):
        """The client algorithm a decentralized strategy runs (None: the strategy's default)."""
        return None

    def evaluate_nodes(self, sim, nodes: Tree) -> dict[str, Any]:
        return evaluate_classification_nodes(sim, nodes)
