"""Repeats over seeds: parsing, per-seed folders equal single runs, quantiles equal numpy, folder protection, CLI."""

import csv
import json

import numpy as np
import pytest

from fedsim.core.errors import FedsimError
from fedsim.seeds import parse_seeds, run_seeds, statistics
from fedsim.simulation import simulate

TINY = dict(dataset="digits", clients=4, rounds=2, local_steps=2, batch_size=16, device="cpu")
SEEDS = [0, 1, 4]
FAST = ["--clients", "4", "--rounds", "2", "--local-steps", "2", "--device", "cpu", "--quiet"]


def metrics(path):
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("time_s")
    return rows


@pytest.mark.parametrize(
    "text, expected",
    [("0-9", list(range(10))), ("0,3,7", [0, 3, 7]), ("1-3,8", [1, 2, 3, 8]), (" 4 ", [4]), ("2-2", [2]),
     ("5, 1", [5, 1]), ("10 - 12", [10, 11, 12])],
)  # fmt: skip
def test_parse_seeds(text, expected):
    assert parse_seeds(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [("", "empty"), ("  ", "empty"), ("a", "bad --seeds item 'a'"), ("3-1", "descending"), ("-1", "non-negative"),
     ("1,1", "seed 1 is given twice"), ("1-3,2", "seed 2 is given twice"), ("1-", "bad --seeds item"),
     (",", "bad --seeds item ''"), ("1.5", "bad --seeds item"), ("0-20000", "more than")],
)  # fmt: skip
def test_parse_seeds_errors(text, message):
    with pytest.raises(FedsimError, match=message):
        parse_seeds(text)


def test_statistics_are_numpy_linear_quantiles():
    values = [3.0, 1.0, 10.0, 2.0, 4.0]
    st = statistics(values)
    assert st["n"] == 5 and st["min"] == 1.0 and st["max"] == 10.0 and st["mean"] == 4.0
    assert st["median"] == 3.0
    assert st["q90"] == pytest.approx(7.6)  # sorted 1,2,3,4,10: position 0.9 * 4 = 3.6 -> 4 + 0.6 * 6
    assert st["q99"] == pytest.approx(4 + 0.96 * 6)
    assert st["std"] == pytest.approx(np.std(values, ddof=1))
    assert statistics([2.5])["std"] == 0.0


@pytest.fixture(scope="module")
def seeds_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("seeds") / "rep"
    report = run_seeds(TINY, SEEDS, out, plots=False)
    return out, report


