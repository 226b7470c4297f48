"""What the trainer records for each unit, against hand-computed gradients."""

import itertools
import math

import pytest
import torch
from torch.func import functional_call

from fedsim.core.protocol import ClientAlgorithm
from fedsim.core.pytree import flatten
from fedsim.engine.trainer import VectorizedTrainer, _Recorder, cross_entropy
from fedsim.models import build_model
from fedsim.optim import make_optimizer
from strategies import BHerd, compose


def _setup(seed=0, clients=3, steps=4, batch=6):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 5, generator=gen)
    y = torch.randint(0, 3, (40,), generator=gen)
    model = build_model("mlp", (5,), 3, seed=1, hidden=(7,))
    params = {k: v.detach().double() for k, v in model.named_parameters()}
    model = model.double()
    index = torch.randint(0, 40, (clients, steps, batch), generator=gen)
    mask = torch.ones(clients, steps, batch, dtype=torch.bool)
    mask[1, 3] = False  # client 1 takes 3 steps
    mask[2, :, 4:] = False  # client 2 has 4 valid samples per batch
    return model, params, x.double(), y, index, mask


def _batch_grad(model, params, xb, yb, m):
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    losses = cross_entropy(functional_call(model, leaves, (xb,)), yb)
    loss = (losses * m).sum() / m.sum()
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))


def test_sample_units_sum_to_the_round_start_batch_gradients():
    """BHerd with sample units, ratio 1, sum: the upload is eta * sum_k grad of step k's batch at w_0."""
    model, params, x, y, index, mask = _setup()
    lr = 0.1
    algorithm = compose(ClientAlgorithm(), BHerd(ratio=1.0, unit="sample"))
    trainer = VectorizedTrainer(model)
    result = trainer.train(params, x, y, index, mask, make_optimizer("sgd"), lr, algorithm)
    for c in range(3):
        expected = {k: torch.zeros_like(v) for k, v in params.items()}
        for k in range(4):
            m = mask[c, k].double()
            if m.sum() == 0:
                continue
            g = _batch_grad(model, params, x[index[c, k]], y[index[c, k]], m)
            for key in expected:
                expected[key] += lr * g[key]
        for key in expected:
            torch.testing.assert_close(result.deltas[key][c], expected[key], rtol=1e-10, atol=1e-12)


def test_microbatch_units_of_plain_sgd_sum_to_the_plain_delta():
    """With plain SGD the microbatch units of a step sum to that step's delta, so BHerd keeping them all
    uploads the plain delta; with momentum it would not (units are raw gradients)."""
    model, params, x, y, index, mask = _setup(seed=2, batch=6)
    algorithm = compose(ClientAlgorithm(), BHerd(ratio=1.0, unit="microbatch", microbatches=3))
    trainer = VectorizedTrainer(model)
    plain = trainer.train(params, x, y, index, mask, make_optimizer("sgd"), 0.1, ClientAlgorithm())
    herd = trainer.train(params, x, y, index, mask, make_optimizer("sgd"), 0.1, algorithm)
    for key in params:
        torch.testing.assert_close(herd.deltas[key], plain.deltas[key], rtol=1e-10, atol=1e-12)
    assert herd.stats["damped_norm_fraction"].abs().max() < 1e-10


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_step_units_keep_the_herded_steps(ratio):
    """BHerd over step units keeps exactly ceil(ratio * K) steps: the upload is a sum of recorded steps."""
    model, params, x, y, index, mask = _setup(seed=4, steps=8)
    mask[1, 3] = True
    algorithm = compose(ClientAlgorithm(), BHerd(ratio=ratio))
    trainer = VectorizedTrainer(model)
    recorded = {}
    original = _Recorder.after_step

    def spy(self, k, params_, active):
        original(self, k, params_, active)
        recorded["traj"] = self.trajectory

    _Recorder.after_step = spy
    try:
        result = trainer.train(params, x, y, index, mask, make_optimizer("sgd", momentum=0.9), 0.1, algorithm)
    finally:
        _Recorder.after_step = original
    traj = recorded["traj"]
    flat = flatten(result.deltas)
    for c in range(3):
        units = traj.units[c].double()
        best = None
        keep = math.ceil(ratio * int(traj.mask[c].sum()))
        for subset in itertools.combinations(range(8), keep):
            if not traj.mask[c, list(subset)].all():
                continue
            err = float((units[list(subset)].sum(0) - flat[c]).norm())
            best = err if best is None else min(best, err)
        assert best < 1e-9
