"""Samplers: chunk independence, epoch coverage, masks for small clients, determinism."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.core.errors import FedsimError
from fedsim.data.samplers import IIDSampler, ShuffleSampler, make_sampler, steps_per_client


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=6), batch=st.integers(1, 9), epochs=st.integers(1, 3))
def test_shuffle_epochs_are_permutations(sizes, batch, epochs):
    sizes = np.array(sizes)
    b, _ = ShuffleSampler().sample(3, 1, np.arange(len(sizes)) + 10, sizes, steps=None, epochs=epochs, batch_size=batch)
    spe = -(-sizes // batch)
    for c, n in enumerate(sizes):
        visited = b.positions[c][b.mask[c]]
        assert len(visited) == epochs * n
        for e in range(epochs):
            assert sorted(visited[e * n : (e + 1) * n]) == list(range(n))
        assert b.step_active[c].sum() == epochs * spe[c]


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=2, max_size=6), batch=st.integers(1, 9), steps=st.integers(1, 12))
def test_shuffle_steps_stream_and_chunk_independence(sizes, batch, steps):
    sizes = np.array(sizes)
    ids = np.arange(len(sizes)) * 3
    full, _ = ShuffleSampler().sample(5, 2, ids, sizes, steps=steps, epochs=None, batch_size=batch)
    for c in range(len(sizes)):
        alone, _ = ShuffleSampler().sample(
            5, 2, ids[c : c + 1], sizes[c : c + 1], steps=steps, epochs=None, batch_size=batch
        )
        np.testing.assert_array_equal(alone.positions[0], full.positions[c])
        np.testing.assert_array_equal(alone.mask[0], full.mask[c])
        per_step = min(batch, sizes[c])
        assert (full.mask[c].sum(axis=1) == per_step).all()
        stream = full.positions[c][full.mask[c]]
        n = sizes[c]
        for start in range(0, len(stream) - n + 1, n):  # every complete epoch of the stream is a permutation
            assert sorted(stream[start : start + n]) == list(range(n))


def test_iid_sampler_range_and_full_batches():
    sizes = np.array([1, 5, 100])
    b, _ = IIDSampler().sample(0, 1, np.arange(3), sizes, steps=50, epochs=None, batch_size=16)
    assert b.mask.all()
    for c, n in enumerate(sizes):
        assert b.positions[c].min() >= 0 and b.positions[c].max() < n
    assert len(np.unique(b.positions[2])) > 60  # covers the client's data


def test_sampling_depends_on_seed_and_round_only():
    s = ShuffleSampler()
    a, _ = s.sample(1, 1, np.array([4]), np.array([50]), steps=3, epochs=None, batch_size=8)
    b, _ = s.sample(1, 1, np.array([4]), np.array([50]), steps=3, epochs=None, batch_size=8)
    c, _ = s.sample(1, 2, np.array([4]), np.array([50]), steps=3, epochs=None, batch_size=8)
    d, _ = s.sample(2, 1, np.array([4]), np.array([50]), steps=3, epochs=None, batch_size=8)
    assert (a.positions == b.positions).all()
    assert not (a.positions == c.positions).all() and not (a.positions == d.positions).all()


def test_steps_per_client_and_errors():
    assert steps_per_client(np.array([10, 3]), None, 2, 4).tolist() == [6, 2]
    assert steps_per_client(np.array([10, 3]), 5, None, 4).tolist() == [5, 5]
    with pytest.raises(FedsimError):
        steps_per_client(np.array([3]), None, None, 4)
    with pytest.raises(FedsimError, match="did you mean 'shuffle'"):
        make_sampler("shufle")


@pytest.mark.parametrize("name", ["iid", "shuffle", "markov-ring", "markov-regular"])
@pytest.mark.parametrize("mode", [{"steps": 5, "epochs": None}, {"steps": None, "epochs": 2}])
def test_planned_samples_are_the_valid_batch_entries(name, mode):
    """The fast count (no batches drawn) equals the mask of the batches the sampler draws."""
    from fedsim.core import components
    from fedsim.data.samplers import planned_samples, sample_by_key

    sampler = components.make("sampler", name)
    ids, sizes = np.array([0, 3, 7, 9]), np.array([3, 8, 40, 17])
    keys = np.array([1, 2, 2, 5])
    fast = planned_samples(sampler, 0, keys, ids, sizes, batch_size=8, **mode)
    batches, _ = sample_by_key(sampler, 0, keys, ids, sizes, batch_size=8, **mode)
    assert fast.tolist() == batches.mask.sum(axis=(1, 2)).tolist()


@pytest.mark.parametrize("name", ["iid", "shuffle", "markov-ring", "markov-regular"])
@pytest.mark.parametrize("mode", [{"steps": 5, "epochs": None}, {"steps": None, "epochs": 2}])
def test_per_client_rounds_in_one_call_equal_one_call_per_round(name, mode):
    """A built-in sampler given one round per client draws what one call per round draws (the asynchronous
    engine trains clients of different rounds together)."""
    from fedsim.core import components

    sampler = components.make("sampler", name)
    ids, sizes, keys = np.array([0, 3, 7, 9, 12]), np.array([3, 8, 40, 17, 5]), np.array([1, 2, 2, 5, 1])
    state = {"markov_position": np.array([-1, -1, -1, 4, -1, -1, -1, 30, -1, -1, -1, -1, 2])}
    together, state_a = sampler.sample(0, keys, ids, sizes, batch_size=8, state=dict(state), **mode)
    for key in np.unique(keys):
        rows = np.flatnonzero(keys == key)
        alone, state = sampler.sample(0, int(key), ids[rows], sizes[rows], batch_size=8, state=state, **mode)
        width = alone.positions.shape[1]
        assert (together.mask[rows, :width] == alone.mask).all() and not together.mask[rows, width:].any()
        assert (
            np.where(alone.mask, together.positions[rows, :width], 0) == np.where(alone.mask, alone.positions, 0)
        ).all()
    if state_a is not None:
        assert (state_a["markov_position"] == state["markov_position"]).all()
