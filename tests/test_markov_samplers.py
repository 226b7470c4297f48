"""Markov-chain samplers: transition laws, chain structure, state across rounds and chunks, spectral gaps
against brute-force eigen-decompositions, config/CLI plumbing, end-to-end runs and resume."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.config import make_config
from fedsim.core.errors import FedsimError
from fedsim.data import markov
from fedsim.data.samplers import (
    IIDSampler,
    MarkovRegularSampler,
    MarkovRingSampler,
    ShuffleSampler,
    make_sampler,
)
from fedsim.simulation import make_simulation, resume, simulate

KEY = "markov_position"


def chain(batches, c):
    """Client c's consumed chain states in order (steps, then slots within a step)."""
    return batches.positions[c][batches.mask[c]]


def rounds(sampler, sizes, n_rounds, *, ids=None, steps=None, epochs=None, batch_size=4, seed=0, state=None):
    """Sample ``n_rounds`` consecutive rounds threading the state; returns every client's full path and the state."""
    ids = np.arange(len(sizes)) if ids is None else np.asarray(ids)
    paths = [[] for _ in sizes]
    for r in range(1, n_rounds + 1):
        b, state = sampler.sample(
            seed, r, ids, np.asarray(sizes), steps=steps, epochs=epochs, batch_size=batch_size, state=state
        )
        for c in range(len(sizes)):
            paths[c].append(chain(b, c))
    return [np.concatenate(p) for p in paths], state


def brute_gap(p):
    """1 - second largest |eigenvalue| by a general (non-symmetric) eigen-solver; 1 for a 1x1 matrix."""
    if len(p) == 1:
        return 1.0
    mods = np.sort(np.abs(np.linalg.eigvals(p)))
    return 1.0 - mods[-2]


# ----------------------------------------------------------------------------------------------- transitions


def test_ring_transition_frequencies_match_laziness():
    laziness, n = 0.3, 50
    paths, _ = rounds(MarkovRingSampler(laziness), [n] * 8, 2, steps=250, batch_size=4)
    d = np.concatenate([np.diff(p) % n for p in paths])
    assert set(np.unique(d)) <= {0, 1, n - 1}
    assert len(d) == 8 * (2 * 1000 - 1)
    assert np.mean(d == 0) == pytest.approx(laziness, abs=0.02)
    assert np.mean(d == 1) == pytest.approx((1 - laziness) / 2, abs=0.02)
    assert np.mean(d == n - 1) == pytest.approx((1 - laziness) / 2, abs=0.02)


def test_regular_empirical_transitions_match_matrix():
    sampler, n = MarkovRegularSampler(degree=4, laziness=0.25), 6
    paths, _ = rounds(sampler, [n], 1, steps=5000, batch_size=6, seed=3)
    path = paths[0]
    counts = np.zeros((n, n))
    np.add.at(counts, (path[:-1], path[1:]), 1)
    empirical = counts / counts.sum(1, keepdims=True)
    np.testing.assert_allclose(empirical, sampler.transition_matrix(n, client_id=0, seed=3), atol=0.03)


@pytest.mark.parametrize("epochs", [None, 2])
def test_consecutive_states_are_chain_edges_across_rounds(epochs):
    sizes = [1, 2, 7, 33, 60]
    steps = None if epochs else 9
    ring_paths, _ = rounds(MarkovRingSampler(0.2), sizes, 3, steps=steps, epochs=epochs, batch_size=5)
    for n, p in zip(sizes, ring_paths, strict=True):
        assert set(np.unique(np.diff(p) % n)) <= {0, 1, n - 1}
    regular = MarkovRegularSampler(degree=6, laziness=0.1)
    reg_paths, _ = rounds(regular, sizes, 3, steps=steps, epochs=epochs, batch_size=5, seed=7)
    for c, (n, p) in enumerate(zip(sizes, reg_paths, strict=True)):
        allowed = regular.transition_matrix(n, client_id=c, seed=7) > 0
        assert allowed[p[:-1], p[1:]].all()


