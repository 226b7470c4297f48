"""The run configuration: defaults < file < overrides, validation errors as one-line FedsimErrors, YAML safety."""

import pytest
import yaml

from fedsim.config import RENAMED, RunConfig, dump_config, load_config, make_config, merge, read_config_file
from fedsim.core.components import Spec
from fedsim.core.errors import FedsimError


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(FedsimError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


def test_defaults_validate():
    c = make_config({})
    assert c == RunConfig()
    assert load_config() == c
    assert load_config(None, {}) == c
    names = (c.dataset.name, c.model.name, c.strategy.name, c.optimizer.name)
    assert (*names, c.rounds, c.lr) == ("digits", "mlp", "fedavg", "sgd", 20, 0.05)


def test_yaml_file_and_overrides_precedence(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "rounds: 5\nlr: 0.1\nclients: 7\nstrategy: {name: fedprox, mu: 0.2}\noptimizer: adam\n"
        "optimizer.betas: [0.8, 0.9]\n"
    )
    from_file = load_config(path)
    assert (
        from_file.rounds,
        from_file.lr,
        from_file.clients,
        from_file.strategy.name,
        from_file.strategy.get("mu"),
    ) == (
        5,
        0.1,
        7,
        "fedprox",
        0.2,
    )
    assert from_file.optimizer.name == "adam" and from_file.optimizer.get("betas") == (0.8, 0.9)
    assert from_file.batch_size == RunConfig().batch_size  # untouched key keeps its default
    c = load_config(str(path), {"rounds": 9, "lr": None, "batch_size": 16, "strategy.mu": None})
    assert c.rounds == 9  # override beats file
    assert c.lr == 0.1  # None override ignored, file value kept
    assert c.strategy.get("mu") == 0.2
    assert c.batch_size == 16  # override beats default
    assert c.clients == 7
    # overrides alone apply on top of the defaults
    assert load_config(None, {"rounds": 3, "lr": None}).rounds == 3
    assert load_config(None, {"lr": None}).lr == RunConfig().lr


def test_toml_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('rounds = 4\nlr = 0.2\n\n[strategy]\nname = "fedadam"\nserver-lr = 0.3\n\n[model]\nhidden = [16]\n')
    c = load_config(path, {"lr": 0.5})
    assert (c.rounds, c.lr, c.strategy.name, c.strategy.get("server_lr")) == (4, 0.5, "fedadam", 0.3)
    assert c.model == Spec(name="mlp", options={"hidden": (16,)})  # a mapping without a name keeps the default


def test_dashed_keys_in_files(tmp_path):
    path = tmp_path / "run.yml"
    path.write_text("local-steps: 3\nbatch-size: 8\nlr-schedule: cosine\nmin_client_size: 4\n")
    assert read_config_file(path) == {"local_steps": 3, "batch_size": 8, "lr_schedule": "cosine", "min_client_size": 4}
    c = load_config(path)
    assert (c.local_steps, c.batch_size, c.lr_schedule.name, c.min_client_size) == (3, 8, "cosine", 4)


def test_empty_yaml_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n")
    assert read_config_file(path) == {}
    assert load_config(path) == RunConfig()


@pytest.mark.parametrize(
    "values",
    [
        {},
        {
            "strategy": "fedyogi",
            "strategy.server_lr": 0.02,
            "strategy.tau": 0.001,
            "optimizer": "adamw",
            "optimizer.weight_decay": 0.01,
            "optimizer.betas": (0.8, 0.95),
            "optimizer.eps": 1e-10,
            "model": {"name": "mlp", "hidden": [32, 16]},
            "lr": 1e-3,
            "lr_schedule": "step",
            "local_epochs": 2,
            "chunk_size": 4,
            "dataset": "npz",
            "dataset.path": "/tmp/x.npz",
        },
        {
            "optimizer": "sgd",
            "optimizer.momentum": 0.9,
            "optimizer.nesterov": True,
            "fraction": 0.1,
            "partition": "shards",
        },
    ],
)
def test_dump_config_round_trip(tmp_path, values):
    c = make_config(values)
    text = dump_config(c)
    path = tmp_path / "dump.yaml"
    path.write_text(text)
    again = load_config(path)
    assert again == c
    assert dump_config(again) == text
    # every field appears in the dump
    assert set(read_config_file(path)) == set(RunConfig.model_fields)


def test_unknown_key_did_you_mean():
    msg = _error(make_config, {"rounds_": 3})
    assert "unknown config key 'rounds_'" in msg
    assert "did you mean 'rounds'" in msg


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("batchsize: 8\n")
    msg = _error(load_config, path)
    assert "unknown config key 'batchsize'" in msg and "did you mean 'batch_size'" in msg


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"rounds": 0}, "rounds:"),
        ({"lr": -1}, "lr:"),
        ({"lr": 0}, "lr:"),
        ({"fraction": 1.5}, "fraction:"),
        ({"fraction": 0}, "fraction:"),
        ({"partition.alpha": 0}, "partitioner 'dirichlet', option 'alpha':"),
        ({"clients": 0}, "clients:"),
        ({"batch_size": 0}, "batch_size:"),
        ({"optimizer.momentum": 1.0}, "optimizer 'sgd', option 'momentum':"),
        ({"strategy": "fedadam", "strategy.server_lr": 0}, "strategy 'fedadam', option 'server_lr':"),
        ({"strategy": "fedadam", "strategy.tau": -1.0}, "strategy 'fedadam', option 'tau':"),
        ({"strategy": "fedprox", "strategy.mu": -0.1}, "strategy 'fedprox', option 'mu':"),
        ({"client_test_fraction": 1.0}, "client_test_fraction:"),
        ({"seed": -1}, "seed:"),
        ({"rounds": "many"}, "rounds:"),
        ({"device": "tpu"}, "device:"),
        ({"lr_schedule": "linear"}, "unknown lr_schedule 'linear'"),
    ],
)
def test_out_of_range_names_field(values, field):
    msg = _error(make_config, values)
    assert msg.startswith(field), msg


