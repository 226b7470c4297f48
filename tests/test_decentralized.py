"""Decentralized training over a topology: oracles (FedAvg, explicit gossip), metrics, resume, errors."""

import json
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
import torch

import topologies
from fedsim.core.errors import FedsimError
from fedsim.decentralized import consensus_distance
from fedsim.simulation import resume, simulate
from strategies import gossip, gossip_matrix

RING = str(Path(__file__).resolve().parents[1] / "experiments" / "topologies" / "ring16.graphml")
SMALL = dict(dataset="digits", rounds=3, local_steps=3, batch_size=16, lr=0.1)


def metrics(path):
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("time_s")
    return rows


@pytest.fixture
def complete3(tmp_path):
    path = tmp_path / "complete3.graphml"
    g = nx.complete_graph(3)
    nx.set_edge_attributes(g, 1 / 3, "weight")
    nx.set_node_attributes(g, 1 / 3, "self_weight")
    topologies.save(g, path)
    return str(path)


def test_atc_over_uniform_complete_graph_is_fedavg(tmp_path, complete3):
    """W = 11^T/m: adapt-then-combine with tau local steps is FedAvg with equal client weights."""
    common = {**SMALL, "clients": 3, "partition": "iid", "client_test_fraction": 0.0}  # 1,437 = 3 x 479
    fed = simulate({**common, "strategy": "fedavg"}, tmp_path / "fed", plots=False)
    dec = simulate(
        {**common, "topology": complete3, "mixing": "weights", "strategy": "dsgd-atc"}, tmp_path / "dec", plots=False
    )
    assert dec["final_test_loss"] == pytest.approx(fed["final_test_loss"], rel=1e-5)
    rows = metrics(tmp_path / "dec")
    assert all(r["consensus_distance"] < 1e-10 for r in rows)  # exact averaging: all nodes agree
    assert rows[0]["spectral_gap"] == pytest.approx(1.0)


def test_gossip_equals_explicit_sum():
    g = nx.random_regular_graph(3, 10, seed=1)
    w = topologies.mixing_matrix(g)
    x = {"a": torch.randn(10, 4, 2), "b": torch.randn(10)}
    mixed = gossip(gossip_matrix(w, torch.device("cpu"), torch.float64), {k: v.double() for k, v in x.items()})
    for k, v in x.items():
        expected = torch.stack([sum(w[i, j] * v[j].double() for j in range(10)) for i in range(10)])
        torch.testing.assert_close(mixed[k], expected)


def test_consensus_distance_formula():
    x = {"w": torch.tensor([[0.0, 0.0], [2.0, 0.0]]), "b": torch.tensor([[1.0], [3.0]])}
    # mean (1, 0 | 2); squared distances: (1 + 1) per node -> mean 2
    assert consensus_distance(x) == pytest.approx(2.0)


def test_dsgd_on_ring_learns_and_reports_metrics(tmp_path):
    summary = simulate({**SMALL, "topology": RING, "rounds": 8}, tmp_path / "ring")
    rows = metrics(tmp_path / "ring")
    assert summary["num_clients"] == 16 and rows[0]["clients"] == 16  # clients taken from the graph
    w = topologies.mixing_matrix(topologies.load(RING))
    assert rows[0]["spectral_gap"] == pytest.approx(topologies.spectral_gap(w))
    for key in (
        "consensus_distance",
        "generalization_gap",
        "node_generalization_gap",
        "node_accuracy_mean",
        "node_accuracy_worst10",
    ):
        assert rows[-1][key] is not None
    assert summary["best_test_accuracy"] > 0.6
    assert rows[0]["bytes_up"] == 32 * summary["num_params"] * 4  # 16 edges, both directions
    assert (tmp_path / "ring" / "drift.png").is_file()
    assert (tmp_path / "ring" / "consensus.png").is_file()


def test_cta_and_atc_differ_and_vectorized_matches_sequential(tmp_path):
    cta = simulate({**SMALL, "topology": RING, "strategy": "dsgd"}, tmp_path / "cta", plots=False)
    atc = simulate({**SMALL, "topology": RING, "strategy": "dsgd-atc"}, tmp_path / "atc", plots=False)
    seq = simulate({**SMALL, "topology": RING, "strategy": "dsgd", "sequential": True}, tmp_path / "seq", plots=False)
    assert cta["final_test_loss"] != atc["final_test_loss"]
    assert seq["final_test_loss"] == pytest.approx(cta["final_test_loss"], rel=1e-4)


