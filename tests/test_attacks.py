"""Byzantine attacks (fedsim.attacks) and the new robust aggregators (centered clipping, RFA, sign vote): the
vectorized attacks against per-client loops written here, the Byzantine set, label flipping in the store,
runs with attacks (chunk size, rows), and one-line refusals."""

from __future__ import annotations

import json
from statistics import NormalDist

import numpy as np
import pytest
import torch

from fedsim.attacks import ALIE, IPM, Gaussian, MinMax, MinSum, SignFlip, alie_z, byzantine_clients
from fedsim.config import make_config
from fedsim.simulation import make_simulation, simulate
from strategies.robust import centered_clipping, geometric_median, sign_vote

SMALL = dict(dataset="digits", clients=10, rounds=3, local_steps=3, batch_size=8, seed=5,
             model={"name": "mlp", "hidden": [16]}, checkpoint_every=0)  # fmt: skip


def stack(seed=0, s=10, d=7):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randn(s, d, generator=g, dtype=torch.float64)
    byzantine = torch.zeros(s, dtype=torch.bool)
    byzantine[[1, 4, 8]] = True
    return flat, byzantine


def honest_loop(flat, byzantine):
    """Mean and population std of the honest rows, one client at a time."""
    rows = [flat[i] for i in range(len(flat)) if not byzantine[i]]
    mean = sum(rows) / len(rows)
    var = sum((r - mean) ** 2 for r in rows) / len(rows)
    return rows, mean, var.sqrt()


def test_the_byzantine_set_is_a_pure_function_of_the_seed():
    a, b = byzantine_clients(100, 0.2, seed=3), byzantine_clients(100, 0.2, seed=3)
    assert len(a) == 20 and (a == b).all() and (np.diff(a) > 0).all()
    assert not (byzantine_clients(100, 0.2, seed=4) == a).all()
    assert len(byzantine_clients(7, 0.0, seed=3)) == 0


def test_model_attacks_equal_a_per_client_loop():
    flat, byz = stack()
    rows, mean, std = honest_loop(flat, byz)
    expected = {
        "sign_flip": lambda i: -2.0 * flat[i],
        "ipm": lambda i: -0.5 * mean,
        "alie": lambda i: mean - alie_z(10, 3) * std,
    }
    attacks = {"sign_flip": SignFlip(0.3, scale=2.0), "ipm": IPM(0.3, eps=0.5), "alie": ALIE(0.3)}
    for name, attack in attacks.items():
        out = attack.malicious(flat, byz, seed=0, round_=1)
        for i in range(len(flat)):
            want = expected[name](i) if byz[i] else flat[i]
            torch.testing.assert_close(out[i], want, rtol=1e-12, atol=1e-12)


def search_loop(rows, mean, direction, fits):
    """The paper's halving search for gamma, written out."""
    gamma, step, best = 10.0, 5.0, 0.0
    while abs(best - gamma) > 1e-5:
        if fits(mean + gamma * direction):
            best, gamma = gamma, gamma + step
        else:
            gamma -= step
        step /= 2
    return mean + best * direction


@pytest.mark.parametrize("perturbation", ["std", "unit", "sign"])
def test_minmax_and_minsum_equal_their_search_written_per_client(perturbation):
    flat, byz = stack(1)
    rows, mean, std = honest_loop(flat, byz)
    direction = {"std": -std, "unit": -mean / mean.norm(), "sign": -torch.sign(mean)}[perturbation]
    pair = max(float((a - b).norm()) for a in rows for b in rows)
    spread = max(sum(float((a - b).norm()) ** 2 for b in rows) for a in rows)
    fits_max = lambda m: max(float((m - r).norm()) for r in rows) <= pair  # noqa: E731
    fits_sum = lambda m: sum(float((m - r).norm()) ** 2 for r in rows) <= spread  # noqa: E731
    for attack, fits in ((MinMax(0.3, perturbation), fits_max), (MinSum(0.3, perturbation), fits_sum)):
        out = attack.malicious(flat, byz, seed=0, round_=2)
        want = search_loop(rows, mean, direction, fits)
        for i in np.flatnonzero(byz.numpy()):
            torch.testing.assert_close(out[i], want, rtol=1e-9, atol=1e-9)
        assert torch.equal(out[~byz], flat[~byz])
        assert not torch.equal(want, mean)  # the search moved away from the mean


def test_gaussian_is_seeded_by_seed_and_round_and_leaves_honest_rows():
    flat, byz = stack(2)
    a = Gaussian(0.3, std=2.0).malicious(flat, byz, seed=1, round_=3)
    b = Gaussian(0.3, std=2.0).malicious(flat, byz, seed=1, round_=3)
    c = Gaussian(0.3, std=2.0).malicious(flat, byz, seed=1, round_=4)
    assert torch.equal(a, b) and not torch.equal(a, c) and torch.equal(a[~byz], flat[~byz])
    assert 1.0 < float(a[byz].std()) < 3.0


def test_alie_z_is_the_papers_formula():
    assert alie_z(50, 10) == pytest.approx(NormalDist().inv_cdf((50 - (26 - 10)) / 50))


