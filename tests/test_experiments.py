"""Shipped experiment configs stay valid, and the README's example config is the shipped one."""

import json
from pathlib import Path

import pytest
import yaml

from fedsim.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "experiments" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_experiment_configs_validate(path):
    assert load_config(path).rounds >= 1


def test_readme_example_config_matches_file():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("Example config (`experiments/configs/fedprox_mnist5k.yaml`):")[1].split("```yaml")[1]
    block = block.split("```")[0]
    assert yaml.safe_load(block) == yaml.safe_load((ROOT / "experiments/configs/fedprox_mnist5k.yaml").read_text())


def test_generalization_script_sweeps_and_plots(tmp_path):
    """The experiment script runs a (tiny) sweep over seeds, fits the 1/sqrt(mn) curve and writes its plot."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("generalization", ROOT / "experiments" / "generalization.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    result = script.nodes_sweep(seeds=2, rounds=1, folder=tmp_path, values=(4, 8))
    rows = result["points"]
    assert [r["m"] for r in rows] == [4, 8] and all(r["seeds"] == 2 for r in rows)
    stats = rows[0]["stats"]["generalization_gap"]
    assert stats["min"] <= stats["q10"] <= stats["median"] <= stats["q90"] <= stats["max"]
    assert script.fit_inverse_sqrt(rows) > 0
    assert script.plot_sweep("nodes", result, tmp_path / "nodes.png").stat().st_size > 1000


def _ecgr_runner():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ecgr_run", ROOT / "experiments" / "ecgr" / "run.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


ECGR_TABLES = sorted((ROOT / "experiments" / "ecgr").glob("table_*.yaml"))


@pytest.mark.parametrize("path", ECGR_TABLES, ids=[p.name for p in ECGR_TABLES])
def test_ecgr_tables_plan_valid_configs(path, tmp_path):
    script = _ecgr_runner()
    table = script.read_table(path)
    plan = script.plan_runs(table, tmp_path, {}, [int(s) for s in table["seeds"]])
    assert len(plan) == len(script.grid_points(table["grid"])) * len(table["methods"]) * len(table["seeds"])
    assert all(r["config"].rounds == 100 and r["config"].clients == 10 for r in plan)  # the paper's setup
    for r in plan:  # the grid point and the method's overrides (nested component options) reach the run's config
        config = r["config"]
        for key, value in r["point"].items():
            head, _, option = key.partition(".")
            assert (getattr(config, head).get(option) if option else str(getattr(config, head))) == value, key
        for key, value in script.overrides_of(table["methods"][r["method"]]).items():
            spec = value if isinstance(value, dict) else {"name": value}
            got = getattr(config, key)
            assert got.name == spec["name"], (r["method"], key)
            assert all(got.get(k) == v for k, v in spec.items() if k != "name"), (r["method"], key)
    assert len({script.config_digest(r["config"]) for r in plan}) == len(plan)  # nested options tell runs apart
    for name, method in table["methods"].items():
        other = script.compared_with(name, method)
        assert other is None or other in table["methods"]


def test_ecgr_runner_tables_pairs_and_resumes(tmp_path, capsys):
    script = _ecgr_runner()
    table = tmp_path / "table_tiny.yaml"
    table.write_text(
        "title: tiny\nbase: " + str(ROOT / "experiments" / "ecgr" / "base.yaml") + "\n"
        "grid: {partition.alpha: [0.5]}\nseeds: [0, 1]\ntarget: 0.2\n"
        "methods:\n  FedAvg: {strategy: fedavg}\n  FedAvg+ECGR: {strategy: fedavg, regulator: ecgr}\n"
    )
    argv = [str(table), "--set", "dataset=digits", "--set", "model=mlp", "--set", "rounds=3",
            "--set", "min_client_size=20", "--set", "lr=0.05", "--runs", str(tmp_path / "runs"),
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert script.main(argv) == 0
    results = json.loads((tmp_path / "out" / "table_tiny.json").read_text())
    methods = results["points"][0]["methods"]
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 4
    finals = {}
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        finals[run.name] = summary["final_test_accuracy"]
    plain = [v for k, v in finals.items() if "ECGR" not in k]
    assert methods["FedAvg"]["stats"]["final_test_accuracy"]["mean"] == pytest.approx(sum(plain) / 2)
    diff = methods["FedAvg+ECGR"]["vs"]
    assert diff["method"] == "FedAvg" and diff["final_test_accuracy"]["n"] == 2
    assert "FedAvg+ECGR" in (tmp_path / "out" / "table_tiny.md").read_text()
    assert (tmp_path / "out" / "table_tiny_partition.alpha_0.5.png").stat().st_size > 1000
    capsys.readouterr()
    assert script.main(argv) == 0  # everything is done: nothing runs again
    assert "4 of 4 runs already done; running 0" in capsys.readouterr().out


def _run_script(path, argv, monkeypatch):
    import runpy
    import sys

    monkeypatch.setattr(sys, "argv", [str(path), *argv])
    runpy.run_path(str(path), run_name="__main__")


def test_optimizer_experiments_write_table_and_plot(tmp_path, monkeypatch):
    """Both optimizer experiments run end to end on a tiny budget and write their table, JSON and plot."""
    folder = ROOT / "experiments" / "optimizers"
    argv = ["--steps", "4", "--eval-every", "2", "--speakers", "3", "--max-samples", "40", "--val-size", "32",
            "--optimizers", "FOAM,SGD-SaI", "--out", str(tmp_path)]  # fmt: skip
    _run_script(folder / "centralized.py", argv, monkeypatch)
    central = json.loads((tmp_path / "centralized.json").read_text())["results"]
    assert set(central) == {"Adam", "FOAM", "SGD-SaI"}
    assert central["FOAM"]["compressed_state_vs_adam"] == pytest.approx(0.25, abs=0.01)
    assert "| FOAM |" in (tmp_path / "centralized.md").read_text()
    assert (tmp_path / "centralized.png").stat().st_size > 1000
    argv = ["--clients", "4", "--fraction", "0.5", "--rounds", "1", "--local-steps", "2", "--max-samples", "40",
            "--eval-every", "1", "--out", str(tmp_path), "--runs", str(tmp_path / "runs")]  # fmt: skip
    _run_script(folder / "federated.py", argv, monkeypatch)
    fed = json.loads((tmp_path / "federated.json").read_text())["results"]
    assert set(fed) == {"Adam", "FOAM", "GWT"}
    adam, foam = (fed[k]["summary"]["optimizer_state_bytes_all_clients"] for k in ("Adam", "FOAM"))
    assert foam < 0.5 * adam
    assert (tmp_path / "federated.png").stat().st_size > 1000


def test_async_experiment_runs_tabulates_and_plots(tmp_path):
    """The asynchronous experiment script (tiny: one seed, one sigma, two methods, a few rounds) fills its
    table, its README markdown and its plot."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("async_run", ROOT / "experiments" / "async" / "run.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert set(script.methods()) >= {"fedavg", "fedavg-deadline", "fedavg-overselect", "fedasync-constant",
                                     "fedasync-polynomial", "fedasync-hinge", "fedbuff"}  # fmt: skip
    result = script.run_all(seeds=1, sigmas=(1.0,), quick=True, names=["fedavg", "fedbuff"])
    assert [(r["method"], r["sigma"]) for r in result["table"]] == [("fedavg", 1.0), ("fedbuff", 1.0)]
    assert all(r["virtual_time_s"] > 0 for r in result["runs"])
    assert script.markdown(result).startswith("| method | sigma 1 |")

    def row(method, median, low, high, reached, speedup):
        spread = {"median": median, "min": low, "max": high, "reached": reached, "of": 2}
        return {"sigma": 1.0, "method": method, "time_to_target_s": spread, "speedup_vs_fedavg": speedup}

    fake = {"target": "0.8", "table": [row("fedavg", 4.0, 3.0, 5.0, 2, 1.0), row("fedbuff", 1.0, 1.0, 2.0, 1, 4.0)]}
    table = script.markdown(fake)
    assert "| fedbuff | 1.0 [1.0-2.0] (1/2), 4.0x |" in table
    assert script.plot(fake, tmp_path / "t.png").stat().st_size > 1000
    assert script._spread([1.0, None, 3.0]) == {"median": 3.0, "min": 1.0, "max": 3.0, "reached": 2, "of": 3}


