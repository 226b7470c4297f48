"""Synchronous round policies on the virtual clock (fedsim.round_policy): deadline (drop or partial work),
over-selection, dropout and a per-round time budget, against hand-computed schedules; the engine trains
exactly the kept clients with their step limits; bad settings are refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedsim.config import make_config
from fedsim.core import rng
from fedsim.core.errors import FedsimError
from fedsim.core.protocol import Plan
from fedsim.round_policy import (
    STREAM_DROPOUT,
    RoundPolicy,
    extra_clients,
    schedule_round,
    steps_within,
)
from fedsim.simulation import make_simulation, simulate
from fedsim.system import ClientProfiles

SMALL = dict(dataset="digits", clients=8, rounds=3, local_steps=4, batch_size=8, seed=3, sampler="iid",
             model={"name": "mlp", "hidden": [16]}, checkpoint_every=0,
             system={"name": "lognormal", "sigma": 1.0})  # fmt: skip

# three clients: no latency, 1 Mbit/s both ways, 0.1 / 0.2 / 0.4 s per sample; 125,000 bytes take 1 s each way
PROFILES = ClientProfiles(np.array([0.1, 0.2, 0.4]), np.array([1.0, 1.0, 1.0]), np.array([1.0, 1.0, 1.0]), np.zeros(3))
STEPS = np.full((3, 4), 2.0)  # 4 steps of 2 samples: full work 8 samples -> 2.8 / 3.6 / 5.2 s


def schedule(policy, ids=(0, 1, 2), target=3, **kw):
    return schedule_round(policy, PROFILES, np.array(ids), target, STEPS[: len(ids)], 125_000, 125_000,
                          seed=kw.get("seed", 0), round_=kw.get("round_", 1))  # fmt: skip


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_no_policy_keeps_everyone_and_lasts_the_slowest():
    s = schedule(RoundPolicy(deadline_s=100.0))
    assert s.kept.tolist() == [0, 1, 2] and s.step_limit is None and s.dropped == 0 and s.wasted_samples == 0
    assert s.round_time_s == pytest.approx(2 + 8 * 0.4)


def test_deadline_drops_late_clients_and_counts_their_work_until_the_deadline():
    s = schedule(RoundPolicy(deadline_s=4.0))
    assert s.kept.tolist() == [0, 1] and s.dropped == 1 and s.round_time_s == 4.0
    # client 2 downloads for 1 s, then 3 s of compute: floor(3 / 0.8) = 3 steps of 2 samples done by the deadline
    assert s.wasted_samples == 6.0


def test_partial_work_keeps_the_steps_done_by_the_deadline():
    s = schedule(RoundPolicy(deadline_s=4.0, partial_work=True))
    # client 2: 2 s of communication leaves 2 s = 2 steps of 0.8 s; client 1 (3.6 s) and 0 finish all 4
    assert s.kept.tolist() == [0, 1, 2] and s.step_limit.tolist() == [4, 4, 2]
    assert s.round_time_s == pytest.approx(3.6) and s.wasted_samples == 0
    s = schedule(RoundPolicy(deadline_s=2.5, partial_work=True))  # 0.5 s of compute: client 2 has no step
    assert s.kept.tolist() == [0, 1] and s.step_limit.tolist() == [2, 1] and s.round_time_s == 2.5


def test_over_selection_keeps_the_first_to_finish():
    s = schedule(RoundPolicy(over_selection=0.5), target=2)
    assert s.kept.tolist() == [0, 1] and s.dropped == 1
    # stopped at 3.6 s: client 2 had 2.6 s of compute = 3 steps
    assert s.round_time_s == pytest.approx(3.6) and s.wasted_samples == 6.0


def test_time_budget_limits_each_clients_steps():
    s = schedule(RoundPolicy(time_budget_s=3.0))
    assert s.kept.tolist() == [0, 1, 2] and s.step_limit.tolist() == [4, 2, 1]  # 1 s of compute each
    assert s.round_time_s == pytest.approx(2.8) and s.wasted_samples == 0


def test_dropout_follows_the_counter_based_draw():
    ids = np.arange(3)
    for round_ in range(1, 30):
        s = schedule(RoundPolicy(dropout=0.4), round_=round_, seed=5)
        u = rng.uniform(5, STREAM_DROPOUT, round_, ids, 0)
        assert s.kept.tolist() == ids[u >= 0.4].tolist()
        done = np.floor(rng.uniform(5, STREAM_DROPOUT, round_, ids, 1) * 4)
        assert s.wasted_samples == pytest.approx(float((2 * done)[u < 0.4].sum()))


def test_steps_within_and_extra_clients():
    cumulative = np.array([[0.0, 2.0, 4.0, 6.0]])
    assert steps_within(np.array([1.0]), cumulative, np.array([0.5]), 3.0).tolist() == [2]
    extra = extra_clients(np.array([1, 4]), np.arange(10), 0.5, seed=0, round_=1)
    assert len(extra) == 1 and extra[0] not in (1, 4)
    assert extra_clients(np.array([1, 4]), np.arange(10), 0.0, seed=0, round_=1).size == 0


def test_a_deadline_everyone_meets_changes_nothing(tmp_path):
    simulate(SMALL, tmp_path / "a", plots=False)
    simulate({**SMALL, "deadline_s": 1e6}, tmp_path / "b", plots=False)
    for a, b in zip(metrics(tmp_path / "a"), metrics(tmp_path / "b"), strict=True):
        assert b.pop("dropped") == 0 and b.pop("wasted_samples") == 0
        for key in ("time_s",):
            a.pop(key), b.pop(key)
        assert a == b


def test_step_limits_train_the_first_steps(tmp_path):
    """A step limit of 2 out of 4 equals a run of 2 local steps (the i.i.d. sampler draws step k the same)."""
    four = make_simulation(make_config(SMALL))
    two = make_simulation(make_config({**SMALL, "local_steps": 2}))
    ids = np.arange(8)
    params = four.initial_state().params
    limited = four.executor.train(Plan(ids, step_limit=np.full(8, 2)), params, 1, 0.05)
    plain = two.executor.train(Plan(ids), params, 1, 0.05)
    assert limited.num_steps.tolist() == [2] * 8
    for k in plain.deltas:
        assert limited.deltas[k].equal(plain.deltas[k])
    ragged = four.executor.train(Plan(ids, step_limit=np.arange(8) % 5), params, 1, 0.05)
    assert ragged.num_steps.tolist() == (np.arange(8) % 5).tolist()
    assert ragged.samples_processed.tolist() == (8 * (np.arange(8) % 5)).tolist()


@pytest.mark.parametrize(
    "policy",
    [{"deadline_s": 0.1}, {"deadline_s": 0.1, "partial_work": True, "strategy": "fednova"},
     {"over_selection": 0.5, "fraction": 0.5}, {"dropout": 0.3}, {"time_budget_s": 0.08}],
)  # fmt: skip
def test_policies_train_exactly_the_kept_clients_whatever_the_chunk_size(tmp_path, policy):
    config = {**SMALL, **policy}
    simulate(config, tmp_path / "auto", plots=False)
    simulate({**config, "chunk_size": 1}, tmp_path / "one", plots=False)
    rows, ones = metrics(tmp_path / "auto"), metrics(tmp_path / "one")
    assert any(r["dropped"] > 0 or r["wasted_samples"] > 0 for r in rows) or "time_budget_s" in policy
    for a, b in zip(rows, ones, strict=True):
        a.pop("time_s"), b.pop("time_s")
        assert a == b
    sim = make_simulation(make_config(config))
    state = sim.initial_state()
    for record in rows:
        plan = sim.mode.plan(sim, record["round"], state).plan
        kept, sched = sim.schedule(record["round"], plan)
        assert record["clients"] == len(kept.client_ids) and record["round_time_s"] == sched.round_time_s
        assert record["dropped"] == sched.dropped and record["wasted_samples"] == sched.wasted_samples


def test_an_empty_round_keeps_the_model_and_advances_the_clock(tmp_path):
    trace = tmp_path / "t.csv"
    # client 0 is fast; the others need 10 s per sample
    trace.write_text("client,compute_s_per_sample,down_mbps,up_mbps,latency_s\n"
                     + "".join(f"{k},{1e-4 if k == 0 else 10},100,100,0\n" for k in range(8)))  # fmt: skip
    config = {**SMALL, "system": {"name": "trace", "path": str(trace)}, "fraction": 0.25, "deadline_s": 1.0}
    simulate(config, tmp_path / "run", plots=False)
    rows = metrics(tmp_path / "run")
    assert {r["clients"] for r in rows} <= {0, 1}
    empty = [r for r in rows if r["clients"] == 0]
    assert empty and all(r["round_time_s"] == 1.0 and r["update_norm"] == 0.0 for r in empty)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--set", "deadline_s=0.001"], "deadline_s=0.001: no client can finish a round within it"),
        (["--set", "partial_work=true"], "partial_work keeps the steps done by the deadline: set deadline_s too"),
        (["--set", "dropout=1"], "dropout"),
        (["--set", "over_selection=-1"], "over_selection"),
        (["--set", "deadline_s=0"], "deadline_s"),
        (["--set", "deadline_s=5", "--backend", "flower"], "--backend flower runs federated fedsim strategies"),
    ],
)
def test_bad_policies_exit_2_in_one_line(tmp_path, cli, flags, message):
    code, _, err = cli(["simulate", "--rounds", "1", "--clients", "4", "--quiet", "--out", str(tmp_path / "r"),
                        *flags])  # fmt: skip
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_policies_over_a_topology_are_refused(tmp_path):
    import networkx as nx

    path = tmp_path / "ring.edgelist"
    nx.write_edgelist(nx.cycle_graph(4), path, data=False)
    with pytest.raises(FedsimError, match="apply to federated rounds"):
        make_config({"topology": str(path), "clients": 4, "deadline_s": 1.0})