def test_label_flip_relabels_only_the_byzantine_training_samples():
    config = make_config({**SMALL, "attack": {"name": "label_flip", "fraction": 0.3}})
    clean = make_simulation(make_config(SMALL)).store
    store = make_simulation(config).store
    byzantine = byzantine_clients(10, 0.3, 5)
    for c in range(10):
        rows = store.order[store.offsets[c] : store.offsets[c + 1]]
        if c in byzantine:
            assert torch.equal(store.y[rows], 9 - clean.y[rows])
        else:
            assert torch.equal(store.y[rows], clean.y[rows])
    assert torch.equal(store.y[store.test_order], clean.y[store.test_order])


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("attack", ["sign_flip", "alie", "minmax", "label_flip"])
def test_runs_under_attack_are_chunk_independent_and_report_byzantine_clients(tmp_path, attack):
    config = {**SMALL, "attack": {"name": attack, "fraction": 0.3}, "aggregator": "median"}
    simulate(config, tmp_path / "auto", plots=False)
    simulate({**config, "chunk_size": 1}, tmp_path / "one", plots=False)
    rows, ones = metrics(tmp_path / "auto"), metrics(tmp_path / "one")
    for a, b in zip(rows, ones, strict=True):
        a.pop("time_s"), b.pop("time_s")
        assert a == b
    assert all(r["byzantine"] == 3 for r in rows)  # every client selected: all 3 Byzantine ones
    assert rows[-1]["honest_accuracy"] == rows[-1]["test_accuracy"]


def test_a_model_attack_changes_what_the_server_aggregates(tmp_path):
    clean = simulate(SMALL, tmp_path / "clean", plots=False)
    flipped = simulate({**SMALL, "attack": {"name": "sign_flip", "fraction": 0.4, "scale": 5.0}}, tmp_path / "f",
                       plots=False)  # fmt: skip
    assert flipped["final_test_accuracy"] < clean["final_test_accuracy"]


def test_centered_clipping_rfa_and_sign_vote():
    flat, _ = stack(3)
    # a radius no update reaches and one iteration from zero: the plain mean
    torch.testing.assert_close(centered_clipping(flat, 1e9, 1, torch.zeros(7, dtype=torch.float64)), flat.mean(0))
    # a tiny radius moves the start by at most tau per iteration
    start = flat.median(0).values
    moved = centered_clipping(flat, 1e-3, 2, start) - start
    assert float(moved.norm()) <= 2e-3 + 1e-12
    w = torch.full((10,), 0.1, dtype=torch.float64)
    z = geometric_median(flat, w, 200, 1e-12)
    objective = lambda p: float((flat - p).norm(dim=1).sum())  # noqa: E731
    for trial in range(20):
        shifted = z + 1e-3 * torch.randn(7, generator=torch.Generator().manual_seed(trial), dtype=torch.float64)
        assert objective(z) <= objective(shifted) + 1e-12
    assert objective(z) < objective(flat.mean(0))
    same = torch.ones(4, 3)
    torch.testing.assert_close(geometric_median(same, torch.full((4,), 0.25), 5, 1e-6), torch.ones(3))
    votes = torch.tensor([[1.0, -2.0, 0.5], [2.0, -1.0, -0.5], [-3.0, 1.0, -0.1]])
    assert sign_vote(votes, 0.1).tolist() == pytest.approx([0.1, -0.1, -0.1])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--attack", "sign_flip", "--set", "attack.fraction=0.5"], "fraction"),
        (["--attack", "ipm", "--strategy", "fedbuff"], "is asynchronous"),
        (["--attack", "alie", "--backend", "flower"], "--backend flower runs federated fedsim strategies"),
        (["--attack", "alie", "--set", "attack.z=x"], "attack"),
        (["--attack", "lable_flip"], "label_flip"),
    ],
)
def test_bad_attacks_exit_2_in_one_line(tmp_path, cli, flags, message):
    code, _, err = cli(["simulate", "--rounds", "1", "--clients", "4", "--quiet", "--out", str(tmp_path / "r"),
                        *flags])  # fmt: skip
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_attacks_over_a_topology_are_refused(tmp_path):
    import networkx as nx

    from fedsim.core.errors import FedsimError

    path = tmp_path / "ring.edgelist"
    nx.write_edgelist(nx.cycle_graph(4), path, data=False)
    with pytest.raises(FedsimError, match="'attack' applies to federated strategies"):
        make_config({"topology": str(path), "clients": 4, "attack": "sign_flip"})


def test_the_backdoor_trigger_and_its_poisoned_share():
    from fedsim.attacks import Backdoor, stamp

    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    stamped = stamp(x, 2)
    assert (stamped[..., -2:, -2:] == x.max()).all() and torch.equal(stamped[..., :2, :], x[..., :2, :])
    flat = torch.zeros(3, 16)
    assert (stamp(flat, 2).view(3, 4, 4)[:, -2:, -2:] == 0).all()  # the max of zeros: still 0
    ones = torch.rand(3, 16)
    assert torch.equal(stamp(ones, 2).view(3, 4, 4)[:, -2:, -2:], torch.full((3, 2, 2), float(ones.max())))
    rows = torch.arange(10, 30)
    chosen = Backdoor(0.2, poison=0.25).poison_rows(rows, seed=1)
    assert len(chosen) == 5 and set(chosen.tolist()) <= set(rows.tolist())


def test_a_backdoor_succeeds_where_the_clean_model_does_not(tmp_path):
    from fedsim.attacks import Backdoor

    config = {**SMALL, "rounds": 6, "attack": {"name": "backdoor", "fraction": 0.3, "target": 3}}
    simulate(config, tmp_path / "bd", plots=False)
    rows = metrics(tmp_path / "bd")
    assert all(r["attack_success_rate"] is not None for r in rows)
    clean = make_simulation(make_config({**SMALL, "rounds": 6}))
    state = clean.initial_state()
    for r in range(1, 7):
        state, _ = clean.round(r, state)
    clean_rate = Backdoor(0.3, target=3).success_rate(clean.predictor(state), clean.x_test, clean.y_test)
    assert rows[-1]["attack_success_rate"] > clean_rate + 0.3
