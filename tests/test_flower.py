"""Flower interoperability (real flwr 1.41): our strategies as Flower strategies, Flower's strategies in our
engine, FedsimClient in ClientApps, ``--backend flower``, and the errors."""

import json
import logging
import sys

import numpy as np
import pytest
import torch

from fedsim.config import make_config
from fedsim.core.errors import FedsimError
from fedsim.simulation import Simulation, make_simulation, simulate

flwr = pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict  # noqa: E402

from strategies import flower  # noqa: E402
from strategies.flower.records import to_record, updates_from_replies  # noqa: E402

BASE = dict(dataset="digits", model="mlp", clients=8, rounds=3, local_steps=3, batch_size=16, lr=0.1, seed=5)

logging.getLogger("flwr").setLevel(logging.WARNING)


def rounds_of(config):
    records = []
    simulate(config, None, plots=False, on_round=records.append)
    for r in records:
        r.pop("time_s")
    return records


def assert_same(a_records, b_records, tol):
    assert len(a_records) == len(b_records)
    for a, b in zip(a_records, b_records, strict=True):
        for key, value in a.items():
            if isinstance(value, float):
                assert b[key] == pytest.approx(value, rel=tol, abs=tol), (a["round"], key)
            else:
                assert b[key] == value, (a["round"], key)


def final_params(config) -> dict:
    with make_simulation(make_config(config)) as sim:
        state = sim.initial_state()
        for r in range(1, sim.config.rounds + 1):
            state, _ = sim.round(r, state)
        return state.params


# -- our strategies as Flower strategies, run on our engine's Grid (in-process) -----------------------------


@pytest.mark.parametrize(
    ("strategy", "flower_strategy", "options"),
    [
        ("scaffold", lambda **kw: flower.SCAFFOLD(**kw), {}),
        ("fednova", lambda **kw: flower.FedNova(**kw), {"local_epochs": 1, "local_steps": None}),
        ("feddyn", lambda **kw: flower.FedDyn(feddyn_alpha=0.1, **kw), {"feddyn_alpha": 0.1}),
        ("fedcm", lambda **kw: flower.FedCM(fedcm_beta=0.3, **kw), {"fedcm_beta": 0.3}),
        ("fedprox", lambda **kw: flower.FlowerStrategy("fedprox", mu=0.1, **kw), {"mu": 0.1}),
    ],
    ids=["scaffold", "fednova", "feddyn", "fedcm", "generic-fedprox"],
)
def test_our_flower_strategies_aggregate_like_our_engine(strategy, flower_strategy, options):
    config = {**BASE, "strategy": strategy, **options}
    config = {k: v for k, v in config.items() if v is not None}
    expected = final_params(config)
    with make_simulation(make_config(config)) as sim:  # the same clients, trained by our engine via its Grid
        fl = flower_strategy(lr=sim.config.lr, seed=sim.config.seed)
        result = fl.start(grid=flower.EngineGrid(sim), initial_arrays=to_record(sim.init_params), num_rounds=3)
    got = result.arrays.to_torch_state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)
    assert fl.state_record()["fedsim.server_state"] is not None
    assert fl.last_updates is not None and len(fl.last_updates.client_ids) == BASE["clients"]


def test_scaffold_broadcast_and_uploads_travel_in_records():
    with make_simulation(make_config({**BASE, "strategy": "scaffold"})) as sim:
        fl = flower.SCAFFOLD(lr=0.1)
        grid = flower.EngineGrid(sim)
        fl.start(grid=grid, initial_arrays=to_record(sim.init_params), num_rounds=1)
        messages = list(fl.configure_train(2, to_record(sim.init_params), ConfigRecord(), grid))
        content = messages[0].content
        assert "fedsim.broadcast" in content.array_records and content["config"]["lr"] == 0.1
        assert set(content["fedsim.broadcast"].keys()) == {f"c.{k}" for k in sim.init_params}
        replies = list(grid.send_and_receive(messages))
        assert all("fedsim.extras" in r.content.array_records for r in replies)


# -- Flower's strategies in our engine ----------------------------------------------------------------------


def test_flower_fedavg_in_our_engine_equals_our_fedavg():
    ours = rounds_of({**BASE})
    theirs = rounds_of({**BASE, "strategy": "flwr:FedAvg"})
    assert_same(ours, theirs, 1e-5)


