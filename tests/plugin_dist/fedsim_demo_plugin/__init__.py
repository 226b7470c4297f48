"""A plugin package for fedsim, as a researcher would ship one: a strategy with its own option, a local
optimizer, a client regulator, an aggregator and a dataset, each declared once by its typed signature and
exposed through entry points in the groups ``fedsim.strategy``, ``fedsim.optimizer``, ``fedsim.regulator``,
``fedsim.aggregator`` and ``fedsim.dataset`` (see ``../fedsim_demo_plugin-0.1.0.dist-info/entry_points.txt``).

The test suite puts this folder on ``sys.path``, so ``importlib.metadata`` finds the ``.dist-info`` exactly as
it finds an installed distribution."""

from __future__ import annotations

from typing import Annotated

import numpy as np
import torch

from fedsim.core.components import option
from fedsim.core.protocol import ServerState
from fedsim.core.pytree import Tree
from fedsim.data.datasets import Dataset
from fedsim.optim import AppliesUpdate, step_counter
from strategies import FedAvg


class DampedFedAvg(FedAvg):
    """FedAvg with a damped server step: ``w <- w - (1 - damp) sum_k p_k Delta_k``."""

    def __init__(self, damp: Annotated[float, option("share of the averaged update held back", ge=0, lt=1)] = 0.5,
                 **kwargs):  # fmt: skip
        super().__init__(**kwargs)
        self.damp = damp

    def server_update(self, round_: int, state: ServerState, mean_delta: Tree) -> ServerState:
        params = {k: state.params[k] - (1 - self.damp) * d for k, d in mean_delta.items()}
        return ServerState(params, state.extras)


class SignSGD(AppliesUpdate):
    """signSGD with a step scale: ``w <- w - lr * scale * sign(g)`` (Bernstein et al. 2018)."""

    def __init__(self, scale: Annotated[float, option("multiplier of the sign step", gt=0)] = 1.0):
        self.scale = scale

    def init(self, params: Tree) -> Tree:
        return {"step": step_counter(params)}

    def update(self, grads: Tree, state: Tree, params: Tree, lr: float) -> tuple[Tree, Tree]:
        return {k: -lr * self.scale * torch.sign(g) for k, g in grads.items()}, {"step": state["step"] + 1}


class ScaledUpload:
    """A client regulator that uploads the plain local delta times ``factor`` (a toy: a regulator rewrites the
    upload, here without looking at the trajectory)."""

    trajectory = None

    def __init__(self, factor: Annotated[float, option("upload multiplier", gt=0)] = 1.0):
        self.factor = factor

    def regulate(self, deltas: Tree, trajectory, num_steps: torch.Tensor) -> tuple[Tree, Tree]:
        return {k: self.factor * v for k, v in deltas.items()}, {}


class MeanOfMedians:
    """Aggregator: the mean of coordinate medians over ``groups`` interleaved groups of clients."""

    def __init__(self, groups: Annotated[int, option("client groups", ge=1)] = 2):
        self.groups = groups

    def __call__(self, tree: Tree, weights: torch.Tensor) -> Tree:
        out = {}
        for k, v in tree.items():
            parts = [v[i :: self.groups] for i in range(min(self.groups, v.shape[0]))]
            out[k] = torch.stack([p.median(dim=0).values for p in parts]).mean(dim=0)
        return out


def blobs(
    centers: Annotated[int, option("classes (Gaussian blobs)", ge=2)] = 3,
    samples: Annotated[int, option("training samples", ge=10)] = 300,
    *,
    seed: int = 0,
) -> Dataset:
    """Gaussian blobs in 2-D, one class per blob (a dataset plugin)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=4.0, size=(centers, 2))

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(centers, size=n)
        return (means[y] + rng.normal(size=(n, 2))).astype(np.float32), y.astype(np.int64)

    x_train, y_train = draw(samples)
    x_test, y_test = draw(max(samples // 4, centers))
    return Dataset("blobs", x_train, y_train, x_test, y_test, centers)
