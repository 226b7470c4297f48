"""Stability probe: the swap touches one slot, a null swap gives exactly 0, gossip spreads the difference one hop
per round on a ring, bad input writes nothing, CLI."""

import csv
import json
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
import torch

import topologies
from fedsim.config import make_config
from fedsim.core.errors import FedsimError
from fedsim.probes import STABILITY_METRICS, perturb, run_stability_probe
from fedsim.simulation import make_simulation, resume, simulate

RING = str(Path(__file__).resolve().parents[1] / "experiments" / "topologies" / "ring16.graphml")
TINY = dict(dataset="digits", clients=4, rounds=2, local_steps=2, batch_size=16, device="cpu")
FAST = ["--clients", "4", "--rounds", "2", "--local-steps", "2", "--device", "cpu", "--quiet"]


def metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def stability_rows(path):
    with open(path / "stability.csv") as f:
        reader = csv.reader(f)
        header = next(reader)
        return header, np.array([[float(v) for v in row] for row in reader])


def test_perturb_changes_exactly_one_slot_of_one_node():
    sim = make_simulation(make_config(TINY))
    before_x, before_y = sim.store.x[sim.store.order].clone(), sim.store.y[sim.store.order].clone()
    swap = perturb(sim, node=2, sample=3)
    slot = int(sim.store.offsets[2]) + 3
    after_x, after_y = sim.store.x[sim.store.order], sim.store.y[sim.store.order]
    changed = (after_x != before_x).flatten(1).any(1) | (after_y != before_y)
    assert torch.nonzero(changed).flatten().tolist() == [slot]
    j = int(torch.nonzero(sim.y_test != before_y[slot])[0])  # the first test point with another label
    assert swap["replacement"] == f"test[{j}]" and swap["label"] == int(before_y[slot]) != swap["replacement_label"]
    assert torch.equal(after_x[slot], sim.x_test[j]) and int(after_y[slot]) == int(sim.y_test[j])
    fresh = make_simulation(make_config(TINY)).store
    assert torch.equal(sim.store.x[:-1], fresh.x) and torch.equal(sim.store.y[:-1], fresh.y)  # the swap is appended


def test_null_swap_gives_zero_and_the_run_is_an_ordinary_run(tmp_path):
    summary = run_stability_probe(TINY, tmp_path / "probe", replace_with="self", plots=False)
    rows = metrics(tmp_path / "probe")
    for r in rows:
        assert r["stability_distance"] == r["stability_distance_max"] == r["stability_distance_node"] == 0.0
        assert r["stability_loss_diff"] == 0.0
    assert summary["final_stability_distance"] == 0.0 and summary["stability_probe"]["replacement"] == "self"
    simulate(TINY, tmp_path / "plain", plots=False)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in STABILITY_METRICS and k != "time_s"} for r in rs]  # noqa: E731
    assert strip(rows) == strip(metrics(tmp_path / "plain"))  # the run on S is unchanged by the probe


def test_swap_moves_the_federated_model(tmp_path):
    # one local epoch: every training sample, the replaced one included, is used in round 1
    cfg = dict(TINY, local_epochs=1, eval_every=2, rounds=3)
    summary = run_stability_probe(cfg, tmp_path / "probe", node=1, sample=5)
    rows = metrics(tmp_path / "probe")
    assert all(r["stability_distance"] > 0 for r in rows)
    assert all(r["stability_distance"] == r["stability_distance_max"] == r["stability_distance_node"] for r in rows)
    assert [r["stability_loss_diff"] is not None for r in rows] == [False, True, True]  # evaluation rounds only
    assert rows[-1]["stability_loss_diff"] > 0
    assert summary["final_stability_distance"] == rows[-1]["stability_distance"]
    assert summary["final_stability_loss_diff"] == rows[-1]["stability_loss_diff"]
    on_disk = json.loads((tmp_path / "probe" / "summary.json").read_text())
    assert on_disk["final_stability_distance"] == summary["final_stability_distance"]
    assert on_disk["stability_probe"]["node"] == 1 and on_disk["stability_probe"]["sample"] == 5
    header, table = stability_rows(tmp_path / "probe")
    assert header == ["round", "global"] and table[:, 0].tolist() == [1, 2, 3]
    assert table[:, 1].tolist() == [r["stability_distance"] for r in rows]
    assert (tmp_path / "probe" / "stability.png").is_file() and (tmp_path / "probe" / "convergence.png").is_file()
    with pytest.raises(FedsimError, match="stability-probe run"):
        resume(tmp_path / "probe")


