"""Herding, ECGR and BHerd against brute-force oracles; trajectory recording; host equivalences."""

import math

import pytest
import torch

from fedsim.core.errors import FedsimError
from fedsim.core.protocol import TrajectorySpec
from fedsim.core.pytree import flatten
from fedsim.engine.trajectory import Trajectory
from strategies import reaggregate
from strategies.bherd import BHerd, keep_count
from strategies.ecgr import ECGR, selection_count
from strategies.herding import centered_gram, gram, greedy_herding


def brute_force_herding(units: torch.Tensor, count: int, center: str = "zero") -> list[int]:
    """Reference greedy for one client: forms ``S + (D_i - c)`` explicitly for every candidate."""
    c = units.mean(0) if center == "local_mean" else torch.zeros_like(units[0])
    e = units - c
    s = torch.zeros_like(c)
    chosen: list[int] = []
    for _ in range(count):
        best, best_cost = -1, math.inf
        for i in range(units.shape[0]):
            if i in chosen:
                continue
            cost = float((s + e[i]).norm())
            if cost < best_cost:
                best, best_cost = i, cost
        chosen.append(best)
        s = s + e[best]
    return chosen


def brute_force_ecgr(units: torch.Tensor, rho: float, beta: float, center: str) -> torch.Tensor:
    """ECGR's upload straight from the definition: C = sum_sel D + beta sum_rest D, rescaled to ||T||."""
    k = units.shape[0]
    chosen = brute_force_herding(units, max(1, math.floor(rho * k + 1e-9)), center)
    coeff = torch.full((k,), beta, dtype=units.dtype)
    coeff[chosen] = 1.0
    combined = (coeff[:, None] * units).sum(0)
    total = units.sum(0)
    return combined * total.norm() / combined.norm()


@pytest.mark.parametrize("center", ["zero", "local_mean"])
@pytest.mark.parametrize("seed", range(6))
def test_greedy_herding_equals_brute_force(center, seed):
    gen = torch.Generator().manual_seed(seed)
    clients, units, dim = 3, 9, 7
    d = torch.randn(clients, units, dim, generator=gen, dtype=torch.float64)
    d[:, :, 0] += 2.0  # a shared drift, as local steps have
    count = torch.tensor([units, 4, 1])
    order, selected = greedy_herding(gram(d), count, center=center)
    for c in range(clients):
        expected = brute_force_herding(d[c], int(count[c]), center)
        assert order[c, : int(count[c])].tolist() == expected
        assert (order[c, int(count[c]) :] == -1).all()
        assert sorted(torch.nonzero(selected[c]).squeeze(1).tolist()) == sorted(expected)


def test_greedy_herding_respects_mask_and_centres_on_recorded_units():
    gen = torch.Generator().manual_seed(3)
    d = torch.randn(1, 8, 5, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[True, False, True, True, False, True, True, True]])
    d[~mask] = 0.0
    order, selected = greedy_herding(gram(d), torch.tensor([6]), mask, "local_mean")
    kept = d[0, mask[0]]
    positions = torch.nonzero(mask[0]).squeeze(1)
    expected = [int(positions[i]) for i in brute_force_herding(kept, 6, "local_mean")]
    assert order[0].tolist() == expected
    assert not selected[~mask].any()


def test_centered_gram_matches_explicit_centering():
    gen = torch.Generator().manual_seed(1)
    d = torch.randn(2, 6, 4, generator=gen, dtype=torch.float64)
    mask = torch.ones(2, 6, dtype=torch.bool)
    e = d - d.mean(1, keepdim=True)
    torch.testing.assert_close(centered_gram(gram(d), mask, "local_mean"), gram(e))


@pytest.mark.parametrize(("rho", "beta", "center"), [(0.5, 0.2, "zero"), (0.3, 0.0, "local_mean"), (0.8, 0.5, "zero")])
def test_reaggregate_equals_definition(rho, beta, center):
    gen = torch.Generator().manual_seed(7)
    d = torch.randn(4, 10, 12, generator=gen, dtype=torch.float64) + 0.3
    batched = reaggregate(d, rho=rho, beta=beta, center=center)
    for c in range(4):
        expected = brute_force_ecgr(d[c], rho, beta, center)
        torch.testing.assert_close(batched[c], expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(reaggregate(d[c], rho=rho, beta=beta, center=center), batched[c])


def test_reaggregate_preserves_the_norm_of_the_plain_delta():
    gen = torch.Generator().manual_seed(11)
    d = torch.randn(5, 20, 30, generator=gen, dtype=torch.float64)
    out = reaggregate(d)
    torch.testing.assert_close(out.norm(dim=1), d.sum(1).norm(dim=1), rtol=1e-12, atol=0)
    assert not torch.allclose(out, d.sum(1))  # it did change the direction


@pytest.mark.parametrize(("rho", "beta"), [(0.5, 1.0), (1.0, 0.2), (1.0, 0.0)])
def test_reaggregate_reduces_to_the_plain_delta_exactly(rho, beta):
    d = torch.randn(3, 7, 5, generator=torch.Generator().manual_seed(2))
    assert torch.equal(reaggregate(d, rho=rho, beta=beta), d.sum(1))


def test_reaggregate_rejects_bad_input():
    with pytest.raises(FedsimError, match="rho"):
        reaggregate(torch.ones(3, 2), rho=0.0)
    with pytest.raises(FedsimError, match="beta"):
        reaggregate(torch.ones(3, 2), beta=1.5)
    with pytest.raises(FedsimError, match="center"):
        reaggregate(torch.ones(3, 2), center="middle")
    with pytest.raises(FedsimError, match="shape"):
        reaggregate(torch.ones(3))


def test_selection_and_keep_counts():
    units = torch.tensor([0, 1, 3, 10, 100])
    assert selection_count(0.5, units).tolist() == [0, 1, 1, 5, 50]
    assert selection_count(0.29, torch.tensor([100])).tolist() == [29]  # floor(0.29 * 100) despite rounding
    assert keep_count(0.5, units).tolist() == [0, 1, 2, 5, 50]
    assert keep_count(0.3, torch.tensor([10])).tolist() == [3]


# ------------------------------------------------------------------------------------------ trajectory


def _stacked(seed=0, clients=3):
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(clients, 4, 3, generator=gen), "b": torch.randn(clients, 3, generator=gen)}


