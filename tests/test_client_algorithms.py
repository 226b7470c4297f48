"""Host algorithms, regulators and filters inside the engine: vectorized equals the sequential reference,
and the special cases that must reduce to a known method do so."""

import dataclasses

import numpy as np
import pytest
import torch

from fedsim.config import make_config
from fedsim.simulation import make_simulation

BASE = dict(
    dataset="digits", clients=6, partition={"name": "dirichlet", "alpha": 0.3}, rounds=3, local_steps=4, batch_size=8,
    lr=0.05, seed=3, device="cpu", model={"name": "mlp", "hidden": [16]}, checkpoint_every=0,
)  # fmt: skip


def run(rounds=None, **overrides):
    """Final server state and per-round records of a small in-memory run."""
    cfg = make_config({**BASE, **overrides, **({"rounds": rounds} if rounds else {})})
    sim = make_simulation(cfg)
    state = sim.initial_state()
    records = []
    for r in range(1, cfg.rounds + 1):
        state, record = sim.round(r, state)
        records.append(record)
    return sim, state, records


def stacked(plan):
    """The plan with the uploads kept as a stack (tests read the per-client deltas)."""
    return dataclasses.replace(plan, reductions=None)


def assert_params_close(a, b, rtol=1e-5, atol=1e-6):
    for k in a.params:
        torch.testing.assert_close(a.params[k], b.params[k], rtol=rtol, atol=atol, msg=k)


def assert_params_equal(a, b):
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k]), k


