"""``fedsim ppi`` (fedsim.ppi.run): Fed-PPI on a trained run, end to end: ppi.json and ppi.png, the truth and
the labelled counts, every estimand, a decentralized run's own node models, determinism in the seed, the
README's example, and one-line refusals (exit 2) that write nothing."""

from __future__ import annotations

import json
import shlex
import warnings

import numpy as np
import pytest

from fedsim.cli import main
from fedsim.core.errors import FedsimError
from fedsim.simulation import make_simulation

with warnings.catch_warnings():
    pytest.importorskip("ppi_py")

from fedsim.config import make_config  # noqa: E402
from fedsim.ppi.run import federated_ppi, load_predictions  # noqa: E402

RUN = dict(dataset="digits", clients=4, rounds=3, local_steps=5, batch_size=16, seed=3,
           model={"name": "mlp", "hidden": [32]}, checkpoint_every=3)  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from fedsim import simulate

    out = tmp_path_factory.mktemp("ppi") / "run"
    simulate(RUN, out=out, plots=False)
    return out


def test_mean_from_the_command_line(trained, tmp_path, cli):
    code, out, err = cli(["ppi", "--run", str(trained), "--labelled-fraction", "0.1", "--out", str(tmp_path)])
    assert code == 0, err
    result = json.loads((tmp_path / "ppi.json").read_text())
    assert (tmp_path / "ppi.png").stat().st_size > 1000
    sim = make_simulation(make_config(RUN))
    sizes = sim.store.sizes
    labels = sim.store.y[sim.store.order].numpy()
    assert result["labelled"] == sum(int(np.floor(0.1 * s)) for s in sizes)
    assert result["labelled"] + result["unlabelled"] == int(sizes.sum())
    np.testing.assert_allclose(result["truth"], np.bincount(labels, minlength=10) / len(labels), atol=1e-12)
    assert result["coordinates"][0] == "P(y=0)" and len(result["truth"]) == 10
    for method in ("fed_ppi", "classical", "centralized"):
        row = result["methods"][method]
        lower, upper, truth = np.array(row["lower"]), np.array(row["upper"]), np.array(result["truth"])
        assert np.all(lower < upper)
        assert row["covers"] == ((lower <= truth) & (truth <= upper)).tolist()
        np.testing.assert_allclose(row["width"], upper - lower)
    assert "median width: fed_ppi / classical" in out and "P(y=3)" in out


@pytest.mark.parametrize(
    "estimand, options",
    [("quantile", {"prediction": "label"}), ("quantile", {"q": 0.25}), ("ols", {"target_class": 1, "features": [20]}),
     ("logistic", {"target_class": 1, "features": [20], "lam_mode": "global"}),
     ("mean", {"target_class": 2, "prediction": "label", "imputed_variance": "pooled"})],
)  # fmt: skip
def test_every_estimand(trained, estimand, options):
    result = federated_ppi(trained, estimand, 0.3, 0.1, **options)
    assert result["estimand"] == estimand
    widths = [w for row in result["methods"].values() for w in row["width"]]
    assert all(w >= 0 for w in widths)
    if estimand in ("ols", "logistic"):
        assert result["coordinates"] == ["intercept", "x[20]"]
    if estimand == "quantile":
        assert result["truth"][0] in range(10)  # a digit


def test_the_seed_draws_the_labels(trained):
    predictions = load_predictions(trained)
    first = federated_ppi(predictions, "mean", 0.2, seed=1)
    assert federated_ppi(predictions, "mean", 0.2, seed=1) == first
    assert federated_ppi(predictions, "mean", 0.2, seed=2)["methods"] != first["methods"]
    assert federated_ppi(trained, "mean", 0.2)["seed"] == RUN["seed"]  # default: the run's seed


def test_a_decentralized_run_predicts_with_each_nodes_model(tmp_path):
    from fedsim import simulate

    graph = tmp_path / "ring.graphml"
    assert main(["topology", "build", "ring", "--n", "4", "--output", str(graph)]) == 0
    out = tmp_path / "dsgd"
    simulate({**RUN, "topology": str(graph)}, out=out, plots=False)  # D-SGD (ATC), the default over a graph
    predictions = load_predictions(out)
    sim = make_simulation(make_config({**RUN, "topology": str(graph)}))
    assert [len(p) for p in predictions.probabilities] == sim.store.sizes.tolist()
    result = federated_ppi(predictions, "mean", 0.2)
    assert result["clients"] == 4


