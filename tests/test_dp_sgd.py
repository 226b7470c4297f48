"""Record-level DP-SGD (fedsim.privacy.DPSGD, fedsim.engine.sample_clipping): the Poisson sampler, per-sample
clipping against Opacus's GradSampleModule and against the sequential loop, chunk-size independence, the
per-client accountant against dp-accounting and Opacus's RDP accountant, the target stop, exact resume and
one-line refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedsim.config import make_config
from fedsim.core import rng
from fedsim.data.samplers import PoissonSampler
from fedsim.engine.sample_clipping import SampleClipping
from fedsim.engine.trainer import VectorizedTrainer
from fedsim.privacy import DPSGD
from fedsim.simulation import make_simulation, simulate

SMALL = dict(dataset="digits", clients=6, rounds=2, local_steps=3, batch_size=8, seed=4, lr=0.1,
             model={"name": "mlp", "hidden": [16]}, checkpoint_every=0,
             privacy={"name": "dp-sgd", "clip": 0.5, "noise_multiplier": 0.8})  # fmt: skip


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_params(config):
    sim = make_simulation(make_config(config))
    state = sim.initial_state()
    rows = []
    for r in range(1, config["rounds"] + 1):
        state, row = sim.round(r, state)
        rows.append(row)
    return state.params, rows, sim


def test_poisson_sampler_draws_each_record_with_rate_b_over_n():
    sampler = PoissonSampler()
    sizes = np.array([40, 80, 5])
    batches, _ = sampler.sample(1, 3, np.array([2, 7, 9]), sizes, steps=400, epochs=None, batch_size=8)
    counts = batches.mask.sum(axis=2)
    assert counts.mean(axis=1) == pytest.approx([8, 8, 5], rel=0.05)  # p = min(1, B / n)
    drawn = rng.uniform(1, rng.STREAM_SAMPLER, 3, 7, np.arange(400)[:, None], np.arange(80)[None, :]) < 0.1
    for k in range(5):  # client 7's step k: exactly the records whose counter-based draw is below p
        assert sorted(batches.positions[1, k][batches.mask[1, k]]) == np.flatnonzero(drawn[k]).tolist()
    alone, _ = sampler.sample(1, 3, np.array([7]), sizes[1:2], steps=400, epochs=None, batch_size=8)
    width = alone.mask.shape[2]
    assert np.array_equal(alone.mask[0], batches.mask[1, :, :width]) and not batches.mask[1, :, width:].any()


def layers(ghost: bool) -> list[torch.nn.Module]:
    """An MLP that ghost clipping handles (flat features first) or one that takes the vmap path."""
    start = [torch.nn.Flatten()] if ghost else [torch.nn.Identity()]
    torch.manual_seed(0)
    return [*start, torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5)]


@pytest.mark.parametrize("ghost", [True, False], ids=["ghost", "vmap"])
def test_per_sample_clipping_equals_opacus_grad_sample_module(ghost):
    """The clipped sum of per-sample gradients (noise off) is Opacus's GradSampleModule + clipping, 1e-6."""
    from opacus import GradSampleModule

    model = torch.nn.Sequential(*layers(ghost))
    trainer = VectorizedTrainer(model)
    assert (trainer._linear_layers is not None) == ghost
    x, y = torch.randn(2, 10, 12), torch.randint(0, 5, (2, 10))
    mask = torch.ones(2, 10)
    mask[1, 7:] = 0
    clip = 0.3
    params = {k: v.detach().unsqueeze(0).repeat(2, *[1] * v.dim()) for k, v in model.named_parameters()}
    params = {k: v + 0.1 * torch.randn_like(v) for k, v in params.items()}
    grads, _, clipped = trainer.private_grads(
        params, x, y, mask, SampleClipping(clip, 0.0, 8.0, 0), (1, np.array([0, 1])), 0
    )
    for c, valid in ((0, 10), (1, 7)):
        reference = torch.nn.Sequential(*layers(ghost))
        reference.load_state_dict({k: v[c] for k, v in params.items()})
        gsm = GradSampleModule(reference, loss_reduction="sum")
        loss = torch.nn.functional.cross_entropy(gsm(x[c, :valid]), y[c, :valid], reduction="sum")
        loss.backward()
        samples = {n: p.grad_sample for n, p in gsm._module.named_parameters()}
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in samples.values()]).norm(dim=0)
        factor = (clip / (norms + 1e-6)).clamp(max=1.0)  # Opacus's clipping factor
        for name, g in samples.items():
            expected = torch.einsum("b,b...->...", factor, g) / 8.0
            torch.testing.assert_close(grads[name][c], expected, atol=1e-6, rtol=1e-5)
        assert int(clipped[c]) == int((norms > clip).sum())


