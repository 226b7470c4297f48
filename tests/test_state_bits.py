"""8-bit optimizer state (fedsim.optim.quantized_state): the dynamic map, the round trip's error bound, the
bytes, and Adam/AdamW with ``state_bits=8`` against the 32-bit rule over 100 steps on a small MLP."""

from __future__ import annotations

import math

import pytest
import torch

from fedsim.config import make_config
from fedsim.core.errors import FedsimError
from fedsim.optim import FOAM, GWT, adam, adamw, foam, gwt, state_bytes
from fedsim.optim.quantized_state import BLOCK, dequantize, dynamic_map, quantize, state_nbytes
from fedsim.simulation import simulate


def test_dynamic_map_has_256_sorted_values_spanning_seven_decades():
    for signed in (True, False):
        values = dynamic_map(signed)
        assert len(values) == 256 == len(set(values)) and list(values) == sorted(values)
        assert values[-1] == 1.0 and 0.0 in values
        positive = [v for v in values if v > 0]
        assert 1e-7 < min(positive) < 1e-6
    assert min(dynamic_map(False)) == 0.0 and min(dynamic_map(True)) < -0.99


def test_round_trip_error_is_within_half_a_bin_of_the_block_scale():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5000, generator=g)
    codes, scale = quantize(x)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape and scale.shape == (3, math.ceil(5000 / BLOCK))
    y = dequantize(codes, scale)
    # near the block maximum the bins are 0.9 / 64 wide: the error is at most half of that times the scale
    blockwise = torch.nn.functional.pad(x, (0, (-5000) % BLOCK)).reshape(3, -1, BLOCK).abs().amax(-1)
    bound = (0.9 / 64 / 2) * blockwise.repeat_interleave(BLOCK, dim=1)[:, :5000]
    assert ((y - x).abs() <= bound * (1 + 1e-5)).all()  # the extreme: -N_b decodes to the map's -0.993 N_b
    # small entries keep relative precision (the dynamic map's point): 1e-4 of the scale to within ~7%
    tiny = torch.full((1, 10), 1e-4)
    tiny[0, 0] = 1.0
    codes, scale = quantize(tiny, signed=False)
    assert (dequantize(codes, scale, signed=False)[0, 1:] / 1e-4 - 1).abs().max() < 0.07
    assert state_nbytes(5000) == 5000 + 4 * 3


def small_mlp(clients=2):
    g = torch.Generator().manual_seed(1)
    return {"w1": 0.2 * torch.randn(clients, 20, 64, generator=g), "b1": torch.zeros(clients, 64),
            "w2": 0.2 * torch.randn(clients, 64, 2, generator=g), "b2": torch.zeros(clients, 2)}  # fmt: skip


def train(optimizer, steps=100, in_place=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 20, generator=g)
    y = (x[:, :3].sum(1) > 0).long()
    params = {k: v.requires_grad_() for k, v in small_mlp().items()}
    state = optimizer.init({k: v.detach() for k, v in params.items()})
    losses = []
    for _ in range(steps):
        h = torch.relu(torch.einsum("nd,cdh->cnh", x, params["w1"]) + params["b1"][:, None])
        out = torch.einsum("cnh,cho->cno", h, params["w2"]) + params["b2"][:, None]
        loss = torch.nn.functional.cross_entropy(out.reshape(-1, 2), y.repeat(2))
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
        with torch.no_grad():
            if in_place:
                state = optimizer.step_(grads, state, params, 1e-2)
            else:
                updates, state = optimizer.update(grads, state, {k: v.detach() for k, v in params.items()}, 1e-2)
                for k in params:
                    params[k].add_(updates[k])
        losses.append(loss.item())
    return losses, state


def _foam(**options):
    return foam(compress=frozenset({"w1"}), scale=1.0, **options)


def _gwt(**options):
    return gwt(compress=frozenset({"w1"}), scale=1.0, **options)


