"""The Ray executor: same metrics as the local executor, client state resident on its shard across rounds,
actors killed mid-round restarted with the same result, and the pieces that need no Ray."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsim.config import make_config
from fedsim.core.errors import FedsimError
from fedsim.data.samplers import merge_states
from fedsim.engine.ray_executor import ShardWorker, shard_clients
from fedsim.engine.store import ClientStore, shard_arrays
from fedsim.simulation import make_simulation, simulate

RING = str(Path(__file__).resolve().parents[1] / "experiments" / "topologies" / "ring16.graphml")
BASE = dict(dataset="digits", model="mlp", clients=12, rounds=3, local_steps=4, batch_size=16, lr=0.1, seed=3)
RAY = dict(executor={"name": "ray", "num_actors": 2, "cpus_per_actor": 0.5})


def run(config):
    """Every round's metrics (without the wall time) and the summary."""
    records = []
    summary = simulate(config, None, plots=False, on_round=records.append)
    for r in records:
        r.pop("time_s")
    return records, summary


def assert_same_metrics(local, ray_run, tol=1e-5):
    assert len(local) == len(ray_run)
    for a, b in zip(local, ray_run, strict=True):
        assert a.keys() == b.keys()
        for key, value in a.items():
            if isinstance(value, float):
                assert b[key] == pytest.approx(value, rel=tol, abs=tol), (a["round"], key)
            else:
                assert b[key] == value, (a["round"], key)


# -- pieces without Ray -----------------------------------------------------------------------------------


def test_shards_are_contiguous_and_cover_every_client():
    shards = shard_clients(10, 3)
    assert [s.tolist() for s in shards] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert len(shard_clients(2, 5)) == 2  # never an empty shard


def test_shard_store_serves_the_same_samples_by_global_id():
    sim = make_simulation(make_config({**BASE, "partition": {"name": "dirichlet", "alpha": 0.5}}))
    owned = np.array([4, 5, 6, 7])
    store = ClientStore.from_shard(shard_arrays(sim.store, owned), torch.device("cpu"))
    assert store.num_clients == sim.store.num_clients
    assert (store.sizes[owned] == sim.store.sizes[owned]).all() and store.sizes.sum() == sim.store.sizes[owned].sum()
    positions = np.stack([np.arange(3)] * len(owned))
    full, shard = sim.store.global_index(owned, positions), store.global_index(owned, positions)
    assert torch.equal(sim.store.x[full], store.x[shard]) and torch.equal(sim.store.y[full], store.y[shard])


def test_shard_worker_trains_like_the_local_executor():
    sim = make_simulation(make_config({**BASE, "strategy": "scaffold"}))
    owned = np.array([3, 4, 5])
    local = sim.executor
    setup = dict(
        model=sim.model, sampler=local.sampler, optimizer=local.optimizer, algorithm=local.algorithm, seed=local.seed,
        local_steps=local.local_steps, local_epochs=None, batch_size=local.batch_size, chunk_size=2,
    )  # fmt: skip
    worker = ShardWorker(shard_arrays(sim.store, owned), setup, None, threads=1, use_gpu=False)
    worker.executor.init_client_state(sim.init_params)
    state = sim.initial_state()
    plan = sim.strategy.configure(1, state, sim.store.num_clients, 0)
    ids = np.array([3, 5])
    meta, snapshot = worker.train(ids, state.params, 1, 0.1, plan.broadcast)
    from fedsim.core.protocol import Plan

    expected = local.train(Plan(ids, plan.broadcast), state.params, 1, 0.1)
    torch.testing.assert_close(meta["train_loss"], expected.train_loss)
    torch.testing.assert_close(worker.gather("deltas")["1.weight"], expected.deltas["1.weight"])
    # client state: rows of the shard only, the trained clients' rows equal the local executor's
    assert snapshot["client_state"]["c.1.weight"].shape[0] == 3
    torch.testing.assert_close(snapshot["client_state"]["c.1.weight"][[0, 2]], local.client_state["c.1.weight"][ids])
    weights = torch.tensor([0.25, 0.75], dtype=torch.float64)
    part = worker.reduce("deltas", weights)
    torch.testing.assert_close(part["1.weight"], (expected.deltas["1.weight"] * weights.float()[:, None, None]).sum(0))


def test_sampler_states_merge_by_owner():
    shards = [np.array([0, 1]), np.array([2, 3, 4])]
    a = {"markov_position": np.array([5, 6, 99])}  # entry 2 belongs to the other shard
    b = {"markov_position": np.array([-1, -1, 7, -1])}
    merged = merge_states([a, b], shards)
    assert merged["markov_position"].tolist() == [5, 6, 7, -1, -1]
    assert merge_states([None, None], shards) is None


def test_missing_ray_is_one_line_naming_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(FedsimError, match=r"fedsim\[ray\]"):
        simulate({**BASE, **RAY}, None, plots=False)