def test_resume_decentralized_with_adam_state(tmp_path):
    config = {**SMALL, "topology": RING, "rounds": 5, "checkpoint_every": 2, "optimizer": "adam", "lr": 0.01}
    simulate(config, tmp_path / "full", plots=False)

    class Killed(Exception):
        pass

    def kill(record):
        if record["round"] == 3:
            raise Killed

    with pytest.raises(Killed):
        simulate(config, tmp_path / "killed", plots=False, on_round=kill)
    resume(tmp_path / "killed", plots=False)
    assert metrics(tmp_path / "killed") == metrics(tmp_path / "full")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"topology": RING, "clients": 20}, "16 nodes but --clients is 20"),
        ({"topology": RING, "strategy": "fedavg"}, "is federated"),
        ({"strategy": "dsgd"}, "needs a topology"),
        ({"topology": RING, "mixing": "metropolis"}, "did you mean 'metropolis_hastings'"),
        ({"topology": "missing.graphml"}, "missing.graphml"),
    ],
)
def test_bad_decentralized_input(tmp_path, values, message):
    with pytest.raises(FedsimError, match=message):
        simulate({**SMALL, **values}, tmp_path / "r", plots=False)


def test_disconnected_topology_refused(tmp_path):
    path = tmp_path / "two.edgelist"
    path.write_text("0 1\n2 3\n")
    with pytest.raises(FedsimError, match="disconnected"):
        simulate({**SMALL, "topology": str(path)}, tmp_path / "r", plots=False)


def test_cli_topology_flag(tmp_path, cli):
    code, out, err = cli(
        ["simulate", "--topology", RING, "--rounds", "2", "--local-steps", "2", "--quiet", "--out", str(tmp_path / "r")]
    )
    assert code == 0, err
    assert "strategy: dsgd" in (tmp_path / "r" / "config.yaml").read_text()
    assert np.isfinite(metrics(tmp_path / "r")[-1]["consensus_distance"])


def test_time_varying_schedules(tmp_path):
    ope = simulate(
        {**SMALL, "topology": RING, "schedule": "one_peer_exponential", "rounds": 4}, tmp_path / "ope", plots=False
    )
    rows = metrics(tmp_path / "ope")
    model_bytes = ope["num_params"] * 4
    assert all(r["bytes_up"] == 16 * model_bytes for r in rows)  # every node sends to exactly one peer
    assert len({r["spectral_gap"] for r in rows}) > 1  # W_t changes with t
    a = simulate({**SMALL, "topology": RING, "schedule": "random_matchings"}, tmp_path / "rm1", plots=False)
    b = simulate({**SMALL, "topology": RING, "schedule": "random_matchings"}, tmp_path / "rm2", plots=False)
    assert a["final_test_loss"] == b["final_test_loss"]  # matchings are a function of (seed, step)
    assert all(r["bytes_up"] <= 16 * model_bytes for r in metrics(tmp_path / "rm1"))


def test_schedule_file_cycles_graphs(tmp_path):
    topologies.save(topologies.build("ring", 8), tmp_path / "ring.graphml")
    topologies.save(topologies.build("complete", 8), tmp_path / "complete.graphml")
    (tmp_path / "cycle.yaml").write_text("graphs: [ring.graphml, complete.graphml]\n")
    summary = simulate({**SMALL, "topology": str(tmp_path / "cycle.yaml"), "rounds": 4}, tmp_path / "r", plots=False)
    rows = metrics(tmp_path / "r")
    assert summary["num_clients"] == 8
    messages = [r["bytes_up"] // (summary["num_params"] * 4) for r in rows]
    assert messages == [16, 56, 16, 56]  # ring (8 edges x 2), complete (28 edges x 2), cycled
    with pytest.raises(FedsimError, match="applies to a graph file"):
        simulate(
            {**SMALL, "topology": str(tmp_path / "cycle.yaml"), "schedule": "random_matchings"},
            tmp_path / "bad",
            plots=False,
        )


def test_bench_dsgd_cli(tmp_path, cli):
    out = tmp_path / "dsgd.json"
    code, _, err = cli(["bench", "dsgd", "--nodes", "8", "--steps", "2", "--repeats", "1", "--out", str(out)])
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["vectorized_over_loop"] > 0 and result["gossip"]["share_of_step"] > 0
    code, _, err = cli(["bench", "dsgd", "--nodes", "1"])
    assert code == 2 and "Traceback" not in err


@pytest.mark.parametrize("family", ["ring", "star", "torus", "erdos_renyi", "barabasi_albert"])
def test_sparse_gossip_equals_dense_product(family):
    w = topologies.mixing_matrix(topologies.build(family, 12))
    op = gossip_matrix(w, torch.device("cpu"), torch.float64)
    x = {"a": torch.randn(12, 3, 4, dtype=torch.float64), "b": torch.randn(12, dtype=torch.float64)}
    mixed = gossip(op, x)
    dense = torch.as_tensor(w)
    for k, v in x.items():
        assert torch.allclose(mixed[k].reshape(12, -1), dense @ v.reshape(12, -1), atol=1e-12)