@pytest.mark.parametrize(
    ("key", "typo", "suggestion"),
    [
        ("dataset", "digts", "digits"),
        ("model", "mlpp", "mlp"),
        ("strategy", "fedavgg", "fedavg"),
        ("optimizer", "adm", "adam"),
        ("sampler", "shufle", "shuffle"),
        ("partition", "dirichlet_", "dirichlet"),
    ],
)
def test_unknown_names_did_you_mean(key, typo, suggestion):
    msg = _error(make_config, {key: typo})
    kind = {"partition": "partitioner"}.get(key, key)  # the message names the component kind
    assert f"unknown {kind} '{typo}'" in msg
    assert f"did you mean '{suggestion}'" in msg


def test_known_names_accepted():
    for values in (
        {"dataset": "synthetic", "model": "logreg", "strategy": "fedadagrad", "optimizer": "adam"},
        {"sampler": "iid", "partition": "iid", "model": "cnn"},
        {"strategy": "fedavgm", "partition": "shards", "model": "lenet5"},
    ):
        c = make_config(values)
        for k, v in values.items():
            assert getattr(c, k).name == v


def test_nesterov_needs_momentum():
    msg = _error(make_config, {"optimizer.nesterov": True})
    assert "nesterov" in msg and "momentum" in msg
    assert make_config({"optimizer.nesterov": True, "optimizer.momentum": 0.9}).optimizer.get("nesterov") is True
    msg = _error(make_config, {"optimizer.nesterov": True, "optimizer.momentum": 0.9, "optimizer": "adam"})
    assert "optimizer 'adam' has no option 'nesterov'" in msg


def test_npz_needs_data_path():
    msg = _error(make_config, {"dataset": "npz"})
    assert msg.startswith("dataset 'npz', option 'path': Field required"), msg
    assert make_config({"dataset": "npz", "dataset.path": "some.npz"}).dataset.get("path") == "some.npz"


def test_validation_on_assignment():
    c = make_config({})
    with pytest.raises(ValueError):
        c.rounds = 0


@pytest.mark.parametrize("text", ["- rounds\n- 3\n", "just a string\n", "42\n"])
def test_yaml_not_a_mapping(tmp_path, text):
    path = tmp_path / "list.yaml"
    path.write_text(text)
    msg = _error(load_config, path)
    assert str(path) in msg


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("bad.yaml", "rounds: [1, 2\nlr: 0.1\n"),
        ("bad2.yaml", "a: b: c\n"),
        ("bad.toml", "rounds = \nlr = [\n"),
        ("bad2.toml", "rounds: 3\n"),
    ],
)
def test_unparsable_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    msg = _error(load_config, path)
    assert str(path) in msg


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    msg = _error(load_config, path)
    assert str(path) in msg
    assert str(tmp_path) in _error(read_config_file, tmp_path)  # a directory is not a config file