def test_lazy_free_ring_alternates_parity():
    paths, _ = rounds(MarkovRingSampler(0.0), [10, 24, 2], 3, steps=7, batch_size=3)
    for p in paths:
        assert (np.diff(p) % 2 == 1).all()


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 30), min_size=1, max_size=5),
    batch=st.integers(1, 6),
    steps=st.integers(1, 5),
    epochs=st.one_of(st.none(), st.integers(1, 2)),
    name=st.sampled_from(["markov-ring", "markov-regular"]),
)
def test_positions_in_range_and_full_batches(sizes, batch, steps, epochs, name):
    sizes = np.array(sizes)
    b, state = make_sampler(name).sample(1, 1, np.arange(len(sizes)) * 2, sizes, steps=steps, epochs=epochs,
                                         batch_size=batch)  # fmt: skip
    expected_steps = epochs * -(-sizes // batch) if epochs else np.full(len(sizes), steps)
    for c, n in enumerate(sizes):
        assert (b.positions[c] >= 0).all() and (b.positions[c] < n).all()
        assert b.mask[c].all(axis=1).sum() == expected_steps[c]  # every step a full batch of B chain states
        assert (b.mask[c].any(axis=1) == b.mask[c].all(axis=1)).all()
    assert state[KEY].tolist()[::2] == [chain(b, c)[-1] for c in range(len(sizes))]
    assert (state[KEY][1::2] == -1).all()  # clients never sampled have not started


# ------------------------------------------------------------------------------------------- state and chunks


@pytest.mark.parametrize("name", ["markov-ring", "markov-regular"])
def test_chunk_size_and_order_independence(name):
    sizes = np.array([5, 17, 3, 40, 1, 9, 28, 12, 6, 2])
    ids = np.arange(10)
    kw = dict(steps=4, epochs=None, batch_size=3)
    whole, whole_state = None, None
    for r in (1, 2):
        whole, whole_state = make_sampler(name).sample(2, r, ids, sizes, state=whole_state, **kw)
    sampler, state = make_sampler(name), None
    for r in (1, 2):
        parts = {}
        for chunk in (slice(6, 10), slice(0, 6)):  # two chunks, the later clients first
            parts[chunk.start], state = sampler.sample(2, r, ids[chunk], sizes[chunk], state=state, **kw)
    np.testing.assert_array_equal(np.concatenate([parts[0].positions, parts[6].positions]), whole.positions)
    np.testing.assert_array_equal(state[KEY], whole_state[KEY])


def test_round_two_continues_where_round_one_ended():
    sampler, sizes = MarkovRingSampler(0.0), np.array([11, 20])
    kw = dict(steps=3, epochs=None, batch_size=2)
    first, state = sampler.sample(5, 1, np.array([0, 3]), sizes, **kw)
    starts = markov.start_positions(5, np.array([0, 3]), sizes)
    np.testing.assert_array_equal(first.positions[:, 0, 0], starts)  # a fresh chain consumes its uniform start
    assert state[KEY].tolist() == [first.positions[0, -1, -1], -1, -1, first.positions[1, -1, -1]]
    second, state2 = sampler.sample(5, 2, np.array([0, 3]), sizes, state=state, **kw)
    step = (second.positions[:, 0, 0] - first.positions[:, -1, -1]) % sizes
    assert ((step == 1) | (step == sizes - 1)).all()  # one transition on from the last state (laziness 0)
    assert state[KEY][0] == first.positions[0, -1, -1]  # the input state is not modified in place
    restarted, _ = sampler.sample(5, 2, np.array([0, 3]), sizes, **kw)
    np.testing.assert_array_equal(restarted.positions[:, 0, 0], starts)  # without state the chain starts afresh
    assert not np.array_equal(restarted.positions, second.positions)


def test_state_that_does_not_fit_the_data_is_refused():
    with pytest.raises(FedsimError, match="does not match"):
        MarkovRingSampler().sample(0, 1, np.array([0]), np.array([4]), steps=1, epochs=None, batch_size=2,
                                   state={KEY: np.array([9])})  # fmt: skip


# ------------------------------------------------------------------------------------------------ spectral gap


def explicit_ring(n, a):
    p = np.zeros((n, n))
    for j in range(n):
        p[j, j] += a
        p[j, (j + 1) % n] += (1 - a) / 2
        p[j, (j - 1) % n] += (1 - a) / 2
    return p


@pytest.mark.parametrize("laziness", [0.0, 0.3, 0.5, 0.9])
def test_ring_gap_closed_form_matches_brute_force(laziness):
    sizes = np.arange(1, 26)
    sampler = MarkovRingSampler(laziness)
    gaps = sampler.spectral_gaps(sizes, np.arange(len(sizes)), 0)
    for n, gap in zip(sizes, gaps, strict=True):
        p = explicit_ring(n, laziness)
        np.testing.assert_allclose(sampler.transition_matrix(n), p)
        assert gap == pytest.approx(brute_gap(p), abs=1e-9), n
    assert gaps[0] == 1.0  # n = 1: no second eigenvalue
    assert gaps[1] == pytest.approx(1 - abs(2 * laziness - 1))  # n = 2: eigenvalues 1, 2a - 1
    if laziness == 0:
        assert (gaps[1::2] == 0).all()  # even n without laziness: periodic, no mixing


def test_regular_matrix_symmetric_doubly_stochastic_and_gap():
    sizes = np.array([1, 2, 5, 30, 120])
    for degree, laziness in ((2, 0.0), (4, 0.0), (4, 0.5), (8, 0.2)):
        sampler = MarkovRegularSampler(degree=degree, laziness=laziness)
        gaps = sampler.spectral_gaps(sizes, np.arange(len(sizes)), 11)
        for c, n in enumerate(sizes):
            p = sampler.transition_matrix(n, client_id=c, seed=11)
            np.testing.assert_allclose(p, p.T)
            np.testing.assert_allclose(p.sum(0), 1.0)
            np.testing.assert_allclose(p.sum(1), 1.0)
            assert (np.diag(p) >= laziness - 1e-12).all()
            assert gaps[c] == pytest.approx(brute_gap(p), abs=1e-9)
        if degree >= 4:
            assert gaps[-1] > 0.05  # an expander: the gap stays away from 0


def test_regular_graph_is_built_from_permutations_and_per_client():
    table = markov.regular_neighbours(4, np.array([2, 9]), np.array([7, 13]), 6)
    client9 = table[7:]
    for r in range(3):
        sigma, inverse = client9[:, 2 * r], client9[:, 2 * r + 1]
        assert sorted(sigma) == list(range(13))
        np.testing.assert_array_equal(inverse[sigma], np.arange(13))
    np.testing.assert_array_equal(client9, markov.regular_neighbours(4, np.array([9]), np.array([13]), 6))
    assert not np.array_equal(client9, markov.regular_neighbours(5, np.array([9]), np.array([13]), 6))


def test_sparse_gap_matches_dense():
    for degree, laziness in ((4, 0.0), (6, 0.3), (2, 0.0)):
        table = markov.regular_neighbours(1, np.array([0]), np.array([300]), degree)
        dense = markov.regular_spectral_gap(table, laziness)
        assert markov.regular_spectral_gap(table, laziness, dense_max=10) == pytest.approx(dense, abs=1e-7)


def test_mixing_time_bound_and_iid_special_case():
    bound = markov.mixing_time(np.array([0.5, 1.0]), np.array([10, 3]))
    np.testing.assert_allclose(bound, [np.log(40) / 0.5, np.log(12)])
    assert markov.mixing_time(0.0, 10) == np.inf
    assert (IIDSampler().spectral_gaps(np.array([3, 9]), np.arange(2), 0) == 1).all()
    report = markov.chain_report(MarkovRingSampler(0.5), np.array([4, 10]), 0)
    slow = 1 - (0.5 + 0.5 * np.cos(2 * np.pi / 10))
    assert report["sampler_spectral_gap"] == pytest.approx(slow)
    assert report["sampler_mixing_time"] == pytest.approx(np.log(40) / slow)
    assert markov.chain_report(ShuffleSampler(), np.array([4]), 0) == {
        "sampler_spectral_gap": None, "sampler_mixing_time": None,
    }  # fmt: skip


# --------------------------------------------------------------------------------------------- config and CLI


def test_sampler_options_from_config():
    assert make_config({"sampler": "markov-ring"}).sampler.options == {"laziness": 0.5}  # defaults resolved
    assert make_config({"sampler": "markov-ring", "sampler.laziness": 0.2}).sampler.options == {"laziness": 0.2}
    cfg = make_config({"sampler": {"name": "markov-regular", "degree": 6}})
    assert cfg.sampler.name == "markov-regular" and cfg.sampler.options == {"degree": 6, "laziness": 0.0}
    assert make_config({"sampler": "shuffle"}).sampler.options == {}
    assert make_sampler("markov-regular", degree=6, laziness=0.1).degree == 6


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"sampler.laziness": 0.5},
         "sampler 'shuffle' has no option 'laziness' ('laziness' is an option of sampler 'markov-ring', "
         "sampler 'markov-regular')"),
        ({"sampler": "iid", "sampler.degree": 6},
         "sampler 'iid' has no option 'degree' ('degree' is an option of sampler 'markov-regular')"),
        ({"sampler": "markov-ring", "sampler.degree": 6}, "('degree' is an option of sampler 'markov-regular')"),
        ({"sampler": "markov-regular", "sampler.degree": 5}, "degree must be an even integer"),
        ({"sampler": "markov-regular", "sampler.degree": 0}, "sampler 'markov-regular', option 'degree'"),
        ({"sampler": "markov-ring", "sampler.laziness": 1.0}, "sampler 'markov-ring', option 'laziness'"),
        ({"sampler": "markov-ring", "sampler.laziness": -0.1}, "sampler 'markov-ring', option 'laziness'"),
        ({"sampler": "markov-rng"}, "did you mean 'markov-ring'"),
        ({"sampler": "markov-ring", "laziness": 0.5}, "config key 'laziness' is now 'sampler.laziness'"),
        ({"sampler": "markov-regular", "markov_degree": 6}, "config key 'markov_degree' is now 'sampler.degree'"),
    ],
)  # fmt: skip
def test_config_errors(values, message):
    with pytest.raises(FedsimError) as err:
        make_config(values)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_constructor_errors():
    with pytest.raises(FedsimError, match="even integer"):
        MarkovRegularSampler(degree=3)
    with pytest.raises(FedsimError, match="laziness"):
        MarkovRingSampler(laziness=1.0)
    with pytest.raises(FedsimError, match="no training samples"):
        MarkovRingSampler().sample(0, 1, np.array([0]), np.array([0]), steps=1, epochs=None, batch_size=1)


