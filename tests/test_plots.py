"""Tests of fedsim.plots on synthetic results folders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedsim.core.errors import FedsimError
from fedsim.plots import (
    available_metrics,
    plot_label_histogram,
    plot_run,
    plot_runs,
    read_label_histogram,
    read_metrics,
    run_label,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 2000


def full_record(r: int) -> dict:
    evaluate = r % 2 == 0
    record = {
        "round": r,
        "test_accuracy": 0.5 + 0.04 * r if evaluate else None,
        "test_loss": 1.5 / (r + 1) if evaluate else None,
        "train_loss": 1.4 / (r + 1),
        "drift": 10.0 ** (-r / 2),  # spans > 2 orders of magnitude: log axis
        "update_norm": 1.0 + 0.1 * r,
        "bytes_up": 1000 * r,
        "bytes_down": 2000 * r,
        "time_s": 0.05,
        "lr": 0.05,
    }
    if evaluate:
        record |= {
            "client_accuracy_mean": 0.45 + 0.04 * r,
            "client_accuracy_std": 0.1,
            "client_accuracy_worst10": 0.3 + 0.03 * r,
            "consensus_distance": 0.2 / (r + 1),
        }
    return record


def write_run(
    root: Path,
    name: str,
    records: list[dict],
    *,
    truncated: bool = True,
    config: dict | None = None,
    histogram: np.ndarray | None = None,
) -> Path:
    run = root / name
    run.mkdir(parents=True)
    text = "".join(json.dumps(r) + "\n" for r in records)
    if truncated:
        text += '{"round": 99, "test_accu'  # the writer is mid-line
    (run / "metrics.jsonl").write_text(text)
    config = {"strategy": "fedavg", "dataset": "digits", "model": "mlp", "seed": 0} if config is None else config
    (run / "config.yaml").write_text("".join(f"{k}: {v}\n" for k, v in config.items()))
    if histogram is not None:
        lines = ["client," + ",".join(f"class_{c}" for c in range(histogram.shape[1]))]
        lines += [f"{i}," + ",".join(str(int(v)) for v in row) for i, row in enumerate(histogram)]
        (run / "label_histogram.csv").write_text("\n".join(lines) + "\n")
    return run


@pytest.fixture
def run_a(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    return write_run(
        tmp_path, "run_a", [full_record(r) for r in range(10)], histogram=rng.integers(0, 50, size=(8, 10))
    )


@pytest.fixture
def run_b(tmp_path: Path) -> Path:
    records = [full_record(r) for r in range(6)]
    for record in records:
        record["test_accuracy"] = None if record["round"] == 2 else record["test_accuracy"]
    return write_run(tmp_path, "run_b", records, config={"strategy": "fedprox", "dataset": "digits"})


# ------------------------------------------------------------------------------------------- reading


def test_read_metrics_skips_truncated_last_line(run_a: Path) -> None:
    records = read_metrics(run_a)
    assert [r["round"] for r in records] == list(range(10))
    assert records[1]["test_accuracy"] is None


def test_read_metrics_skips_blank_lines_and_accepts_complete_file(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"round": 0, "x": 1}\n\n{"round": 1, "x": 2}\n\n')
    assert [r["x"] for r in read_metrics(run)] == [1, 2]


def test_read_metrics_malformed_middle_line_names_file_and_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"round": 0}\n{"round": 1,,}\n{"round": 2}\n')
    with pytest.raises(FedsimError, match=r"metrics\.jsonl:2: malformed JSON") as info:
        read_metrics(run)
    assert "\n" not in str(info.value)


def test_read_metrics_non_object_middle_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"round": 0}\n[1, 2]\n{"round": 2}\n')
    with pytest.raises(FedsimError, match=r"metrics\.jsonl:2: expected a JSON object"):
        read_metrics(run)


def test_read_metrics_missing_dir_or_file(tmp_path: Path) -> None:
    with pytest.raises(FedsimError, match="does not exist"):
        read_metrics(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FedsimError, match="no metrics.jsonl"):
        read_metrics(tmp_path / "empty")


def test_available_metrics_any_numeric_key() -> None:
    records = [
        {"round": 0, "spectral_gap": 0.3, "name": "x", "flag": True, "a": None},
        {"round": 1, "oscillation": float("nan"), "generalization_gap": 2},
    ]
    assert available_metrics(records) == ["generalization_gap", "spectral_gap"]


def test_run_label_is_folder_name(run_a: Path) -> None:
    assert run_label(run_a) == "run_a"
    assert run_label(str(run_a) + "/") == "run_a"


def test_read_label_histogram(run_a: Path) -> None:
    counts = read_label_histogram(run_a / "label_histogram.csv")
    assert counts.shape == (8, 10)
    assert counts.dtype.kind == "i"


# ------------------------------------------------------------------------------------------- plot_runs


def test_plot_runs_two_runs_two_metrics(run_a: Path, run_b: Path, tmp_path: Path) -> None:
    out = tmp_path / "nested" / "dir" / "cmp.png"
    result = plot_runs([run_a, run_b], ["test_accuracy", "drift"], out)
    assert result == out
    assert_png(out)


def test_plot_runs_new_metric_present_in_one_run(run_a: Path, tmp_path: Path) -> None:
    other = write_run(tmp_path, "gossip", [{"round": r, "spectral_gap": 0.1 * r} for r in range(5)])
    out = plot_runs([str(run_a), str(other)], ["spectral_gap", "consensus_distance"], tmp_path / "x.png")
    assert_png(out)


def test_plot_runs_same_folder_names(tmp_path: Path) -> None:
    a = write_run(tmp_path / "exp1", "seed0", [full_record(r) for r in range(4)])
    b = write_run(tmp_path / "exp2", "seed0", [full_record(r) for r in range(4)])
    assert_png(plot_runs([a, b], ["train_loss"], tmp_path / "same.png"))


def test_plot_runs_unknown_metric_suggests(run_a: Path, run_b: Path, tmp_path: Path) -> None:
    out = tmp_path / "bad.png"
    with pytest.raises(FedsimError) as info:
        plot_runs([run_a, run_b], ["test_acuracy"], out)
    message = str(info.value)
    assert "test_acuracy" in message
    assert "did you mean 'test_accuracy'" in message
    assert "available metrics:" in message and "update_norm" in message
    assert "\n" not in message
    assert not out.exists()


def test_plot_runs_all_null_metric_is_unknown(tmp_path: Path) -> None:
    run = write_run(tmp_path, "r", [{"round": r, "test_accuracy": None, "train_loss": 1.0} for r in range(3)])
    with pytest.raises(FedsimError, match="none of the runs"):
        plot_runs([run], ["test_accuracy"], tmp_path / "o.png")


def test_plot_runs_missing_run_dir(run_a: Path, tmp_path: Path) -> None:
    with pytest.raises(FedsimError, match="does not exist"):
        plot_runs([run_a, tmp_path / "missing"], ["drift"], tmp_path / "o.png")


def test_plot_runs_run_dir_without_metrics(run_a: Path, tmp_path: Path) -> None:
    (tmp_path / "bare").mkdir()
    with pytest.raises(FedsimError, match="no metrics.jsonl"):
        plot_runs([run_a, tmp_path / "bare"], ["drift"], tmp_path / "o.png")


def test_plot_runs_empty_metrics(run_a: Path, tmp_path: Path) -> None:
    with pytest.raises(FedsimError, match="no metrics"):
        plot_runs([run_a], [], tmp_path / "o.png")


def test_plot_runs_empty_run_list(tmp_path: Path) -> None:
    with pytest.raises(FedsimError, match="no run directories"):
        plot_runs([], ["drift"], tmp_path / "o.png")


# ------------------------------------------------------------------------------- plot_label_histogram


def test_plot_label_histogram(tmp_path: Path) -> None:
    counts = np.random.default_rng(1).integers(0, 30, size=(20, 10))
    assert_png(plot_label_histogram(counts, tmp_path / "h" / "hist.png"))


def test_plot_label_histogram_truncates_many_clients(tmp_path: Path) -> None:
    counts = np.random.default_rng(2).integers(0, 5, size=(150, 3))
    assert_png(plot_label_histogram(counts, tmp_path / "many.png", max_clients=40))


def test_plot_label_histogram_many_classes(tmp_path: Path) -> None:
    counts = np.random.default_rng(3).integers(0, 5, size=(5, 30))
    assert_png(plot_label_histogram(counts, tmp_path / "classes.png"))


def test_plot_label_histogram_is_one_collection_of_the_counts(tmp_path: Path, monkeypatch) -> None:
    """All bars are one artist (a patch per client and class made this plot take a second), stacked in class
    order with the counts as heights, and the legend names every class."""
    from fedsim import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, out: figures.append(fig) or Path(out))
    counts = np.random.default_rng(4).integers(0, 9, size=(100, 10))
    counts[3] = 0  # an empty client draws nothing
    plot_label_histogram(counts, tmp_path / "h.png")
    (ax,) = figures[0].axes
    assert not ax.patches and len(ax.collections) == 1
    boxes = np.array([path.vertices[:4] for path in ax.collections[0].get_paths()])
    client = np.rint(boxes[:, :, 0].mean(axis=1)).astype(int)
    height = boxes[:, :, 1].max(axis=1) - boxes[:, :, 1].min(axis=1)
    totals = np.zeros(len(counts))
    np.add.at(totals, client, height)
    np.testing.assert_allclose(totals, counts.sum(axis=1))
    assert len(boxes) == np.count_nonzero(counts)
    assert boxes[:, :, 1].min() == 0.0 and ax.get_ylim() == pytest.approx((0.0, 1.02 * counts.sum(axis=1).max()))
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [f"class {c}" for c in range(10)]


@pytest.mark.parametrize("bad", [np.zeros(4), np.zeros((0, 3)), -np.ones((2, 2))])
def test_plot_label_histogram_rejects_bad_counts(bad: np.ndarray, tmp_path: Path) -> None:
    with pytest.raises(FedsimError):
        plot_label_histogram(bad, tmp_path / "bad.png")


# ------------------------------------------------------------------------------------------- plot_run


def test_plot_run_writes_all_plots(run_a: Path) -> None:
    paths = plot_run(run_a)
    names = sorted(p.name for p in paths)
    assert names == ["client_accuracy.png", "consensus.png", "convergence.png", "drift.png", "label_histogram.png"]
    for path in paths:
        assert path.parent == run_a
        assert_png(path)


def test_plot_run_skips_missing_metrics(tmp_path: Path) -> None:
    # Only training loss and update norm: no accuracy, no drift, no client metrics, no histogram.
    records = [{"round": r, "train_loss": 1.0 / (r + 1), "update_norm": 0.5, "drift": None} for r in range(5)]
    run = write_run(tmp_path, "minimal", records, config={})
    paths = plot_run(run)
    assert sorted(p.name for p in paths) == ["convergence.png", "drift.png"]
    assert not (run / "client_accuracy.png").exists()
    assert not (run / "label_histogram.png").exists()
    for path in paths:
        assert_png(path)


def test_plot_run_nothing_to_plot(tmp_path: Path) -> None:
    run = write_run(tmp_path, "empty", [], truncated=True)
    assert plot_run(run) == []


def test_plot_run_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(FedsimError, match="does not exist"):
        plot_run(tmp_path / "missing")


def test_import_is_cheap() -> None:
    code = "import sys, fedsim.plots; print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_plot_run_adds_regulator_and_oscillation_panels(tmp_path: Path) -> None:
    import matplotlib.image as mpimg

    # 12 evaluations: the oscillation panel appears once its 10-evaluation window is full
    base = [{"round": r, "train_loss": 1.0, "update_norm": 0.5, "drift": 0.3, "test_accuracy": 0.5} for r in range(12)]
    extra = [{**row, "damped_norm_fraction": 0.4, "oscillation": 0.01 * i} for i, row in enumerate(base)]
    plain = plot_run(write_run(tmp_path, "plain", base, config={}))
    regulated = plot_run(write_run(tmp_path, "regulated", extra, config={}))
    height = {p.parent.name + "/" + p.name: mpimg.imread(p).shape[0] for p in [*plain, *regulated]}
    assert height["regulated/drift.png"] > height["plain/drift.png"]
    assert height["regulated/convergence.png"] > height["plain/convergence.png"]


# --------------------------------------------------------------------------------------- virtual clock


def _clocked_run(tmp_path: Path, asynchronous: bool) -> Path:
    """A results folder of a run on the virtual clock, written by hand: rows with a client timeline."""
    run = tmp_path / ("async" if asynchronous else "sync")
    run.mkdir()
    rows, clock = [], 0.0
    for r in range(1, 5):
        clock += 1.0
        timeline = [[0, clock - 1.0, 0.1, 0.5, 0.2, "trained"], [3, clock - 1.0, 0.2, 0.6, 0.0, "late"]]
        rows.append({"round": r, "test_accuracy": 0.2 * r, "round_time_s": 1.0, "virtual_time_s": clock,
                     "timeline": timeline})  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = {"staleness_histogram": {"0": 3, "1": 5, "4": 1}} if asynchronous else {}
    (run / "summary.json").write_text(json.dumps(summary))
    return run


@pytest.mark.parametrize("asynchronous", [False, True])
def test_plot_run_draws_the_time_plots_of_a_clocked_run(tmp_path: Path, asynchronous: bool) -> None:
    run = _clocked_run(tmp_path, asynchronous)
    written = {p.name for p in plot_run(run)}
    assert {"virtual_time.png", "timeline.png"} <= written
    assert all((run / name).stat().st_size > 5000 for name in ("virtual_time.png", "timeline.png"))


def test_plot_run_skips_the_time_plots_without_a_timeline(run_a: Path) -> None:
    assert not {"virtual_time.png", "timeline.png"} & {p.name for p in plot_run(run_a)}


def test_plot_runs_on_the_virtual_clock(tmp_path: Path) -> None:
    from fedsim.plots import _series

    run = _clocked_run(tmp_path, False)
    assert plot_runs([run], ["test_accuracy"], tmp_path / "t.png", x="virtual_time_s").stat().st_size > 1000
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert _series(records, "test_accuracy", "virtual_time_s")[0] == [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(FedsimError, match="unknown x axis 'time'"):
        plot_runs([run], ["test_accuracy"], tmp_path / "u.png", x="time")


def test_plot_runs_against_cumulative_megabytes(run_a: Path, tmp_path: Path) -> None:
    """``x="uplink_mb"`` / ``"total_mb"``: the running sum of the rounds' bytes in MB, on a log axis."""
    from fedsim.plots import _series, with_cumulative_mb
    from fedsim.results import read_metrics

    records = read_metrics(run_a)
    up = np.cumsum([r["bytes_up"] for r in records]) / 1e6
    both = np.cumsum([r["bytes_up"] + r["bytes_down"] for r in records]) / 1e6
    xs, _ = _series(with_cumulative_mb(records, "uplink_mb"), "test_accuracy", "uplink_mb")
    np.testing.assert_allclose(xs, [u for u, r in zip(up, records, strict=True) if r.get("test_accuracy") is not None])
    np.testing.assert_allclose([r["total_mb"] for r in with_cumulative_mb(records, "total_mb")], both)
    for x in ("uplink_mb", "total_mb"):
        assert plot_runs([run_a], ["test_accuracy"], tmp_path / f"{x}.png", x=x).stat().st_size > 1000
