"""Experiment tracking (fedsim.tracking): what each logger wrote is read back with the library's own reader
(TensorBoard's event accumulator, MlflowClient, the W&B offline run file with W&B's protobuf records) and
compared with metrics.jsonl; bad input is one line, exit 2."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from fedsim.core.errors import FedsimError
from fedsim.results import read_metrics
from fedsim.simulation import simulate

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")
pytest.importorskip("wandb")

RUN = {"clients": 6, "rounds": 3, "local_steps": 2, "batch_size": 8, "eval_every": 2, "checkpoint_every": 0}


def scalar_metrics(run):
    """(key, round) -> value of every numeric value in metrics.jsonl."""
    out = {}
    for record in read_metrics(run):
        for key, value in record.items():
            if key != "round" and isinstance(value, (int, float)) and not isinstance(value, bool):
                out[(key, record["round"])] = float(value)
    return out


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tracked") / "run"
    simulate({**RUN, "logger": "tensorboard,mlflow,wandb"}, out, plots=False)
    return out


def test_tensorboard_scalars_equal_metrics_jsonl(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked_run / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    expected = scalar_metrics(tracked_run)
    assert set(events.Tags()["scalars"]) == {key for key, _ in expected}
    logged = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    assert logged.keys() == expected.keys()
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-6, abs=1e-6)  # stored as float32
    # the per-client accuracy histogram on evaluated rounds (2 and 3), of the clients' values
    histograms = events.Histograms("client_accuracy")
    assert [h.step for h in histograms] == [2, 3]
    accuracy = np.load(tracked_run / "client_accuracy.npy", allow_pickle=False)
    assert histograms[-1].histogram_value.num == len(accuracy) == RUN["clients"]
    assert histograms[-1].histogram_value.sum == pytest.approx(float(accuracy.sum()), rel=1e-5)
    assert "config" in " ".join(events.Tags()["tensors"])


def test_mlflow_params_metrics_and_artifacts(tracked_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tracked_run / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fedsim")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["strategy.name"] == "fedavg" and run.data.params["rounds"] == "3"
    assert run.data.params["partition.name"] == "dirichlet" and run.data.params["partition.alpha"] == "0.5"
    expected = scalar_metrics(tracked_run)
    assert set(run.data.metrics) == {key for key, _ in expected}
    for key in run.data.metrics:
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert history == pytest.approx({r: v for (k, r), v in expected.items() if k == key})
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.jsonl", "summary.json", "label_histogram.csv"} <= artifacts


def wandb_records(run_dir):
    """Every record of the offline run's ``.wandb`` file: W&B's log format (a 7-byte header, then 32 KiB blocks
    of chunks with a 7-byte header: CRC, length, type) holding ``wandb_internal_pb2.Record`` messages."""
    from wandb.proto import wandb_internal_pb2

    (path,) = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        block_left = 32768 - pos % 32768
        if block_left < 7:  # padding at the end of a block
            pos += block_left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + chunk)
            records.append(record)
            pending = b""
        elif kind in (2, 3):
            pending += chunk
        else:
            break
    return records


def test_wandb_offline_history_equals_metrics_jsonl(tracked_run):
    records = wandb_records(tracked_run)
    history = {}
    config = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history[items["_step"]] = items
        elif kind == "run":  # the run's config, sent when it starts
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
    expected = scalar_metrics(tracked_run)
    assert sorted(history) == [1, 2, 3]
    for (key, step), value in expected.items():
        assert history[step][key] == pytest.approx(value)
    assert history[2]["client_accuracy/_type"] == "histogram" and sum(history[3]["client_accuracy/values"]) == 6
    assert config["strategy"] == "fedavg" and config["rounds"] == 3 and config["partition"]["alpha"] == 0.5


def test_mlflow_uri_elsewhere_and_resume_continues_the_steps(tmp_path):
    uri = f"sqlite:///{tmp_path / 'store' / 'm.db'}"
    (tmp_path / "store").mkdir()
    simulate({**RUN, "checkpoint_every": 1, "logger": ["mlflow"], "mlflow_uri": uri}, tmp_path / "run", plots=False)
    assert not (tmp_path / "run" / "mlruns").exists()
    assert any((tmp_path / "store" / "artifacts").rglob("metrics.jsonl"))  # artifacts beside the store
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("fedsim").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2, 3]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--logger", "tensorbored"], "unknown logger 'tensorbored'"),
        (["--logger", "mlflow,mlflow"], "logger 'mlflow' is named twice"),
        (["--set", "mlflow_uri=sqlite:////tmp/x.db"], "mlflow_uri is set but no mlflow logger"),
        (["--logger", "mlflow", "--set", "mlflow_uri=sqlite:////proc/fedsim/m.db"],
         "cannot write the tracking directory '/proc/fedsim'"),
        (["--logger", "mlflow", "--set", "logger.experiment=x"], "a logger's options go with its name"),
        (["--set", "logger=[{name: mlflow, bogus: 1}]"], "logger 'mlflow' has no option 'bogus'"),
    ],
)  # fmt: skip
def test_bad_logger_input_is_one_line(tmp_path, cli, args, message):
    code, _, err = cli(["simulate", "--rounds", "1", "--quiet", "--no-plots", "--out", str(tmp_path / "run"), *args])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["tensorboard", "mlflow", "wandb"])
def test_unwritable_tracking_directory_is_one_line(tmp_path, name):
    from fedsim.core import components

    blocked = tmp_path / "run"
    blocked.write_text("a file where the results folder goes")
    with pytest.raises(FedsimError, match=f"logger '{name}': cannot write the tracking directory") as err:
        components.build("logger", name, run_dir=blocked, config={}, mlflow_uri=None)
    assert "\n" not in str(err.value)


def test_logger_options_in_a_list(tmp_path):
    from mlflow.tracking import MlflowClient

    config = {**RUN, "rounds": 1, "logger": [{"name": "mlflow", "experiment": "mine"}, "tensorboard"]}
    simulate(config, tmp_path / "run", plots=False)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'run' / 'mlruns' / 'mlflow.db'}")
    assert client.get_experiment_by_name("mine") is not None and (tmp_path / "run" / "tensorboard").is_dir()


def test_loggers_need_a_results_folder():
    with pytest.raises(FedsimError, match="loggers write into the results folder"):
        simulate({**RUN, "logger": "tensorboard"}, plots=False)