def test_non_utf8_file_is_fedsim_error(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"rounds: 3\nname: \xff\xfe\x80\n")
    msg = _error(load_config, path)
    assert str(path) in msg


@pytest.mark.parametrize("values", [{"dataset": "digits\nx"}, {"rounds\nx": 3}])
def test_messages_one_line_even_for_odd_values(values):
    _error(make_config, values)


@pytest.mark.parametrize(
    "payload",
    [
        '!!python/object/apply:os.system ["touch {marker}"]',
        'rounds: !!python/object/apply:os.system ["touch {marker}"]',
        'rounds: !!python/object/new:subprocess.check_output [["touch", "{marker}"]]',
    ],
)
def test_yaml_python_tags_refused(tmp_path, payload):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.yaml"
    path.write_text(payload.format(marker=marker) + "\n")
    msg = _error(load_config, path)
    assert str(path) in msg
    assert not marker.exists()


def test_option_of_another_strategy_is_refused():
    msg = _error(make_config, {"strategy": "fedavg", "strategy.mu": 0.5})
    assert "strategy 'fedavg' has no option 'mu'" in msg and "fedprox" in msg
    assert make_config({"strategy": "fedprox", "strategy.mu": 0.5}).strategy.get("mu") == 0.5
    # an option the strategy does not take is refused even at another strategy's default value
    msg = _error(make_config, {"strategy": "fedavg", "strategy.mu": 0.01})
    assert "strategy 'fedavg' has no option 'mu'" in msg
    msg = _error(make_config, {"strategy": "fedavgm", "strategy.tau": 0.1})
    assert "strategy 'fedavgm' has no option 'tau'" in msg and "fedadam" in msg


# --------------------------------------------------------------------------------------------------------
# Components: dotted keys, merging a file with flags, the nested dump, the renamed flat keys of fedsim 0.1
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dotted", "nested", "check"),
    [
        (
            {"strategy": "fedadam", "strategy.server_lr": 0.01, "strategy.tau": 0.1},
            {"strategy": {"name": "fedadam", "server_lr": 0.01, "tau": 0.1}},
            ("strategy", "tau", 0.1),
        ),
        (  # a dotted option without a name keeps the default component
            {"optimizer.momentum": 0.9},
            {"optimizer": {"name": "sgd", "momentum": 0.9}},
            ("optimizer", "momentum", 0.9),
        ),
        (  # dashes for underscores in keys and options
            {"lr-schedule": "step", "lr-schedule.decay": 0.3, "lr_schedule.step": 4},
            {"lr_schedule": {"name": "step", "decay": 0.3, "step": 4}},
            ("lr_schedule", "decay", 0.3),
        ),
        (  # a mapping and dotted keys for the same component add up
            {"regulator": {"name": "ecgr", "rho": 0.3}, "regulator.center": "local_mean"},
            {"regulator": {"name": "ecgr", "rho": 0.3, "center": "local_mean"}},
            ("regulator", "center", "local_mean"),
        ),
        (
            {
                "model.hidden": [24, 12],
                "partition": "shards",
                "partition.classes_per_client": 3,
                "dataset": "npz",
                "dataset.path": "data.npz",
                "client_filter": "gaf",
                "client_filter.microbatches": 2,
            },
            {
                "model": {"name": "mlp", "hidden": [24, 12]},
                "partition": {"name": "shards", "classes_per_client": 3},
                "dataset": {"name": "npz", "path": "data.npz"},
                "client_filter": {"name": "gaf", "microbatches": 2},
            },
            ("partition", "classes_per_client", 3),
        ),
    ],  # fmt: skip
)
def test_dotted_keys_and_nested_mappings_give_the_same_config(tmp_path, dotted, nested, check):
    a, b = make_config(dotted), make_config(nested)
    assert a == b
    assert a.to_dict() == b.to_dict()
    key, option, value = check
    assert getattr(a, key).get(option) == value
    assert a != RunConfig()  # the options took effect
    # the same two forms written in YAML files
    (tmp_path / "dotted.yaml").write_text(yaml.safe_dump(dotted))
    (tmp_path / "nested.yaml").write_text(yaml.safe_dump(nested))
    assert load_config(tmp_path / "dotted.yaml") == load_config(tmp_path / "nested.yaml") == a