@pytest.mark.parametrize("strategy, hops_after_round_1", [("dsgd", 0), ("dsgd-atc", 1)])
def test_gossip_spreads_the_difference_one_hop_per_round(tmp_path, strategy, hops_after_round_1):
    """Full-batch D-SGD with one local step. Combine-then-adapt: x_i <- sum_j W_ij x_j - eta g_i(x_i). Round 1
    starts from the same x0 everywhere, so only the perturbed node's gradient differs: after round t the difference
    reaches exactly the nodes within t - 1 hops. Adapt-then-combine mixes after the step: within t hops."""
    node = 5
    cfg = dict(
        dataset="digits", topology=RING, strategy=strategy, partition="iid", rounds=3, local_steps=1,
        batch_size=512, lr=0.1, eval_every=3, device="cpu",
    )  # fmt: skip
    run_stability_probe(cfg, tmp_path / "ring", node=node, plots=False)
    header, table = stability_rows(tmp_path / "ring")
    assert header == ["round", *(f"node_{i}" for i in range(16))]
    hops = nx.single_source_shortest_path_length(topologies.load(RING), node)
    rows = metrics(tmp_path / "ring")
    for t, row in enumerate(table, start=1):
        reach = t - 1 + hops_after_round_1
        for i in range(16):
            if hops[i] <= reach:
                assert row[1 + i] > 0, (t, i)
            else:
                assert row[1 + i] == 0.0, (t, i)  # exactly: the twins' computations are identical there
        assert rows[t - 1]["stability_distance_node"] == row[1 + node]
        assert rows[t - 1]["stability_distance"] == pytest.approx(row[1:].mean(), rel=1e-12)
        assert rows[t - 1]["stability_distance_max"] == row[1:].max()


@pytest.mark.parametrize(
    "kwargs, message",
    [({"node": 4}, "node 4 is out of range"), ({"sample": 10_000}, "sample 10000 is out of range"),
     ({"node": -1}, "node must be a non-negative"), ({"replace_with": "other"}, "unknown stability-probe replacement")],
)  # fmt: skip
def test_bad_probe_input_writes_nothing(tmp_path, kwargs, message):
    with pytest.raises(FedsimError, match=message):
        run_stability_probe(TINY, tmp_path / "probe", **kwargs)
    assert not (tmp_path / "probe").exists()


def test_cli_probe_and_seeds_with_probe(tmp_path, cli):
    out = tmp_path / "probe"
    code, stdout, err = cli(["simulate", *FAST, "--probe", "stability", "--probe-node", "1", "--out", str(out)])
    assert code == 0, err
    assert "stability: final distance" in stdout
    for name in ("stability.csv", "stability.png", "metrics.jsonl", "summary.json", "config.yaml"):
        assert (out / name).is_file(), name
    assert json.loads((out / "summary.json").read_text())["stability_probe"]["node"] == 1
    rep = tmp_path / "rep"
    argv = ["simulate", *FAST, "--rounds", "1", "--seeds", "0,2", "--probe", "stability", "--out", str(rep)]
    code, stdout, err = cli(argv)
    assert code == 0, err
    report = json.loads((rep / "seeds_summary.json").read_text())
    finals = [json.loads((rep / f"seed-{s}" / "summary.json").read_text())["final_stability_distance"] for s in (0, 2)]
    assert report["final"]["final_stability_distance"]["n"] == 2
    assert report["final"]["final_stability_distance"]["q90"] == np.quantile(finals, 0.9)
    assert (rep / "seed-2" / "stability.csv").is_file() and "final stability distance median" in stdout


@pytest.mark.parametrize(
    "argv, message",
    [(["--probe", "stab"], "unknown probe 'stab' (did you mean 'stability'?); choose from: stability"),
     (["--probe-node", "1"], "need --probe stability"), (["--probe", "stability", "--probe-sample", "-1"], "sample")],
)  # fmt: skip
def test_cli_bad_probe(tmp_path, cli, argv, message):
    code, _, err = cli(["simulate", *FAST, *argv, "--out", str(tmp_path / "p")])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p").exists()
