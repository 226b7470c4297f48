"""The new strategies, regulators, aggregators and filters from the command line: flags, metrics, errors,
and exact resume with persistent client state."""

import json

import pytest

from fedsim.config import make_config
from fedsim.core.errors import FedsimError

FAST = ["--clients", "6", "--rounds", "3", "--local-steps", "3", "--quiet"]


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_ecgr_flags_run_and_report_damping_and_oscillation(tmp_path, cli):
    out = tmp_path / "run"
    argv = ["simulate", *FAST, "--strategy", "scaffold", "--regulator", "ecgr", "--ecgr-beta", "0.2",
            "--ecgr-rho", "0.5", "--ecgr-center", "local_mean", "--out", str(out)]  # fmt: skip
    code, stdout, err = cli(argv)
    assert code == 0, err
    rows = _rows(out)
    assert all(0 < r["damped_norm_fraction"] < 1 for r in rows)
    assert rows[0]["oscillation"] is None and rows[-1]["oscillation"] is not None
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_oscillation"] == rows[-1]["oscillation"]
    assert summary["client_state_bytes"] > 0  # SCAFFOLD's control variates, all clients
    resolved = (out / "config.yaml").read_text()
    assert "regulator: ecgr" in resolved and "ecgr_center: local_mean" in resolved


@pytest.mark.parametrize(
    "flags",
    [
        ["--strategy", "fednova", "--set", "fednova_form=general", "--momentum", "0.9"],
        ["--strategy", "feddyn", "--set", "feddyn_alpha=0.1"],
        ["--strategy", "fedcm", "--set", "fedcm_beta=0.5", "--set", "server_lr=1.0"],
        ["--strategy", "scaffold-m", "--set", "scaffold_control=model_difference"],
        [
            "--regulator",
            "bherd",
            "--bherd-unit",
            "microbatch",
            "--bherd-ratio",
            "0.5",
            "--bherd-scale",
            "rescale",
            "--set",
            "bherd_microbatches=2",
            "--set",
            "trajectory_dtype=bfloat16",
            "--set",
            "trajectory_device=cpu",
        ],
        ["--regulator", "bherd", "--bherd-unit", "sample", "--batch-size", "4"],
        ["--aggregator", "krum", "--set", "krum_byzantine=1", "--set", "krum_select=2"],
        ["--aggregator", "gaf", "--set", "gaf_tau=1.0"],
        ["--set", "client_filter=gaf", "--set", "gaf_microbatches=2", "--set", "gaf_tau=1.5"],
    ],  # fmt: skip
    ids=[
        "fednova-general",
        "feddyn",
        "fedcm",
        "scaffold-m",
        "bherd-microbatch",
        "bherd-sample",
        "krum",
        "gaf",
        "gaf-client",
    ],  # fmt: skip
)
def test_client_side_options_from_the_cli(tmp_path, cli, flags):
    code, _, err = cli(["simulate", *FAST, *flags, "--out", str(tmp_path / "r")])
    assert code == 0, err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ecgr-beta", "0.3"], "option 'ecgr_beta' applies with --regulator ecgr"),
        (["--regulator", "ecgr", "--bherd-ratio", "0.3"], "option 'bherd_ratio' applies with --regulator bherd"),
        (["--regulator", "ecgr", "--ecgr-rho", "0"], "ecgr_rho"),
        (["--regulator", "ecgr", "--ecgr-center", "middle"], "ecgr_center"),
        (["--regulator", "ecgr2"], "regulator"),
        (["--aggregator", "medain"], "aggregator"),
        (["--set", "trim_fraction=0.2"], "option 'trim_fraction' applies with --aggregator trimmed_mean"),
        (["--set", "gaf_tau=0.5"], "option 'gaf_tau' applies with --aggregator gaf"),
        (["--set", "trajectory_dtype=float16"], "option 'trajectory_dtype' applies with a --regulator"),
        (["--regulator", "bherd", "--set", "bherd_microbatches=2"], "bherd_microbatches' applies with bherd_unit"),
        (["--set", "fedcm_beta=0.5"], "option 'fedcm_beta' is not used by strategy 'fedavg'"),
        (["--strategy", "fedavg", "--set", "feddyn_alpha=0.5"], "feddyn_alpha"),
        (["--strategy", "fednova", "--set", "fednova_form=general", "--optimizer", "adam"], "fednova_form 'general'"),
        (["--regulator", "ecgr", "--topology", "experiments/topologies/ring16.graphml"], "federated strategies"),
        (
            ["--set", "client_filter=gaf", "--set", "gaf_microbatches=5"],
            "does not split into gaf_microbatches = 5 microbatches",
        ),
        (["--set", "train_samples=100000"], "train_samples must be in [1, 1437]"),
        (
            [
                "--regulator",
                "bherd",
                "--bherd-unit",
                "microbatch",
                "--set",
                "bherd_microbatches=2",
                "--set",
                "client_filter=gaf",
            ],
            "gaf_microbatches (4) and bherd_microbatches (2) must agree",
        ),
        (["--set", "scaffold_weighting=uniform"], "option 'scaffold_weighting' is not used by strategy 'fedavg'"),
        (["--strategy", "scaffold", "--set", "scaffold_correction=inside"], "scaffold_correction"),
    ],
)
def test_client_side_bad_input_is_one_line_exit_2(tmp_path, cli, argv, message):
    code, _, err = cli(["simulate", *FAST, *argv, "--out", str(tmp_path / "r")])
    assert code == 2, err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_fednova_gets_mu_only_when_set():
    cfg = make_config({"strategy": "fednova"})
    assert "mu" not in cfg.strategy_options()
    cfg = make_config({"strategy": "fednova", "mu": 0.1})
    assert cfg.strategy_options()["mu"] == 0.1
    with pytest.raises(FedsimError):
        make_config({"strategy": "fedavg", "mu": 0.1})


def test_resume_with_control_variates_and_regulator_is_exact(tmp_path):
    from fedsim.simulation import resume, simulate

    cfg = {"clients": 6, "rounds": 6, "local_steps": 3, "strategy": "scaffold", "regulator": "ecgr",
           "fraction": 0.5, "checkpoint_every": 2, "momentum": 0.5}  # fmt: skip
    full = tmp_path / "full"
    simulate(cfg, full, plots=False)
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):

        def stop(record):
            if record["round"] == 3:
                raise KeyboardInterrupt

        simulate(cfg, part, plots=False, on_round=stop)
    resume(part, plots=False)
    a, b = _rows(full), _rows(part)
    assert len(a) == len(b) == 6
    for ra, rb in zip(a, b, strict=True):
        for key in ("train_loss", "test_accuracy", "damped_norm_fraction", "drift"):
            assert ra[key] == rb[key], key
