"""Experiment tracking: every round's metrics also go to TensorBoard, MLflow or Weights & Biases (kind ``logger``,
several at once: ``--logger tensorboard,mlflow,wandb``).

``metrics.jsonl`` stays the source of truth and is always written; a logger mirrors it. Every numeric value of a
round's record is logged under its ``metrics.jsonl`` key at step ``round`` (``round`` itself is the step;
lists, strings, booleans and nulls are not scalars and are skipped). Where the run measures every client's
accuracy (``client_accuracy.npy``), it is logged as a histogram (TensorBoard) or a distribution (W&B). The
resolved config goes with it: as text (TensorBoard), params ``strategy.name``, ``partition.alpha``, ``lr``, ... (MLflow)
or the run config (W&B). A run that diverges, is interrupted or fails is closed with that status.

- ``tensorboard``: event files under ``OUT/tensorboard/`` through ``torch.utils.tensorboard``.
- ``mlflow``: a SQLite store under ``OUT/mlruns/`` (``mlflow.db``, artifacts in ``artifacts/``; MLflow 3 keeps
  its plain-file store in maintenance mode), or the tracking URI of ``mlflow_uri``. Params, metrics per round,
  and at the end the results folder's files as artifacts. ``experiment`` names the MLflow experiment.
- ``wandb``: offline mode (runs under ``OUT/wandb/``, ``wandb sync`` uploads them later); no network call.

A logger is a class with ``log(record, client_accuracy)`` and ``close(summary, status)``; a user's own is
registered like any component (``register("logger", "name", MyLogger)``); it receives ``run_dir`` (the
results folder) and ``config`` (the nested config) when it names them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import yaml

from fedsim.config import flat_config
from fedsim.core import components
from fedsim.core.components import option
from fedsim.core.errors import FedsimError

STATUSES = ("finished", "failed", "killed")
"""How a run ended: completed (or stopped by its own rule), diverged or failed, interrupted."""


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric values of a ``metrics.jsonl`` record, by key (``round`` is the step, not a metric)."""
    return {
        k: float(v)
        for k, v in record.items()
        if k != "round" and isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None
    }