@pytest.mark.parametrize("make", [adam, adamw, _foam, _gwt], ids=["adam", "adamw", "foam", "gwt"])
def test_eight_bit_state_follows_the_32_bit_rule_over_100_steps(make):
    """Documented tolerance: over 100 steps the training loss of the 8-bit run stays within 10% (relative) of the
    32-bit run's at every step from the 10th on, and both reach the same loss within 0.02."""
    exact, _ = train(make(weight_decay=0.01))
    eight, state = train(make(weight_decay=0.01, state_bits=8))
    functional, _ = train(make(weight_decay=0.01, state_bits=8), in_place=False)
    assert all(abs(a - b) <= 0.1 * a for a, b in zip(exact[9:], eight[9:], strict=True))
    assert abs(exact[-1] - eight[-1]) < 0.02 and exact[-1] < 0.1 * exact[0]
    assert functional == pytest.approx(eight, rel=5e-3)  # the same rule (rounding can flip a code)
    assert state["m.w1"].dtype == torch.uint8 and state["v_scale.w1"].dtype == torch.float32


def test_eight_bit_state_takes_about_a_quarter_of_the_bytes():
    params = small_mlp(1)
    full, eight = state_bytes(adam().init(params)), state_bytes(adam(state_bits=8).init(params))
    moments = 2 * sum(v.numel() for v in params.values())
    assert full - eight == 4 * moments - sum(2 * state_nbytes(v[0].numel()) for v in params.values())
    assert eight < 0.3 * full
    # FOAM's folded moments and 8 bits stack: level 2 keeps a quarter of w1's columns, then a byte per entry
    folded, both = state_bytes(_foam(level=2).init(params)), state_bytes(_foam(level=2, state_bits=8).init(params))
    assert folded < full and both < 0.3 * folded


def test_state_bits_from_the_config_and_its_refusals(tmp_path):
    config = {"clients": 4, "rounds": 2, "local_steps": 3, "optimizer": {"name": "adam", "state_bits": 8},
              "checkpoint_every": 0}  # fmt: skip
    summary = simulate(config, tmp_path / "run", plots=False)
    plain = simulate({**config, "optimizer": "adam"}, tmp_path / "plain", plots=False)
    assert summary["optimizer_state_bytes_per_client"] < 0.3 * plain["optimizer_state_bytes_per_client"]
    with pytest.raises(FedsimError, match="state_bits"):
        make_config({"optimizer": {"name": "adam", "state_bits": 4}})
    with pytest.raises(FedsimError, match="state_bits"):
        make_config({"optimizer": {"name": "sgd", "state_bits": 8}})


@pytest.mark.parametrize("cls", [FOAM, GWT], ids=["FOAM", "GWT"])
def test_torch_optim_classes_keep_8_bit_moments_between_steps(cls):
    """The ``torch.optim`` drop-ins with ``state_bits=8``: uint8 moments and scales between steps, the same loss
    as 32 bits within the documented tolerance, and about a quarter of the state bytes."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 20, generator=g)
    y = (x[:, :3].sum(1) > 0).long()
    runs = {}
    for bits in (32, 8):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
        opt = cls(model.parameters(), lr=1e-2, scale=1.0, state_bits=bits)
        losses = []
        for _ in range(100):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        runs[bits] = losses, opt
    (exact, full), (eight, small) = runs[32], runs[8]
    assert all(abs(a - b) <= 0.1 * a for a, b in zip(exact[9:], eight[9:], strict=True))
    weight = next(iter(small.param_groups[0]["params"]))
    assert small.state[weight]["exp_avg"].dtype == torch.uint8 and "exp_avg_sq_scale" in small.state[weight]
    assert state_bytes(small) < 0.35 * state_bytes(full)
    with pytest.raises(ValueError, match="state_bits must be 8 or 32"):
        cls(torch.nn.Linear(2, 2).parameters(), state_bits=4)
