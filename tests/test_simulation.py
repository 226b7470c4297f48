"""End-to-end runs: determinism, resume, divergence, results folder safety, every strategy."""

import json

import pytest

from fedsim.core.errors import DivergenceError, FedsimError
from fedsim.simulation import resume, simulate
from strategies import STRATEGIES

SMALL = dict(dataset="digits", clients=10, rounds=4, local_steps=3, batch_size=16, lr=0.1)


def metrics(path):
    lines = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        line.pop("time_s")
    return lines


def test_results_folder_contents(tmp_path):
    out = tmp_path / "run"
    summary = simulate(SMALL, out)
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "label_histogram.csv",
        "checkpoint.pt",
        "convergence.png",
        "drift.png",
        "label_histogram.png",
        "client_accuracy.png",
    ):
        assert (out / name).is_file(), name
    rows = metrics(out)
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    required = {
        "round",
        "test_accuracy",
        "test_loss",
        "train_loss",
        "drift",
        "update_norm",
        "bytes_up",
        "bytes_down",
        "client_accuracy_mean",
        "client_accuracy_std",
        "client_accuracy_worst10",
    }
    assert required <= set(rows[0])
    assert summary["rounds_completed"] == 4 and summary["final_test_accuracy"] == rows[-1]["test_accuracy"]
    model_bytes = summary["num_params"] * 4
    assert rows[0]["bytes_up"] == rows[0]["bytes_down"] == 10 * model_bytes
    hist = (out / "label_histogram.csv").read_text().splitlines()
    assert len(hist) == 11 and hist[0].startswith("client,class_0")


def test_learns_digits(tmp_path):
    summary = simulate({**SMALL, "rounds": 15, "local_steps": 10}, tmp_path / "r")
    assert summary["best_test_accuracy"] > 0.85


def test_same_seed_same_metrics_any_chunk_size(tmp_path):
    simulate(SMALL, tmp_path / "a")
    simulate({**SMALL, "chunk_size": 3}, tmp_path / "b")
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
    simulate({**SMALL, "seed": 1}, tmp_path / "c")
    assert metrics(tmp_path / "a") != metrics(tmp_path / "c")


def test_vectorized_and_sequential_runs_agree(tmp_path):
    a = simulate({**SMALL, "rounds": 2}, tmp_path / "a")
    b = simulate({**SMALL, "rounds": 2, "sequential": True}, tmp_path / "b")
    assert a["final_test_accuracy"] == pytest.approx(b["final_test_accuracy"], abs=1e-3)
    assert a["final_train_loss"] == pytest.approx(b["final_train_loss"], rel=1e-4)


def test_resume_after_kill_matches_uninterrupted(tmp_path):
    config = {
        **SMALL,
        "rounds": 6,
        "checkpoint_every": 2,
        "fraction": 0.5,
        "strategy": "fedadam",
        "optimizer.momentum": 0.5,
    }
    simulate(config, tmp_path / "full")

    killed = tmp_path / "killed"
    with pytest.raises(Killed):
        simulate(config, killed, plots=False, on_round=_kill_at(5))
    assert [r["round"] for r in metrics(killed)] == [1, 2, 3, 4, 5]  # round 5 written, not checkpointed
    resume(killed)
    assert metrics(killed) == metrics(tmp_path / "full")


class Killed(Exception):
    """Stands in for the process being killed after a round was written."""


def _kill_at(round_):
    def callback(record):
        if record["round"] == round_:
            raise Killed

    return callback


def test_resume_without_checkpoint_needs_overwrite_to_restart(tmp_path):
    out = tmp_path / "r"
    simulate({**SMALL, "checkpoint_every": 0, "rounds": 2}, out)
    with pytest.raises(FedsimError, match="has no checkpoint"):
        resume(out)
    resume(out, overwrite=True)
    assert [r["round"] for r in metrics(out)] == [1, 2]


def test_resume_refuses_non_results_folder(tmp_path):
    with pytest.raises(FedsimError, match="not a results folder"):
        resume(tmp_path)


