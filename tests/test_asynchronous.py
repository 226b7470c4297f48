"""Asynchronous FL on the virtual clock (fedsim.asynchronous, strategies.asynchronous): FedBuff with K = C = N
equals synchronous FedAvg; FedAsync with C = 1 equals a sequential loop; the vectorized engine equals a
per-client event loop written here; resume equals uninterrupted; results do not depend on the chunk size;
bad settings exit 2 in one line."""

from __future__ import annotations

import heapq
import json

import numpy as np
import pytest
import torch

from fedsim.asynchronous import pick_client
from fedsim.config import make_config
from fedsim.core.protocol import Plan
from fedsim.simulation import make_simulation, simulate
from fedsim.system import durations
from strategies.asynchronous import staleness_weight

BASE = dict(dataset="digits", clients=12, local_steps=3, batch_size=8, seed=4, sampler="iid", lr=0.05,
            model={"name": "mlp", "hidden": [16]}, checkpoint_every=0)  # fmt: skip
HETERO = {"name": "lognormal", "sigma": 1.0}


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def states(config, steps):
    """The server parameters after each of ``steps`` server steps, and the rows."""
    sim = make_simulation(make_config(config))
    state, out, rows = sim.initial_state(), [], []
    for r in range(1, steps + 1):
        state, row = sim.round(r, state)
        out.append({k: v.clone() for k, v in state.params.items()})
        rows.append(row)
    return out, rows, sim


def assert_close(a, b, atol=1e-6):
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0)


def test_staleness_functions():
    assert staleness_weight(7, "constant") == 1.0
    assert staleness_weight(3, "polynomial", a=0.5) == pytest.approx(0.5)
    assert staleness_weight(4, "hinge", a=10, b=4) == 1.0
    assert staleness_weight(6, "hinge", a=10, b=4) == pytest.approx(1 / 21)


def test_fedbuff_with_everyone_in_one_buffer_is_fedavg():
    n = BASE["clients"]
    fedbuff = {**BASE, "strategy": {"name": "fedbuff", "buffer_size": n, "concurrency": n, "staleness": "constant",
                                    "weighting": "samples"}}  # fmt: skip
    fedavg = {**BASE, "strategy": "fedavg"}
    buffered, rows, _ = states(fedbuff, 4)
    synchronous, sync_rows, _ = states(fedavg, 4)
    for a, b in zip(buffered, synchronous, strict=True):
        assert_close(a, b)
    for a, b in zip(rows, sync_rows, strict=True):
        assert a["clients"] == b["clients"] == n and a["staleness_max"] == 0
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a["round_time_s"] == pytest.approx(b["round_time_s"], rel=1e-12)


def test_fedasync_with_one_client_in_flight_is_a_sequential_loop():
    alpha, steps = 0.7, 6
    config = {**BASE, "strategy": {"name": "fedasync", "concurrency": 1, "alpha": alpha}}
    got, rows, sim = states(config, steps)
    w = {k: v.clone() for k, v in sim.init_params.items()}
    counts = np.zeros(BASE["clients"], dtype=np.int64)
    busy = np.zeros(BASE["clients"], dtype=bool)
    for t in range(steps):
        k = pick_client(BASE["seed"], t, busy)
        counts[k] += 1
        plan = Plan(np.array([k]), round_keys=np.array([counts[k]]))
        update = sim.executor.train(plan, w, 0, BASE["lr"], start={n: v[None] for n, v in w.items()})
        w = {n: (1 - alpha) * v + alpha * (v - update.deltas[n][0]) for n, v in w.items()}  # staleness 0: s = 1
        assert_close(got[t], w)
        assert rows[t]["staleness_max"] == 0 and rows[t]["arrived"] == t + 1


def event_loop(sim, steps, buffer_size, concurrency, a=0.5):
    """FedBuff (polynomial staleness, uniform weights, server lr 1) one client at a time: every client is
    trained alone as it is dispatched."""
    n, seed = sim.store.num_clients, sim.config.seed
    profiles = sim.system.profiles(n)
    w = {k: v.clone() for k, v in sim.init_params.items()}
    counts, busy = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool)
    queue, dispatched, clock, version, buffer, out = [], 0, 0.0, 0, [], []
    while len(out) < steps:
        if (not queue or queue[0][0] > clock) and busy.sum() < concurrency:
            for _ in range(concurrency - int(busy.sum())):
                k = pick_client(seed, dispatched, busy)
                dispatched, busy[k] = dispatched + 1, True
                counts[k] += 1
                plan = Plan(np.array([k]), round_keys=np.array([counts[k]]))
                update = sim.executor.train(plan, w, 0, sim.config.lr, start={q: v[None] for q, v in w.items()})
                samples = float(update.samples_processed[0])
                d = durations(profiles, [k], [sim.model_bytes], [sim.upload_bytes], [samples])[0]
                heapq.heappush(queue, (clock + d, k, version, {q: v[0] for q, v in update.deltas.items()}))
        end, k, started, delta = heapq.heappop(queue)
        clock, busy[k] = end, False
        buffer.append((delta, version - started))
        if len(buffer) == buffer_size:
            step = {q: sum(d[q].double() * (s + 1.0) ** -a for d, s in buffer) / buffer_size for q in w}
            w = {q: v - step[q].float() for q, v in w.items()}
            version, buffer = version + 1, []
            out.append({q: v.clone() for q, v in w.items()})
    return out


