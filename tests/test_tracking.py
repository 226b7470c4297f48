"""Gradient tracking (dsgt): the tracking invariant, the first round, and exact convergence where D-SGD is biased."""

import json
from pathlib import Path

import pytest
import torch

import topologies
from fedsim.simulation import resume, simulate
from strategies import DSGD, DSGT, gossip_matrix

RING = str(Path(__file__).resolve().parents[1] / "experiments" / "topologies" / "ring16.graphml")


def random_tree(m, seed):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(m, 3, 2, generator=g, dtype=torch.float64), "b": torch.randn(m, generator=g).double()}


def random_mixing(m, seed):
    graph = topologies.build("erdos_renyi", m, p=0.4, seed=seed)
    return topologies.mixing_matrix(graph)


def test_tracker_mean_equals_mean_direction_for_any_doubly_stochastic_w():
    m, lr = 7, 0.3
    x, dsgt = random_tree(m, 0), DSGT()
    state = dsgt.init(x)
    for t in range(5):
        w = gossip_matrix(random_mixing(m, t), torch.device("cpu"), torch.float64)
        deltas = random_tree(m, 100 + t)
        x, state = dsgt.update(w, x, deltas, lr, state)
        for k in x:
            assert torch.allclose(state[f"y.{k}"].mean(0), (deltas[k] / lr).mean(0), atol=1e-12)
            assert torch.allclose(state[f"g.{k}"], deltas[k] / lr)


def test_first_round_is_dsgd_and_later_rounds_match_the_recursion():
    m, lr = 5, 0.1
    w_np = random_mixing(m, 3)
    w = gossip_matrix(w_np, torch.device("cpu"), torch.float64)
    x0, d0, d1 = random_tree(m, 1), random_tree(m, 2), random_tree(m, 3)
    dsgt = DSGT()
    x1, state = dsgt.update(w, x0, d0, lr, dsgt.init(x0))
    expected = DSGD().step(w, x0, d0)
    assert all(torch.allclose(x1[k], expected[k]) for k in x0)
    x2, _ = dsgt.update(w, x1, d1, lr, state)
    wt = torch.as_tensor(w_np)
    for k in x0:  # brute force: y1 = W y0 + g1 - g0, x2 = W x1 - lr y1, with y0 = g0
        flat = lambda t: t.reshape(m, -1)  # noqa: E731
        y0, g0, g1 = flat(d0[k]) / lr, flat(d0[k]) / lr, flat(d1[k]) / lr
        y1 = wt @ y0 + g1 - g0
        assert torch.allclose(flat(x2[k]), wt @ flat(x1[k]) - lr * y1, atol=1e-12)


def test_dsgt_converges_exactly_on_heterogeneous_quadratics_where_dsgd_is_biased():
    """f_i(x) = ||x - b_i||^2 / 2 on a ring: the minimizer of the average is mean(b). D-SGD at a constant step
    stalls at an O(eta) distance; gradient tracking reaches it to machine precision."""
    m, lr = 16, 0.05
    w = gossip_matrix(topologies.mixing_matrix(topologies.build("ring", m)), torch.device("cpu"), torch.float64)
    b = torch.randn(m, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    errors = {}
    for strategy in (DSGT(), DSGD()):
        x = {"w": torch.zeros(m, 5, dtype=torch.float64)}
        state = strategy.init(x)
        for _ in range(2000):
            x, state = strategy.update(w, x, {"w": lr * (x["w"] - b)}, lr, state)
        errors[strategy.name] = float((x["w"] - b.mean(0)).norm())
    assert errors["dsgt"] < 1e-10
    assert errors["dsgd"] > 1.0


def test_dsgt_run_resumes_exactly(tmp_path):
    """The tracker and previous directions live in the checkpoint: a killed run resumes to the same numbers."""
    config = dict(topology=RING, strategy="dsgt", rounds=5, local_steps=2, batch_size=16, lr=0.05, checkpoint_every=2)
    full = simulate(config, tmp_path / "full", plots=False)

    def stop(record):
        if record["round"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        simulate(config, tmp_path / "cut", plots=False, on_round=stop)
    resumed = resume(tmp_path / "cut", plots=False)
    assert resumed["final_test_accuracy"] == full["final_test_accuracy"]
    assert resumed["final_train_loss"] == full["final_train_loss"]
    assert metrics(tmp_path / "cut") == metrics(tmp_path / "full")


def metrics(path):
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("time_s")
    return rows
