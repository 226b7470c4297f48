"""DP-BREM and DP-BREM+ (fedsim.dp_brem): one iteration by hand, momenta of unselected clients, the secure sum
(the server sees only the total), the accountant against dp-accounting, schedules, chunk-size independence,
exact resume with the momenta, attacks, and one-line refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fedsim.config import make_config
from fedsim.core import rng
from fedsim.core.pytree import flatten
from fedsim.dp_brem import DPBREM, STREAM_BREM_NOISE, SecureSum
from fedsim.engine.sample_clipping import SampleClipping
from fedsim.engine.trainer import _sequential_private_grads
from fedsim.privacy import epsilon, poisson_clients
from fedsim.simulation import make_simulation, simulate

BREM = {"name": "dp-brem", "clip": 0.5, "record_clip": 1.0, "noise_multiplier": 0.05, "momentum": 0.5}
SMALL = dict(dataset="digits", clients=6, rounds=3, local_steps=1, batch_size=8, seed=3, lr=0.2,
             model={"name": "mlp", "hidden": [16]}, checkpoint_every=0, privacy=BREM)  # fmt: skip


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run(config, rounds=None):
    sim = make_simulation(make_config(config))
    state, rows = sim.initial_state(), []
    for r in range(1, (rounds or config["rounds"]) + 1):
        state, row = sim.round(r, state)
        rows.append(row)
    return state, rows, sim


def test_one_iteration_by_hand():
    """g_i from a per-sample loop, m_i, centered clipping around m = 0, noise sigma R_0, m = S / |sel|,
    w <- w - eta_0 m."""
    config = {**SMALL, "fraction": 0.5}
    state, [row], sim = run(config, rounds=1)
    w0 = sim.init_params
    selected = poisson_clients(6, 0.5, 3, 1)
    assert row["clients"] == len(selected) > 0
    batches = sim.executor.sample(np.arange(6), 1)
    index = sim.store.global_index(np.arange(6), batches.positions)[:, 0]
    momenta = []
    for i in range(6):
        m = torch.as_tensor(batches.mask[i, 0]).float()
        g, _, _ = _sequential_private_grads(
            sim.model, sim.loss_fn, {k: v.unsqueeze(0) for k, v in w0.items()}, sim.store.x[index[i]],
            sim.store.y[index[i]], m, SampleClipping(1.0, 0.0, 1.0, 3), (1, np.array([i])), 0,
        )  # fmt: skip
        expected_batch = min(1.0, 8 / sim.store.sizes[i]) * sim.store.sizes[i]
        momenta.append(0.5 * flatten(g)[0].double() / expected_batch)  # (1 - beta) g_i + beta * 0
    momenta = torch.stack(momenta)
    torch.testing.assert_close(sim.privacy.client_momentum.double(), momenta, atol=1e-6, rtol=1e-5)
    uploads = momenta[selected]
    clipped = torch.stack([u * min(1.0, 0.5 / float(u.norm())) for u in uploads])
    generator = torch.Generator().manual_seed(rng.seed_for(3, STREAM_BREM_NOISE, 1))
    noise = 0.05 * 1.0 * torch.randn(clipped.shape[1], generator=generator, dtype=torch.float64)
    server = (clipped.sum(0) + noise) / len(selected)
    expected = flatten(w0, stacked=False).double() - 0.2 * server
    torch.testing.assert_close(flatten(state.params, stacked=False).double(), expected, atol=1e-6, rtol=0)
    assert row["clipped_fraction"] == pytest.approx(float((uploads.norm(dim=1) > 0.5).double().mean()))


def test_unselected_clients_update_their_momentum_only_with_beta():
    _, _, sim = run({**SMALL, "fraction": 0.3}, rounds=1)
    assert (sim.privacy.client_momentum.norm(dim=1) > 0).all()
    _, _, sim = run({**SMALL, "fraction": 0.3, "privacy": {**BREM, "momentum": 0.0}}, rounds=1)
    moved = (sim.privacy.client_momentum.norm(dim=1) > 0).numpy()
    assert moved.tolist() == np.isin(np.arange(6), poisson_clients(6, 0.3, 3, 1)).tolist()


def test_schedules_decay_linearly():
    _, rows, sim = run({**SMALL, "rounds": 4})
    assert [r["lr"] for r in rows] == pytest.approx([0.2 * ((0.1 - 1) * t / 4 + 1) for t in range(4)])
    assert [sim.privacy.decay(t) for t in (0, 2, 4, 8)] == pytest.approx([1.0, 0.65, 0.3, 0.3])


def test_secure_aggregation_reveals_only_the_sum(monkeypatch):
    seen = []
    original = DPBREM.server_view

    def spy(secure):
        seen.append(secure)
        return original(secure)

    monkeypatch.setattr(DPBREM, "server_view", staticmethod(spy))
    quiet = {**BREM, "noise_multiplier": 0.0}
    secure, _, _ = run({**SMALL, "privacy": {**quiet, "secure_aggregation": True}})
    central, _, _ = run({**SMALL, "privacy": quiet})
    assert len(seen) == 3 and all(isinstance(s, SecureSum) for s in seen)
    tensors = [v for s in seen for v in vars(s).values() if isinstance(v, torch.Tensor)]
    assert all(t.dim() == 1 for t in tensors)  # a running total, never the clients' messages
    for k in secure.params:  # without noise the secure sum is the central sum
        torch.testing.assert_close(secure.params[k], central.params[k], atol=1e-6, rtol=0)
    noisy, _, _ = run({**SMALL, "privacy": {**BREM, "secure_aggregation": True}})
    assert any(not torch.allclose(noisy.params[k], secure.params[k]) for k in noisy.params)


def test_epsilon_is_dp_accounting_of_the_stated_mechanism():
    import dp_accounting
    from dp_accounting import rdp

    _, rows, sim = run(SMALL)
    privacy, sizes = sim.privacy, sim.store.sizes
    batches = np.minimum(8, sizes).astype(float)
    worst = []
    for b in sorted(set(batches)):  # beta > 0: Gaussian mechanisms with z_t = sigma R_t / Delta_t, composed
        zs = []
        for t in range(3):
            delta_t = sum(0.5 * 0.5**k * privacy.decay(t - k) for k in range(t + 1))
            zs.append(0.05 * privacy.decay(t) * b / delta_t)
        account = rdp.RdpAccountant()
        account.compose(dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(z) for z in zs]))
        worst.append(account.get_epsilon(1e-5))
    assert rows[-1]["epsilon"] == pytest.approx(max(worst), rel=1e-9)
    _, rows, sim = run({**SMALL, "privacy": {**BREM, "momentum": 0.0}})
    rates = np.minimum(1.0, 8 / sizes)
    direct = max(epsilon(float(p), 0.05 * float(p * n), 3, 1e-5) for p, n in zip(rates, sizes, strict=True))
    assert rows[-1]["epsilon"] == pytest.approx(direct, rel=1e-9)


def test_results_do_not_depend_on_the_chunk_size():
    a, rows_a, _ = run({**SMALL, "chunk_size": 6})
    b, rows_b, _ = run({**SMALL, "chunk_size": 4})
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k])
    assert rows_a == rows_b


def test_resume_is_exact_with_the_momenta(tmp_path):
    """Interrupted after round 3 (checkpoint at 2), resumed: the same rows as one run (the schedules keep T)."""
    from fedsim.simulation import resume

    config = {**SMALL, "rounds": 5, "fraction": 0.5, "checkpoint_every": 2}
    simulate(config, tmp_path / "full", plots=False)

    def stop(record):
        if record["round"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        simulate(config, tmp_path / "part", plots=False, on_round=stop)
    resume(tmp_path / "part", plots=False)
    full, part = metrics(tmp_path / "full"), metrics(tmp_path / "part")
    assert len(full) == len(part) == 5
    for a, b in zip(full, part, strict=True):
        a.pop("time_s"), b.pop("time_s")
        assert a == b


def test_a_model_attack_replaces_the_byzantine_uploads(tmp_path):
    clean = simulate(SMALL, tmp_path / "clean", plots=False)
    attacked = {**SMALL, "attack": {"name": "sign_flip", "fraction": 0.34, "scale": 10.0}}
    summary = simulate(attacked, tmp_path / "attacked", plots=False)
    rows = metrics(tmp_path / "attacked")
    assert all(r["byzantine"] == 2 for r in rows) and summary["final_test_accuracy"] != clean["final_test_accuracy"]
    assert math.isfinite(rows[-1]["epsilon"])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--strategy", "fedprox"], "strategy 'fedprox'"),
        (["--local-steps", "3"], "--local-steps 1"),
        (["--aggregator", "median"], "aggregator 'median'"),
        (["--sampler", "iid"], "use --sampler poisson"),
        (["--executor", "ray"], "--executor ray"),
        (["--set", "privacy.momentum=1"], "momentum"),
    ],
)
def test_bad_dp_brem_settings_exit_2_in_one_line(tmp_path, cli, flags, message):
    code, _, err = cli(["simulate", "--rounds", "1", "--clients", "4", "--local-steps", "1", "--privacy", "dp-brem",
                        "--quiet", "--out", str(tmp_path / "r"), *flags])  # fmt: skip
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
