"""The command line: simulate/plot/list/bench, flag precedence, one-line errors with exit code 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

FAST = ["--clients", "6", "--rounds", "2", "--local-steps", "2", "--quiet"]


def test_simulate_writes_results(tmp_path, cli):
    out = tmp_path / "run"
    code, stdout, _ = cli(["simulate", *FAST, "--out", str(out)])
    assert code == 0, stdout
    assert "final test accuracy" in stdout
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_flags_override_config_file(tmp_path, cli):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("rounds: 3\nclients: 6\nlocal-steps: 2\nstrategy: fedavgm\n")
    out = tmp_path / "run"
    code, _, err = cli(
        ["simulate", str(cfg), "--rounds", "2", "--set", "strategy.server_momentum=0.5", "--quiet", "--out", str(out)]
    )
    assert code == 0, err
    resolved = (out / "config.yaml").read_text()
    assert "rounds: 2" in resolved and "strategy:\n  name: fedavgm\n" in resolved and "server_momentum: 0.5" in resolved
    written = yaml.safe_load(resolved)
    assert (written["rounds"], written["clients"], written["local_steps"]) == (2, 6, 2)
    assert written["strategy"]["name"] == "fedavgm" and written["strategy"]["server_momentum"] == 0.5


def test_toml_config(tmp_path, cli):
    cfg = tmp_path / "exp.toml"
    cfg.write_text('rounds = 1\nclients = 4\nmodel = "logreg"\n')
    code, _, err = cli(["simulate", str(cfg), "--quiet", "--out", str(tmp_path / "r")])
    assert code == 0, err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dataset", "digts"], "unknown dataset 'digts' (did you mean 'digits'?)"),
        (["--model", "lenet"], "did you mean 'lenet5'"),
        (["--strategy", "fedavgg"], "did you mean 'fedavg'"),
        (["--optimizer", "adm"], "did you mean 'adam'"),
        (["--partition", "dirichlet2"], "did you mean 'dirichlet'"),
        (["--set", "roundz=3"], "unknown config key 'roundz' (did you mean 'rounds'?)"),
        (["--set", "noequals"], "--set expects KEY=VALUE"),
        (["--lr", "-1"], "lr"),
        (["--alpha", "0"], "partitioner 'dirichlet', option 'alpha': Input should be greater than 0"),
        (["--dataset", "npz"], "dataset 'npz', option 'path': Field required"),
        (["--dataset", "npz", "--data-path", "/nonexistent/x.npz"], "/nonexistent/x.npz"),
        (["--clients", "5000"], "client"),
        (["--device", "tpu"], "device"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, cli, argv, message):
    out = tmp_path / "r"
    code, _, err = cli(["simulate", *argv, "--quiet", "--out", str(out)])
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_missing_config_file(tmp_path, cli):
    code, _, err = cli(["simulate", str(tmp_path / "nope.yaml"), "--quiet"])
    assert code == 2 and "config file not found" in err


def test_existing_results_folder_is_kept(tmp_path, cli):
    out = tmp_path / "run"
    assert cli(["simulate", *FAST, "--out", str(out)])[0] == 0
    before = (out / "metrics.jsonl").read_text()
    code, _, err = cli(["simulate", *FAST, "--rounds", "1", "--out", str(out)])
    assert code == 2 and "--overwrite" in err
    assert (out / "metrics.jsonl").read_text() == before
    assert cli(["simulate", *FAST, "--rounds", "1", "--out", str(out), "--overwrite"])[0] == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_resume_cli(tmp_path, cli):
    out = tmp_path / "run"
    assert cli(["simulate", *FAST, "--out", str(out)])[0] == 0
    code, stdout, _ = cli(["simulate", "--resume", str(out), "--quiet"])
    assert code == 0 and "2 rounds" in stdout
    code, _, err = cli(["simulate", "--resume", str(out), "--lr", "0.1"])
    assert code == 2 and "only --rounds and --threads may change" in err
    code, stdout, err = cli(["simulate", "--resume", str(out), "--rounds", "3", "--quiet"])  # extends the run
    assert code == 0 and "3 rounds" in stdout, err


def test_divergence_exit_code_3(tmp_path, cli):
    out = tmp_path / "run"
    code, _, err = cli(["simulate", *FAST, "--lr", "1e9", "--rounds", "5", "--out", str(out)])
    assert code == 3 and "diverged" in err
    assert (out / "metrics.jsonl").is_file()


def test_list(cli):
    code, stdout, _ = cli(["list"])
    assert code == 0
    words = ("digits", "dirichlet", "shuffle", "lenet5", "fedyogi", "adamw", "cosine", "scaffold-m", "ecgr", "krum")
    for word in words:
        assert word in stdout


def test_plot_overlays_runs(tmp_path, cli):
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli(["simulate", *FAST, "--out", str(a)])[0] == 0
    assert cli(["simulate", *FAST, "--strategy", "fedprox", "--out", str(b)])[0] == 0
    png = tmp_path / "cmp.png"
    code, stdout, _ = cli(["plot", str(a), str(b), "--metric", "test_accuracy,drift", "--out", str(png)])
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _, err = cli(["plot", str(a), "--metric", "test_acc", "--out", str(png)])
    assert code == 2 and "did you mean 'test_accuracy'" in err


def test_bench_engine_json(tmp_path, cli):
    out = tmp_path / "bench.json"
    code, stdout, _ = cli(
        ["bench", "engine", "--clients", "6", "--local-steps", "2", "--repeats", "1", "--out", str(out)]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert result["vectorized"]["samples_per_s"] > 0 and result["sequential"]["samples_per_s"] > 0
    assert result["vectorized_over_sequential"] > 0 and result["vectorized_over_centralized"] > 0


def test_console_script_error_has_no_traceback(tmp_path):
    """The installed entry point: exit code 2 and a single line on stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "fedsim.cli", "simulate", "--dataset", "imagenet", "--quiet"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: unknown dataset")
    usage = subprocess.run(
        [sys.executable, "-m", "fedsim.cli", "simulate", "--rounds", "abc"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert usage.returncode == 2 and "Traceback" not in usage.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "os:getcwd"], "could not be built"),
        (["--model", "cnn", "--set", "model.width=3"], "model 'cnn', option 'width': Input should be a multiple of 8"),
        (["--set", "model.hidden=[-1]"], "model 'mlp', option 'hidden.0': Input should be greater than or equal to 1"),
        (["--optimizer", "adam", "--momentum", "0.9"], "optimizer 'adam' has no option 'momentum'"),
        (
            ["--set", "optimizer.betas=[1.0, 0.999]", "--optimizer", "adam"],
            "optimizer 'adam', option 'betas.0': Input should be less than 1",
        ),
        (["--set", "optimizer.betas=[0.8, 0.99]"], "optimizer 'sgd' has no option 'betas'"),
        (["--strategy", "fedavg", "--mu", "0.5"], "strategy 'fedavg' has no option 'mu'"),
    ],
)
def test_more_bad_input(tmp_path, cli, argv, message):
    code, _, err = cli(["simulate", *argv, "--quiet", "--out", str(tmp_path / "r")])
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # nothing created for a refused run


