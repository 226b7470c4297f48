"""Compressed channels in the engine (fedsim.compression, fedsim.choco): bytes of a message by hand, the
vectorized channel against a per-client loop, the error-feedback algebra across rounds with partial
participation, the downlink's two feedback forms, CHOCO-SGD with the identity compressor against plain gossip,
chunk-size independence, exact resume with residuals, and one-line refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fedsim.choco import ChocoGossip
from fedsim.compression import (
    UPLINK,
    BlockwiseCompression,
    Downlink,
    Identity,
    Int4Compression,
    Int8Compression,
    PowerSGDCompression,
    QSGDCompression,
    RandKCompression,
    SignCompression,
    TopKCompression,
)
from fedsim.config import make_config
from fedsim.core import components
from fedsim.core.errors import FedsimError
from fedsim.simulation import make_simulation, simulate
from strategies import gossip_matrix
from strategies.decentralized import DSGD, DSGDATC, DSGT

SMALL = dict(dataset="digits", clients=8, rounds=3, local_steps=3, batch_size=8, seed=2,
             model={"name": "mlp", "hidden": [16]}, checkpoint_every=0)  # fmt: skip
MODEL = {"w": torch.zeros(16, 64), "b": torch.zeros(16), "v": torch.zeros(10, 16), "c": torch.zeros(10)}


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_message_bytes_by_hand():
    # MODEL: matrices 16x64 (1024) and 10x16 (160), vectors 16 and 10
    sizes = [1024, 16, 160, 10]
    cases = {
        "identity": 32 * sum(sizes),
        "topk": sum(64 * max(1, math.floor(0.1 * n)) for n in sizes),  # k values + k indices, 32 bits each
        "randk": sum(64 * max(1, math.floor(0.1 * n)) for n in sizes),
        "sign": sum(n + 32 for n in sizes),
        "qsgd": sum(n * (1 + 3) + 32 for n in sizes),  # s = 4 levels: sign + ceil(log2 5) = 3 bits
        "int8": sum(8 * n + 32 * math.ceil(n / 64) for n in sizes),
        "int4": sum(4 * n + 32 * math.ceil(n / 64) for n in sizes),
        "powersgd": 32 * 2 * (16 + 64) + 32 * 16 + 32 * 2 * (10 + 16) + 32 * 10,  # rank 2, vectors uncompressed
    }
    options = {"topk": {"ratio": 0.1}, "randk": {"ratio": 0.1}, "qsgd": {"levels": 4}, "powersgd": {"rank": 2}}
    for name, bits in cases.items():
        channel = components.build("compressor", {"name": name, **options.get(name, {})})
        assert channel.message_bytes(MODEL) == math.ceil(bits / 8), name
    # rank above min(a, b) is capped: a 10 x 16 matrix at rank 12 sends 10 columns
    assert PowerSGDCompression(rank=12).tensor_bits((10, 16)) == 32 * 10 * (10 + 16)


def stacked(clients=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(clients, *v.shape, generator=g) for k, v in MODEL.items()}


CHANNELS = [
    lambda: TopKCompression(0.05, feedback="ef"),
    lambda: RandKCompression(0.1, feedback="ef21"),
    lambda: QSGDCompression(4, feedback="ef"),
    lambda: SignCompression(),
    lambda: Int4Compression(block=32, feedback="ef"),
    lambda: PowerSGDCompression(rank=2),
]


@pytest.mark.parametrize("make", CHANNELS, ids=["topk-ef", "randk-ef21", "qsgd-ef", "sign", "int4-ef", "powersgd"])
def test_vectorized_channel_equals_a_per_client_loop(make):
    together, alone = make(), make()
    for round_ in (1, 2):
        x = stacked(seed=round_)
        ids = np.array([0, 3, 4, 6, 9])
        out = together.compress(x, ids, 10, 7, UPLINK, round_)
        for row in range(len(ids)):
            one = alone.compress({k: v[row : row + 1] for k, v in x.items()}, ids[row : row + 1], 10, 7, UPLINK, round_)
            for k in x:
                torch.testing.assert_close(out[k][row], one[k][0], rtol=1e-6, atol=1e-6)
    for k in together.state:
        torch.testing.assert_close(together.state[k], alone.state[k], rtol=1e-6, atol=1e-6)


def test_error_feedback_residuals_persist_for_unselected_clients():
    channel = TopKCompression(0.05, feedback="ef")
    previous = torch.zeros(10, *MODEL["w"].shape)
    for round_, ids in enumerate(([0, 1, 2], [2, 5], [0, 5, 9]), start=1):
        ids = np.array(ids)
        x = stacked(len(ids), seed=round_)
        sent = channel.compress(x, ids, 10, 0, UPLINK, round_)
        residual = channel.state["residual.w"]
        # compressed + residual = input + previous residual, for the round's clients
        torch.testing.assert_close(sent["w"] + residual[ids], x["w"] + previous[ids], rtol=0, atol=1e-6)
        others = np.setdiff1d(np.arange(10), ids)
        assert torch.equal(residual[others], previous[others])  # the others keep theirs
        previous = residual.clone()


def test_compressors_at_their_limits_equal_no_compression():
    x = stacked()
    ids = np.arange(5)
    for channel in (TopKCompression(1.0), RandKCompression(1.0), Identity(), PowerSGDCompression(rank=64)):
        out = channel.compress(x, ids, 5, 0, UPLINK, 1)
        for k in x:  # PowerSGD at full rank: to float32 rounding of the QR
            torch.testing.assert_close(out[k], x[k], rtol=1e-4, atol=1e-4)


def test_downlink_ef_and_ef21_give_the_same_client_model():
    w0 = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(1)) for k, v in MODEL.items()}
    a = Downlink(TopKCompression(0.2, feedback="ef"), w0)
    b = Downlink(TopKCompression(0.2, feedback="ef21"), w0)
    w = dict(w0)
    for round_ in range(1, 6):
        w = {k: v + 0.1 * torch.randn(v.shape, generator=torch.Generator().manual_seed(round_)) for k, v in w.items()}
        ma, mb = a.broadcast(w, 0, round_), b.broadcast(w, 0, round_)
        for k in w:
            torch.testing.assert_close(ma[k], mb[k], rtol=1e-5, atol=1e-5)
    assert any(not torch.allclose(ma[k], w[k]) for k in w)  # lossy: the clients' copy lags the server's model


def ring(m, dtype=torch.float32):
    w = np.zeros((m, m))
    for i in range(m):
        w[i, i], w[i, (i + 1) % m], w[i, (i - 1) % m] = 1 / 3, 1 / 3, 1 / 3
    return gossip_matrix(w, torch.device("cpu"), dtype)


@pytest.mark.parametrize("strategy", [DSGD, DSGDATC, DSGT], ids=["dsgd", "dsgd-atc", "dsgt"])
def test_choco_with_the_identity_compressor_is_plain_gossip(strategy):
    w, m = ring(6), 6
    g = torch.Generator().manual_seed(3)
    x = {"a": torch.randn(m, 4, 3, generator=g), "b": torch.randn(m, 5, generator=g)}
    s = strategy()
    state_plain = state_choco = s.init(x)
    public, xp, xc = {}, x, x
    for round_ in range(1, 4):
        deltas = {k: 0.1 * torch.randn(v.shape, generator=g) for k, v in x.items()}
        xp, state_plain = s.update(w, xp, deltas, 0.1, state_plain)
        op = ChocoGossip(w, Identity(), 1.0, 0, round_, public)
        xc, state_choco = s.update(op, xc, deltas, 0.1, state_choco)
        public = op.public
        assert op.calls == s.gossips
        for k in x:
            torch.testing.assert_close(xc[k], xp[k], rtol=1e-5, atol=1e-5)


def test_choco_keeps_the_network_average_and_reaches_consensus():
    """CHOCO gossip alone (no local steps) preserves mean(x) (W doubly stochastic, x_hat mixed symmetrically)
    and contracts the disagreement, with top-k."""
    w, m = ring(8, torch.float64), 8
    x = {"a": torch.randn(m, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)}
    mean, public = x["a"].mean(0), {}
    spread0 = (x["a"] - mean).pow(2).sum()
    channel = TopKCompression(0.2)
    for round_ in range(1, 400):
        op = ChocoGossip(w, channel, 0.3, 0, round_, public)
        x, public = op.mix(x), op.public
    torch.testing.assert_close(x["a"].mean(0), mean, rtol=0, atol=1e-10)
    assert (x["a"] - mean).pow(2).sum() < 1e-3 * spread0


def test_choco_with_rescaled_qsgd_averages_at_a_small_gamma():
    """QSGD rescaled into a contraction (delta ~ 1 / (1 + sqrt(n) / s)) averages at gamma 0.05; at gamma 0.8 the
    disagreement grows, as CHOCO's step-size condition predicts (the README's experiment uses 0.05)."""
    w = ring(8, torch.float64)
    spreads = {}
    for gamma in (0.05, 0.8):
        x = {"a": torch.randn(8, 10000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)}
        mean, public, channel = x["a"].mean(0), {}, QSGDCompression(16)
        spread0 = (x["a"] - mean).pow(2).sum()
        for round_ in range(1, 151):
            op = ChocoGossip(w, channel, gamma, 0, round_, public)
            x, public = op.mix(x), op.public
        torch.testing.assert_close(x["a"].mean(0), mean, rtol=0, atol=1e-9)
        spreads[gamma] = float((x["a"] - mean).pow(2).sum() / spread0)
    assert spreads[0.05] < 0.05 and spreads[0.8] > 1


@pytest.mark.parametrize(
    "uplink",
    [
        {"name": "topk", "ratio": 0.05, "feedback": "ef"},
        {"name": "qsgd", "levels": 4, "feedback": "ef21"},
        {"name": "powersgd", "rank": 2},
    ],  # fmt: skip
    ids=["topk-ef", "qsgd-ef21", "powersgd"],
)
def test_runs_are_chunk_independent_and_count_compressed_bytes(tmp_path, uplink):
    config = {**SMALL, "fraction": 0.5, "uplink": uplink, "downlink": {"name": "int8"}}
    summary = simulate(config, tmp_path / "auto", plots=False)
    simulate({**config, "chunk_size": 1}, tmp_path / "one", plots=False)
    rows, ones = metrics(tmp_path / "auto"), metrics(tmp_path / "one")
    for a, b in zip(rows, ones, strict=True):
        a.pop("time_s"), b.pop("time_s")
        assert a == b
    sim = make_simulation(make_config(config))
    up = components.build("compressor", uplink).message_bytes(sim.init_params)
    down = components.build("compressor", "int8").message_bytes(sim.init_params)
    assert all(r["bytes_up"] == r["clients"] * up and r["bytes_down"] == r["clients"] * down for r in rows)
    assert summary["compression"]["uplink_ratio"] == pytest.approx(sim.model_bytes / up)
    assert summary["total_mb_up"] == pytest.approx(sum(r["bytes_up"] for r in rows) / 1e6)
    plain = simulate(SMALL, tmp_path / "plain", plots=False)
    assert summary["final_test_loss"] != plain["final_test_loss"]  # the compression changed the run


def test_uplink_with_full_ratio_is_the_uncompressed_run(tmp_path):
    plain = simulate({**SMALL, "fraction": 0.5}, tmp_path / "plain", plots=False)
    full = simulate({**SMALL, "fraction": 0.5, "uplink": {"name": "topk", "ratio": 1.0, "feedback": "ef"}},
                    tmp_path / "full", plots=False)  # fmt: skip
    assert full["final_test_loss"] == plain["final_test_loss"]


@pytest.mark.parametrize(
    "flags",
    [
        ["--uplink", "topk", "--set", "uplink.feedback=ef", "--set", "uplink.ratio=0.1", "--fraction", "0.5"],
        ["--uplink", "powersgd", "--downlink", "topk", "--set", "downlink.feedback=ef21", "--fraction", "0.5"],
        [
            "--topology",
            "RING",
            "--uplink",
            "qsgd",
            "--set",
            "choco_gamma=0.3",
            "--strategy",
            "dsgt",
            "--local-steps",
            "1",
        ],
    ],  # fmt: skip
    ids=["uplink-ef", "powersgd-downlink-ef21", "choco-dsgt"],
)
def test_resume_is_exact_with_residuals(tmp_path, cli, flags):
    ring_file = tmp_path / "ring.edgelist"
    ring_file.write_text("".join(f"{i} {(i + 1) % 8}\n" for i in range(8)))
    flags = [str(ring_file) if f == "RING" else f for f in flags]
    common = ["--clients", "8", "--local-steps", "2", "--quiet", "--no-plots", "--checkpoint-every", "2", *flags]
    assert cli(["simulate", *common, "--rounds", "5", "--out", str(tmp_path / "full")])[0] == 0
    assert cli(["simulate", *common, "--rounds", "2", "--out", str(tmp_path / "part")])[0] == 0
    assert cli(["simulate", "--resume", str(tmp_path / "part"), "--rounds", "5", "--quiet", "--no-plots"])[0] == 0
    for a, b in zip(metrics(tmp_path / "full"), metrics(tmp_path / "part"), strict=True):
        a.pop("time_s"), b.pop("time_s")
        assert a == b


def test_choco_counts_bytes_per_directed_edge_and_gossip(tmp_path):
    ring_file = tmp_path / "ring.edgelist"
    ring_file.write_text("".join(f"{i} {(i + 1) % 8}\n" for i in range(8)))
    base = {**SMALL, "topology": str(ring_file), "strategy": "dsgt", "local_steps": 1}
    simulate({**base, "uplink": "sign"}, tmp_path / "sign", plots=False)
    simulate(base, tmp_path / "plain", plots=False)
    sim = make_simulation(make_config(base))
    sign = SignCompression().message_bytes(sim.init_params)
    # 8 nodes on a ring: 16 directed edges; DSGT gossips parameters and tracker
    assert {r["bytes_up"] for r in metrics(tmp_path / "sign")} == {16 * 2 * sign}
    assert {r["bytes_up"] for r in metrics(tmp_path / "plain")} == {16 * 2 * sim.model_bytes}


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--uplink", "topk", "--set", "uplink.ratio=0"], "ratio"),
        (["--uplink", "randk", "--set", "uplink.ratio=1.5"], "ratio"),
        (["--uplink", "blockwise", "--set", "uplink.bits=3"], "bits must be one of 1, 2, 4, 8"),
        (["--uplink", "powersgd", "--set", "uplink.rank=0"], "rank"),
        (["--uplink", "qsgd", "--set", "uplink.feedback=ef3"], "feedback"),
        (["--topology", "RING", "--uplink", "topk", "--set", "choco_gamma=0"], "choco_gamma"),
        (["--topology", "RING", "--uplink", "topk", "--set", "choco_gamma=1.5"], "choco_gamma"),
        (["--topology", "RING", "--set", "choco_gamma=0.5"], "needs --uplink"),
        (["--set", "choco_gamma=0.5"], "over a topology"),
        (["--topology", "RING", "--downlink", "int8"], "over a topology there is none"),
        (["--topology", "RING", "--uplink", "int8", "--schedule", "random_matchings"], "fixed graph"),
        (["--strategy", "fedbuff", "--uplink", "int8"], "asynchronous"),
        (["--privacy", "dp-fedavg", "--uplink", "int8"], "privacy"),
    ],
)
def test_bad_input_is_one_line(tmp_path, cli, flags, message):
    ring_file = tmp_path / "ring.edgelist"
    ring_file.write_text("".join(f"{i} {(i + 1) % 8}\n" for i in range(8)))
    flags = [str(ring_file) if f == "RING" else f for f in flags]
    code, _, err = cli(["simulate", "--rounds", "1", "--quiet", "--no-plots", "--out", str(tmp_path / "x"), *flags])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


def test_powersgd_refuses_a_model_without_a_matrix():
    with pytest.raises(FedsimError, match="needs a model with a weight matrix"):
        PowerSGDCompression().check_model({"b": torch.zeros(5)})
    with pytest.raises(FedsimError, match="bits must be one of"):
        BlockwiseCompression(bits=3)
    assert Int8Compression().bits == 8


def test_chunkwise_uplink_equals_compressing_the_stacked_round(tmp_path, monkeypatch):
    """The local executor compresses each trained chunk before the streamed means; the driver's path (used with
    a model attack or Ray) compresses the stacked round: the same numbers."""
    from fedsim.engine.executor import LocalExecutor

    config = {**SMALL, "fraction": 0.5, "uplink": {"name": "qsgd", "levels": 4, "feedback": "ef"}, "chunk_size": 2}
    simulate(config, tmp_path / "chunkwise", plots=False)
    monkeypatch.setattr(LocalExecutor, "encodes_uploads", False)
    simulate(config, tmp_path / "stacked", plots=False)
    for a, b in zip(metrics(tmp_path / "chunkwise"), metrics(tmp_path / "stacked"), strict=True):
        a.pop("time_s"), b.pop("time_s")
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == (b[k] if b[k] is None else pytest.approx(b[k], rel=1e-6, abs=1e-9)), k


VECTOR_MODEL = """
import torch


class Vectors(torch.nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(num_classes))
        self.bias = torch.nn.Parameter(torch.zeros(num_classes))

    def forward(self, x):
        return self.scale * x.flatten(1)[:, : len(self.bias)] + self.bias


def make(input_shape, num_classes):
    return Vectors(num_classes)
"""


def test_powersgd_on_a_model_without_a_matrix_exits_2(tmp_path, cli, monkeypatch):
    (tmp_path / "vector_model.py").write_text(VECTOR_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    flags = ["simulate", "--rounds", "1", "--quiet", "--no-plots", "--model", "vector_model:make"]
    assert cli([*flags, "--out", str(tmp_path / "plain")])[0] == 0  # the model itself trains
    code, _, err = cli([*flags, "--uplink", "powersgd", "--out", str(tmp_path / "x")])
    assert code == 2 and "needs a model with a weight matrix" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


def test_fedsim_list_names_both_config_keys(cli):
    code, out, _ = cli(["list", "compressor"])
    assert code == 0 and "config key 'uplink' or 'downlink'" in out and "powersgd" in out
    code, out, _ = cli(["list", "compressor", "topk"])
    assert code == 0 and "--set uplink.OPTION=VALUE" in out and "--set downlink.OPTION=VALUE" in out