def test_cli_list_and_flag_errors(cli):
    code, out, _ = cli(["list"])
    assert code == 0 and "markov-ring" in out and "markov-regular" in out
    code, _, err = cli(["simulate", "--laziness", "0.4", "--quiet", "--rounds", "1"])
    assert code == 2 and "sampler 'shuffle' has no option 'laziness'" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------- end to end

SMALL = dict(dataset="digits", clients=8, rounds=3, local_steps=3, batch_size=8, lr=0.1, model="logreg")


def test_cli_federated_markov_ring_reports_gap(tmp_path, cli):
    out = tmp_path / "run"
    argv = ["simulate", "--clients", "8", "--rounds", "3", "--local-steps", "3", "--batch-size", "8", "--quiet",
            "--model", "logreg", "--set", "sampler=markov-ring", "--laziness", "0.25", "--out", str(out)]  # fmt: skip
    code, _, err = cli(argv)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    sim = make_simulation(make_config({**SMALL, "sampler": {"name": "markov-ring", "laziness": 0.25}}))
    gaps = markov.ring_spectral_gaps(sim.store.sizes, 0.25)
    assert summary["sampler_spectral_gap"] == pytest.approx(gaps.min())
    assert summary["sampler_mixing_time"] == pytest.approx(markov.mixing_time(gaps, sim.store.sizes).max())
    assert summary["rounds_completed"] == 3 and summary["final_test_accuracy"] is not None


