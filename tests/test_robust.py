"""Robust aggregators and GAF against numpy / brute-force oracles; FedNova's normalizer against closed forms."""

import math

import numpy as np
import pytest
import torch

from fedsim.core.errors import FedsimError
from fedsim.core.protocol import ClientUpdates
from strategies import GAF, Krum, Median, TrimmedMean, build_strategy, make_aggregator
from strategies.fednova import general_norm
from strategies.gaf import GAFClientFilter, gaf_fold
from strategies.robust import coordinate_median, krum, krum_scores, trimmed_mean


def _stack(seed, clients=7, dim=11):
    return torch.randn(clients, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("clients", [1, 2, 5, 6])
def test_coordinate_median_is_numpy_median(clients):
    flat = _stack(clients, clients)
    np.testing.assert_allclose(coordinate_median(flat).numpy(), np.median(flat.numpy(), axis=0), rtol=0, atol=1e-15)


@pytest.mark.parametrize(("clients", "fraction"), [(10, 0.1), (10, 0.25), (7, 0.2), (5, 0.0)])
def test_trimmed_mean_drops_b_per_side(clients, fraction):
    flat = _stack(3, clients).numpy()
    b = math.floor(fraction * clients)
    expected = np.sort(flat, axis=0)[b : clients - b].mean(0)
    np.testing.assert_allclose(trimmed_mean(torch.tensor(flat), fraction).numpy(), expected, rtol=1e-12)


def test_trimmed_mean_that_leaves_nothing_is_an_error():
    trimmed_mean(_stack(0, 3), 0.49)  # b = 1 of 3: one left
    with pytest.raises(FedsimError, match="leaves no update"):
        trimmed_mean(_stack(0, 2), 0.5)
    with pytest.raises(FedsimError, match=r"fraction must be in \[0, 0\.5\), got 0\.5"):
        TrimmedMean(0.5)
    with pytest.raises(FedsimError, match=r"aggregator 'trimmed_mean', option 'fraction': .*less than 0\.5"):
        make_aggregator("trimmed_mean", fraction=0.5)


def test_krum_against_brute_force():
    flat = _stack(5, 8)
    flat[2] += 10.0  # an outlier
    f = 2
    n = flat.shape[0]
    scores = []
    for i in range(n):
        d = sorted(float(((flat[i] - flat[j]) ** 2).sum()) for j in range(n) if j != i)
        scores.append(sum(d[: n - f - 2]))
    torch.testing.assert_close(krum_scores(flat, f), torch.tensor(scores, dtype=torch.float64))
    best = int(np.argmin(scores))
    assert torch.equal(krum(flat, f, 1), flat[best])
    top3 = np.argsort(scores, kind="stable")[:3]
    torch.testing.assert_close(krum(flat, f, 3), flat[top3].mean(0))
    assert 2 not in top3
    with pytest.raises(FedsimError, match="needs at least 5 clients per round, got 4"):
        krum(flat[:4], 2, 1)
    with pytest.raises(FedsimError, match="needs at least 9 clients"):
        krum(flat, 0, 9)


def test_gaf_fold_against_the_loop_and_skip_rule():
    units = _stack(9, 6).unsqueeze(0)
    tau = 0.9
    fold, agreed = gaf_fold(units, tau)
    g, count = units[0, 0].clone(), 0
    for j in range(1, 6):
        cos = float(g @ units[0, j] / (g.norm() * units[0, j].norm()))
        if 1 - cos <= tau:
            g, count = (g + units[0, j]) / 2, count + 1
    torch.testing.assert_close(fold[0], g)
    assert int(agreed[0]) == count
    # server: nothing agrees -> zero update; a single client -> its own update
    opposite = torch.stack([torch.ones(4), -torch.ones(4)]).double()
    tree = {"w": opposite}
    assert torch.equal(GAF(0.5)(tree, torch.ones(2))["w"], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(GAF(0.5)({"w": opposite[:1]}, torch.ones(1))["w"], opposite[0])


def test_gaf_client_filter_masks_empty_microbatches_and_reports_skips():
    grads = {"w": torch.tensor([[[1.0, 0.0], [1.0, 0.1], [5.0, 5.0]], [[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]]])}
    counts = torch.tensor([[2.0, 2.0, 0.0], [2.0, 2.0, 2.0]])
    out, keep = GAFClientFilter(tau=0.5, microbatches=3).combine_microbatches(grads, counts)
    torch.testing.assert_close(out["w"][0], torch.tensor([1.0, 0.05]))  # the empty third slice never joins
    assert keep.tolist() == [True, False]  # client 1: nothing agreed -> the step is skipped
    # a single non-empty slice (a client smaller than the batch) has nothing to disagree with: the step is taken
    single = {"w": torch.tensor([[[1.0, 2.0], [0.0, 0.0], [0.0, 0.0]]])}
    out, keep = GAFClientFilter(tau=0.5, microbatches=3).combine_microbatches(single, torch.tensor([[3.0, 0, 0]]))
    assert keep.tolist() == [True] and torch.equal(out["w"][0], torch.tensor([1.0, 2.0]))


def test_aggregators_through_the_strategy_reduce():
    deltas = {"w": _stack(1, 5, 6).reshape(5, 2, 3), "b": _stack(2, 5, 2)}
    flat = torch.cat([deltas["w"].reshape(5, -1), deltas["b"]], 1)
    updates = ClientUpdates(
        np.arange(5), deltas, torch.tensor([1.0, 1, 1, 1, 6], dtype=torch.float64), torch.full((5,), 3),
        torch.zeros(5), lr=0.1, num_clients=5,
    )  # fmt: skip
    params = {"w": torch.zeros(2, 3, dtype=torch.float64), "b": torch.zeros(2, dtype=torch.float64)}
    for aggregator, expected in (
        (Median(), coordinate_median(flat)),
        (TrimmedMean(0.2), trimmed_mean(flat, 0.2)),
        (Krum(1, 2), krum(flat, 1, 2)),
    ):
        strategy = build_strategy("fedavg", aggregator=aggregator)
        new = strategy.aggregate(1, strategy.init(params), updates)
        got = torch.cat([-new.params["w"].reshape(-1), -new.params["b"]])
        torch.testing.assert_close(got, expected)
    assert make_aggregator("mean") is None
    with pytest.raises(FedsimError, match="unknown aggregator"):
        make_aggregator("medain")


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("mu", [0.0, 0.1])
def test_fednova_general_norm_closed_forms_and_brute_force(rho, mu):
    lr, taus = 0.05, torch.tensor([1, 3, 10])
    got = general_norm(taus, lr, rho, mu)
    for i, tau in enumerate(taus.tolist()):
        # brute force: local SGD (heavy ball, proximal term) on a constant gradient g = 1 from e = 0
        e, b = 0.0, 0.0
        for _ in range(tau):
            b = rho * b + 1.0 + mu * e
            e -= lr * b
        assert float(got[i]) == pytest.approx(-e / lr, rel=1e-12)
        if mu == 0.0:
            expected = tau if rho == 0 else sum((1 - rho**j) / (1 - rho) for j in range(1, tau + 1))
            assert float(got[i]) == pytest.approx(expected, rel=1e-12)
        elif rho == 0.0:
            assert float(got[i]) == pytest.approx(sum((1 - lr * mu) ** j for j in range(tau)), rel=1e-12)
    if rho == 0.0 and mu == 0.0:
        assert got.tolist() == [1.0, 3.0, 10.0]  # exactly the step counts


def test_fednova_unequal_steps_hand_computed():
    strategy = build_strategy("fednova")
    params = {"w": torch.zeros(2, dtype=torch.float64)}
    deltas = {"w": torch.tensor([[2.0, 0.0], [0.0, 8.0]], dtype=torch.float64)}
    sizes = torch.tensor([1.0, 3.0], dtype=torch.float64)
    up = ClientUpdates(np.arange(2), deltas, sizes, torch.tensor([2, 8]), torch.zeros(2), lr=0.1)
    new = strategy.aggregate(1, strategy.init(params), up)
    tau_eff = 0.25 * 2 + 0.75 * 8
    direction = 0.25 * np.array([1.0, 0.0]) + 0.75 * np.array([0.0, 1.0])
    np.testing.assert_allclose(new.params["w"].numpy(), -tau_eff * direction)
