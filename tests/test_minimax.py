"""Decentralized SGDA on min-max problems: the problems' closed forms against brute force, the descent-ascent
client against a hand-written step, feasibility of the dual, and end-to-end runs."""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import functional_call

from fedsim.config import make_config
from fedsim.core.errors import FedsimError
from fedsim.minimax import (
    AUCMaximization,
    DescentAscentClient,
    RobustLogisticRegression,
    auc_score,
    project_simplex,
)
from fedsim.simulation import make_simulation, simulate

RING = str(Path(__file__).resolve().parents[1] / "experiments" / "topologies" / "ring16.graphml")


def test_project_simplex_matches_bisection_reference():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(50, 7, generator=g, dtype=torch.float64) * 2
    p = project_simplex(v)
    assert torch.all(p >= 0) and torch.allclose(p.sum(-1), torch.ones(50, dtype=torch.float64))
    for row, out in zip(v, p, strict=True):  # reference: theta solves sum max(v - theta, 0) = 1 (bisection)
        lo, hi = float(row.min()) - 1, float(row.max())
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if float((row - mid).clamp_min(0).sum()) > 1 else (lo, mid)
        assert torch.allclose(out, (row - lo).clamp_min(0), atol=1e-10)
    inside = torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64)
    assert torch.equal(project_simplex(inside), inside)


def test_auc_score_is_the_pairwise_probability_with_ties_half():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=40).astype(float)  # many ties
    positive = rng.random(40) < 0.4
    pairs = [(s, t) for s, t in itertools.product(scores[positive], scores[~positive])]
    brute = np.mean([1.0 if s > t else 0.5 if s == t else 0.0 for s, t in pairs])
    assert auc_score(scores, positive) == pytest.approx(brute, abs=1e-12)
    assert auc_score(scores, np.zeros(40, bool)) is None


def data(n=200, d=5, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def linear(d, out):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(d, out))


def test_auc_objective_inner_max_is_the_closed_form():
    x, y = data()
    problem = AUCMaximization(positive_classes=[1, 3])
    problem.fit(y, 4)
    assert problem.p == pytest.approx(float(((y == 1) | (y == 3)).float().mean()))
    model = problem.wrap(linear(5, 1))
    params = {k: v.detach().double() for k, v in model.named_parameters()}
    model = model.double()
    best = max(problem.objective(model, {**params, "alpha": torch.tensor(a, dtype=torch.float64)}, x.double(), y)
               for a in np.linspace(-5, 5, 20001))  # fmt: skip
    assert problem.max_dual(model, params, x.double(), y) == pytest.approx(best, abs=1e-6)


def test_dro_inner_max_beats_every_point_of_the_simplex_and_gap_is_nonnegative():
    x, y = data()
    problem = RobustLogisticRegression(lam=0.5)
    problem.fit(y, 4)
    model = problem.wrap(linear(5, 4)).double()
    params = {k: v.detach().double() for k, v in model.named_parameters()}
    x = x.double()
    value = problem.max_dual(model, params, x, y)
    samples = torch.distributions.Dirichlet(torch.ones(4, dtype=torch.float64)).sample((3000,))
    vertices = torch.eye(4, dtype=torch.float64)
    for q in torch.cat([samples, vertices]):
        assert problem.objective(model, {**params, "q": q}, x, y) <= value + 1e-9
    # the per-sample objective averages to sum_k q_k L_k - lambda/2 ||q - 1/K||^2 with training priors
    q = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    losses = problem.class_losses(model, params, x, y)
    exact = float((q * losses).sum() - 0.25 * ((q - 0.25) ** 2).sum())
    assert problem.objective(model, {**params, "q": q}, x, y) == pytest.approx(exact, abs=1e-10)
    assert problem.primal_dual_gap(model, params, x, y) >= 0


def test_descent_ascent_client_descends_the_primal_and_ascends_the_dual():
    problem = RobustLogisticRegression()
    problem.fit(torch.arange(3), 3)
    client = DescentAscentClient(problem, ratio=2.0)
    grads = {"classifier.0.weight": torch.ones(2, 3, 4), "q": torch.ones(2, 3)}
    out = client.grad_transform(grads, {}, None)
    assert torch.equal(out["classifier.0.weight"], grads["classifier.0.weight"])
    assert torch.equal(out["q"], -2.0 * grads["q"])
    projected = client.project({"q": torch.tensor([[2.0, 0.0, 0.0], [0.5, 0.5, 0.5]])})
    assert torch.allclose(projected["q"], torch.tensor([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]]))


