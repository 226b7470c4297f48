"""User plugins: a real distribution (``tests/plugin_dist``: a package plus its ``.dist-info`` with entry points)
adds a strategy with its own option, a local optimizer, a client regulator, an aggregator and a dataset. Each
runs by entry-point name and by ``module:Name``, from the CLI, a config file and Python; its options are
validated; ``fedsim list`` shows it. ``register(kind, name, obj)`` is the Python form."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import fedsim
from fedsim.core import components

PLUGIN_DIST = Path(__file__).parent / "plugin_dist"
MODULE = "fedsim_demo_plugin"
BY_ENTRY_POINT = {
    "dataset": {"name": "blobs", "centers": 4},
    "strategy": {"name": "fedavg-damped", "damp": 0.2},
    "optimizer": {"name": "signsgd", "scale": 0.5},
    "regulator": {"name": "scaled", "factor": 0.9},
    "aggregator": {"name": "mean-of-medians", "groups": 2},
}
CLASS_OF = {"dataset": "blobs", "strategy": "DampedFedAvg", "optimizer": "SignSGD", "regulator": "ScaledUpload",
            "aggregator": "MeanOfMedians"}  # fmt: skip
BY_REFERENCE = {key: {**spec, "name": f"{MODULE}:{CLASS_OF[key]}"} for key, spec in BY_ENTRY_POINT.items()}
RUN = {"model": "mlp", "clients": 6, "rounds": 2, "local_steps": 3, "partition": "iid", "lr": 0.01, "seed": 1}


@pytest.fixture
def plugin(monkeypatch):
    """The plugin distribution importable (as if installed); the registry restored afterwards."""
    for kind in components.KINDS:  # built-ins registered before the snapshot
        components.names(kind)
    monkeypatch.syspath_prepend(str(PLUGIN_DIST))
    saved = {kind: dict(registered) for kind, registered in components._REGISTRY.items()}
    yield
    for kind, registered in saved.items():
        components._REGISTRY[kind] = registered


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _flags(specs: dict[str, dict]) -> list[str]:
    argv = []
    for key, spec in specs.items():
        argv += [f"--{key}", spec["name"]]
        argv += [f"--set={key}.{k}={v}" for k, v in spec.items() if k != "name"]
    for key, value in RUN.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def test_fedsim_list_shows_the_plugins(plugin, cli):
    code, out, _ = cli(["list"])
    assert code == 0
    lines = {line.split(":")[0]: line for line in out.splitlines()}
    for kind, spec in (("dataset", "blobs"), ("strategy", "fedavg-damped"), ("optimizer", "signsgd"),
                       ("regulator", "scaled"), ("aggregator", "mean-of-medians")):  # fmt: skip
        assert spec in lines[kind], kind
    code, out, _ = cli(["list", "strategy"])
    assert "fedavg-damped" in out and "[plugin fedsim-demo-plugin]" in out
    code, out, _ = cli(["list", "strategy", "fedavg-damped"])
    assert code == 0 and "damp" in out and "default 0.5" in out and ">= 0, < 1" in out
    code, out, _ = cli(["list", "strategy", f"{MODULE}:DampedFedAvg"])
    assert code == 0 and "damp" in out


@pytest.mark.parametrize("specs", [BY_ENTRY_POINT, BY_REFERENCE], ids=["entry_point", "module_name"])
def test_plugins_run_from_cli_config_file_and_python(plugin, cli, tmp_path, specs):
    code, _, err = cli(["simulate", *_flags(specs), "--quiet", "--out", str(tmp_path / "cli")])
    assert code == 0, err
    config_file = tmp_path / "exp.yaml"
    config_file.write_text(yaml.safe_dump({**specs, **RUN}))
    code, _, err = cli(["simulate", str(config_file), "--quiet", "--out", str(tmp_path / "file")])
    assert code == 0, err
    fedsim.simulate({**specs, **RUN}, out=tmp_path / "python", plots=False)
    runs = [_metrics(tmp_path / name) for name in ("cli", "file", "python")]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time_s"} for r in rows]  # noqa: E731
    assert strip(runs[0]) == strip(runs[1]) == strip(runs[2])
    written = yaml.safe_load((tmp_path / "cli" / "config.yaml").read_text())
    for key, spec in specs.items():
        assert written[key]["name"] == spec["name"]
        assert all(written[key][k] == v for k, v in spec.items())
    assert runs[0][-1]["test_accuracy"] > 0.5  # the blobs are separable: the plugins really train


def test_entry_point_and_reference_are_the_same_component(plugin, tmp_path):
    by_name = fedsim.simulate({**BY_ENTRY_POINT, **RUN}, plots=False)
    by_ref = fedsim.simulate({**BY_REFERENCE, **RUN}, plots=False)
    assert by_name["final_test_accuracy"] == by_ref["final_test_accuracy"]


def test_plugin_options_reach_the_components(plugin):
    """damp = 0 is FedAvg (an oracle); another damp changes the numbers; so does the regulator's factor."""
    base = {**RUN, "dataset": "blobs"}
    fedavg = fedsim.simulate({**base, "strategy": "fedavg"}, plots=False)
    undamped = fedsim.simulate({**base, "strategy": {"name": "fedavg-damped", "damp": 0.0}}, plots=False)
    damped = fedsim.simulate({**base, "strategy": {"name": "fedavg-damped", "damp": 0.9}}, plots=False)
    assert undamped["final_test_loss"] == fedavg["final_test_loss"]
    assert damped["final_test_loss"] != fedavg["final_test_loss"]
    scaled = fedsim.simulate({**base, "regulator": {"name": "scaled", "factor": 0.1}}, plots=False)
    assert scaled["final_test_loss"] != fedavg["final_test_loss"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--strategy", "fedavg-damped", "--set", "strategy.damp=1.5"], "strategy 'fedavg-damped', option 'damp'"),
        (["--strategy", "fedavg-damped", "--set", "strategy.dampp=0.1"], "did you mean 'damp'"),
        (["--optimizer", "signsgd", "--set", "optimizer.scale=abc"], "optimizer 'signsgd', option 'scale'"),
        (["--optimizer", "signsgd", "--set", "optimizer.momentum=0.9"], "optimizer 'signsgd' has no option"),
        (["--regulator", "scaled", "--set", "regulator.factor=0"], "regulator 'scaled', option 'factor'"),
        (["--aggregator", "mean-of-medians", "--set", "aggregator.groups=0"], "aggregator 'mean-of-medians'"),
        (["--dataset", "blobs", "--set", "dataset.centers=1"], "dataset 'blobs', option 'centers'"),
        (["--strategy", f"{MODULE}:Nope"], f"module '{MODULE}' has no attribute 'Nope'"),
        (["--optimizer", f"{MODULE}:DampedFedAvg"], "is not an optimizer"),
    ],
)
def test_plugin_options_are_validated(plugin, cli, tmp_path, flags, message):
    code, _, err = cli(["simulate", *flags, "--dataset", "blobs", "--rounds", "1", "--quiet",
                        "--out", str(tmp_path / "run")])  # fmt: skip
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_register_is_the_python_form(plugin, tmp_path):
    from fedsim_demo_plugin import DampedFedAvg

    components.register("strategy", "my-damped", DampedFedAvg)
    summary = fedsim.simulate({**RUN, "dataset": "blobs", "strategy": {"name": "my-damped", "damp": 0.3}},
                              out=tmp_path / "run", plots=False)  # fmt: skip
    assert summary["strategy"] == "my-damped"
    assert "my-damped" in components.names("strategy")
