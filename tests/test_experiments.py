"""Shipped experiment configs stay valid, and the README's example config is the shipped one."""

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