def test_decentralized_markov_ring_over_topology():
    config = {k: v for k, v in SMALL.items() if k != "clients"}  # the graph's 16 nodes are the clients
    summary = simulate({**config, "topology": "experiments/topologies/ring16.graphml", "sampler": "markov-ring"})
    assert summary["num_clients"] == 16 and summary["rounds_completed"] == 3
    assert 0 < summary["sampler_spectral_gap"] < 0.01  # ring over ~100 samples: gap of order 1/n^2
    assert summary["sampler_mixing_time"] > 100


def metrics(path):
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("time_s")
    return rows


class Killed(Exception):
    """Stands in for the process being killed after a round was written."""


def kill_at(round_):
    def callback(record):
        if record["round"] == round_:
            raise Killed

    return callback


def test_resume_continues_the_chain(tmp_path):
    """Partial participation, chunks of 3 vs whole, kill after round 3, resume from the round-2 checkpoint (the
    chain state of the clients selected in rounds 1-2 must come back, and the graphs be rebuilt the same)."""
    config = {**SMALL, "fraction": 0.5, "checkpoint_every": 2, "sampler": "markov-regular", "sampler.laziness": 0.1}
    simulate({**config, "chunk_size": 3}, tmp_path / "full", plots=False)
    killed = tmp_path / "killed"
    with pytest.raises(Killed):
        simulate(config, killed, plots=False, on_round=kill_at(3))
    assert [r["round"] for r in metrics(killed)] == [1, 2, 3]
    summary = resume(killed, plots=False)
    full = metrics(tmp_path / "full")
    assert metrics(killed) == full
    full_summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["sampler_spectral_gap"] == full_summary["sampler_spectral_gap"] > 0