def test_flower_strategies_run_in_our_engine():
    adam = rounds_of({**BASE, "strategy": "flwr:FedAdam", "flwr_options": {"eta": 0.03}, "fraction": 0.5})
    assert [r["clients"] for r in adam] == [4, 4, 4]
    assert adam[-1]["test_accuracy"] > adam[0]["test_accuracy"]
    again = rounds_of({**BASE, "strategy": "flwr:FedAdam", "flwr_options": {"eta": 0.03}, "fraction": 0.5})
    assert adam == again  # Flower's random node sampling is seeded from (seed, round)
    trimmed = rounds_of({**BASE, "strategy": "flwr:FedTrimmedAvg", "flwr_options": {"beta": 0.25}})
    assert all(np.isfinite(r["train_loss"]) for r in trimmed)


def test_engine_grid_answers_evaluate_messages():
    with make_simulation(make_config(BASE)) as sim:
        strategy = flwr.serverapp.strategy.FedAvg(fraction_evaluate=1.0, min_available_nodes=1)
        result = strategy.start(grid=flower.EngineGrid(sim), initial_arrays=to_record(sim.init_params), num_rounds=1)
    assert 0.0 <= result.evaluate_metrics_clientapp[1]["accuracy"] <= 1.0


def test_bad_flower_strategy_names_and_options():
    with pytest.raises(FedsimError, match="unknown Flower strategy"):
        simulate({**BASE, "strategy": "flwr:FedNope"}, None, plots=False)
    with pytest.raises(FedsimError, match="takes no option"):
        simulate({**BASE, "strategy": "flwr:FedAdam", "flwr_options": {"etta": 1}}, None, plots=False)
    with pytest.raises(FedsimError, match="applies to fedsim strategies"):
        make_config({**BASE, "strategy": "flwr:FedAvg", "aggregator": "median"})
    with pytest.raises(FedsimError, match="flwr_options"):
        make_config({**BASE, "flwr_options": {"eta": 1}})


# -- FedsimClient in a ClientApp, and the checks on replies -------------------------------------------------


def _context(state=None):
    return Context(run_id=1, node_id=7, node_config={"partition-id": 2}, state=state or RecordDict(), run_config={})


def _train_message(sim, round_, broadcast=None):
    content = {"arrays": to_record(sim.init_params), "config": ConfigRecord({"server-round": round_, "lr": 0.1})}
    if broadcast:
        content["fedsim.broadcast"] = to_record(broadcast)
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    return Message(RecordDict(content), 7, MessageType.TRAIN)


@pytest.mark.parametrize(
    "options",
    [
        {"strategy": "scaffold"},
        {"strategy": "fedavg", "regulator": "ecgr"},
        {"strategy": "fedprox", "regulator": "bherd", "optimizer": "foam", "lr": 0.01},
        {"strategy": "feddyn", "optimizer": "sgd-sai", "lr": 0.01, "sampler": "markov-ring"},
    ],
    ids=["scaffold", "ecgr", "bherd-foam", "feddyn-sgdsai-markov"],
)
def test_fedsim_client_trains_like_the_engine_and_keeps_state_in_the_context(options):
    config = make_config({**BASE, **options})
    sim = Simulation(config)
    from fedsim.core.protocol import Plan
    from fedsim.engine.store import shard_arrays

    data = shard_arrays(sim.store, np.array([2]))
    local = sim.executor
    client = flower.FedsimClient(sim.model, data["x"], data["y"], strategy=local.algorithm, optimizer=local.optimizer,
                                 sampler=local.sampler, local_steps=3, batch_size=16, seed=5)  # fmt: skip
    context = _context()
    state = sim.initial_state()
    for round_ in (1, 2):  # round 2 starts from the state the node kept in its context
        plan = sim.strategy.configure(round_, state, 8, 5)
        lr = sim.lr(round_)
        message = _train_message(sim, round_, plan.broadcast)
        message.content["config"]["lr"] = lr
        reply = client.train(message, context)
        expected = local.train(Plan(np.array([2]), plan.broadcast), state.params, round_, lr)
        metrics = reply.content["metrics"]
        assert metrics["num-examples"] == int(sim.store.sizes[2]) and metrics["num-steps"] == 3
        assert metrics["train-loss"] == pytest.approx(float(expected.train_loss[0]), rel=1e-5)
        got = reply.content["arrays"].to_torch_state_dict()
        for k, v in state.params.items():
            torch.testing.assert_close(v - got[k], expected.deltas[k][0], rtol=1e-5, atol=1e-6)
        for k, v in expected.stats.items():
            assert metrics[k] == pytest.approx(float(v[0]), rel=1e-5)
    key = f"fedsim.client_state.{local.algorithm.name}"
    if local.client_state:
        stored = context.state[key].to_torch_state_dict()
        for k, v in stored.items():
            torch.testing.assert_close(v, local.client_state[k][2])
    else:
        assert key not in context.state
    if options.get("sampler") == "markov-ring":
        assert "fedsim.sampler_state" in context.state
    if options["strategy"] == "scaffold":
        assert "fedsim.extras" in reply.content.array_records