def test_ray_options_need_the_ray_executor():
    with pytest.raises(FedsimError, match="executor 'local' has no option 'num_actors'"):
        make_config({**BASE, "executor.num_actors": 2})
    with pytest.raises(FedsimError, match="executor 'local' has no option 'num_actors'"):
        make_config({**BASE, "executor": {"name": "local", "num_actors": 2}})
    with pytest.raises(FedsimError, match="--executor local"):
        from fedsim.probes import run_stability_probe

        run_stability_probe({**BASE, **RAY}, None)


# -- with Ray (one local Ray for the module: num_cpus=2, actors with fractional CPUs) ------------------------

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_session():
    import os

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.mark.parametrize(
    "options",
    [
        {"strategy": "fedavg", "fraction": 0.5},
        {"strategy": "scaffold", "fraction": 0.5},
        {
            "strategy": "fednova",
            "local_epochs": 1,
            "local_steps": None,
            "partition": {"name": "dirichlet", "alpha": 0.3},
        },
        {"strategy": "fedcm", "aggregator": "median"},
        {"strategy": "fedavg", "regulator": "ecgr", "sampler": "markov-ring"},
        {
            "strategy": "fednova",
            "system": {"name": "lognormal", "sigma": 1.0},
            "deadline_s": 0.2,
            "partial_work": True,
            "over_selection": 0.5,
            "fraction": 0.5,
        },
        {"strategy": {"name": "fedbuff", "buffer_size": 3, "concurrency": 6}, "system": {"name": "lognormal"}},
        {"strategy": "fedavg", "attack": {"name": "alie", "fraction": 0.25}, "aggregator": "rfa"},
        {"strategy": "fedadam", "fraction": 0.5, "privacy": {"name": "dp-fedavg", "clip": 0.1}},
        {"strategy": "fedavg", "aggregator": "median", "privacy": {"name": "dp-sgd", "clip": 0.5}},
    ],
    ids=[
        "fedavg",
        "scaffold",
        "fednova-ragged",
        "fedcm-median",
        "ecgr-markov",
        "deadline-partial",
        "fedbuff",
        "alie-rfa",
        "dp-fedavg",
        "dp-sgd-median",
    ],
)
def test_same_metrics_as_the_local_executor(ray_session, options):
    config = {**BASE, **{k: v for k, v in options.items() if v is not None}}
    if options.get("local_steps", 0) is None:
        config.pop("local_steps")
    local, _ = run(config)
    sharded, summary = run({**config, **RAY, "executor.num_actors": 3})
    assert_same_metrics(local, sharded)
    assert summary["final_test_accuracy"] is not None


@pytest.mark.parametrize(
    "options",
    [
        {"optimizer": {"name": "sgd", "momentum": 0.9}},
        {"schedule": "random_matchings"},
        {"strategy": "dsgda", "problem": "auc"},
    ],
    ids=["dsgd-momentum", "dsgd-random-matchings", "dsgda-auc"],
)
def test_decentralized_runs_match_the_local_executor(ray_session, options):
    config = {**BASE, "topology": RING, "clients": 16, **options}  # momentum: node optimizer state rows
    local, _ = run(config)
    sharded, _ = run({**config, **RAY, "executor.num_actors": 3})  # ring edges cross the shard boundaries
    assert_same_metrics(local, sharded)


def test_client_state_stays_with_its_client(ray_session):
    config = make_config({**BASE, "strategy": "scaffold", "fraction": 0.5, "rounds": 4})
    with make_simulation(config) as local_sim:
        local_sim.run(None)
        expected = local_sim.executor.client_state
    with make_simulation(config.replace(**RAY)) as sim:
        sim.run(None)
        got = sim.executor.client_state
        assert len(sim.executor.shards) == 2 and sim.executor.restarts == 0
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6)
    assert any(float(v.abs().sum()) > 0 for v in got.values())


def test_checkpoint_restore_into_ray_actors(ray_session):
    config = make_config({**BASE, "strategy": "scaffold", "fraction": 0.5, "rounds": 4})
    with make_simulation(config) as local_sim:
        full = local_sim.run(None)
    half = config.replace(rounds=2)
    with make_simulation(half) as first:
        first_state = first.initial_state()
        for r in (1, 2):
            first_state, _ = first.round(r, first_state)
        payload = first.checkpoint_payload(2, first_state)
    with make_simulation(config.replace(**RAY)) as sim:
        start, state = sim.restore(payload)
        summary = sim.run(None, start_round=start + 1, state=state)
    assert summary["final_test_accuracy"] == pytest.approx(full["final_test_accuracy"], abs=1e-6)
    assert summary["final_train_loss"] == pytest.approx(full["final_train_loss"], rel=1e-5)