@pytest.mark.parametrize(
    "spec",
    [
        TrajectorySpec(),
        TrajectorySpec(dtype=torch.float16),
        TrajectorySpec(dtype=torch.bfloat16),
        TrajectorySpec(device="cpu"),
    ],  # fmt: skip
)
def test_trajectory_gram_and_combine(spec, monkeypatch):
    import fedsim.engine.trajectory as tmod

    monkeypatch.setattr(tmod, "BLOCK_BYTES", 3 * 5 * 4 * 4)  # force several column blocks
    traj = Trajectory(_stacked(), 5, spec)
    units = [_stacked(seed) for seed in range(1, 6)]
    for u, tree in enumerate(units):
        traj.write(u, tree, torch.tensor([True, True, u < 3]))
    flat = torch.stack([flatten(t) for t in units], dim=1)  # [C, U, D]
    stored = flat.to(spec.dtype or torch.float32).float()
    assert torch.equal(traj.units.float(), stored)
    torch.testing.assert_close(traj.gram(), gram(stored).double(), rtol=1e-5, atol=1e-5)
    coeffs = torch.rand(3, 5, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(traj.combine(coeffs), (coeffs[:, :, None] * stored).sum(1), rtol=1e-5, atol=1e-5)
    assert traj.mask[2].tolist() == [True, True, True, False, False]
    back = traj.unflatten(flat[:, 0])
    assert torch.equal(back["w"], units[0]["w"]) and torch.equal(back["b"], units[0]["b"])
    assert traj.nbytes == 3 * 5 * 15 * (2 if spec.dtype in (torch.float16, torch.bfloat16) else 4)


def test_regulators_reduce_to_the_plain_delta_bit_for_bit():
    """ECGR with beta = 1 or rho = 1 and BHerd (step units, sum) with ratio 1 upload T itself."""
    traj = Trajectory(_stacked(), 6)
    for u in range(6):
        traj.write(u, _stacked(u + 1))
    deltas = _stacked(42)
    for regulator in (ECGR(beta=1.0), ECGR(rho=1.0), BHerd(ratio=1.0)):
        out, stats = regulator.regulate(deltas, traj, torch.full((3,), 6))
        for k in deltas:
            assert torch.equal(out[k], deltas[k])
        assert torch.equal(stats["damped_norm_fraction"], torch.zeros(3))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_narrow_storage_survives_a_decayed_learning_rate(dtype):
    """Step deltas of a late round (lr 2e-6) would underflow float16; stored divided by the learning rate they
    give the same ECGR upload as float32 storage, to storage precision."""
    from fedsim.core.protocol import ClientAlgorithm
    from fedsim.engine.trainer import VectorizedTrainer
    from fedsim.models import build_model
    from fedsim.optim import make_optimizer
    from strategies import compose

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 5, generator=gen), torch.randint(0, 3, (60,), generator=gen)
    model = build_model("mlp", (5,), 3, seed=1, hidden=(16,))
    params = {k: v.detach() for k, v in model.named_parameters()}
    index = torch.randint(0, 60, (4, 10, 8), generator=gen)
    mask = torch.ones(4, 10, 8, dtype=torch.bool)
    trainer = VectorizedTrainer(model)
    sgd = make_optimizer("sgd", momentum=0.9)
    uploads = {}
    for name, storage in (("exact", "float32"), ("narrow", dtype)):
        algorithm = compose(ClientAlgorithm(), ECGR(trajectory_dtype=storage))
        uploads[name] = flatten(trainer.train(params, x, y, index, mask, sgd, 2e-6, algorithm).deltas)
    assert uploads["exact"].abs().max() < 1e-4  # tiny steps: below float16's normal range per step
    rel = (uploads["narrow"] - uploads["exact"]).norm(dim=1) / uploads["exact"].norm(dim=1)
    assert rel.max() < (2e-3 if dtype == "float16" else 2e-2)
