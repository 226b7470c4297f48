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