def _needs(package: str, logger: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise FedsimError(f"logger '{logger}' needs {package} (pip install \"fedsim[tracking]\")")


def writable_folder(folder: Path, what: str) -> Path:
    """``folder``, created; a one-line error naming it when it cannot be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".fedsim-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise FedsimError(f"{what}: cannot write the tracking directory '{folder}' ({exc.strerror or exc})") from None
    return folder


class TensorBoard:
    """Scalars per round (tags = ``metrics.jsonl`` keys), a histogram ``client_accuracy`` on evaluated rounds and
    the config as text ``config``, in ``OUT/tensorboard/``."""

    def __init__(self, *, run_dir: Path, config: dict[str, Any]) -> None:
        _needs("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        folder = writable_folder(Path(run_dir) / "tensorboard", "logger 'tensorboard'")
        self.writer = SummaryWriter(log_dir=str(folder))
        text = yaml.safe_dump(config, sort_keys=False)
        self.writer.add_text("config", "    " + text.replace("\n", "\n    "))  # markdown code block

    def log(self, record: dict[str, Any], client_accuracy: np.ndarray | None) -> None:
        step = int(record["round"])
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, step)
        if client_accuracy is not None and len(client_accuracy):
            self.writer.add_histogram("client_accuracy", np.asarray(client_accuracy, dtype=np.float64), step)

    def close(self, summary: dict[str, Any] | None, status: str) -> None:
        self.writer.close()


class MLflow:
    """A run in MLflow: params from the nested config, metrics per round, the results folder as artifacts."""

    def __init__(
        self,
        experiment: Annotated[str, option("MLflow experiment name")] = "fedsim",
        *,
        run_dir: Path,
        config: dict[str, Any],
        mlflow_uri: str | None = None,
    ) -> None:
        _needs("mlflow", "mlflow")
        self.run_dir = Path(run_dir)
        if mlflow_uri is None:
            store = writable_folder(self.run_dir / "mlruns", "logger 'mlflow'")
            uri, artifacts = f"sqlite:///{store.resolve()}/mlflow.db", (store / "artifacts").resolve().as_uri()
        else:
            uri, artifacts = mlflow_uri, None
            local = _local_path(mlflow_uri)
            if local is not None:
                folder = local if mlflow_uri.startswith("file:") else local.parent
                writable_folder(folder, "logger 'mlflow'")
                if mlflow_uri.startswith("sqlite:"):  # else MLflow puts artifacts in ./mlruns of the working directory
                    artifacts = (folder / "artifacts").resolve().as_uri()
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # a file: URI given on purpose
        with _quiet("mlflow", "mlflow.store.db.utils", "alembic", "alembic.runtime.migration"):
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient

            try:
                self.client = MlflowClient(tracking_uri=uri)
                found = self.client.get_experiment_by_name(experiment)
                experiment_id = found.experiment_id if found else self.client.create_experiment(experiment, artifacts)
                self.run_id = self.client.create_run(experiment_id, run_name=self.run_dir.name).info.run_id
            except Exception as exc:  # MLflow raises its own and sqlalchemy's exception types
                raise FedsimError(f"logger 'mlflow': cannot use tracking URI {uri!r} ({_first_line(exc)})") from None
            params = [Param(k, str(v)[:6000]) for k, v in flat_config(config).items()]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=params[start : start + 100])

    def log(self, record: dict[str, Any], client_accuracy: np.ndarray | None) -> None:
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), int(record["round"])
        metrics = [Metric(k, v, now, step) for k, v in scalars(record).items() if math.isfinite(v)]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, summary: dict[str, Any] | None, status: str) -> None:
        skip = {"mlruns", "tensorboard", "wandb", ".lock"}
        for path in sorted(self.run_dir.iterdir()):
            if path.name not in skip and path.is_file():
                self.client.log_artifact(self.run_id, str(path))
        mlflow_status = {"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED"}[status]
        self.client.set_terminated(self.run_id, mlflow_status)


class WandB:
    """An offline W&B run under ``OUT/wandb/``: the config, every round's metrics at step ``round``, the
    per-client accuracy as a histogram, the summary."""

    def __init__(
        self,
        project: Annotated[str, option("W&B project name")] = "fedsim",
        *,
        run_dir: Path,
        config: dict[str, Any],
    ) -> None:
        _needs("wandb", "wandb")
        os.environ["WANDB_MODE"] = "offline"  # never a network call
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        folder = writable_folder(Path(run_dir), "logger 'wandb'")
        settings = wandb.Settings(console="off", x_disable_stats=True, x_disable_meta=True, mode="offline")
        try:
            self.run = wandb.init(dir=str(folder), project=project, name=Path(run_dir).name, config=config,
                                  settings=settings, reinit="create_new")  # fmt: skip
        except Exception as exc:  # wandb's errors come from its service process
            raise FedsimError(f"logger 'wandb': cannot start an offline run ({_first_line(exc)})") from None
        self.wandb = wandb

    def log(self, record: dict[str, Any], client_accuracy: np.ndarray | None) -> None:
        values: dict[str, Any] = dict(scalars(record))
        if client_accuracy is not None and len(client_accuracy):
            values["client_accuracy"] = self.wandb.Histogram(np.asarray(client_accuracy, dtype=np.float64))
        self.run.log(values, step=int(record["round"]))

    def close(self, summary: dict[str, Any] | None, status: str) -> None:
        if summary:
            self.run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        self.run.finish(exit_code={"finished": 0, "failed": 1, "killed": 255}[status])


def _local_path(uri: str) -> Path | None:
    """The file or folder a ``sqlite:///`` or ``file:`` tracking URI writes to; None for a server."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :])
    if uri.startswith("file:"):
        return Path(uri[len("file://") :] if uri.startswith("file://") else uri[len("file:") :])
    if "://" not in uri:
        return Path(uri)
    return None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Loggers of ``names`` at WARNING while the block runs (MLflow's database set-up talks at INFO)."""
    saved = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)


class Tracking:
    """The run's loggers: ``log`` after every round, ``close`` once with how the run ended."""

    def __init__(self, loggers: list[Any]) -> None:
        self.loggers = loggers
        self.closed = False

    def log(self, record: dict[str, Any], client_accuracy: np.ndarray | None) -> None:
        for logger in self.loggers:
            logger.log(record, client_accuracy)

    def close(self, summary: dict[str, Any] | None, status: str) -> None:
        if self.closed:
            return
        self.closed = True
        for logger in self.loggers:
            logger.close(summary, status)


def preflight(config) -> None:
    """Before the results folder is written: the folder of a local ``mlflow_uri`` is created and must be writable
    (one-line error otherwise)."""
    local = _local_path(config.mlflow_uri) if config.mlflow_uri else None
    if local is None:
        return
    writable_folder(local if config.mlflow_uri.startswith("file:") else local.parent, "logger 'mlflow' (mlflow_uri)")


def start_tracking(config, run_dir: Path | None) -> Tracking:
    """Build the loggers of ``config`` (``config.logger``) for the results folder ``run_dir``."""
    specs = list(getattr(config, "logger", ()) or ())
    if not specs:
        return Tracking([])
    if run_dir is None:
        raise FedsimError("loggers write beside the results folder; give the run an output folder (out=...)")
    nested = config.to_dict()
    built = []
    for spec in specs:
        built.append(components.build("logger", spec, run_dir=Path(run_dir), config=nested,
                                      mlflow_uri=config.mlflow_uri))  # fmt: skip
    return Tracking(built)


components.register("logger", "tensorboard", TensorBoard)
components.register("logger", "mlflow", MLflow)
components.register("logger", "wandb", WandB)
