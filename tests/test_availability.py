"""Markov client availability (federated mode): chain statistics, purity, selection among the available
clients, rounds without clients, resume, config and CLI."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsim.availability import MarkovAvailability
from fedsim.config import make_config
from fedsim.core import components, rng
from fedsim.core.errors import FedsimError
from fedsim.simulation import make_simulation, resume, simulate
from strategies import build_strategy, select_clients

RING = str(Path(__file__).resolve().parents[1] / "experiments" / "topologies" / "ring16.graphml")
# 20 clients, p_on = 0.05, p_off = 1, seed 0: available counts per round 1..8 are 1, 1, 0, 0, 1, 2, 1, 0.
SPARSE = dict(dataset="digits", clients=20, local_steps=2, batch_size=16, lr=0.1,
              availability={"name": "markov", "p_on": 0.05, "p_off": 1.0})  # fmt: skip
SPARSE_COUNTS = [1, 1, 0, 0, 1, 2, 1, 0]


def metrics(path):
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("time_s")
    return rows


def history(chain: MarkovAvailability, rounds: int, n: int) -> np.ndarray:
    """States [rounds, n] (bool)."""
    return np.stack([chain.states(r, n) for r in range(1, rounds + 1)])


# ---------------------------------------------------------------------------------------------------------
# The chain
# ---------------------------------------------------------------------------------------------------------


def test_matches_scalar_reference():
    """The vectorized, cached chain equals a per-client scalar simulation with the same counter uniforms."""
    p_on, p_off, seed, n, rounds = 0.3, 0.6, 7, 13, 12
    expected = np.zeros((rounds, n), dtype=bool)
    for i in range(n):
        on = float(rng.uniform(seed, rng.STREAM_AVAILABILITY, 1, i)) < p_on / (p_on + p_off)
        expected[0, i] = on
        for r in range(2, rounds + 1):
            u = float(rng.uniform(seed, rng.STREAM_AVAILABILITY, r, i))
            on = (u >= p_off) if on else (u < p_on)
            expected[r - 1, i] = on
    got = history(MarkovAvailability(p_on, p_off, seed), rounds, n)
    np.testing.assert_array_equal(got, expected)
    chain = MarkovAvailability(p_on, p_off, seed)
    for r in range(1, rounds + 1):
        np.testing.assert_array_equal(chain.available(r, n), np.flatnonzero(expected[r - 1]))


def test_stationary_fraction_transitions_and_autocorrelation():
    p_on, p_off, n, rounds = 0.2, 0.3, 2000, 200
    chain = MarkovAvailability(p_on, p_off, seed=3)
    s = history(chain, rounds, n)
    pi = p_on / (p_on + p_off)
    assert chain.stationary_on == pytest.approx(0.4)
    assert s.mean() == pytest.approx(pi, abs=0.01)
    assert s[0].mean() == pytest.approx(pi, abs=0.04)  # round 1 is drawn from the stationary law
    assert np.abs(s.mean(axis=1) - pi).max() < 0.06  # stationary every round (std per round ~0.011)
    prev, nxt = s[:-1], s[1:]
    assert (prev & ~nxt).sum() / prev.sum() == pytest.approx(p_off, abs=0.01)
    assert (~prev & nxt).sum() / (~prev).sum() == pytest.approx(p_on, abs=0.01)
    x = s.astype(float) - pi
    lam = chain.second_eigenvalue
    assert lam == pytest.approx(0.5)
    for k in (1, 2, 3):
        corr = (x[:-k] * x[k:]).mean() / (pi * (1 - pi))
        assert corr == pytest.approx(lam**k, abs=0.02)


def test_mean_period_lengths():
    p_on, p_off = 0.25, 0.5
    chain = MarkovAvailability(p_on, p_off, seed=1)
    s = history(chain, 400, 500)
    on_runs, off_runs = [], []
    for col in s.T:
        edges = np.flatnonzero(np.diff(col.astype(int))) + 1
        pieces = np.split(col, edges)[1:-1]  # drop the censored first and last runs
        on_runs += [len(p) for p in pieces if p[0]]
        off_runs += [len(p) for p in pieces if not p[0]]
    assert chain.expected_on_duration == 2.0 and chain.expected_off_duration == 4.0
    assert np.mean(on_runs) == pytest.approx(1 / p_off, rel=0.03)
    assert np.mean(off_runs) == pytest.approx(1 / p_on, rel=0.03)


def test_pure_function_of_seed_and_round():
    n = 50
    reference = MarkovAvailability(0.3, 0.2, seed=5)
    sequential = [reference.available(r, n) for r in range(1, 21)]
    fresh = MarkovAvailability(0.3, 0.2, seed=5)
    np.testing.assert_array_equal(fresh.available(17, n), sequential[16])  # straight to round 17
    np.testing.assert_array_equal(fresh.available(4, n), sequential[3])  # an earlier round afterwards
    np.testing.assert_array_equal(reference.available(9, n), sequential[8])  # re-query from the cache
    # a client's chain does not depend on how many clients there are
    np.testing.assert_array_equal(MarkovAvailability(0.3, 0.2, 5).states(12, 20), reference.states(12, n)[:20])
    np.testing.assert_array_equal(reference.available(3, n), sequential[2])  # after switching N back
    other_seed = MarkovAvailability(0.3, 0.2, seed=6)
    assert any(not np.array_equal(other_seed.available(r, n), sequential[r - 1]) for r in range(1, 21))


def test_p_on_p_off_one_alternates():
    chain = MarkovAvailability(1.0, 1.0, seed=2)
    s = history(chain, 10, 30)
    assert chain.stationary_on == 0.5 and chain.second_eigenvalue == -1.0
    assert 0 < s[0].sum() < 30
    for r in range(1, 10):
        np.testing.assert_array_equal(s[r], ~s[r - 1])


@pytest.mark.parametrize("p_on, p_off", [(0.0, 0.5), (0.5, 0.0), (1.5, 0.5), (0.5, -0.1), (float("nan"), 0.5)])
def test_invalid_probabilities(p_on, p_off):
    with pytest.raises(FedsimError, match="must be in"):
        MarkovAvailability(p_on, p_off, 0)


def test_make_availability():
    assert components.build("availability", "always", seed=0) is None
    assert isinstance(components.build("availability", {"name": "markov", "p_on": 0.5}, seed=0), MarkovAvailability)
    with pytest.raises(FedsimError, match="unknown availability 'markv'.*did you mean 'markov'"):
        components.build("availability", "markv", seed=0)
    with pytest.raises(FedsimError, match="rounds start at 1"):
        MarkovAvailability(0.5, 0.5, 0).available(0, 4)


# ---------------------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------------------


def _old_select_clients(num_clients, fraction, min_clients, seed, round_):
    """The selection before availability existed (kept verbatim as the reference)."""
    count = min(num_clients, max(min_clients, math.floor(fraction * num_clients + 0.5)))
    if count >= num_clients:
        return np.arange(num_clients)
    keys = rng.hash_keys(seed, rng.STREAM_SELECTION, round_, np.arange(num_clients))
    return np.sort(np.argsort(keys, kind="stable")[:count])


@pytest.mark.parametrize("n, fraction, min_clients", [(1, 1.0, 1), (10, 0.3, 1), (37, 0.1, 5), (100, 0.55, 2)])
def test_select_without_availability_unchanged(n, fraction, min_clients):
    for seed in (0, 9):
        for r in range(1, 6):
            old = _old_select_clients(n, fraction, min_clients, seed, r)
            np.testing.assert_array_equal(select_clients(n, fraction, min_clients, seed, r), old)
            np.testing.assert_array_equal(select_clients(n, fraction, min_clients, seed, r, None), old)
            np.testing.assert_array_equal(select_clients(n, fraction, min_clients, seed, r, np.arange(n)), old)


@pytest.mark.parametrize("fraction, min_clients", [(0.1, 1), (0.5, 1), (0.5, 4), (1.0, 1), (0.25, 30)])
def test_select_among_available(fraction, min_clients):
    n = 40
    chain = MarkovAvailability(0.4, 0.4, seed=4)
    for r in range(1, 15):
        avail = chain.available(r, n)
        got = select_clients(n, fraction, min_clients, 11, r, avail)
        expected = min(len(avail), max(min_clients, math.floor(fraction * len(avail) + 0.5)))
        assert len(got) == expected
        assert np.all(np.diff(got) > 0) and np.isin(got, avail).all()


def test_select_among_available_is_uniform_and_empty_ok():
    avail = np.array([2, 5, 6, 11, 17, 30])
    counts = np.zeros(40)
    rounds = 3000
    for r in range(1, rounds + 1):
        counts[select_clients(40, 0.5, 1, 0, r, avail)] += 1  # 3 of 6 each round
    assert counts.sum() == 3 * rounds and counts[np.setdiff1d(np.arange(40), avail)].sum() == 0
    np.testing.assert_allclose(counts[avail] / rounds, 0.5, atol=0.04)
    assert len(select_clients(40, 0.5, 3, 0, 1, np.array([], dtype=np.int64))) == 0


def test_strategy_configure_passes_available():
    strategy = build_strategy("fedadam", fraction=0.5)
    state = strategy.init({"w": torch.zeros(3)})
    avail = np.array([1, 4, 7, 8])
    plan = strategy.configure(3, state, 10, 0, available=avail)
    np.testing.assert_array_equal(plan.client_ids, select_clients(10, 0.5, 1, 0, 3, avail))
    np.testing.assert_array_equal(strategy.configure(3, state, 10, 0).client_ids, _old_select_clients(10, 0.5, 1, 0, 3))


# ---------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------


def test_simulate_with_markov_availability(tmp_path):
    config = dict(dataset="digits", clients=20, rounds=4, local_steps=2, batch_size=16, lr=0.1, fraction=0.5,
                  availability={"name": "markov", "p_on": 0.3, "p_off": 0.4}, seed=2)  # fmt: skip
    summary = simulate(config, tmp_path / "run", plots=False)
    rows = metrics(tmp_path / "run")
    chain = MarkovAvailability(0.3, 0.4, seed=2)
    for row in rows:
        a = len(chain.available(row["round"], 20))
        assert row["available_clients"] == a
        assert 0 < row["clients"] <= a and row["clients"] == min(a, max(1, math.floor(0.5 * a + 0.5)))
    assert summary["rounds_completed"] == 4 and summary["final_test_accuracy"] is not None
    plain = {**config, "availability": "always", "rounds": 1}
    simulate(plain, tmp_path / "plain", plots=False)
    assert "available_clients" not in metrics(tmp_path / "plain")[0]


def test_round_without_clients_keeps_the_model(tmp_path):
    assert [len(MarkovAvailability(0.05, 1.0, 0).available(r, 20)) for r in range(1, 9)] == SPARSE_COUNTS
    summary = simulate({**SPARSE, "rounds": 4, "strategy": "fedavgm"}, tmp_path / "run")  # plots on: None ok
    rows = metrics(tmp_path / "run")
    assert [r["available_clients"] for r in rows] == SPARSE_COUNTS[:4]
    assert [r["clients"] for r in rows] == SPARSE_COUNTS[:4]
    for r in rows[2:]:
        assert r["train_loss"] is None and r["drift"] is None and r["update_norm"] == 0.0
        assert r["bytes_up"] == r["bytes_down"] == 0
        assert r["test_accuracy"] == rows[1]["test_accuracy"] and r["test_loss"] == rows[1]["test_loss"]
    assert rows[1]["update_norm"] > 0  # fedavgm's momentum would move the model if the round were not skipped
    assert summary["final_train_loss"] == rows[1]["train_loss"] and not summary["diverged"]


def test_round_without_clients_returns_the_same_state(monkeypatch):
    sim = make_simulation(make_config({**SPARSE, "rounds": 2, "availability.p_on": 0.5, "strategy": "fedadam"}))
    state = sim.initial_state()
    monkeypatch.setattr(sim.availability, "available", lambda r, n: np.array([], dtype=np.int64))
    monkeypatch.setattr(sim.executor, "train", lambda *a, **k: pytest.fail("no client should train"))
    new, record = sim.round(1, state)
    assert new is state
    assert record["clients"] == 0 and record["available_clients"] == 0 and record["train_loss"] is None


def test_resume_reproduces_uninterrupted_run(tmp_path):
    config = {**SPARSE, "rounds": 7, "checkpoint_every": 2, "strategy": "fedadam", "availability.p_on": 0.05}

    class Killed(Exception):
        pass

    def kill_at_5(record):
        if record["round"] == 5:
            raise Killed

    simulate(config, tmp_path / "full", plots=False)
    with pytest.raises(Killed):
        simulate(config, tmp_path / "killed", plots=False, on_round=kill_at_5)
    resume(tmp_path / "killed", plots=False)  # restarts at round 5 from the checkpoint after an empty round 4
    full = metrics(tmp_path / "full")
    assert metrics(tmp_path / "killed") == full
    assert [r["available_clients"] for r in full] == SPARSE_COUNTS[:7]


# ---------------------------------------------------------------------------------------------------------
# Config and CLI
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values, message",
    [
        ({"availability.p_on": 0.2}, "availability 'always' takes no options; got p_on"),
        ({"availability": {"name": "always", "p_off": 0.9}}, "availability 'always' takes no options; got p_off"),
        (
            {"availability": "markov", "topology": RING},
            "option 'availability' applies to federated strategies, not to decentralized training",
        ),
        ({"availability": "markov", "availability.p_on": 0.0}, "availability 'markov', option 'p_on'"),
        ({"availability": "markov", "availability.p_off": 1.5}, "availability 'markov', option 'p_off'"),
        ({"availability": "sometimes"}, "unknown availability 'sometimes'"),
        ({"availability_p_on": 0.2}, "config key 'availability_p_on' is now 'availability.p_on'"),
    ],
)
def test_config_errors(values, message):
    with pytest.raises(FedsimError, match=message) as err:
        make_config(values)
    assert "\n" not in str(err.value)


def test_config_accepts_markov():
    cfg = make_config({"availability": "markov", "availability.p_on": 1.0, "availability.p_off": 0.25})
    assert (cfg.availability.name, cfg.availability.get("p_on"), cfg.availability.get("p_off")) == ("markov", 1.0, 0.25)
    cfg = make_config({"availability": {"name": "markov", "p_on": 1.0, "p_off": 0.25}})
    assert (cfg.availability.name, cfg.availability.options) == ("markov", {"p_on": 1.0, "p_off": 0.25})


def test_cli_flag(tmp_path, cli):
    out = tmp_path / "run"
    argv = ["simulate", "--clients", "6", "--rounds", "2", "--local-steps", "2", "--quiet", "--out", str(out)]
    code, stdout, err = cli([*argv, "--availability", "markov", "--set", "availability.p_on=0.9"])
    assert code == 0, err
    assert "availability:\n  name: markov\n  p_on: 0.9\n" in (out / "config.yaml").read_text()
    assert all("available_clients" in r for r in metrics(out))
    code, _, err = cli([*argv[:-1], str(tmp_path / "other"), "--set", "availability.p_on=0.9"])
    assert code == 2 and "availability 'always' takes no options; got p_on" in err
    assert len(err.strip().splitlines()) == 1