def test_run_seeds_writes_per_seed_folders_and_quantiles(seeds_run):
    out, report = seeds_run
    assert report == json.loads((out / "seeds_summary.json").read_text())
    assert report["seeds"] == SEEDS and report["runs"] == [f"seed-{s}" for s in SEEDS]
    summaries = [json.loads((out / f"seed-{s}" / "summary.json").read_text()) for s in SEEDS]
    lasts = [metrics(out / f"seed-{s}")[-1] for s in SEEDS]
    for key in ("final_test_accuracy", "final_test_loss", "final_train_loss", "best_test_accuracy"):
        values = np.array([s[key] for s in summaries])
        st = report["final"][key]
        assert st["n"] == 3
        assert st["median"] == np.quantile(values, 0.5)
        assert st["q90"] == np.quantile(values, 0.9) and st["q99"] == np.quantile(values, 0.99)
        assert st["min"] == values.min() and st["max"] == values.max() and st["mean"] == pytest.approx(values.mean())
    loss = np.array([r["test_loss"] for r in lasts])
    assert report["last"]["test_loss"]["q90"] == np.quantile(loss, 0.9)
    assert "round" not in report["last"]
    assert len({s["final_test_loss"] for s in summaries}) == 3  # the seeds really differ
    with open(out / "seeds.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["seed"]) for r in rows] == SEEDS
    assert [float(r["final_test_accuracy"]) for r in rows] == [s["final_test_accuracy"] for s in summaries]
    assert [float(r["last.test_loss"]) for r in rows] == list(loss)


def test_seed_folder_equals_single_run(seeds_run, tmp_path):
    out, _ = seeds_run
    simulate(TINY, tmp_path / "single", seed=4, plots=False)
    assert metrics(tmp_path / "single") == metrics(out / "seed-4")
    assert "seed: 4" in (out / "seed-4" / "config.yaml").read_text()


def test_seeds_folder_protection(tmp_path):
    out = tmp_path / "rep"
    one = dict(TINY, rounds=1)
    run_seeds(one, [0, 1], out, plots=False)
    with pytest.raises(FedsimError, match="already exists"):
        run_seeds(one, [0], out, plots=False)
    run_seeds(one, [3], out, overwrite=True, plots=False)  # an earlier seeds folder may be replaced
    assert sorted(p.name for p in out.glob("seed-*")) == ["seed-3"]
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(FedsimError, match="not a fedsim results folder"):
        run_seeds(one, [0], precious, overwrite=True, plots=False)
    assert (precious / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "seeds, kwargs, message",
    [([], {}, "no seeds"), ([1, 1], {}, "twice"), ([-2], {}, "non-negative"), ([0], {"probe": "nope"}, "unknown probe"),
     ([0], {"probe": "stability", "probe_options": {"node": -1}}, "node must be"),
     ([0], {"probe": "stability", "probe_options": {"nodes": 1}}, "unknown probe option"),
     ([0], {"probe_options": {"node": 1}}, "need a probe")],
)  # fmt: skip
def test_bad_input_writes_nothing(tmp_path, seeds, kwargs, message):
    with pytest.raises(FedsimError, match=message):
        run_seeds(TINY, seeds, tmp_path / "rep", **kwargs)
    assert not (tmp_path / "rep").exists()


def test_cli_seeds(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, stdout, err = cli(["simulate", *FAST, "--seeds", "0-1"])
    assert code == 0, err
    out = tmp_path / "runs" / "fedavg-digits-mlp-seeds"  # default name: -seeds instead of -s<seed>
    for name in ("seeds_summary.json", "seeds.csv", "seeds.png", "seeds_config.yaml", "seed-1/metrics.jsonl"):
        assert (out / name).is_file(), name
    assert "2 seeds" in stdout and "median" in stdout and "q90" in stdout


@pytest.mark.parametrize(
    "argv, message",
    [(["--seeds", "3-1"], "descending seed range"), (["--seeds", "x"], "bad --seeds item"),
     (["--seeds", "0-1", "--seed", "3"], "exclude each other")],
)  # fmt: skip
def test_cli_bad_seeds(tmp_path, cli, argv, message):
    code, _, err = cli(["simulate", *FAST, *argv, "--out", str(tmp_path / "rep")])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "rep").exists()


def test_cli_seeds_refuses_foreign_folder_and_resume(tmp_path, cli):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    code, _, err = cli(["simulate", *FAST, "--seeds", "0-1", "--out", str(precious)])
    assert code == 2 and "already exists" in err
    code, _, err = cli(["simulate", *FAST, "--seeds", "0-1", "--out", str(precious), "--overwrite"])
    assert code == 2 and "not a fedsim results folder" in err
    assert sorted(p.name for p in precious.iterdir()) == ["notes.txt"]
    code, _, err = cli(["simulate", "--seeds", "0-1", "--resume", str(precious)])
    assert code == 2 and "--seeds cannot be combined with --resume" in err


def test_plot_seed_bands_skips_absent_metrics(seeds_run, tmp_path):
    from fedsim.plots import plot_seed_bands

    out, _ = seeds_run
    dirs = [out / f"seed-{s}" for s in SEEDS]
    png = plot_seed_bands(dirs, ["test_accuracy", "consensus_distance"], tmp_path / "bands.png")
    assert png.is_file() and png.stat().st_size > 0
    with pytest.raises(FedsimError, match="none of the metrics"):
        plot_seed_bands(dirs, ["consensus_distance"], tmp_path / "none.png")