def test_the_vectorized_engine_equals_a_per_client_event_loop():
    config = {**BASE, "system": HETERO, "strategy": {"name": "fedbuff", "buffer_size": 3, "concurrency": 6}}
    got, rows, sim = states(config, 8)
    expected = event_loop(sim, 8, buffer_size=3, concurrency=6)
    for a, b in zip(got, expected, strict=True):
        assert_close(a, b)
    assert max(r["staleness_max"] for r in rows) > 0
    assert sim.mode.report()["mean_vectorized_batch"] > 1


@pytest.mark.parametrize("strategy", [{"name": "fedasync", "concurrency": 5, "staleness": "hinge"},
                                      {"name": "fedbuff", "buffer_size": 3, "concurrency": 8}])  # fmt: skip
def test_chunk_size_does_not_change_results(tmp_path, strategy):
    config = {**BASE, "system": HETERO, "strategy": strategy, "rounds": 6}
    simulate(config, tmp_path / "auto", plots=False)
    simulate({**config, "chunk_size": 1}, tmp_path / "one", plots=False)
    for a, b in zip(metrics(tmp_path / "auto"), metrics(tmp_path / "one"), strict=True):
        a.pop("time_s"), b.pop("time_s")
        assert a == b


@pytest.mark.parametrize("strategy", ["fedasync", "fedbuff"])
def test_resume_equals_uninterrupted(tmp_path, cli, strategy):
    flags = ["--clients", "12", "--local-steps", "2", "--system", "lognormal", "--strategy", strategy,
             "--set", "strategy.concurrency=6", "--quiet", "--no-plots", "--checkpoint-every", "2"]  # fmt: skip
    if strategy == "fedbuff":
        flags += ["--set", "strategy.buffer_size=4"]
    assert cli(["simulate", *flags, "--rounds", "8", "--out", str(tmp_path / "full")])[0] == 0
    assert cli(["simulate", *flags, "--rounds", "3", "--out", str(tmp_path / "part")])[0] == 0
    assert cli(["simulate", "--resume", str(tmp_path / "part"), "--rounds", "8", "--quiet", "--no-plots"])[0] == 0
    full, part = metrics(tmp_path / "full"), metrics(tmp_path / "part")
    for a, b in zip(full, part, strict=True):
        a.pop("time_s"), b.pop("time_s")
        assert a == b
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("full", "part")]
    for key in ("participation", "virtual_time_s", "final_test_accuracy"):
        assert summaries[0][key] == summaries[1][key]


def test_fedbuff_server_optimizer_and_rows(tmp_path):
    strategy = {"name": "fedbuff", "buffer_size": 4, "concurrency": 8, "server_optimizer": "adam"}
    config = {**BASE, "rounds": 4, "system": HETERO, "strategy": strategy}
    summary = simulate(config, tmp_path / "run", plots=False)
    rows = metrics(tmp_path / "run")
    assert [r["arrived"] for r in rows] == [4, 8, 12, 16] and all(r["clients"] == 4 for r in rows)
    assert all(r["in_flight"] == 7 for r in rows) and summary["mean_vectorized_batch"] >= 1
    assert rows[-1]["virtual_time_s"] == pytest.approx(sum(r["round_time_s"] for r in rows))
    assert sum(summary["participation"].values()) > 0


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--strategy", "fedavg", "--set", "strategy.staleness=hinge"], "staleness"),
        (["--strategy", "fedasync", "--set", "strategy.b=3"], "'b' does not apply to staleness 'polynomial'"),
        (
            ["--strategy", "fedbuff", "--set", "strategy.staleness=constant", "--set", "strategy.a=1"],
            "'a' does not apply to staleness 'constant'",
        ),
        (["--strategy", "fedbuff", "--fraction", "0.5"], "is asynchronous"),
        (["--strategy", "fedasync", "--set", "deadline_s=3"], "is asynchronous"),
        (["--strategy", "fedasync", "--availability", "markov"], "is asynchronous"),
        (["--strategy", "fedbuff", "--set", "strategy.concurrency=50"], "exceeds the 4 clients"),
        (["--strategy", "fedbuff", "--set", "strategy.buffer_size=0"], "buffer_size"),
    ],
)
def test_bad_asynchronous_settings_exit_2_in_one_line(tmp_path, cli, flags, message):
    code, _, err = cli(["simulate", "--rounds", "1", "--clients", "4", "--quiet", "--out", str(tmp_path / "r"),
                        *flags])  # fmt: skip
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_plugin_asynchronous_strategy_runs_on_the_event_loop(monkeypatch):
    """A rule of one's own (here: the server takes the latest arrival's model) runs on the event loop."""
    from fedsim.core import components
    from fedsim.core.protocol import ServerState
    from strategies.asynchronous import AsyncStrategy

    class Latest(AsyncStrategy):
        name = "latest-test"

        def __init__(self, concurrency: int | None = 4, **kwargs):
            super().__init__(concurrency=concurrency, **kwargs)

        @property
        def step_size(self) -> int:
            return 1

        def server_step(self, version, state, arrivals):
            (x,) = arrivals
            return ServerState({k: x.start[k] - x.delta[k] for k in state.params}, state.extras)

    monkeypatch.setitem(components._REGISTRY["strategy"], "latest-test", None)  # restored after the test
    components.register("strategy", "latest-test", Latest)
    got, rows, sim = states({**BASE, "system": HETERO, "strategy": "latest-test"}, 5)
    assert [r["arrived"] for r in rows] == [1, 2, 3, 4, 5] and rows[-1]["in_flight"] == 3
    first = next(iter(got[-1]))
    assert not torch.equal(got[-1][first], sim.init_params[first])