def test_dropout_model_refused(tmp_path, cli, monkeypatch):
    (tmp_path / "drop_model.py").write_text(
        "from torch import nn\n"
        "def make(shape, classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Dropout(0.5), nn.Linear(8, classes))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    code, _, err = cli(["simulate", "--model", "drop_model:make", "--quiet", "--out", str(tmp_path / "r")])
    assert code == 2 and "Dropout" in err


def test_overwrite_refuses_foreign_folder(tmp_path, cli):
    precious = tmp_path / "thesis"
    (precious / "sub").mkdir(parents=True)
    (precious / "sub" / "thesis.tex").write_text("years of work")
    code, _, err = cli(["simulate", *FAST, "--out", str(precious), "--overwrite"])
    assert code == 2 and "not a fedsim results folder" in err
    assert (precious / "sub" / "thesis.tex").read_text() == "years of work"


def test_out_path_under_a_file(tmp_path, cli):
    (tmp_path / "file").write_text("x")
    code, _, err = cli(["simulate", *FAST, "--out", str(tmp_path / "file" / "run")])
    assert code == 2 and "cannot create results folder" in err


def test_resume_refuses_damaged_history_and_foreign_checkpoint(tmp_path, cli):
    import torch

    out = tmp_path / "run"
    assert cli(["simulate", *FAST, "--rounds", "3", "--out", str(out)])[0] == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    damaged = "\n".join([lines[0], "{not json", lines[2]]) + "\n"
    (out / "metrics.jsonl").write_text(damaged)
    code, _, err = cli(["simulate", "--resume", str(out), "--quiet"])
    assert code == 2 and "metrics.jsonl:2" in err
    assert (out / "metrics.jsonl").read_text() == damaged  # history kept as it was
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    torch.save({"foo": 1}, out / "checkpoint.pt")
    code, _, err = cli(["simulate", "--resume", str(out), "--quiet"])
    assert code == 2 and "not a fedsim checkpoint" in err
    torch.save({"round": 1, "params": {"w": torch.zeros(2)}, "extras": {}, "client_state": {}}, out / "checkpoint.pt")
    code, _, err = cli(["simulate", "--resume", str(out), "--quiet"])
    assert code == 2 and "do not match" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--repeats", "0"], "repeats"),
        (["--batch-size", "0"], "batch-size"),
        (["--grad-mode", "foo"], "unknown grad_mode 'foo'"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--model", "lenet"], "did you mean 'lenet5'"),
    ],
)
def test_bench_bad_input(cli, argv, message):
    code, _, err = cli(["bench", "engine", "--clients", "4", "--local-steps", "1", "--repeats", "1", *argv])
    assert code == 2 and message in err and "Traceback" not in err


