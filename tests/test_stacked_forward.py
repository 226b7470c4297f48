"""The stacked forward of sequential dense models (fedsim.engine.stacked) gives bitwise the vmap path's
losses, gradients and whole-run metrics; other models keep the vmap path."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.func import functional_call, vmap

from fedsim.engine import stacked, trainer
from fedsim.models import build_model


def _stacked_params(model: nn.Module, clients: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {k: v.detach().unsqueeze(0).repeat(clients, *[1] * v.dim()) + 0.05 * torch.randn(clients, *v.shape,
            generator=generator) for k, v in model.named_parameters()}  # fmt: skip


@pytest.mark.parametrize(
    "model",
    [
        build_model("mlp", (1, 8, 8), 10),
        build_model("mlp", (1, 8, 8), 10, hidden=(64, 32, 16)),
        nn.Sequential(nn.Flatten(), nn.Linear(64, 20), nn.Tanh(), nn.Linear(20, 10, bias=False), nn.GELU()),
    ],
)
def test_stacked_forward_and_gradients_are_bitwise_the_vmap_path(model):
    forward = stacked.stacked_forward(model)
    assert forward is not None
    params = _stacked_params(model, 7)
    x = torch.randn(7, 5, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 10, (7, 5), generator=torch.Generator().manual_seed(3))
    reference = vmap(lambda p, xb: functional_call(model, p, (xb,)))
    assert torch.equal(forward(params, x), reference(params, x))
    fast = trainer.VectorizedTrainer(model)
    slow = trainer.VectorizedTrainer(model)
    slow._vmapped_forward = reference
    mask = torch.ones(7, 5)
    (g_fast, l_fast), (g_slow, l_slow) = fast.grads(params, x, y, mask), slow.grads(params, x, y, mask)
    assert torch.equal(l_fast, l_slow) and all(torch.equal(g_fast[k], g_slow[k]) for k in g_slow)


def test_other_models_keep_the_vmap_path():
    assert stacked.stacked_forward(build_model("lenet5", (1, 8, 8), 10)) is None
    assert stacked.stacked_forward(nn.Sequential(nn.Linear(64, 10))) is None  # no Flatten first
    assert stacked.stacked_forward(nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Dropout(0.5))) is None


@pytest.mark.parametrize(
    "extra",
    [[], ["--optimizer", "foam"], ["--strategy", "scaffold", "--regulator", "ecgr"],
     ["--client-filter", "gaf", "--set", "client_filter.microbatches=2", "--batch-size", "8"],
     ["--regulator", "bherd"]],
)  # fmt: skip
def test_whole_run_is_identical_with_the_vmap_path(tmp_path, monkeypatch, cli, extra):
    """Bitwise, also where the gradients' memory layout matters downstream (FOAM's matmuls, ECGR's herding)."""
    args = ["simulate", "--rounds", "3", "--clients", "6", "--local-steps", "3", "--no-plots", "--quiet", *extra]
    rows = []
    for name in ("stacked", "vmap"):
        if name == "vmap":
            monkeypatch.setattr(trainer, "stacked_forward", lambda model: None)
        code, _, err = cli([*args, "--out", str(tmp_path / name)])
        assert code == 0, err
        rows.append([{k: v for k, v in json.loads(line).items() if k != "time_s"}
                     for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()])  # fmt: skip
    assert rows[0] == rows[1]
