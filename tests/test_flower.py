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
from fedsim.simulation import make_simulation, simulate

flwr = pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict  # noqa: E402

from fedsim.flower.records import to_record, updates_from_replies  # noqa: E402
from strategies import flower  # noqa: E402

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
        ("scaffold", lambda **kw: flower.SCAFFOLD(weighting="uniform", **kw), {"strategy.weighting": "uniform"}),
        ("fednova", lambda **kw: flower.FedNova(**kw), {"local_epochs": 1, "local_steps": None}),
        (
            "fednova",
            lambda **kw: flower.FedNova(form="general", mu=0.1, **kw),
            {"local_epochs": 1, "local_steps": None, "strategy.form": "general", "strategy.mu": 0.1},
        ),
        ("feddyn", lambda **kw: flower.FedDyn(alpha=0.1, **kw), {"strategy.alpha": 0.1}),
        ("fedcm", lambda **kw: flower.FedCM(beta=0.3, **kw), {"strategy.beta": 0.3}),
        ("fedprox", lambda **kw: flower.FlowerStrategy("fedprox", mu=0.1, **kw), {"strategy.mu": 0.1}),
    ],
    ids=["scaffold", "scaffold-uniform", "fednova", "fednova-general", "feddyn", "fedcm", "generic-fedprox"],
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


# -- options and the learning rate: nothing given is dropped or replaced silently ---------------------------


class RecordingGrid(flower.EngineGrid):
    """An EngineGrid that records the ``lr`` of every train message it answers, by round."""

    def __init__(self, simulation):
        super().__init__(simulation)
        self.lrs: dict[int, list[float]] = {}

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for m in messages:
            if m.metadata.message_type.startswith(MessageType.TRAIN):
                config = m.content["config"]
                self.lrs.setdefault(int(config["server-round"]), []).append(float(config["lr"]))
        return super().send_and_receive(messages, timeout=timeout)


def _start(strategy, sim, rounds, train_config=None):
    """Flower's start loop of ``strategy`` on ``sim``'s clients: the final model and the set of lrs sent per round."""
    grid = RecordingGrid(sim)
    result = strategy.start(grid=grid, initial_arrays=to_record(sim.init_params), num_rounds=rounds,
                            train_config=train_config)  # fmt: skip
    return result.arrays.to_torch_state_dict(), {r: sorted(set(v)) for r, v in grid.lrs.items()}


def test_the_train_config_lr_wins_when_flower_strategy_has_none():
    config = {**BASE, "rounds": 2}  # the simulation's own lr (0.1) is neither of the lrs below
    with make_simulation(make_config(config)) as sim:
        got, lrs = _start(flower.FlowerStrategy("fedavg", seed=5), sim, 2, ConfigRecord({"lr": 0.2}))
    assert lrs == {1: [0.2], 2: [0.2]}
    expected = final_params({**config, "lr": 0.2})  # the clients trained with it
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)
    with make_simulation(make_config({**config, "strategy": "scaffold"})) as sim:  # the wrappers too
        got, lrs = _start(flower.SCAFFOLD(seed=5), sim, 2, ConfigRecord({"lr": 0.2}))
    assert lrs == {1: [0.2], 2: [0.2]}
    expected = final_params({**config, "strategy": "scaffold", "lr": 0.2})
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)
    with make_simulation(make_config(config)) as sim:  # neither gives one: the documented default
        _, lrs = _start(flower.FlowerStrategy("fedavg", seed=5), sim, 2)
    assert lrs == {1: [0.05], 2: [0.05]}


def test_a_train_config_lr_that_disagrees_with_flower_strategy_is_refused():
    with make_simulation(make_config(BASE)) as sim:
        with pytest.raises(FedsimError, match=r"train config's lr 0\.2 disagrees with FlowerStrategy\(lr=0\.1\)"):
            _start(flower.FlowerStrategy("fedavg", lr=0.1, seed=5), sim, 1, ConfigRecord({"lr": 0.2}))
        with pytest.raises(FedsimError, match="disagrees"):  # a schedule: compared with its value in the round
            _start(flower.FlowerStrategy("fedavg", lr=lambda r: 0.1, seed=5), sim, 1, ConfigRecord({"lr": 0.2}))
        _, lrs = _start(flower.FlowerStrategy("fedavg", lr=0.2, seed=5), sim, 2, ConfigRecord({"lr": 0.2}))
    assert lrs == {1: [0.2], 2: [0.2]}  # the same lr in both places is fine
    with (
        make_simulation(make_config({**BASE, "strategy": "fedcm"})) as sim,
        pytest.raises(FedsimError, match="disagrees"),
    ):
        _start(flower.FedCM(beta=0.1, lr=0.1, seed=5), sim, 1, ConfigRecord({"lr": 0.2}))  # the wrappers too