def test_merge_keeps_file_options_of_a_component_named_again():
    base = {"optimizer": {"name": "sgd", "momentum": 0.9}, "rounds": 3}
    assert merge(base, {"optimizer": "sgd"}) == {"optimizer": {"name": "sgd", "momentum": 0.9}, "rounds": 3}
    assert merge(base, {"optimizer": "sgd", "optimizer.nesterov": True, "rounds": None}) == {
        "optimizer": {"name": "sgd", "momentum": 0.9, "nesterov": True},
        "rounds": 3,
    }
    # an option given again on top wins over the file's
    assert merge(base, {"optimizer.momentum": 0.5}) == {"optimizer": {"name": "sgd", "momentum": 0.5}, "rounds": 3}
    # the options go along to a newly named component (and are validated against it)
    assert merge({"strategy": "fedprox", "strategy.mu": 0.2}, {"strategy": "fednova"}) == {
        "strategy": {"name": "fednova", "mu": 0.2}
    }


def test_option_alone_on_top_of_a_file_keeps_the_file_component(tmp_path):
    """``--set optimizer.eps=1e-6`` on a file naming ``optimizer: adam`` sets adam's option; it does not switch
    back to the default optimizer."""
    assert merge({"optimizer": "adam"}, {"optimizer.eps": 1e-6}) == {"optimizer": {"name": "adam", "eps": 1e-6}}
    path = tmp_path / "run.yaml"
    path.write_text("strategy: fedavgm\noptimizer: {name: adam, eps: 1.0e-7}\n")
    c = load_config(path, {"strategy.server_momentum": 0.5, "optimizer.weight_decay": 0.01})
    assert c.strategy == Spec(name="fedavgm", options={"server_lr": 1.0, "server_momentum": 0.5})
    assert c.optimizer.name == "adam"
    assert (c.optimizer.get("eps"), c.optimizer.get("weight_decay")) == (1e-7, 0.01)