CASES = [
    {"strategy": "fedavg"},
    {"strategy": "fedprox", "strategy.mu": 0.1},
    {"strategy": "scaffold"},
    {"strategy": "scaffold", "strategy.control": "gradient_mean"},
    {"strategy": "scaffold", "optimizer.momentum": 0.5, "strategy.correction": "gradient"},
    {"strategy": "scaffold", "optimizer.momentum": 0.9, "strategy.correction": "after_step"},
    {"strategy": "scaffold-m", "strategy.beta": 0.5},
    {"strategy": "scaffold-m", "strategy.beta": 0.5, "strategy.correction": "gradient"},
    {"strategy": "fednova"},
    {"strategy": "fednova", "strategy.form": "general", "optimizer.momentum": 0.9, "strategy.mu": 0.1},
    {"strategy": "feddyn", "strategy.alpha": 0.1},
    {"strategy": "fedcm", "strategy.beta": 0.5},
    {"strategy": "fedavg", "regulator": "ecgr"},
    {"strategy": "scaffold", "regulator": "ecgr", "optimizer.momentum": 0.9},
    {"strategy": "fednova", "regulator": "ecgr", "regulator.center": "local_mean"},
    {"strategy": "feddyn", "regulator": "ecgr", "regulator.rho": 0.25, "regulator.beta": 0.0},
    {"strategy": "fedcm", "regulator": "ecgr"},
    {"strategy": "fedprox", "regulator": "bherd"},
    {
        "strategy": "fedavg",
        "regulator": "bherd",
        "regulator.unit": "microbatch",
        "regulator.microbatches": 2,
        "regulator.scale": "rescale",
    },
    {"strategy": "fedavg", "regulator": "bherd", "regulator.unit": "sample", "regulator.ratio": 0.3},
    {"strategy": "fedavg", "client_filter": "gaf", "client_filter.microbatches": 2, "client_filter.tau": 1.0},
    {"strategy": "scaffold-m", "client_filter": "gaf", "client_filter.microbatches": 2, "client_filter.tau": 0.6},
    {"strategy": "scaffold", "strategy.weighting": "uniform", "fraction": 0.5},
    {"strategy": "scaffold", "aggregator": "median"},
    {"strategy": "fedavg", "aggregator": "trimmed_mean", "aggregator.fraction": 0.2},
    {"strategy": "fedavg", "aggregator": "krum", "aggregator.byzantine": 1, "aggregator.select": 2},
    {"strategy": "fedavg", "aggregator": "gaf", "aggregator.tau": 1.2},
    {
        "strategy": "fedavg",
        "regulator": "ecgr",
        "regulator.trajectory_dtype": "float16",
        "regulator.trajectory_device": "cpu",
    },
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_vectorized_matches_sequential(case):
    """Ragged clients (one local epoch each, partial participation): the vectorized engine (masked steps run
    on the active clients only) equals the per-client reference loop."""
    options = {"local_epochs": 1, "fraction": 0.7, **case}
    _, vec, vec_records = run(**options)
    _, seq, seq_records = run(sequential=True, **options)
    assert_params_close(vec, seq, rtol=1e-4, atol=1e-5)
    for k in vec.extras:
        torch.testing.assert_close(vec.extras[k], seq.extras[k], rtol=1e-4, atol=1e-4, msg=k)
    for a, b in zip(vec_records, seq_records, strict=True):
        for key in ("train_loss", "drift", "damped_norm_fraction"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize(
    "host",
    [
        dict(strategy="fedavg"),
        {"strategy": "fedprox", "strategy.mu": 0.1},
        {"strategy": "scaffold", "optimizer.momentum": 0.9},
        dict(strategy="fednova"),
        dict(strategy="feddyn"),
        dict(strategy="fedcm"),
    ],  # fmt: skip
    ids=lambda c: c["strategy"],
)
@pytest.mark.parametrize("neutral", [{"regulator.beta": 1.0}, {"regulator.rho": 1.0}], ids=["beta1", "rho1"])
def test_ecgr_neutral_settings_equal_the_host_exactly(host, neutral):
    _, plain, plain_records = run(**host)
    _, ecgr, ecgr_records = run(regulator="ecgr", **neutral, **host)
    assert_params_equal(plain, ecgr)
    for k in plain.extras:
        assert torch.equal(plain.extras[k], ecgr.extras[k]), k
    assert all(r["damped_norm_fraction"] == 0.0 for r in ecgr_records)


def test_ecgr_upload_has_the_plain_delta_norm_and_changes_the_model():
    sim, _, _ = run(rounds=1, strategy="fedavg")
    state = sim.initial_state()
    plain = sim.executor.train(stacked(sim.strategy.configure(1, state, 6, 3)), state.params, 1, 0.05)
    sim_e, _, _ = run(rounds=1, strategy="fedavg", regulator="ecgr", optimizer={"name": "sgd", "momentum": 0.9})
    sim_p, _, _ = run(rounds=1, strategy="fedavg", optimizer={"name": "sgd", "momentum": 0.9})
    state = sim_p.initial_state()
    plan = stacked(sim_p.strategy.configure(1, state, 6, 3))
    plain = sim_p.executor.train(plan, state.params, 1, 0.05)
    regulated = sim_e.executor.train(plan, state.params, 1, 0.05)
    from fedsim.core.pytree import flatten

    torch.testing.assert_close(flatten(regulated.deltas).norm(dim=1), flatten(plain.deltas).norm(dim=1))
    assert not torch.allclose(flatten(regulated.deltas), flatten(plain.deltas))
    assert (regulated.stats["damped_norm_fraction"] > 0).all()


def test_bherd_step_sum_with_ratio_one_is_the_host():
    _, plain, _ = run(strategy={"name": "fedprox", "mu": 0.1})
    _, herd, records = run(strategy={"name": "fedprox", "mu": 0.1}, regulator={"name": "bherd", "ratio": 1.0})
    assert_params_equal(plain, herd)


def test_bherd_rescale_multiplies_the_kept_sum():
    _, plain_sum, _ = run(rounds=1, strategy="fedavg", regulator={"name": "bherd", "ratio": 0.5})
    _, rescaled, _ = run(rounds=1, strategy="fedavg", regulator={"name": "bherd", "ratio": 0.5, "scale": "rescale"})
    _, init, _ = run(rounds=1, strategy="fedavg", lr=1e-12)  # (model unchanged: the initial params)
    # all clients take 4 steps and keep 2: the rescaled update is twice the summed one
    for k in plain_sum.params:
        d_sum = init.params[k] - plain_sum.params[k]
        d_rescaled = init.params[k] - rescaled.params[k]
        torch.testing.assert_close(d_rescaled, 2 * d_sum, rtol=1e-4, atol=1e-7)


def test_scaffold_first_round_with_zero_control_variates_is_fedavg():
    _, fedavg, _ = run(rounds=1, strategy="fedavg", optimizer={"name": "sgd", "momentum": 0.5})
    _, scaffold, _ = run(rounds=1, strategy="scaffold", optimizer={"name": "sgd", "momentum": 0.5})
    assert_params_equal(fedavg, scaffold)
    assert any(bool(v.abs().sum() > 0) for k, v in scaffold.extras.items() if k.startswith("c."))


def test_scaffold_correction_forms_agree_for_plain_sgd_and_differ_with_momentum():
    """After the step (authors' code, Flower's baseline) or inside the gradient: the same for plain SGD; with
    momentum the gradient form lets the momentum buffer amplify the correction."""
    _, after, _ = run(strategy={"name": "scaffold", "correction": "after_step"})
    _, inside, _ = run(strategy={"name": "scaffold", "correction": "gradient"})
    assert_params_close(after, inside, rtol=1e-5, atol=1e-6)
    _, after_m, _ = run(
        strategy={"name": "scaffold", "correction": "after_step"}, optimizer={"name": "sgd", "momentum": 0.9}
    )
    _, inside_m, _ = run(
        strategy={"name": "scaffold", "correction": "gradient"}, optimizer={"name": "sgd", "momentum": 0.9}
    )
    assert not torch.allclose(after_m.params["1.weight"], inside_m.params["1.weight"], atol=1e-4)


def test_scaffold_after_step_correction_by_hand():
    """One local SGD-momentum step of one client against the rule: w1 = w0 - eta buf - eta (c - c_k)."""
    from fedsim.core.protocol import LocalContext
    from strategies.scaffold import ScaffoldClient

    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(2, 3, generator=gen)}
    ctx = LocalContext({"w": torch.zeros(3)}, {"c.w": torch.randn(3, generator=gen)},
                       {"c.w": torch.randn(2, 3, generator=gen)}, lr=0.1)  # fmt: skip
    client = ScaffoldClient(correction="after_step")
    grads = {"w": torch.randn(2, 3, generator=gen)}
    assert torch.equal(client.grad_transform(grads, params, ctx)["w"], grads["w"])  # the optimizer sees g
    before = params["w"].clone()
    out = client.after_step({"w": before.clone()}, ctx)
    torch.testing.assert_close(out["w"], before - 0.1 * (ctx.broadcast["c.w"] - ctx.client_state["c.w"]))
    inside = ScaffoldClient(correction="gradient").grad_transform(grads, params, ctx)
    torch.testing.assert_close(inside["w"], grads["w"] - ctx.client_state["c.w"] + ctx.broadcast["c.w"])


def test_scaffold_client_state_stays_with_its_client():
    """With partial participation only the selected clients' control variates change, and they equal
    c_k - c + Delta_k / (K eta) computed from that round's updates."""
    sim, _, _ = run(rounds=1, strategy="scaffold", fraction=0.5)
    state = sim.initial_state()
    seen = []
    for r in (1, 2, 3):
        before = {k: v.clone() for k, v in sim.executor.client_state.items()}
        plan = stacked(sim.strategy.configure(r, state, 6, sim.config.seed))
        updates = sim.executor.train(plan, state.params, r, sim.lr(r))
        after = sim.executor.client_state
        chosen = set(plan.client_ids.tolist())
        for key, value in after.items():
            name = key[2:]
            for client in range(6):
                if client not in chosen:
                    assert torch.equal(value[client], before[key][client])
            for row, client in enumerate(plan.client_ids):
                expected = (
                    before[key][client]
                    - state.extras[key]
                    + updates.deltas[name][row] / (updates.num_steps[row] * sim.lr(r))
                )
                torch.testing.assert_close(value[client], expected, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(updates.extras[f"d{key}"][row], value[client] - before[key][client])
        seen.append(chosen)
        state = sim.strategy.aggregate(r, state, updates)
    assert len(set().union(*seen)) > len(seen[0])  # different clients over the rounds


def test_fednova_with_equal_step_counts_is_fedavg():
    _, fedavg, _ = run(strategy="fedavg", optimizer={"name": "sgd", "momentum": 0.9})
    for form in ("simplified", "general"):
        _, nova, _ = run(strategy={"name": "fednova", "form": form})
        _, plain, _ = run(strategy="fedavg")
        assert_params_close(nova, plain, rtol=1e-6, atol=1e-7)
    _, nova_m, _ = run(
        strategy="fednova", optimizer={"name": "sgd", "momentum": 0.9}
    )  # simplified: tau = K regardless of momentum
    assert_params_close(nova_m, fedavg, rtol=1e-6, atol=1e-7)


def test_fedcm_with_beta_one_is_fedavg_and_scaffold_m_is_scaffold():
    _, fedavg, _ = run(strategy="fedavg")
    _, fedcm, _ = run(strategy={"name": "fedcm", "beta": 1.0})
    assert_params_equal(fedavg, fedcm)
    _, scaffold, _ = run(strategy={"name": "scaffold", "control": "gradient_mean"})
    _, scaffold_m, _ = run(strategy={"name": "scaffold-m", "beta": 1.0})
    assert_params_equal(scaffold, scaffold_m)


def test_fedcm_momentum_is_the_mean_local_direction():
    sim, _, _ = run(rounds=1, strategy={"name": "fedcm", "beta": 0.3})
    state = sim.initial_state()
    plan = stacked(sim.strategy.configure(1, state, 6, 3))
    assert set(plan.broadcast) == {f"m.{k}" for k in state.params}
    updates = sim.executor.train(plan, state.params, 1, 0.05)
    new = sim.strategy.aggregate(1, state, updates)
    p = updates.weights
    for k, d in updates.deltas.items():
        expected = sum(p[i] * d[i] / (updates.num_steps[i] * 0.05) for i in range(len(p)))
        torch.testing.assert_close(new.extras[f"m.{k}"], expected.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(new.params[k], state.params[k] - sum(p[i] * d[i] for i in range(len(p))).float())


def test_feddyn_round_against_its_equations():
    sim, _, _ = run(rounds=1, strategy={"name": "feddyn", "alpha": 0.2}, fraction=0.5)
    state = sim.initial_state()
    for r in (1, 2):
        plan = stacked(sim.strategy.configure(r, state, 6, 3))
        h_before = {k: v[plan.client_ids].clone() for k, v in sim.executor.client_state.items()}
        updates = sim.executor.train(plan, state.params, r, 0.05)
        new = sim.strategy.aggregate(r, state, updates)
        for k, d in updates.deltas.items():
            theta = state.params[k] - d  # client models
            theta_bar = theta.mean(0)
            h = state.extras[f"h.{k}"] - 0.2 * (3 / 6) * (theta_bar - state.params[k])
            torch.testing.assert_close(new.extras[f"h.{k}"], h, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(new.params[k], theta_bar - h / 0.2, rtol=1e-5, atol=1e-5)
            h_k = sim.executor.client_state[f"h.{k}"][plan.client_ids]
            torch.testing.assert_close(h_k, h_before[f"h.{k}"] - 0.2 * (theta - state.params[k]), rtol=1e-5, atol=1e-6)
        state = new


def test_gaf_client_filter_that_always_agrees_is_plain_training():
    """Two microbatches of equal size always folded: (g1 + g2) / 2 is the whole batch's gradient."""
    _, plain, _ = run(strategy="fedavg")
    _, gaf, _ = run(strategy="fedavg", client_filter={"name": "gaf", "microbatches": 2, "tau": 2.0})
    assert_params_close(plain, gaf, rtol=1e-5, atol=1e-6)


def test_gaf_client_filter_that_never_agrees_skips_every_step():
    sim, state, records = run(rounds=1, strategy="fedavg", client_filter={"name": "gaf", "microbatches": 4, "tau": 0.0})
    init = sim.initial_state()
    assert_params_equal(init, state)
    assert records[0]["update_norm"] == 0.0


def test_oscillation_is_the_std_of_the_last_ten_evaluations():
    _, _, _ = run(rounds=1)
    from fedsim.simulation import oscillation

    history = [{"test_accuracy": v} for v in [0.1, None, 0.5, 0.2, 0.3, 0.9, 0.4, 0.6, 0.7, 0.8, 0.55]]
    latest = 0.65
    values = [0.5, 0.2, 0.3, 0.9, 0.4, 0.6, 0.7, 0.8, 0.55, 0.65]
    assert oscillation(history, latest) == pytest.approx(float(np.std(values)))
    assert oscillation([], 0.5) is None
    assert oscillation([{"test_accuracy": 0.4}], 0.6) == pytest.approx(0.1)


def test_scaffold_weighting_and_zero_step_clients():
    """Sample-weighted (default) or uniform means in both server updates; a client without a local step keeps
    its control variate."""
    import numpy as np

    from fedsim.core.protocol import ClientUpdates, LocalContext
    from strategies import build_strategy
    from strategies.scaffold import ScaffoldClient

    params = {"w": torch.zeros(2, dtype=torch.float64)}
    deltas = {"w": torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)}
    extras = {"dc.w": torch.tensor([[2.0, 0.0], [0.0, 4.0]], dtype=torch.float64)}
    sizes = torch.tensor([1.0, 3.0], dtype=torch.float64)
    up = ClientUpdates(np.arange(2), deltas, sizes, torch.tensor([2, 2]), torch.zeros(2), extras, lr=0.1, num_clients=4)
    for weighting, q in (("samples", [0.25, 0.75]), ("uniform", [0.5, 0.5])):
        strategy = build_strategy("scaffold", weighting=weighting)
        new = strategy.aggregate(1, strategy.init(params), up)
        torch.testing.assert_close(new.params["w"], -torch.tensor([q[0] * 1.0, q[1] * 3.0], dtype=torch.float64))
        torch.testing.assert_close(new.extras["c.w"], 0.5 * torch.tensor([q[0] * 2.0, q[1] * 4.0], dtype=torch.float64))
    ctx = LocalContext({"w": torch.zeros(2)}, {"c.w": torch.ones(2)}, {"c.w": torch.full((2, 2), 5.0)}, lr=0.1)
    _, extras, state = ScaffoldClient().finish({"w": torch.ones(2, 2)}, torch.tensor([0, 4]), ctx)
    assert torch.equal(state["c.w"][0], torch.full((2,), 5.0)) and torch.equal(extras["dc.w"][0], torch.zeros(2))
    torch.testing.assert_close(state["c.w"][1], torch.full((2,), 5.0 - 1.0 + 1.0 / (4 * 0.1)))


def _quadratic_federation(strategy_name, rounds=300, local_steps=10, lr=0.05, **options):
    """Heterogeneous least-squares clients f_k(w) = mean_i (a_i^T w - b_i)^2 / 2 with full-batch local steps;
    returns the final global model and the minimizer of the average loss."""
    import numpy as np

    from fedsim.core.protocol import ClientUpdates
    from fedsim.engine.trainer import VectorizedTrainer
    from fedsim.optim import make_optimizer
    from strategies import build_strategy

    gen = torch.Generator().manual_seed(0)
    clients, per_client, dim = 4, 6, 3
    x = torch.randn(clients * per_client, dim, generator=gen, dtype=torch.float64)
    shift = torch.arange(clients, dtype=torch.float64).repeat_interleave(per_client) * 2.0  # heterogeneous targets
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + shift + 0.1 * torch.randn(len(x), generator=gen)
    model = torch.nn.Linear(dim, 1, bias=False).double()
    trainer = VectorizedTrainer(model, loss_fn=lambda out, t: 0.5 * (out.squeeze(-1) - t) ** 2)
    index = torch.arange(clients * per_client).reshape(clients, 1, per_client).expand(clients, local_steps, per_client)
    mask = torch.ones(index.shape, dtype=torch.bool)
    strategy = build_strategy(strategy_name, **options)
    state = strategy.init({"weight": torch.zeros(1, dim, dtype=torch.float64)})
    client_state = {
        k: torch.stack([v] * clients) for k, v in strategy.client_algorithm.init_client_state(state.params).items()
    }
    ids = np.arange(clients)
    for r in range(1, rounds + 1):
        plan = strategy.configure(r, state, clients, 0)
        res = trainer.train(state.params, x, y, index, mask, make_optimizer("sgd"), lr, strategy.client_algorithm,
                            plan.broadcast, client_state)  # fmt: skip
        client_state = res.client_state or client_state
        updates = ClientUpdates(ids, res.deltas, torch.full((clients,), float(per_client), dtype=torch.float64),
                                res.num_steps, res.train_loss, res.extras, lr=lr, num_clients=clients)  # fmt: skip
        state = strategy.aggregate(r, state, updates)
    optimum = torch.linalg.lstsq(x, y.unsqueeze(1)).solution.T
    return state.params["weight"], optimum


@pytest.mark.parametrize(
    "options",
    [
        dict(strategy_name="scaffold"),
        dict(strategy_name="scaffold", correction="gradient"),
        dict(strategy_name="scaffold-m", beta=1.0),
        dict(strategy_name="feddyn", alpha=0.1, rounds=2000),
    ],
    ids=["scaffold", "scaffold-gradient", "scaffold-m", "feddyn"],
)
def test_drift_correcting_hosts_reach_the_global_optimum_where_fedavg_does_not(options):
    """With full participation and several local steps, FedAvg's fixed point is biased by client drift on
    heterogeneous quadratics; SCAFFOLD's control variates and FedDyn's dynamic regularizer remove the bias."""
    w, optimum = _quadratic_federation(**options)
    torch.testing.assert_close(w, optimum, rtol=0, atol=1e-8)
    w_avg, _ = _quadratic_federation("fedavg")
    assert float((w_avg - optimum).abs().max()) > 1e-3