def test_actor_killed_mid_round_is_restarted_with_the_same_result(ray_session, monkeypatch):
    """Three deaths in one SCAFFOLD run (stateful clients): while its shard trains (round 2), after training
    and before the server's reductions (round 3), and idle between rounds 3 and 4."""
    from fedsim.engine import ray_executor

    config = {**BASE, "strategy": "scaffold", "fraction": 0.5, "rounds": 4}
    local, _ = run(config)
    executors, records = [], []
    init, submit, reduce = (ray_executor.RayExecutor.__init__, ray_executor.RayExecutor.submit,
                            ray_executor.ShardedUpdates.reduce)  # fmt: skip

    def remember(self, *args, **kwargs):
        init(self, *args, **kwargs)
        executors.append(self)

    def submit_then_kill(self, calls):
        pending = submit(self, calls)
        if len(records) == 1 and 0 in calls and calls[0][0] == "train" and self.restarts == 0:
            ray.kill(self.actors[0], no_restart=True)  # round 2: the train call is in flight
        return pending

    def kill_then_reduce(self, *args, **kwargs):
        if len(records) == 2 and self.executor.restarts == 1:
            ray.kill(self.executor.actors[1], no_restart=True)  # round 3: trained, updates held, then dead
        return reduce(self, *args, **kwargs)

    def on_round(record):
        records.append({k: v for k, v in record.items() if k != "time_s"})
        if record["round"] == 3:
            ray.kill(executors[0].actors[0], no_restart=True)  # idle between rounds 3 and 4

    monkeypatch.setattr(ray_executor.RayExecutor, "__init__", remember)
    monkeypatch.setattr(ray_executor.RayExecutor, "submit", submit_then_kill)
    monkeypatch.setattr(ray_executor.ShardedUpdates, "reduce", kill_then_reduce)
    simulate({**config, **RAY}, None, plots=False, on_round=on_round)
    assert executors[0].restarts == 3
    assert_same_metrics(local, records)


def test_cli_ray_run_writes_the_same_metrics(ray_session, tmp_path, cli):
    import json

    flags = ["--clients", "8", "--rounds", "2", "--local-steps", "2", "--quiet", "--strategy", "scaffold"]
    assert cli(["simulate", *flags, "--out", str(tmp_path / "local")])[0] == 0
    ray_flags = ["--executor", "ray", "--num-actors", "2", "--cpus-per-actor", "0.5"]
    code, _, err = cli(["simulate", *flags, *ray_flags, "--out", str(tmp_path / "ray")])
    assert code == 0, err
    read = lambda p: [  # noqa: E731
        {k: v for k, v in json.loads(line).items() if k != "time_s"}
        for line in (p / "metrics.jsonl").read_text().splitlines()
    ]
    assert_same_metrics(read(tmp_path / "local"), read(tmp_path / "ray"))
    import yaml

    written = yaml.safe_load((tmp_path / "ray" / "config.yaml").read_text())
    assert written["executor"]["name"] == "ray"
    assert written["executor"]["num_actors"] == 2 and written["executor"]["cpus_per_actor"] == 0.5
    assert yaml.safe_load((tmp_path / "local" / "config.yaml").read_text())["executor"] == "local"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--num-actors", "2"], "executor 'local' has no option 'num_actors'"),
        (["--set", "executor.num_actors=2"], "executor 'local' has no option 'num_actors'"),
        (["--executor", "ray", "--cpus-per-actor", "0"], "cpus_per_actor"),
        (["--executor", "spark"], "executor"),
    ],
)
def test_cli_bad_executor_flags_exit_2(tmp_path, cli, flags, message):
    code, _, err = cli(["simulate", "--rounds", "1", "--quiet", *flags, "--out", str(tmp_path / "r")])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_cli_without_ray_names_the_extra(tmp_path, cli, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)
    code, _, err = cli(["simulate", "--rounds", "1", "--quiet", "--executor", "ray", "--out", str(tmp_path / "r")])
    assert code == 2 and "fedsim[ray]" in err and len(err.strip().splitlines()) == 1


def ray_processes() -> list[str]:
    """Command lines of Ray's daemons (raylet, GCS server) running on this machine."""
    found = []
    for entry in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmd = entry.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "raylet/raylet" in cmd or "gcs_server" in cmd:
            found.append(cmd)
    return found


def assert_nothing_left_running():
    import time

    assert not ray.is_initialized()
    deadline = time.monotonic() + 15
    while ray_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not ray_processes()


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_the_run_starts_and_shuts_down_ray_even_when_it_fails():
    from fedsim.core.errors import DivergenceError

    if ray.is_initialized():
        ray.shutdown()
    assert_nothing_left_running()
    simulate({**BASE, **RAY, "rounds": 1}, None, plots=False)
    assert_nothing_left_running()
    with pytest.raises(FedsimError, match="need"):  # more actors than the machine's CPUs: refused at the start
        simulate(
            {**BASE, **RAY, "executor.num_actors": 64, "executor.cpus_per_actor": 1.0, "rounds": 1}, None, plots=False
        )
    assert_nothing_left_running()
    with pytest.raises(DivergenceError):  # fails mid-run
        simulate({**BASE, **RAY, "lr": 1e8, "rounds": 3}, None, plots=False)
    assert_nothing_left_running()