def test_one_local_step_is_the_hand_written_sgda_step():
    cfg = make_config(dict(topology=RING, strategy="dsgda", model="logreg", local_steps=1, lr=0.05,
                          **{"strategy.dual_lr": 0.2}))  # fmt: skip
    sim = make_simulation(cfg)
    state = sim.initial_state()
    from fedsim.core.protocol import Plan

    updates = sim.executor.train(Plan(np.arange(16)), sim.init_params, 1, 0.05, start=state.params)
    batch, _ = sim.executor.sampler.sample(0, 1, np.array([5]), sim.store.sizes[[5]], steps=1, epochs=None,
                                           batch_size=32)  # fmt: skip
    idx = sim.store.global_index(np.array([5]), batch.positions)[0, 0]
    leaves = {k: v[5].clone().requires_grad_(True) for k, v in state.params.items()}
    loss = sim.task.problem.loss(functional_call(sim.model, leaves, (sim.store.x[idx],)), sim.store.y[idx]).mean()
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))
    for k, g in grads.items():
        expected = -0.2 * g if k == "alpha" else 0.05 * g  # delta = x - x_new: ascent on alpha at eta_y
        assert torch.allclose(updates.deltas[k][5], expected, atol=1e-6), k


def read(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_auc_maximization_over_a_ring_learns_and_closes_the_gap(tmp_path):
    simulate(dict(topology=RING, strategy="dsgda-atc", model="logreg", rounds=30, local_steps=5, lr=0.02,
                  eval_every=10), tmp_path / "auc", plots=False)  # fmt: skip
    rows = [r for r in read(tmp_path / "auc") if r["test_accuracy"] is not None]
    assert rows[-1]["test_auc"] > 0.9
    assert 0 <= rows[-1]["primal_dual_gap"] < 0.5 * rows[0]["primal_dual_gap"]
    for key in ("generalization_gap", "node_generalization_gap", "consensus_distance", "node_accuracy_mean"):
        assert rows[-1][key] is not None


@pytest.mark.parametrize("strategy", ["dsgda", "dsgda-atc"])
def test_robust_logistic_regression_keeps_every_dual_on_the_simplex(strategy):
    cfg = make_config(dict(topology=RING, strategy={"name": strategy, "dual_lr": 0.5},
                           problem={"name": "dro", "lam": 0.1}, model="logreg", local_steps=3, lr=0.05))  # fmt: skip
    assert cfg.strategy.get("dual_lr") == 0.5 and cfg.problem.options == {"lam": 0.1}
    sim = make_simulation(cfg)
    state = sim.initial_state()
    for r in range(1, 6):
        state, _ = sim.round(r, state)
        q = state.params["q"]
        assert torch.all(q >= 0) and torch.allclose(q.sum(1), torch.ones(16), atol=1e-5)
    record = sim.evaluate_state(state)
    assert 0 <= record["worst_class_accuracy"] <= record["test_accuracy"]
    assert record["primal_dual_gap"] >= 0
    # the dual moved toward the hardest classes (uniform start, lambda small)
    assert float(q.mean(0).max()) > 1 / 10 + 0.01


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"strategy": "dsgd", "problem": "dro"}, "applies to the min-max strategies"),
        (
            {"strategy": "dsgda", "problem": "dro", "problem.positive_classes": [1]},
            r"problem 'dro' has no option 'positive_classes' \('positive_classes' is an option of problem 'auc'\)",
        ),
        (
            {"strategy": "dsgda", "problem": {"name": "auc", "lam": 2.0}},
            r"problem 'auc' has no option 'lam' \('lam' is an option of problem 'dro'\)",
        ),
        ({"strategy": "dsgda", "problem.lam": 2.0}, r"problem 'auc' has no option 'lam'"),
        ({"strategy": "dsgda", "optimizer": "adam", "strategy.dual_lr": 0.1}, "dual_lr needs the sgd optimizer"),
        ({"strategy": "dsgda", "optimizer.weight_decay": 0.1}, "weight_decay is not supported"),
        ({"strategy": "dsgda", "problem": "hinge"}, "unknown problem 'hinge'"),
        ({"strategy": "dsgda", "dro_lambda": 2.0}, "config key 'dro_lambda' is now 'problem.lam'"),
        ({"strategy": "dsgda", "dual_lr": 0.1}, "config key 'dual_lr' is now 'strategy.dual_lr'"),
    ],
)
def test_minimax_config_errors(values, message):
    with pytest.raises(FedsimError, match=message) as err:
        make_config({"topology": RING, **values})
    assert "\n" not in str(err.value)


def test_positive_classes_out_of_range_is_refused():
    with pytest.raises(FedsimError, match="positive_classes"):
        make_simulation(
            make_config(dict(topology=RING, strategy="dsgda", problem={"name": "auc", "positive_classes": [12]}))
        )


def test_cli_runs_dsgda_and_plots_the_gap(cli, tmp_path):
    out = tmp_path / "dro"
    code, _, err = cli(["simulate", "--topology", RING, "--strategy", "dsgda-atc", "--problem", "dro", "--dual-lr",
                        "0.2", "--rounds", "2", "--local-steps", "2", "--quiet", "--out", str(out)])  # fmt: skip
    assert code == 0, err
    last = read(out)[-1]
    assert last["primal_dual_gap"] >= 0 and last["worst_class_accuracy"] is not None
    assert (out / "convergence.png").is_file() and (out / "consensus.png").is_file()
    code, _, err = cli(["simulate", "--topology", RING, "--problem", "dro", "--out", str(tmp_path / "bad")])
    assert code == 2 and err.count("\n") == 1 and "min-max strategies" in err
    assert not (tmp_path / "bad").exists()