def test_a_flower_strategy_lr_schedule_is_sent_round_by_round():
    """``lr`` may be a function of the round (documented); Flower's start loop passes the same train config
    every round, so the lr sent in round 1 must not be taken for a train-config lr in round 2."""
    with make_simulation(make_config(BASE)) as sim:
        _, lrs = _start(flower.FlowerStrategy("fedavg", lr=lambda r: 0.2 / r, seed=5), sim, 3)
    assert lrs == {1: [0.2], 2: [0.1], 3: [0.2 / 3]}


def test_flower_strategy_refuses_options_it_would_not_use():
    from strategies import FedProx

    with pytest.raises(FedsimError, match="strategy 'fedavg' has no option 'mu'"):
        flower.FlowerStrategy("fedavg", mu=0.1)
    with pytest.raises(FedsimError, match=r"strategy 'fedprox' has no option 'muu' \(did you mean 'mu'\?\)"):
        flower.FlowerStrategy("fedprox", muu=0.1)
    with pytest.raises(FedsimError, match="strategy 'fedprox', option 'mu'"):  # out of its bounds
        flower.FlowerStrategy("fedprox", mu=-1.0)
    with pytest.raises(FedsimError, match="apply to a strategy given by name"):
        flower.FlowerStrategy(FedProx(mu=0.1), mu=0.2)
    assert flower.FlowerStrategy("fedprox", mu=0.3).strategy.mu == 0.3
    # the wrappers take the strategies' own option names; the old prefixed names are refused
    assert flower.SCAFFOLD(weighting="uniform").strategy.weighting == "uniform"
    assert flower.FedNova(form="general").strategy.form == "general"
    assert flower.FedDyn(alpha=0.2).strategy.alpha == 0.2
    assert flower.FedCM(beta=0.3).strategy.beta == 0.3
    old_names = ((flower.SCAFFOLD, {"scaffold_weighting": "uniform"}), (flower.FedNova, {"fednova_form": "general"}),
                 (flower.FedDyn, {"feddyn_alpha": 0.2}), (flower.FedCM, {"fedcm_beta": 0.3}))  # fmt: skip
    for cls, old in old_names:
        with pytest.raises(FedsimError, match=list(old)[0]):
            cls(**old)


def test_fedsim_client_refuses_options_it_would_not_use():
    from strategies import FedProx

    model, x, y = torch.nn.Linear(4, 2), np.zeros((3, 4), np.float32), np.zeros(3, np.int64)
    with pytest.raises(FedsimError, match="strategy 'fedavg' has no option 'momentum'"):  # an optimizer option
        flower.FedsimClient(model, x, y, strategy="fedavg", momentum=0.9)
    with pytest.raises(FedsimError, match=r"strategy 'fedprox' has no option 'muu' \(did you mean 'mu'\?\)"):
        flower.FedsimClient(model, x, y, strategy="fedprox", muu=0.1)
    with pytest.raises(FedsimError, match="strategy 'fedprox', option 'mu'"):
        flower.FedsimClient(model, x, y, strategy="fedprox", mu=-1.0)
    assert flower.FedsimClient(model, x, y, strategy="fedprox", mu=0.3).algorithm.mu == 0.3
    built = FedProx(mu=0.1)
    for strategy in (built, built.client_algorithm):  # an already built strategy, or its client algorithm
        with pytest.raises(FedsimError, match="apply to a strategy given by name"):
            flower.FedsimClient(model, x, y, strategy=strategy, mu=0.2)
    with pytest.raises(FedsimError, match="optimizer 'sgd' has no option 'betas'"):
        flower.FedsimClient(model, x, y, optimizer="sgd", optimizer_options={"betas": (0.9, 0.99)})
    client = flower.FedsimClient(model, x, y, optimizer="sgd", optimizer_options={"momentum": 0.9})
    assert client.optimizer.momentum == 0.9


# -- Flower's strategies in our engine ----------------------------------------------------------------------


def test_flower_fedavg_in_our_engine_equals_our_fedavg():
    ours = rounds_of({**BASE})
    theirs = rounds_of({**BASE, "strategy": "flwr:FedAvg"})
    assert_same(ours, theirs, 1e-5)