def test_usage_error_type_matches_installed_typer():
    """main() must catch the usage-error class that the installed typer really raises (typer >= 0.22
    vendors click and no longer installs it)."""
    from fedsim.cli import _usage_error_type, app

    with pytest.raises(_usage_error_type()):
        app(args=["simulate", "--rounds", "abc"], standalone_mode=False)
    source = (Path(__file__).resolve().parents[1] / "fedsim" / "cli.py").read_text()
    assert "\nimport click" not in source and "    import click" not in source


def test_bench_regulator_json(tmp_path, cli):
    out = tmp_path / "bench.json"
    argv = ["bench", "regulator", "--clients", "4", "--local-steps", "3", "--repeats", "1", "--device", "cpu",
            "--set", "beta=0.5", "--out", str(out)]  # fmt: skip
    code, stdout, err = cli(argv)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["regulated"]["seconds_per_round"] > 0 and result["plain"]["seconds_per_round"] > 0
    assert result["overhead"] == pytest.approx(
        result["regulated"]["seconds_per_round"] / result["plain"]["seconds_per_round"] - 1
    )
    assert result["trajectory_bytes_per_client"] == 3 * result["num_params"] * 4 + 8 * 9
    code, _, err = cli(["bench", "regulator", "--clients", "4", "--set", "rho=2"])
    assert code == 2 and "regulator 'ecgr', option 'rho'" in err


def test_bench_optimizer_json(tmp_path, cli):
    out = tmp_path / "bench.json"
    argv = ["bench", "optimizer", "--optimizers", "adam,foam,gwt,mols,sgd-sai", "--steps", "1", "--rounds", "1",
            "--out", str(out)]  # fmt: skip
    code, _, err = cli(argv)
    assert code == 0, err
    result = json.loads(out.read_text())
    opts = result["optimizers"]
    assert opts["adam"]["vs_adam"] == 1.0 and all(r["seconds_per_step"] > 0 for r in opts.values())
    for name in ("foam", "gwt"):  # level 2 on the transformer's matrices (widths divisible by 4)
        assert opts[name]["matrix_state_vs_adam"] == pytest.approx(0.25)
    assert opts["sgd-sai"]["matrix_state_vs_adam"] == pytest.approx(0.5)
    assert result["compressed_params"] < result["num_params"]
    for bad, message in ((["--optimizers", "lion"], "unknown optimizer 'lion'"), (["--workload", "x"], "workload")):
        code, _, err = cli(["bench", "optimizer", *bad])
        assert code == 2 and message in err