def test_corrupt_checkpoint_refused(tmp_path):
    out = tmp_path / "r"
    simulate({**SMALL, "rounds": 2}, out, plots=False)
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(FedsimError, match="cannot load checkpoint"):
        resume(out)


def test_divergence_stops_and_keeps_results(tmp_path):
    out = tmp_path / "r"
    with pytest.raises(DivergenceError, match="diverged at round"):
        simulate({**SMALL, "lr": 1e9, "rounds": 10}, out)
    rows = metrics(out)
    assert rows and rows[-1]["diverged"] is True and rows[-1]["train_loss"] is None
    text = (out / "summary.json").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    assert json.loads(text)["diverged"] is True


def test_existing_folder_needs_overwrite(tmp_path):
    out = tmp_path / "r"
    simulate({**SMALL, "rounds": 1}, out, plots=False)
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(FedsimError, match="already exists"):
        simulate({**SMALL, "rounds": 2}, out)
    assert (out / "metrics.jsonl").read_text() == before
    simulate({**SMALL, "rounds": 2}, out, overwrite=True, plots=False)
    assert len(metrics(out)) == 2


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_runs_and_improves(strategy, tmp_path):
    summary = simulate({**SMALL, "strategy": strategy, "rounds": 5}, tmp_path / strategy, plots=False)
    assert summary["best_test_accuracy"] > 0.3  # 10 classes: clearly above chance


def test_partial_participation_and_epochs(tmp_path):
    out = tmp_path / "r"
    simulate({**SMALL, "fraction": 0.3, "local_epochs": 1, "eval_every": 2, "rounds": 4}, out, plots=False)
    rows = metrics(out)
    assert all(r["clients"] == 3 for r in rows)
    assert [r["test_accuracy"] is None for r in rows] == [True, False, True, False]
    assert [("client_accuracy_mean" in r) for r in rows] == [False, True, False, True]


def test_lr_schedule_in_metrics(tmp_path):
    out = tmp_path / "r"
    simulate({**SMALL, "rounds": 4, "lr_schedule": {"name": "step", "step": 2, "decay": 0.5}}, out, plots=False)
    assert [r["lr"] for r in metrics(out)] == [0.1, 0.1, 0.05, 0.05]


def test_npz_dataset_with_natural_partition(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 12)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    client = np.repeat(np.arange(6), 50)
    np.savez(tmp_path / "data.npz", x=x, y=y, client=client)
    summary = simulate(
        {
            **SMALL,
            "dataset": {"name": "npz", "path": str(tmp_path / "data.npz")},
            "clients": 6,
            "partition": "natural",
            "model": "logreg",
            "rounds": 5,
        },
        tmp_path / "r",
        plots=False,
    )
    assert summary["best_test_accuracy"] > 0.8


def test_client_drift_formula():
    import torch

    from fedsim.core.protocol import client_drift

    deltas = {"w": torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 3.0]])}
    mean = torch.tensor([2.0, 1.0])
    expected = sum(float((d - mean).norm()) for d in deltas["w"]) / 3 / float(mean.norm())
    assert client_drift(deltas) == pytest.approx(expected)
    assert client_drift({"w": torch.ones(4, 3)}) == 0.0  # identical clients: no drift
    assert client_drift({"w": torch.tensor([[1.0], [-1.0]])}) is None  # zero mean update: undefined


def test_same_seed_same_initial_model_for_user_models(tmp_path, monkeypatch):
    (tmp_path / "rand_model.py").write_text(
        "import torch\nfrom torch import nn\n"
        "class M(nn.Module):\n"
        "    def __init__(self, shape, classes):\n"
        "        super().__init__()\n"
        "        self.w = nn.Parameter(torch.randn(64, classes))\n"
        "    def forward(self, x):\n"
        "        return x.flatten(1) @ self.w\n"
        "def make(shape, classes):\n    return M(shape, classes)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    a = simulate({**SMALL, "model": "rand_model:make", "rounds": 2}, tmp_path / "a", plots=False)
    import torch

    torch.randn(100)  # global RNG state must not matter
    b = simulate({**SMALL, "model": "rand_model:make", "rounds": 2}, tmp_path / "b", plots=False)
    assert a["final_train_loss"] == b["final_train_loss"]
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
