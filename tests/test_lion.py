"""Lion, the built-in optimizer added as "one new file plus one registration line" (README, "Extending")."""

from __future__ import annotations

import pytest
import torch

import fedsim
from fedsim.core import components
from fedsim.optim import Lion, make_optimizer


def _reference(w, grads, lr, b1, b2, wd):
    """Chen et al. 2023, Algorithm 2, one tensor at a time."""
    m = torch.zeros_like(w)
    for g in grads:
        c = b1 * m + (1 - b1) * g
        w = w * (1 - lr * wd) - lr * torch.sign(c)
        m = b2 * m + (1 - b2) * g
    return w


@pytest.mark.parametrize(("betas", "wd"), [((0.9, 0.99), 0.0), ((0.8, 0.95), 0.1)])
def test_lion_matches_the_paper_per_client(betas, wd):
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)  # 3 clients stacked
    grads = [torch.randn(3, 4, 5, generator=gen, dtype=torch.float64) for _ in range(6)]
    opt = make_optimizer("lion", betas=betas, weight_decay=wd)
    params, state = {"w": w0.clone()}, opt.init({"w": w0})
    for g in grads:
        state = opt.step_({"w": g.clone()}, state, params, 0.01)
    for c in range(3):
        expected = _reference(w0[c], [g[c] for g in grads], 0.01, *betas, wd)
        assert torch.allclose(params["w"][c], expected, atol=1e-12, rtol=0)


def test_lion_is_registered_with_its_options():
    assert components.get("optimizer", "lion").obj is Lion
    assert set(components.get("optimizer", "lion").options()) == {"betas", "weight_decay"}


def test_lion_trains_from_the_cli_config(tmp_path):
    summary = fedsim.simulate({"optimizer": {"name": "lion", "betas": [0.9, 0.99]}, "lr": 0.003, "rounds": 3,
                               "clients": 8, "local_steps": 5}, out=tmp_path / "run", plots=False)  # fmt: skip
    assert summary["optimizer"] == "lion" and summary["final_test_accuracy"] > 0.5
