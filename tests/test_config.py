"""The run configuration: defaults < file < overrides, validation errors as one-line FedsimErrors, YAML safety."""

import pytest

from fedsim.config import RunConfig, dump_config, load_config, make_config, read_config_file
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
    assert (c.dataset, c.model, c.strategy, c.optimizer, c.rounds, c.lr) == ("digits", "mlp", "fedavg", "sgd", 20, 0.05)


def test_yaml_file_and_overrides_precedence(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "rounds: 5\nlr: 0.1\nclients: 7\nstrategy: fedprox\nmu: 0.2\noptimizer: adam\nadam_betas: [0.8, 0.9]\n"
    )
    from_file = load_config(path)
    assert (from_file.rounds, from_file.lr, from_file.clients, from_file.strategy, from_file.mu) == (
        5,
        0.1,
        7,
        "fedprox",
        0.2,
    )
    assert from_file.adam_betas == (0.8, 0.9)
    assert from_file.batch_size == RunConfig().batch_size  # untouched key keeps its default
    c = load_config(str(path), {"rounds": 9, "lr": None, "batch_size": 16, "mu": None})
    assert c.rounds == 9  # override beats file
    assert c.lr == 0.1  # None override ignored, file value kept
    assert c.mu == 0.2
    assert c.batch_size == 16  # override beats default
    assert c.clients == 7
    # overrides alone apply on top of the defaults
    assert load_config(None, {"rounds": 3, "lr": None}).rounds == 3
    assert load_config(None, {"lr": None}).lr == RunConfig().lr


def test_toml_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('rounds = 4\nlr = 0.2\nstrategy = "fedadam"\nserver-lr = 0.3\n\n[model_args]\nhidden = 16\n')
    c = load_config(path, {"lr": 0.5})
    assert (c.rounds, c.lr, c.strategy, c.server_lr) == (4, 0.5, "fedadam", 0.3)
    assert c.model_args == {"hidden": 16}


def test_dashed_keys_in_files(tmp_path):
    path = tmp_path / "run.yml"
    path.write_text("local-steps: 3\nbatch-size: 8\nlr-schedule: cosine\nmin_client_size: 4\n")
    assert read_config_file(path) == {"local_steps": 3, "batch_size": 8, "lr_schedule": "cosine", "min_client_size": 4}
    c = load_config(path)
    assert (c.local_steps, c.batch_size, c.lr_schedule, c.min_client_size) == (3, 8, "cosine", 4)


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
            "server_lr": 0.02,
            "tau": 0.001,
            "optimizer": "adamw",
            "weight_decay": 0.01,
            "adam_betas": (0.8, 0.95),
            "adam_eps": 1e-10,
            "model_args": {"hidden": [32, 16]},
            "lr": 1e-3,
            "lr_schedule": "step",
            "local_epochs": 2,
            "chunk_size": 4,
            "dataset": "npz",
            "data_path": "/tmp/x.npz",
        },
        {"optimizer": "sgd", "momentum": 0.9, "nesterov": True, "fraction": 0.1, "partition": "shards"},
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
        ({"rounds": 0}, "rounds"),
        ({"lr": -1}, "lr"),
        ({"lr": 0}, "lr"),
        ({"fraction": 1.5}, "fraction"),
        ({"fraction": 0}, "fraction"),
        ({"alpha": 0}, "alpha"),
        ({"clients": 0}, "clients"),
        ({"batch_size": 0}, "batch_size"),
        ({"momentum": 1.0}, "momentum"),
        ({"server_lr": 0}, "server_lr"),
        ({"tau": -1.0}, "tau"),
        ({"mu": -0.1}, "mu"),
        ({"client_test_fraction": 1.0}, "client_test_fraction"),
        ({"seed": -1}, "seed"),
        ({"rounds": "many"}, "rounds"),
        ({"device": "tpu"}, "device"),
        ({"lr_schedule": "linear"}, "lr_schedule"),
    ],
)
def test_out_of_range_names_field(values, field):
    msg = _error(make_config, values)
    assert msg.startswith(f"{field}:"), msg


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
    assert f"unknown {key} '{typo}'" in msg
    assert f"did you mean '{suggestion}'" in msg


def test_known_names_accepted():
    for values in (
        {"dataset": "synthetic", "model": "logreg", "strategy": "fedadagrad", "optimizer": "adam"},
        {"sampler": "iid", "partition": "iid", "model": "cnn"},
        {"strategy": "fedavgm", "partition": "shards", "model": "lenet5"},
    ):
        c = make_config(values)
        for k, v in values.items():
            assert getattr(c, k) == v


def test_nesterov_needs_momentum():
    msg = _error(make_config, {"nesterov": True})
    assert "nesterov" in msg and "momentum" in msg
    assert make_config({"nesterov": True, "momentum": 0.9}).nesterov is True
    assert "nesterov" in _error(make_config, {"nesterov": True, "momentum": 0.9, "optimizer": "adam"})


def test_npz_needs_data_path():
    msg = _error(make_config, {"dataset": "npz"})
    assert "npz" in msg and "data_path" in msg
    assert make_config({"dataset": "npz", "data_path": "some.npz"}).data_path == "some.npz"


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
    msg = _error(make_config, {"strategy": "fedavg", "mu": 0.5})
    assert "'mu'" in msg and "fedprox" in msg
    assert make_config({"strategy": "fedprox", "mu": 0.5}).mu == 0.5
    assert make_config({"strategy": "fedavg", "mu": 0.01}).strategy == "fedavg"  # the default is fine
    assert "fedadam" in _error(make_config, {"strategy": "fedavgm", "tau": 0.1})