def _reply(content, node=7):
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    sent = Message(RecordDict({"config": ConfigRecord({})}), node, MessageType.TRAIN)
    return Message(RecordDict(content), reply_to=sent)


def test_replies_without_the_expected_records_name_the_client():
    params = {"w": torch.zeros(2)}
    good_metrics = MetricRecord({"num-examples": 3, "num-steps": 2, "train-loss": 0.5})
    cases = [
        ({"metrics": good_metrics}, "client 4 \\(node 7\\).*ArrayRecord 'arrays'"),
        ({"arrays": ArrayRecord({"w": torch.ones(2)})}, "client 4.*'num-examples'"),
        ({"arrays": ArrayRecord({"w": torch.ones(2)}), "metrics": MetricRecord({"num-examples": 3})},
         "client 4.*'num-steps', 'train-loss'"),
        ({"arrays": ArrayRecord({"v": torch.ones(2)}), "metrics": good_metrics}, "client 4.*names"),
    ]  # fmt: skip
    for content, message in cases:
        with pytest.raises(flower.FlowerReplyError, match=message):
            updates_from_replies([_reply(content)], {7: 4}, params, lr=0.1, num_clients=8)
    with pytest.raises(flower.FlowerReplyError, match="client 4.*'dc.\\*'"):
        updates_from_replies([_reply({"arrays": ArrayRecord({"w": torch.ones(2)}), "metrics": good_metrics})],
                             {7: 4}, params, lr=0.1, num_clients=8, required_extras=("dc.",))  # fmt: skip
    from flwr.app import Error
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    sent = Message(RecordDict({"config": ConfigRecord({})}), 7, MessageType.TRAIN)
    failed = Message(Error(code=1, reason="Traceback ...\n  File x\nValueError: bad batch'>"), reply_to=sent)
    with pytest.raises(flower.FlowerReplyError) as raised:
        updates_from_replies([failed], {7: 4}, params, lr=0.1, num_clients=8)
    assert str(raised.value) == "client 4 (node 7) failed to train: ValueError: bad batch"
    updates = updates_from_replies([_reply({"arrays": ArrayRecord({"w": torch.ones(2)}), "metrics": good_metrics})],
                                   {7: 4}, params, lr=0.1, num_clients=8)  # fmt: skip
    torch.testing.assert_close(updates.deltas["w"], -torch.ones(1, 2))


def test_missing_flower_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "flwr", None)
    from strategies.flower.records import require_flower

    with pytest.raises(FedsimError, match=r"fedsim\[flower\]"):
        require_flower()


# -- Flower's simulation engine (Ray): --backend flower and our strategies with FedsimClient ClientApps ----


def test_backend_flower_reproduces_the_local_run(tmp_path):
    config = {**BASE, "strategy": "scaffold", "fraction": 0.5, "clients": 6, "rounds": 2}
    local = rounds_of(config)
    records = []
    summary = simulate({**config, "backend": "flower", "flower_cpus_per_client": 0.5}, tmp_path / "fl",
                       plots=False, on_round=records.append)  # fmt: skip
    for r in records:
        r.pop("time_s")
    assert_same(local, records, 1e-3)
    assert summary["rounds_completed"] == 2
    assert not list((tmp_path / "fl").glob("checkpoint*"))  # client state lived on the nodes
    with pytest.raises(FedsimError, match="cannot resume"):
        from fedsim.simulation import resume

        resume(tmp_path / "fl")


def _dispatching_client_app(configs: dict[str, str]):
    """A ClientApp serving several fedsim configs: the train config's ``test-strategy`` picks the node's
    FedsimClient (the backend's ClientApp serves one)."""
    from flwr.clientapp import ClientApp

    from fedsim.flower_backend import _node_client, answer_partition_query

    app = ClientApp()

    @app.train()
    def train(msg, context):
        name = msg.content["config"]["test-strategy"]
        return _node_client(configs[name], int(context.node_config["partition-id"])).train(msg, context)

    app.query()(answer_partition_query)
    return app