def test_config_file_options_merge_with_a_flag_naming_the_same_component(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optimizer:\n  name: sgd\n  momentum: 0.9\n  nesterov: true\nstrategy: {name: fedprox, mu: 0.2}\n")
    c = load_config(path, {"optimizer": "sgd", "strategy": "fednova"})  # as --optimizer sgd --strategy fednova
    assert c.optimizer == Spec(name="sgd", options={"momentum": 0.9, "nesterov": True, "weight_decay": 0.0})
    assert c.strategy.name == "fednova" and c.strategy.get("mu") == 0.2
    c = load_config(path, {"optimizer": "sgd", "optimizer.momentum": 0.5})  # --set beats the file's option
    assert (c.optimizer.get("momentum"), c.optimizer.get("nesterov")) == (0.5, True)
    # a flag naming a component that does not take the file's option: refused, not dropped
    msg = _error(load_config, path, {"strategy": "fedavg"})
    assert "strategy 'fedavg' has no option 'mu'" in msg
    msg = _error(load_config, path, {"optimizer": "adam"})
    assert "optimizer 'adam' has no option 'momentum'" in msg


def test_cli_flag_naming_the_file_component_keeps_its_options(tmp_path, cli):
    path = tmp_path / "run.yaml"
    path.write_text("clients: 4\nrounds: 1\nlocal_steps: 1\noptimizer: {name: sgd, momentum: 0.9}\n")
    out = tmp_path / "r"
    code, _, err = cli(["simulate", str(path), "--optimizer", "sgd", "--quiet", "--out", str(out)])
    assert code == 0, err
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["optimizer"] == {"name": "sgd", "momentum": 0.9, "nesterov": False, "weight_decay": 0.0}


_EVERY_KIND = {
    "dataset": {"name": "synthetic", "alpha": 0.5, "beta": 0.25},
    "partition": {"name": "shards", "classes_per_client": 3},
    "model": {"name": "mlp", "hidden": [24, 12]},
    "strategy": {"name": "scaffold", "control": "model_difference", "weighting": "uniform"},
    "aggregator": {"name": "krum", "byzantine": 1, "select": 2},
    "regulator": {"name": "bherd", "unit": "microbatch", "microbatches": 2, "ratio": 0.25,
                  "trajectory_dtype": "bfloat16"},
    "client_filter": {"name": "gaf", "tau": 1.5, "microbatches": 2},
    "availability": {"name": "markov", "p_on": 0.7, "p_off": 0.2},
    "sampler": {"name": "markov-regular", "degree": 6, "laziness": 0.1},
    "optimizer": {"name": "sgd", "momentum": 0.9, "weight_decay": 1e-4},
    "lr_schedule": {"name": "step", "decay": 0.3, "step": 5},
    "executor": {"name": "ray", "num_actors": 2, "cpus_per_actor": 0.5},
    "fraction": 0.5,
    "rounds": 7,
}  # fmt: skip
_DECENTRALIZED = {
    "topology": "experiments/topologies/ring16.graphml",
    "strategy": {"name": "dsgda", "dual_lr": 0.02},
    "problem": {"name": "dro", "lam": 0.3},
    "schedule": "random_matchings",
    "mixing": "max_degree",
}


@pytest.mark.parametrize("values", [_EVERY_KIND, _DECENTRALIZED], ids=["every-kind", "decentralized"])
def test_dump_config_reads_back_equal(tmp_path, values):
    c = make_config(values)
    text = dump_config(c)
    path = tmp_path / "config.yaml"
    path.write_text(text)
    again = load_config(path)
    assert again == c
    assert again.to_dict() == c.to_dict()
    assert dump_config(again) == text
    for key, given in values.items():  # every option given survives the round trip
        if isinstance(given, dict):
            spec = getattr(again, key)
            assert spec.name == given["name"]
            for option, value in given.items():
                if option != "name":
                    expected = tuple(value) if isinstance(value, list) else value
                    assert spec.get(option) == expected, (key, option)
        else:
            assert getattr(again, key) == given
    # nested: a component with options as a mapping with every option resolved, one without as its bare name
    written = yaml.safe_load(text)
    if "topology" in values:
        assert written["strategy"] == {"name": "dsgda", "dual_lr": 0.02}
        assert (written["dataset"], written["aggregator"], written["executor"]) == ("digits", "mean", "local")
    else:
        assert written["optimizer"] == {"name": "sgd", "momentum": 0.9, "nesterov": False, "weight_decay": 0.0001}
        assert written["executor"] == {
            "name": "ray", "num_actors": 2, "cpus_per_actor": 0.5, "gpus_per_actor": 0.0, "address": None
        }  # fmt: skip
        assert written["problem"] is None


def _new_places(place: str) -> list[tuple[str, str]]:
    return [tuple(p.split(".")) for p in place.split(" or ")]


@pytest.mark.parametrize("old", sorted(RENAMED))
def test_renamed_flat_key_is_refused_naming_its_new_place(tmp_path, cli, old):
    new = RENAMED[old]
    msg = _error(make_config, {old: 1})
    assert msg.startswith(f"config key '{old}' is now '{new}'"), msg
    component = new.split(".")[0]
    assert f"--set {component}." in msg
    # the same from a config file and from --set on the command line
    path = tmp_path / "old.yaml"
    path.write_text(f"{old}: 1\n")
    assert _error(load_config, path) == msg
    code, _, err = cli(["simulate", "--set", f"{old}=1", "--quiet", "--out", str(tmp_path / "r")])
    assert code == 2 and err == f"error: {msg}\n"
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("old", sorted(k for k, v in RENAMED.items() if "<option>" not in v))
def test_renamed_key_points_to_a_real_option(old):
    """The new place a renamed key's message names is an option of some component of that kind."""
    from fedsim.config import COMPONENT_KEYS
    from fedsim.core import components

    for key, option in _new_places(RENAMED[old]):
        kinds = [COMPONENT_KEYS[key]] + (["decentralized"] if key == "strategy" else [])
        owners = [(k, n) for k in kinds for n in components.names(k) if option in components.get(k, n).options()]
        assert owners, f"{old} -> {key}.{option}: no {key} has option '{option}'"
