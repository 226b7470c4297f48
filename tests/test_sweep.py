"""``fedsim sweep``: the grid times the seeds, content-hashed runs skipped when complete (a killed sweep
resumes), summary.csv's medians and spreads from the runs, the Optuna search resuming its SQLite study, and
one-line refusals."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from fedsim.config import make_config
from fedsim.sweep import grid_points, metric_value, parse_grid, run_key

BASE = ["--set", "rounds=2", "--set", "clients=4", "--set", "local_steps=2", "--set", "checkpoint_every=0",
        "--set", "threads=1"]  # fmt: skip


def rows(path):
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_grid_points_and_content_hash():
    grid = parse_grid(["strategy=fedavg,fedprox", "lr=0.01,0.1,1"])
    assert grid == {"strategy": ["fedavg", "fedprox"], "lr": [0.01, 0.1, 1]}
    points = grid_points(grid)
    assert len(points) == 6 and points[0] == {"strategy": "fedavg", "lr": 0.01} and points[-1]["lr"] == 1
    a = make_config({"lr": 0.1, "threads": 1, "logger": "tensorboard"})
    assert run_key(a) == run_key(make_config({"lr": 0.1})) != run_key(make_config({"lr": 0.2}))
    assert parse_grid(["lr=0.001:0.1:log"], ranges=True) == {"lr": ("range", 0.001, 0.1, True)}


def test_grid_sweep_tables_report_and_resume(tmp_path, cli):
    out = tmp_path / "sweep"
    args = ["sweep", "--grid", "strategy=fedavg,fedprox", "--seeds", "0-1", "--out", str(out), *BASE]
    code, stdout, err = cli(args)
    assert code == 0, err
    assert "| strategy | n | final_test_accuracy |" in stdout
    runs = rows(out / "runs.csv")
    assert [(r["strategy"], r["seed"]) for r in runs] == [("fedavg", "0"), ("fedavg", "1"), ("fedprox", "0"),
                                                          ("fedprox", "1")]  # fmt: skip
    assert len({r["run"] for r in runs}) == 4 and (out / "report.html").is_file() and (out / "comparison.png").is_file()
    summary = rows(out / "summary.csv")
    for point in summary:
        mine = [r for r in runs if r["strategy"] == point["strategy"]]
        values = [metric_value(out / r["run"], "final_test_accuracy") for r in mine]
        assert float(point["final_test_accuracy_median"]) == pytest.approx(np.median(values))
        assert float(point["final_test_accuracy_std"]) == pytest.approx(np.std(values, ddof=1))
        assert float(point["final_test_accuracy_min"]) == min(values) and point["n"] == "2"
    # everything complete: a second call runs nothing and gives the same table
    before = (out / "summary.csv").read_text()
    code, _, err = cli(args)
    assert code == 0 and err.count("complete, skipped") == 4 and (out / "summary.csv").read_text() == before
    # a run killed before its summary is run again, alone, and gives the same numbers
    killed = out / runs[1]["run"]
    (killed / "summary.json").unlink()
    code, _, err = cli(args)
    assert code == 0 and err.count("complete, skipped") == 3 and (out / "summary.csv").read_text() == before


def test_jobs_give_the_same_runs_as_one_at_a_time(tmp_path, cli):
    for jobs, name in ((1, "one"), (2, "two")):
        code, _, err = cli(["sweep", "--grid", "lr=0.05,0.1", "--jobs", str(jobs), "--out", str(tmp_path / name),
                            "--no-plots", *BASE])  # fmt: skip
        assert code == 0, err
    assert (tmp_path / "one" / "summary.csv").read_text() == (tmp_path / "two" / "summary.csv").read_text()
    for run in (tmp_path / "one" / "runs").iterdir():
        twin = tmp_path / "two" / "runs" / run.name
        assert [r["train_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())] == [
            r["train_loss"] for r in map(json.loads, (twin / "metrics.jsonl").read_text().splitlines())
        ]


def test_optuna_search_resumes_its_study(tmp_path, cli):
    optuna = pytest.importorskip("optuna")
    out = tmp_path / "search"
    args = ["sweep", "--grid", "lr=0.01:0.3:log", "--optimize", "test_accuracy", "--out", str(out), "--no-plots",
            *BASE]  # fmt: skip
    code, stdout, err = cli([*args, "--trials", "2"])
    assert code == 0, err
    assert "best test_accuracy:" in stdout
    study = optuna.load_study(study_name="fedsim", storage=f"sqlite:///{out / 'optuna.db'}")
    assert len(study.trials) == 2 and study.direction.name == "MAXIMIZE"
    code, _, err = cli([*args, "--trials", "3"])  # one more trial, not three
    assert code == 0, err
    study = optuna.load_study(study_name="fedsim", storage=f"sqlite:///{out / 'optuna.db'}")
    assert len(study.trials) == 3 and len(rows(out / "summary.csv")) == 3
    for trial in study.trials:  # each trial's value is its run's metric
        (run,) = [r for r in rows(out / "runs.csv") if float(r["lr"]) == trial.params["lr"]]
        assert trial.value == pytest.approx(metric_value(out / run["run"], "test_accuracy"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--grid", "learning_rate=0.1,0.2"], "grid key 'learning_rate' is not a config key"),
        (["--grid", "strategy.mu=0.1", "--grid", "bogus.x=1"], "grid key 'bogus.x' is not a config key"),
        (["--grid", "lr=0.1", "--jobs", "0"], "jobs must be a positive integer, got 0"),
        (["--grid", "lr=0.01:0.1"], "a range needs --optimize"),
        (["--grid", "lr=0.1", "--optimize", "test_accuracy"], "--optimize needs --trials N"),
        (["--grid", "lr=0.1", "--trials", "3"], "add --optimize METRIC"),
        (["--grid", "seed=1,2"], "the sweep sets the seed from --seeds"),
        (["--grid", "strategy=fedavg,nosuch"], "unknown strategy 'nosuch'"),
        (["--grid", "lr=0.1", "--seeds", "3-1"], "descending seed range"),
        (["--grid", "lr=0.1", "--executor", "ray", "--jobs", "2"], "with --executor ray, Ray schedules the runs"),
        (["--grid", "lr=0.1", "--executor", "slurm"], "unknown sweep executor 'slurm'"),
    ],
)
def test_bad_sweep_input_is_one_line(tmp_path, cli, args, message):
    code, _, err = cli(["sweep", *args, "--out", str(tmp_path / "s"), *BASE])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "s").exists()


def test_a_folder_that_is_not_a_sweep_is_refused(tmp_path, cli):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "notes.txt").write_text("mine")
    code, _, err = cli(["sweep", "--grid", "lr=0.1", "--out", str(tmp_path / "s"), *BASE])
    assert code == 2 and "is not empty and not a sweep folder" in err
    assert (tmp_path / "s" / "notes.txt").read_text() == "mine"


def test_ray_tasks_give_the_same_run(tmp_path, cli):
    pytest.importorskip("ray")
    code, _, err = cli(["sweep", "--grid", "lr=0.1", "--out", str(tmp_path / "local"), "--no-plots", *BASE])
    assert code == 0, err
    code, _, err = cli(["sweep", "--grid", "lr=0.1", "--executor", "ray", "--out", str(tmp_path / "ray"),
                        "--no-plots", *BASE])  # fmt: skip
    assert code == 0, err
    (run,) = list((tmp_path / "local" / "runs").iterdir())
    twin = tmp_path / "ray" / "runs" / run.name
    assert (run / "metrics.jsonl").read_text().count("\n") == (twin / "metrics.jsonl").read_text().count("\n")
    assert metric_value(run, "final_train_loss") == metric_value(twin, "final_train_loss")
    shutil.rmtree(tmp_path / "ray")