def test_our_strategies_in_a_flower_simulation_equal_our_engine():
    """One Flower simulation (Ray backend, FedsimClient nodes): our four strategies, 2 rounds each, end where
    our engine ends."""
    import cloudpickle
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from fedsim.flower_backend import client_nodes

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    config = {**BASE, "clients": 4, "rounds": 2}
    cases = {
        "scaffold": flower.SCAFFOLD, "fednova": flower.FedNova, "feddyn": flower.FedDyn, "fedcm": flower.FedCM,
    }  # fmt: skip
    configs = {name: json.dumps({**config, "strategy": name}) for name in cases}
    results, errors = {}, []
    server = ServerApp()

    @server.main()
    def main(grid, context):
        try:
            sim = Simulation(make_config(config))
            nodes = client_nodes(grid, 4)
            for name, cls in cases.items():
                out = cls(lr=0.1, seed=5, client_nodes=nodes).start(
                    grid=grid, initial_arrays=to_record(sim.init_params), num_rounds=2,
                    train_config=ConfigRecord({"test-strategy": name}),
                )  # fmt: skip
                results[name] = out.arrays.to_torch_state_dict()
        except Exception as err:  # noqa: BLE001 - surfaced below
            errors.append(err)

    run_simulation(server, _dispatching_client_app(configs), num_supernodes=4,
                   backend_config={"client_resources": {"num_cpus": 0.5, "num_gpus": 0.0},
                                   "init_args": {"include_dashboard": False, "log_to_driver": False}})  # fmt: skip
    assert not errors, errors
    for name in cases:
        expected = final_params({**config, "strategy": name})
        for k, v in expected.items():
            torch.testing.assert_close(results[name][k], v, rtol=1e-5, atol=1e-6)


def test_the_example_flower_app_learns():
    """experiments/flower_app (what `flwr run .` runs there): our SCAFFOLD server and SCAFFOLD+ECGR clients."""
    import importlib
    from pathlib import Path

    import cloudpickle
    from flwr.simulation import run_simulation

    root = Path(__file__).resolve().parents[1] / "experiments" / "flower_app"
    sys.path.insert(0, str(root))
    try:
        modules = [importlib.import_module(f"flower_app.{m}") for m in ("task", "client_app", "server_app")]
        for module in modules:  # the Ray workers cannot import the example from its folder
            cloudpickle.register_pickle_by_value(module)
        task, client_app, server_app = modules
        run_simulation(server_app.app, client_app.app, num_supernodes=4,
                       backend_config={"client_resources": {"num_cpus": 0.5, "num_gpus": 0.0},
                                       "init_args": {"include_dashboard": False, "log_to_driver": False}})  # fmt: skip
    finally:
        sys.path.remove(str(root))
    result = server_app.LAST_RESULT["result"]
    accuracy = result.evaluate_metrics_serverapp
    rounds = task.DEFAULTS["num-server-rounds"]
    assert accuracy[rounds]["accuracy"] > max(0.5, accuracy[0]["accuracy"] + 0.3)


def test_cli_flower_strategy_and_flags(tmp_path, cli):
    flags = ["--clients", "6", "--rounds", "2", "--local-steps", "2", "--quiet"]
    code, out, err = cli(["simulate", *flags, "--strategy", "flwr:FedYogi", "--set", "flwr_options={eta: 0.01}",
                          "--out", str(tmp_path / "yogi")])  # fmt: skip
    assert code == 0, err
    assert "strategy: flwr:FedYogi" in (tmp_path / "yogi" / "config.yaml").read_text()
    for bad, message in (
        (["--strategy", "flwr:Nope"], "unknown Flower strategy"),
        (["--backend", "flower", "--executor", "ray"], "drop --executor ray"),
        (["--backend", "flow"], "backend"),
        (["--strategy", "flwr:FedAvg", "--regulator", "ecgr"], "applies to fedsim strategies"),
    ):
        code, _, err = cli(["simulate", *flags, *bad, "--out", str(tmp_path / "bad")])
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (bad, err)
        assert not (tmp_path / "bad").exists()


def test_cli_without_flower_names_the_extra(tmp_path, cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "flwr", None)
    for flags in (["--backend", "flower"], ["--strategy", "flwr:FedAdam"]):
        code, _, err = cli(["simulate", "--rounds", "1", "--quiet", *flags, "--out", str(tmp_path / "r")])
        assert code == 2 and "fedsim[flower]" in err and len(err.strip().splitlines()) == 1