def _refused(cli, argv, match):
    code, _, err = cli(argv)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and match in err, err


def test_bad_input_is_refused_in_one_line(trained, tmp_path, cli):
    from fedsim import simulate

    no_checkpoint = tmp_path / "nockpt"
    simulate({**RUN, "rounds": 1, "checkpoint_every": 0}, out=no_checkpoint, plots=False)
    _refused(cli, ["ppi", "--run", str(no_checkpoint)], "has no checkpoint.pt")
    _refused(cli, ["ppi", "--run", str(tmp_path / "missing")], "is not a folder")
    _refused(cli, ["ppi", "--run", str(tmp_path)], "is not a results folder")
    run = ["ppi", "--run", str(trained), "--out", str(tmp_path / "out")]
    _refused(cli, [*run, "--labelled-fraction", "0.001"], "leaves client 0")
    _refused(cli, [*run, "--labelled-fraction", "1.5"], "--labelled-fraction must be in (0, 1)")
    _refused(cli, [*run, "--alpha", "0"], "--alpha must be in (0, 1)")
    _refused(cli, [*run, "--estimand", "ols"], "give --class K")
    _refused(cli, [*run, "--estimand", "median"], "--estimand must be one of")
    _refused(cli, [*run, "--q", "0.3"], "--q applies to --estimand quantile only")
    _refused(cli, [*run, "--estimand", "quantile", "--q", "1"], "--q must be in (0, 1)")
    _refused(cli, [*run, "--class", "12"], "--class must be in [0, 9]")
    _refused(cli, [*run, "--estimand", "ols", "--class", "1", "--features", "a,b"], "comma-separated integers")
    _refused(cli, [*run, "--estimand", "ols", "--class", "1", "--features", "9999"], "--features must be input")
    _refused(cli, [*run, "--imputed-variance", "mean"], "--imputed-variance must be")
    assert not (tmp_path / "out").exists()  # nothing written by a refused command
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "ppi.json").write_text("keep")
    _refused(cli, run, "ppi.json exists; pass --overwrite")
    assert (tmp_path / "out" / "ppi.json").read_text() == "keep"
    code, _, err = cli([*run, "--overwrite"])
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "ppi.json").read_text())["estimand"] == "mean"


def test_readme_example_runs_in_order(tmp_path, monkeypatch, capsys):
    """The README's Fed-PPI block (train, then ``fedsim ppi`` on the run) runs as written in an empty folder."""
    from test_readme import code_blocks

    block = next(b for b in code_blocks("bash") if "fedsim ppi --run" in b)
    monkeypatch.chdir(tmp_path)
    for line in block.splitlines():
        argv = shlex.split(line, comments=True)
        if argv:
            assert main(argv[1:]) == 0, f"{line}: {capsys.readouterr().err}"
    assert json.loads((tmp_path / "runs/ppi-digits/ppi.json").read_text())["estimand"]


def test_the_api_refuses_what_the_cli_refuses(trained):
    with pytest.raises(FedsimError, match="leaves client"):
        federated_ppi(trained, "mean", 0.001)
    with pytest.raises(FedsimError, match="drop --lam-mode"):
        federated_ppi(trained, "quantile", 0.2, lam_mode="global")


def test_readme_python_example_runs():
    """The README's ``fedsim.ppi`` Python example runs as written."""
    from test_readme import code_blocks

    block = next(b for b in code_blocks("python") if "from fedsim.ppi import" in b)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["lower"].shape == (2,) and np.all(namespace["lower"] < namespace["upper"])
    assert len(namespace["lowers"]) == 5


def test_out_must_be_a_folder(trained, tmp_path, cli):
    (tmp_path / "file").write_text("x")
    _refused(cli, ["ppi", "--run", str(trained), "--out", str(tmp_path / "file")], "is a file, not a folder")
    assert (tmp_path / "file").read_text() == "x"