def test_vectorized_equals_the_sequential_loop_with_noise():
    vectorized, rows, sim = final_params(SMALL)
    assert sim.executor.trainer._linear_layers is not None  # the ghost-clipping path
    sequential, rows_seq, _ = final_params({**SMALL, "sequential": True})
    for k in vectorized:
        torch.testing.assert_close(vectorized[k], sequential[k], atol=2e-6, rtol=1e-5)
    assert [r["clipped_fraction"] for r in rows] == [r["clipped_fraction"] for r in rows_seq]
    assert 0 < rows[0]["clipped_fraction"] <= 1


def test_results_do_not_depend_on_the_chunk_size():
    whole, rows, _ = final_params({**SMALL, "chunk_size": 6})
    parts, rows_parts, _ = final_params({**SMALL, "chunk_size": 4})
    for k in whole:
        assert torch.equal(whole[k], parts[k])
    assert rows == rows_parts or [r["epsilon"] for r in rows] == [r["epsilon"] for r in rows_parts]


def test_noise_is_on():
    quiet, _, _ = final_params({**SMALL, "privacy": {**SMALL["privacy"], "noise_multiplier": 0.0}})
    noisy, _, _ = final_params(SMALL)
    assert any(not torch.equal(quiet[k], noisy[k]) for k in quiet)


def test_epsilon_is_the_worst_client_in_dp_accounting_and_opacus(tmp_path):
    import dp_accounting
    from dp_accounting import rdp
    from opacus.accountants import RDPAccountant

    summary = simulate({**SMALL, "rounds": 3}, tmp_path / "run", plots=False)
    rows = metrics(tmp_path / "run")
    sizes = make_simulation(make_config(SMALL)).store.sizes
    steps = np.full(len(sizes), 3 * 3)  # every client takes its 3 steps in each of the 3 rounds
    assert len(set(np.minimum(1.0, 8 / sizes))) > 1  # clients differ in their rate: the worst one counts
    rates = np.minimum(1.0, 8 / sizes)
    direct = []
    for p, k in zip(rates, steps, strict=True):
        if k == 0:
            continue
        account = rdp.RdpAccountant()
        account.compose(dp_accounting.PoissonSampledDpEvent(float(p), dp_accounting.GaussianDpEvent(0.8)), int(k))
        direct.append(account.get_epsilon(1e-5))
    assert summary["epsilon"] == pytest.approx(max(direct), rel=1e-9) == rows[-1]["epsilon"]
    worst = int(np.argmax(rates))  # equal steps: the highest rate is the worst client
    opacus = RDPAccountant()
    opacus.history = [(0.8, float(rates[worst]), int(steps[worst]))]
    assert opacus.get_epsilon(1e-5) == pytest.approx(summary["epsilon"], rel=0.05)  # its coarser order grid


def test_the_target_stops_before_a_client_could_pass_it(tmp_path):
    config = {**SMALL, "rounds": 20, "privacy": {**SMALL["privacy"], "target_epsilon": 5.0}}
    summary = simulate(config, tmp_path / "run", plots=False)
    rows = metrics(tmp_path / "run")
    assert 0 < len(rows) < 20 and rows[-1]["epsilon"] <= 5.0 and "privacy budget" in summary["stopped"]
    privacy = DPSGD(clip=0.5, noise_multiplier=0.8)
    sim = make_simulation(make_config(SMALL))
    privacy.start(np.minimum(1.0, 8 / sim.store.sizes), np.full(6, 3))
    privacy.steps = np.full(6, 3 * (len(rows) + 1))
    assert privacy.spent() > 5.0


def test_resume_is_exact(tmp_path, cli):
    flags = ["--dataset", "digits", "--clients", "6", "--local-steps", "2", "--fraction", "0.5", "--privacy",
             "dp-sgd", "--quiet", "--no-plots", "--checkpoint-every", "2"]  # fmt: skip
    assert cli(["simulate", *flags, "--rounds", "4", "--out", str(tmp_path / "full")])[0] == 0
    assert cli(["simulate", *flags, "--rounds", "2", "--out", str(tmp_path / "part")])[0] == 0
    assert cli(["simulate", "--resume", str(tmp_path / "part"), "--rounds", "4", "--quiet", "--no-plots"])[0] == 0
    for a, b in zip(metrics(tmp_path / "full"), metrics(tmp_path / "part"), strict=True):
        a.pop("time_s"), b.pop("time_s")
        assert a == b


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--sampler", "shuffle"], "use --sampler poisson"),
        (["--set", "privacy.clip=inf"], "'clip': Input should be a finite number"),
        (["--regulator", "ecgr"], "reads the raw per-step gradients"),
        (["--set", "deadline_s=5"], "does not combine with deadline_s"),
    ],
)
def test_bad_dp_sgd_settings_exit_2_in_one_line(tmp_path, cli, flags, message):
    code, _, err = cli(["simulate", "--rounds", "1", "--clients", "4", "--privacy", "dp-sgd", "--quiet",
                        "--out", str(tmp_path / "r"), *flags])  # fmt: skip
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
