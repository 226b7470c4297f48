"""Client-level DP-FedAvg (fedsim.privacy): FedAvg exactly without clipping or noise, clipping and noise by
hand, Poisson sampling (zero clients included), epsilon against a direct dp-accounting computation, the
target-epsilon stop, exact resume, ``fedsim privacy``, and one-line refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fedsim.config import make_config
from fedsim.core.protocol import Plan
from fedsim.privacy import STREAM_POISSON, epsilon, noise_for, poisson_clients
from fedsim.simulation import make_simulation, simulate

SMALL = dict(dataset="digits", clients=8, rounds=3, local_steps=3, batch_size=8, seed=2,
             model={"name": "mlp", "hidden": [16]}, checkpoint_every=0)  # fmt: skip


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_states(config, rounds):
    sim = make_simulation(make_config(config))
    state, out = sim.initial_state(), []
    for r in range(1, rounds + 1):
        state, row = sim.round(r, state)
        out.append(({k: v.clone() for k, v in state.params.items()}, row))
    return out, sim


def test_without_clipping_or_noise_it_is_fedavg_exactly():
    private = {**SMALL, "privacy": {"name": "dp-fedavg", "clip": math.inf, "noise_multiplier": 0.0,
                                    "weighting": "samples"}}  # fmt: skip
    dp, _ = run_states(private, 3)
    plain, _ = run_states(SMALL, 3)
    for (a, row), (b, _) in zip(dp, plain, strict=True):
        for k in a:
            assert torch.equal(a[k], b[k])
        assert row["clients"] == 8 and row["clipped_fraction"] == 0.0 and row["epsilon"] is None


def test_clipping_and_noise_follow_the_formula():
    """One round written by hand: clip each delta to C, sum, add N(0, (z C)^2), divide by q N."""
    config = {**SMALL, "fraction": 0.5, "privacy": {"name": "dp-fedavg", "clip": 0.05, "noise_multiplier": 0.7}}
    [(params, row)], sim = run_states(config, 1)
    ids = poisson_clients(8, 0.5, SMALL["seed"], 1)
    assert row["clients"] == len(ids) > 0
    w0 = sim.init_params
    updates = sim.executor.train(Plan(ids), w0, 1, sim.lr(1))
    flat = torch.cat([updates.deltas[k].reshape(len(ids), -1) for k in updates.deltas], 1).double()
    clipped = torch.stack([d * min(1.0, 0.05 / float(d.norm())) for d in flat])
    from fedsim.core import rng
    from fedsim.privacy import STREAM_DP_NOISE

    generator = torch.Generator().manual_seed(rng.seed_for(SMALL["seed"], STREAM_DP_NOISE, 1))
    noise = torch.randn(flat.shape[1], generator=generator, dtype=torch.float64) * (0.7 * 0.05)
    mean = (clipped.sum(0) + noise) / (0.5 * 8)
    expected = torch.cat([w0[k].reshape(-1) for k in w0]).double() - mean
    got = torch.cat([params[k].reshape(-1) for k in params]).double()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert row["clipped_fraction"] == pytest.approx(float((flat.norm(dim=1) > 0.05).double().mean()))


def test_poisson_sampling_is_counter_based_and_a_round_may_have_no_client(tmp_path):
    from fedsim.core import rng

    for round_ in range(1, 20):
        u = rng.uniform(3, STREAM_POISSON, round_, np.arange(50))
        assert poisson_clients(50, 0.2, 3, round_).tolist() == np.flatnonzero(u < 0.2).tolist()
    config = {**SMALL, "rounds": 6, "fraction": 0.05, "privacy": {"name": "dp-fedavg", "noise_multiplier": 1.0}}
    simulate(config, tmp_path / "run", plots=False)
    rows = metrics(tmp_path / "run")
    empty = [r for r in rows if r["clients"] == 0]
    assert empty and all(r["update_norm"] > 0 and r["clipped_fraction"] is None for r in empty)  # noise only
    assert [r["epsilon"] for r in rows] == sorted(r["epsilon"] for r in rows)


def test_epsilon_is_dp_accounting_directly():
    import dp_accounting
    from dp_accounting import pld, rdp

    event = dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.1))
    direct = rdp.RdpAccountant()
    direct.compose(event, 40)
    assert epsilon(0.05, 1.1, 40, 1e-5) == pytest.approx(direct.get_epsilon(1e-5), rel=1e-9)
    direct = pld.PLDAccountant()
    direct.compose(event, 40)
    assert epsilon(0.05, 1.1, 40, 1e-5, "pld") == pytest.approx(direct.get_epsilon(1e-5), rel=1e-9)
    from opacus.accountants import RDPAccountant

    opacus = RDPAccountant()
    opacus.history = [(1.1, 0.05, 40)]  # (noise multiplier, sample rate, steps)
    assert epsilon(0.05, 1.1, 40, 1e-5) == pytest.approx(opacus.get_epsilon(1e-5), rel=0.05)  # its coarser orders
    z = noise_for(4.0, 0.05, 40, 1e-5)
    assert epsilon(0.05, z, 40, 1e-5) <= 4.0 < epsilon(0.05, z * 0.999, 40, 1e-5)


def test_rows_and_summary_carry_epsilon_and_the_target_stops_cleanly(tmp_path):
    config = {**SMALL, "rounds": 10, "fraction": 0.5,
              "privacy": {"name": "dp-fedavg", "noise_multiplier": 1.0, "target_epsilon": 6.0}}  # fmt: skip
    summary = simulate(config, tmp_path / "run", plots=False)
    rows = metrics(tmp_path / "run")
    expected = [epsilon(0.5, 1.0, r, 1e-5) for r in range(1, len(rows) + 1)]
    assert [r["epsilon"] for r in rows] == pytest.approx(expected, rel=1e-12)
    assert rows[-1]["epsilon"] <= 6.0 < epsilon(0.5, 1.0, len(rows) + 1, 1e-5) and len(rows) < 10
    assert summary["epsilon"] == rows[-1]["epsilon"] and "privacy budget" in summary["stopped"]
    assert summary["rounds_completed"] == len(rows)


def test_resume_is_exact(tmp_path, cli):
    flags = ["--clients", "8", "--local-steps", "2", "--fraction", "0.5", "--privacy", "dp-fedavg",
             "--set", "privacy.noise_multiplier=0.8", "--quiet", "--no-plots", "--checkpoint-every", "2"]  # fmt: skip
    assert cli(["simulate", *flags, "--rounds", "6", "--out", str(tmp_path / "full")])[0] == 0
    assert cli(["simulate", *flags, "--rounds", "2", "--out", str(tmp_path / "part")])[0] == 0
    assert cli(["simulate", "--resume", str(tmp_path / "part"), "--rounds", "6", "--quiet", "--no-plots"])[0] == 0
    for a, b in zip(metrics(tmp_path / "full"), metrics(tmp_path / "part"), strict=True):
        a.pop("time_s"), b.pop("time_s")
        assert a == b


def test_fedsim_privacy_prints_epsilon_or_the_noise(cli):
    code, out, _ = cli(["privacy", "--q", "0.1", "--noise-multiplier", "1.0", "--rounds", "100"])
    assert code == 0 and f"epsilon {epsilon(0.1, 1.0, 100, 1e-5):.6g}" in out
    code, out, _ = cli(["privacy", "--q", "0.1", "--target-epsilon", "8", "--rounds", "100"])
    assert code == 0 and out.startswith("noise multiplier ")
    code, _, err = cli(["privacy", "--q", "0.1", "--rounds", "100"])
    assert code == 2 and "exactly one of" in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--set", "privacy.noise_multiplier=-1"], "noise_multiplier"),
        (["--set", "privacy.clip=0"], "clip"),
        (["--set", "privacy.delta=1"], "delta"),
        (["--aggregator", "median"], "privacy.mode=local, privacy.local_noise=full"),
        (["--set", "privacy.local_noise=full"], "local_noise applies to mode local"),
        (["--set", "privacy.count_noise=2"], "count_noise applies to adaptive clipping"),
        (["--set", "privacy.target_quantile=0.5", "--set", "privacy.count_noise=0.1"], "count_noise 0.1 is too small"),
        (["--strategy", "scaffold"], "replaces the strategy's one weighted mean"),
        (["--strategy", "fedbuff"], "is asynchronous"),
        (["--backend", "flower"], "--backend flower runs federated fedsim strategies"),
    ],
)
def test_bad_privacy_settings_exit_2_in_one_line(tmp_path, cli, flags, message):
    code, _, err = cli(["simulate", "--rounds", "1", "--clients", "4", "--privacy", "dp-fedavg", "--quiet",
                        "--out", str(tmp_path / "r"), *flags])  # fmt: skip
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_resuming_with_a_spent_budget_exits_2(tmp_path, cli):
    flags = ["--clients", "8", "--local-steps", "2", "--fraction", "0.5", "--privacy", "dp-fedavg",
             "--set", "privacy.target_epsilon=6", "--quiet", "--no-plots", "--checkpoint-every", "1"]  # fmt: skip
    assert cli(["simulate", *flags, "--rounds", "20", "--out", str(tmp_path / "run")])[0] == 0
    code, _, err = cli(["simulate", "--resume", str(tmp_path / "run"), "--rounds", "30", "--quiet", "--no-plots"])
    assert code == 2 and "privacy budget is spent" in err and len(err.strip().splitlines()) == 1, err


def test_attacks_reach_private_rounds(tmp_path):
    """A model attack replaces the Byzantine uploads before DP-FedAvg clips them (not silently skipped)."""
    private = {**SMALL, "fraction": 0.5, "privacy": {"name": "dp-fedavg", "noise_multiplier": 0.5}}
    clean = simulate(private, tmp_path / "clean", plots=False)
    attacked = {**private, "attack": {"name": "sign_flip", "fraction": 0.4, "scale": 10.0}}
    summary = simulate(attacked, tmp_path / "attacked", plots=False)
    rows = metrics(tmp_path / "attacked")
    assert all("byzantine" in r for r in rows if r["clients"]) and any(r["byzantine"] for r in rows)
    assert summary["final_test_accuracy"] != clean["final_test_accuracy"]
    assert rows[-1]["honest_accuracy"] == rows[-1]["test_accuracy"]


def test_adaptive_clipping_tracks_the_quantile_with_a_noised_count():
    """C_{t+1} = C_t exp(-eta_C (b_t - gamma)), b_t = (unclipped + N(0, sigma_b^2)) / (q N); the update's noise
    multiplier is z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)."""
    from fedsim.core import rng
    from fedsim.privacy import STREAM_DP_COUNT

    dp = {"name": "dp-fedavg", "clip": 0.01, "noise_multiplier": 1.0, "target_quantile": 0.5, "clip_lr": 0.3,
          "count_noise": 1.0}  # fmt: skip
    rows = [row for _, row in run_states({**SMALL, "rounds": 4, "privacy": dp}, 4)[0]]
    clip = 0.01
    for r, row in enumerate(rows, start=1):
        assert row["clip"] == pytest.approx(clip, rel=1e-12)
        unclipped = row["clients"] * (1 - row["clipped_fraction"])
        generator = torch.Generator().manual_seed(rng.seed_for(SMALL["seed"], STREAM_DP_COUNT, r))
        noise = float(torch.randn((), generator=generator, dtype=torch.float64))
        clip *= math.exp(-0.3 * ((unclipped + noise) / 8 - 0.5))
    assert rows[-1]["clip"] > rows[0]["clip"]  # every update was clipped at first: C grows
    from fedsim.privacy import DPFedAvg

    z = DPFedAvg(noise_multiplier=1.0, target_quantile=0.5, count_noise=1.0).update_noise_multiplier(1.0, 8)
    assert z == pytest.approx((1.0 - 0.25) ** -0.5)


def test_adaptive_clipping_resumes_exactly(tmp_path, cli):
    flags = ["--clients", "8", "--local-steps", "2", "--fraction", "0.5", "--privacy", "dp-fedavg",
             "--set", "privacy.target_quantile=0.5", "--set", "privacy.count_noise=2", "--quiet", "--no-plots",
             "--checkpoint-every", "2"]  # fmt: skip
    assert cli(["simulate", *flags, "--rounds", "5", "--out", str(tmp_path / "full")])[0] == 0
    assert cli(["simulate", *flags, "--rounds", "2", "--out", str(tmp_path / "part")])[0] == 0
    assert cli(["simulate", "--resume", str(tmp_path / "part"), "--rounds", "5", "--quiet", "--no-plots"])[0] == 0
    full = metrics(tmp_path / "full")
    assert len({r["clip"] for r in full}) == 5
    for a, b in zip(full, metrics(tmp_path / "part"), strict=True):
        a.pop("time_s"), b.pop("time_s")
        assert a == b


def test_robust_aggregators_combine_locally_noised_updates():
    """With every client adding the whole noise, a robust aggregator sees each clipped, noised update: without
    clipping or noise DP-FedAvg + median is the median run; with noise it is the median of noised updates."""
    local = {"name": "dp-fedavg", "mode": "local", "local_noise": "full", "clip": math.inf, "noise_multiplier": 0.0}
    private, _ = run_states({**SMALL, "aggregator": "median", "privacy": local}, 2)
    plain, _ = run_states({**SMALL, "aggregator": "median"}, 2)
    for (a, _), (b, _) in zip(private, plain, strict=True):
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-7, rtol=0)
    noisy = {**local, "clip": 0.05, "noise_multiplier": 0.5}
    [(params, row)], sim = run_states({**SMALL, "rounds": 1, "aggregator": "median", "privacy": noisy}, 1)
    w0 = sim.init_params
    ids = np.arange(8)
    updates = sim.executor.train(Plan(ids), w0, 1, sim.lr(1))
    flat = torch.cat([updates.deltas[k].reshape(8, -1) for k in updates.deltas], 1).double()
    clipped = torch.stack([d * min(1.0, 0.05 / float(d.norm())) for d in flat])
    from fedsim.core import rng
    from fedsim.privacy import STREAM_DP_NOISE

    generator = torch.Generator().manual_seed(rng.seed_for(SMALL["seed"], STREAM_DP_NOISE, 1))
    noised = clipped + 0.5 * 0.05 * torch.randn(clipped.shape, generator=generator, dtype=torch.float64)
    middle = noised.float().sort(dim=0).values[3:5].mean(dim=0)  # the median of 8: the mean of the middle two
    expected = torch.cat([w0[k].reshape(-1) for k in w0]).double() - middle.double()
    got = torch.cat([params[k].reshape(-1) for k in params]).double()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