def test_flower_strategies_run_in_our_engine():
    adam = rounds_of({**BASE, "strategy": {"name": "flwr:FedAdam", "eta": 0.03}, "fraction": 0.5})
    assert [r["clients"] for r in adam] == [4, 4, 4]
    assert adam[-1]["test_accuracy"] > adam[0]["test_accuracy"]
    again = rounds_of({**BASE, "strategy": "flwr:FedAdam", "strategy.eta": 0.03, "fraction": 0.5})
    assert adam == again  # Flower's random node sampling is seeded from (seed, round)
    trimmed = rounds_of({**BASE, "strategy": {"name": "flwr:FedTrimmedAvg", "beta": 0.25}})
    assert all(np.isfinite(r["train_loss"]) for r in trimmed)


def test_engine_grid_answers_evaluate_messages():
    with make_simulation(make_config(BASE)) as sim:
        strategy = flwr.serverapp.strategy.FedAvg(fraction_evaluate=1.0, min_available_nodes=1)
        result = strategy.start(grid=flower.EngineGrid(sim), initial_arrays=to_record(sim.init_params), num_rounds=1)
    assert 0.0 <= result.evaluate_metrics_clientapp[1]["accuracy"] <= 1.0


def test_bad_flower_strategy_names_and_options():
    with pytest.raises(FedsimError, match="unknown Flower strategy"):
        simulate({**BASE, "strategy": "flwr:FedNope"}, None, plots=False)
    with pytest.raises(FedsimError, match=r"strategy 'flwr:FedAdam' has no option 'etta' \(did you mean 'eta'\?\)"):
        simulate({**BASE, "strategy": {"name": "flwr:FedAdam", "etta": 1}}, None, plots=False)
    with pytest.raises(FedsimError, match="strategy 'flwr:FedAdam', option 'eta'"):  # checked against its type
        make_config({**BASE, "strategy": "flwr:FedAdam", "strategy.eta": "fast"})
    with pytest.raises(FedsimError, match="strategy 'flwr:FedAvg' has no option 'eta'"):  # FedAdam's, not FedAvg's
        make_config({**BASE, "strategy": "flwr:FedAvg", "strategy.eta": 0.01})
    with pytest.raises(FedsimError, match="strategy 'fedavg' has no option 'eta'"):
        make_config({**BASE, "strategy.eta": 0.01})
    with pytest.raises(FedsimError, match="applies to fedsim strategies"):
        make_config({**BASE, "strategy": "flwr:FedAvg", "aggregator": "median"})
    with pytest.raises(FedsimError, match=r"config key 'flwr_options' is now 'strategy\.<option>'"):
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
    sim = make_simulation(config)
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
    from fedsim.flower.records import require_flower

    with pytest.raises(FedsimError, match=r"fedsim\[flower\]"):
        require_flower()


# -- Flower's simulation engine (Ray): --backend flower and our strategies with FedsimClient ClientApps ----


def test_backend_flower_reproduces_the_local_run(tmp_path):
    config = {**BASE, "strategy": "scaffold", "fraction": 0.5, "clients": 6, "rounds": 2}
    local = rounds_of(config)
    records = []
    summary = simulate({**config, "backend": {"name": "flower", "cpus_per_client": 0.5}}, tmp_path / "fl",
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
            sim = make_simulation(make_config(config))
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
    code, out, err = cli(["simulate", *flags, "--strategy", "flwr:FedYogi", "--set", "strategy.eta=0.01",
                          "--out", str(tmp_path / "yogi")])  # fmt: skip
    assert code == 0, err
    import yaml

    written = yaml.safe_load((tmp_path / "yogi" / "config.yaml").read_text())["strategy"]
    assert written["name"] == "flwr:FedYogi" and written["eta"] == 0.01
    for bad, message in (
        (["--strategy", "flwr:Nope"], "unknown Flower strategy"),
        (["--strategy", "flwr:FedYogi", "--set", "strategy.etta=0.01"], "strategy 'flwr:FedYogi' has no option 'etta'"),
        (["--strategy", "flwr:FedYogi", "--set", "flwr_options={eta: 0.01}"], "config key 'flwr_options' is now"),
        (["--backend", "flower", "--executor", "ray"], "drop --executor ray"),
        (["--backend", "flow"], "backend"),
        (["--set", "backend.cpus_per_client=0.5"], "backend 'fedsim' has no option 'cpus_per_client'"),
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