def test_privacy_experiment_runs_tabulates_and_plots(tmp_path, monkeypatch):
    """The privacy experiment script end to end on a tiny workload (digits, 10 clients, 2 rounds, a few cells):
    its JSON, tables, heat map and privacy-utility plot; DP-BREM's sigma reaches the target epsilon."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("privacy_run", ROOT / "experiments" / "privacy" / "run.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(script, "BASE", {**script.BASE, "dataset": "digits", "clients": 10})
    script.main(["--quick", "--out", str(tmp_path)])
    robustness = json.loads((tmp_path / "robustness.json").read_text())["runs"]
    assert {(r["attack"], r["aggregator"]) for r in robustness} == {
        (a, g) for a in ("none", "alie") for g in ("mean", "median", "dp-brem")
    }
    assert "| dp-brem |" in (tmp_path / "robustness.md").read_text()
    utility = json.loads((tmp_path / "privacy_utility.json").read_text())["runs"]
    finite = [r for r in utility if r["target_epsilon"] == 4.0]
    assert len(finite) == 6 and all(r["epsilon"] == pytest.approx(4.0, rel=2e-3) for r in finite)
    assert all(r["epsilon"] is None for r in utility if r["target_epsilon"] == float("inf"))
    for name in ("robustness.png", "privacy_utility.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_ppi_experiment_runs_tabulates_and_plots(tmp_path):
    """The Fed-PPI experiment script end to end in quick mode (two synthetic cells, a few reps, a 3-round digits
    run, a few seeds): its JSON (cells, methods, coverages in [0, 1]), tables and plots."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ppi_run", ROOT / "experiments" / "ppi" / "run.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--quick", "--out", str(tmp_path)])
    coverage = json.loads((tmp_path / "coverage.json").read_text())
    assert coverage["config"]["theta"] == pytest.approx(1.5)
    assert len(coverage["cells"]) >= 2 and coverage["factors"]
    for cell in coverage["cells"]:
        assert set(cell["methods"]) == set(script.METHODS)
        for name, row in cell["methods"].items():
            truths = {"client"} if name == "per_client" else {"population", "stratified"}
            assert set(row["coverage"]) == truths
            assert all(0 <= stats["coverage"] <= 1 and stats["se"] >= 0 for stats in row["coverage"].values())
            assert row["median_width"] > 0 and row["ratio_classical"] > 0
        assert cell["methods"]["classical"]["ratio_classical"] == pytest.approx(1.0)
    assert "| fed_ppi client/averaged (default) |" in (tmp_path / "coverage.md").read_text()
    real = json.loads((tmp_path / "real.json").read_text())
    assert 0 <= real["test_accuracy"] <= 1 and real["config"]["dataset"] == "digits"
    blocks = [b for b in real["fractions"].values() if "skipped" not in b]
    assert blocks
    for block in blocks:
        assert set(block["methods"]) == set(script.REAL_METHODS)
        for row in block["methods"].values():
            assert len(row["coverage"]) == len(real["classes"]) == 10
            assert all(0 <= c <= 1 for c in row["coverage"])
    assert "## labelled fraction" in (tmp_path / "real.md").read_text()
    for name in ("coverage.png", "widths.png", "intervals.png", "real.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_compression_experiment_runs_tabulates_and_plots(tmp_path):
    """The compression experiment script (tiny: one seed, a few rounds, three uplinks, CHOCO on the ring) fills
    its table with gaps and byte ratios against the uncompressed run, and draws accuracy and consensus vs MB."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("compression_run", ROOT / "experiments" / "compression" / "run.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert {"none", "topk 0.01+ef", "sign", "sign+ef", "qsgd 16", "powersgd 4+ef", "int8"} <= set(script.uplinks())
    assert all(set(variants) <= set(script.uplinks()) for _, variants in script.SETTINGS.values() if variants)
    result = script.run_all(seeds=1, quick=True, names=["none", "topk 0.01+ef", "exact", "choco topk 0.1"],
                            topologies=("ring",), settings=("federated",))  # fmt: skip
    rows = {(r["setting"], r["variant"]): r for r in result["table"]}
    assert set(rows) == {("federated", "none"), ("federated", "topk 0.01+ef"), ("ring", "exact"),
                         ("ring", "choco topk 0.1")}  # fmt: skip
    assert rows[("federated", "none")]["gap_points"] == 0 and rows[("federated", "none")]["bytes_ratio"] == 1
    assert rows[("federated", "topk 0.01+ef")]["bytes_ratio"] > 40  # 1% of the entries, values and indices
    assert rows[("ring", "choco topk 0.1")]["bytes_ratio"] > 4
    assert "| federated | topk 0.01+ef |" in script.markdown(result)
    assert script.plot(result, tmp_path / "a.png").stat().st_size > 1000
    assert script.plot(result, tmp_path / "c.png", "ring", "consensus_distance").stat().st_size > 1000
