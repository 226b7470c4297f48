"""The new strategies, regulators, aggregators and filters from the command line: flags, metrics, errors,
and exact resume with persistent client state."""

import json

import pytest
import yaml

from fedsim.config import make_config
from fedsim.core.errors import FedsimError

FAST = ["--clients", "6", "--rounds", "3", "--local-steps", "3", "--quiet"]


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_ecgr_flags_run_and_report_damping_and_oscillation(tmp_path, cli):
    out = tmp_path / "run"
    argv = ["simulate", *FAST, "--strategy", "scaffold", "--regulator", "ecgr", "--set", "regulator.beta=0.2",
            "--set", "regulator.rho=0.5", "--set", "regulator.center=local_mean", "--out", str(out)]  # fmt: skip
    code, stdout, err = cli(argv)
    assert code == 0, err
    rows = _rows(out)
    assert all(0 < r["damped_norm_fraction"] < 1 for r in rows)
    assert rows[0]["oscillation"] is None and rows[-1]["oscillation"] is not None
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_oscillation"] == rows[-1]["oscillation"]
    assert summary["client_state_bytes"] > 0  # SCAFFOLD's control variates, all clients
    resolved = (out / "config.yaml").read_text()
    assert "regulator:\n  name: ecgr\n" in resolved and "  center: local_mean\n" in resolved
    regulator = yaml.safe_load(resolved)["regulator"]
    assert regulator == {"name": "ecgr", "rho": 0.5, "beta": 0.2, "center": "local_mean",
                         "trajectory_dtype": "float32", "trajectory_device": "same"}  # fmt: skip


@pytest.mark.parametrize(
    "flags",
    [
        ["--strategy", "fednova", "--set", "strategy.form=general", "--momentum", "0.9"],
        ["--strategy", "feddyn", "--set", "strategy.alpha=0.1"],
        ["--strategy", "fedcm", "--set", "strategy.beta=0.5", "--set", "strategy.server_lr=1.0"],
        ["--strategy", "scaffold-m", "--set", "strategy.control=model_difference"],
        [
            "--regulator",
            "bherd",
            "--set",
            "regulator.unit=microbatch",
            "--set",
            "regulator.ratio=0.5",
            "--set",
            "regulator.scale=rescale",
            "--set",
            "regulator.microbatches=2",
            "--set",
            "regulator.trajectory_dtype=bfloat16",
            "--set",
            "regulator.trajectory_device=cpu",
        ],
        ["--regulator", "bherd", "--set", "regulator.unit=sample", "--batch-size", "4"],
        ["--aggregator", "krum", "--set", "aggregator.byzantine=1", "--set", "aggregator.select=2"],
        ["--aggregator", "gaf", "--set", "aggregator.tau=1.0"],
        ["--set", "client_filter=gaf", "--set", "client_filter.microbatches=2", "--set", "client_filter.tau=1.5"],
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
        (["--set", "regulator.beta=0.3"], "regulator 'none' takes no options; got beta"),
        (["--regulator", "ecgr", "--set", "regulator.ratio=0.3"], "regulator 'ecgr' has no option 'ratio'"),
        (["--regulator", "ecgr", "--set", "regulator.rho=0"], "regulator 'ecgr', option 'rho'"),
        (["--regulator", "ecgr", "--set", "regulator.center=middle"], "regulator 'ecgr', option 'center'"),
        (["--regulator", "ecgr2"], "unknown regulator 'ecgr2' (did you mean 'ecgr'?)"),
        (["--aggregator", "medain"], "unknown aggregator 'medain' (did you mean 'median'?)"),
        (["--set", "aggregator.fraction=0.2"], "aggregator 'mean' takes no options; got fraction"),
        (["--set", "aggregator.tau=0.5"], "aggregator 'mean' takes no options; got tau"),
        (["--set", "regulator.trajectory_dtype=float16"], "regulator 'none' takes no options; got trajectory_dtype"),
        (["--regulator", "bherd", "--set", "regulator.microbatches=2"], "microbatches"),  # unit is 'step'
        (["--set", "strategy.beta=0.5"], "strategy 'fedavg' has no option 'beta'"),
        (["--strategy", "fedavg", "--set", "strategy.alpha=0.5"], "strategy 'fedavg' has no option 'alpha'"),
        (["--strategy", "fednova", "--set", "strategy.form=general", "--optimizer", "adam"], "fednova form 'general'"),
        (["--regulator", "ecgr", "--topology", "experiments/topologies/ring16.graphml"], "federated strategies"),
        (
            ["--set", "client_filter=gaf", "--set", "client_filter.microbatches=5"],
            "does not split into client_filter.microbatches = 5 microbatches",
        ),
        (["--set", "train_samples=100000"], "train_samples must be in [1, 1437]"),
        (
            [
                "--regulator",
                "bherd",
                "--set",
                "regulator.unit=microbatch",
                "--set",
                "regulator.microbatches=2",
                "--set",
                "client_filter=gaf",
            ],
            "client_filter.microbatches and regulator.microbatches must agree (both split the same minibatch); "
            "got 4 and 2",
        ),
        (["--set", "strategy.weighting=uniform"], "strategy 'fedavg' has no option 'weighting'"),
        (["--strategy", "scaffold", "--set", "strategy.correction=inside"], "strategy 'scaffold', option 'correction'"),
    ],
)
def test_client_side_bad_input_is_one_line_exit_2(tmp_path, cli, argv, message):
    code, _, err = cli(["simulate", *FAST, *argv, "--out", str(tmp_path / "r")])
    assert code == 2, err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_fednova_gets_mu_only_when_set():
    cfg = make_config({"strategy": "fednova"})
    assert cfg.strategy.get("mu") == 0.0  # FedNova's own default, not FedProx's 0.01
    cfg = make_config({"strategy": "fednova", "strategy.mu": 0.1})
    assert cfg.strategy.get("mu") == 0.1
    with pytest.raises(FedsimError, match="strategy 'fedavg' has no option 'mu'"):
        make_config({"strategy": "fedavg", "strategy.mu": 0.1})


def test_resume_with_control_variates_and_regulator_is_exact(tmp_path):
    from fedsim.simulation import resume, simulate

    cfg = {"clients": 6, "rounds": 6, "local_steps": 3, "strategy": "scaffold", "regulator": "ecgr",
           "fraction": 0.5, "checkpoint_every": 2, "optimizer.momentum": 0.5}  # fmt: skip
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
