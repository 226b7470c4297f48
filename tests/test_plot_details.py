"""Plot details of issue 16: bands inside [0, 1], the oscillation panel only with a full window, the spectral
gap of a static graph in the title, per-node accuracy for decentralized runs, plots of a stopped run, and
topology drawings labelled with the file's own node names."""

from __future__ import annotations

import itertools
from pathlib import Path

import networkx as nx
import pytest

import fedsim
from fedsim import plots

ROOT = Path(__file__).resolve().parents[1]
RING = str(ROOT / "experiments" / "topologies" / "ring16.graphml")


@pytest.fixture
def panels(monkeypatch):
    """Record what plot_run asks each multi-panel figure to draw."""
    calls = {}
    original = plots._plot_panel_group

    def record(records, groups, out, title, labels=None):
        calls[Path(out).name] = {"records": records, "groups": groups, "title": title}
        return original(records, groups, out, title, labels)

    monkeypatch.setattr(plots, "_plot_panel_group", record)
    return calls


def test_static_gap_in_the_title_and_node_accuracy(tmp_path, panels):
    out = tmp_path / "run"
    fedsim.simulate({"topology": RING, "rounds": 3}, out)
    consensus = panels["consensus.png"]
    assert ["spectral_gap"] not in consensus["groups"] and "spectral gap 0.05075" in consensus["title"]
    assert (out / "client_accuracy.png").is_file()  # per-node accuracy of a decentralized run


def test_time_varying_gap_keeps_its_panel(tmp_path, panels):
    import json

    run = tmp_path / "run"
    run.mkdir()
    rows = [{"round": r, "consensus_distance": 0.1, "spectral_gap": 0.1 * r, "train_loss": 1.0} for r in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    plots.plot_run(run)
    assert ["spectral_gap"] in panels["consensus.png"]["groups"]


def test_oscillation_drawn_only_with_a_full_window():
    records = [{"round": r, "test_accuracy": 0.5, "oscillation": 0.1} for r in range(1, 13)]
    kept = [r["oscillation"] for r in plots._full_oscillation_windows(records)]
    assert kept == [None] * 9 + [0.1] * 3


def test_client_accuracy_band_stays_in_unit_interval(tmp_path, monkeypatch):
    bands = []
    monkeypatch.setattr("matplotlib.axes.Axes.fill_between", lambda self, x, lo, hi, **kw: bands.append((lo, hi)))
    records = [{"round": r, "client_accuracy_mean": 0.9, "client_accuracy_std": 0.3,
                "client_accuracy_worst10": 0.5} for r in (1, 2)]  # fmt: skip
    plots._plot_client_accuracy(records, tmp_path / "c.png", "t")
    ((lo, hi),) = bands
    assert min(lo) >= 0.0 and max(hi) <= 1.0 and max(hi) == 1.0


def test_a_diverged_run_still_gets_its_plots(tmp_path, monkeypatch, panels):
    import fedsim.rounds

    calls = itertools.count(1)
    monkeypatch.setattr(fedsim.rounds, "all_finite", lambda tree: next(calls) < 3)
    out = tmp_path / "run"
    with pytest.raises(fedsim.core.errors.DivergenceError):
        fedsim.simulate({"rounds": 5}, out)
    assert (out / "convergence.png").is_file() and (out / "drift.png").is_file()
    assert "diverged at round 3" in panels["convergence.png"]["title"]


def test_topology_drawing_uses_the_files_node_names(tmp_path, monkeypatch):
    seen = {}
    original = nx.draw_networkx
    monkeypatch.setattr(nx, "draw_networkx", lambda g, **kw: seen.update(kw["labels"]) or original(g, **kw))
    graph = nx.Graph()
    graph.add_nodes_from([(0, {"name": "alpha"}), (1, {"name": "beta"}), (2, {})])
    graph.add_edges_from([(0, 1), (1, 2)])
    plots.plot_topology(graph, tmp_path / "g.png")
    assert seen == {0: "alpha", 1: "beta", 2: "2"}
