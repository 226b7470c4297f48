"""``fedsim ppi``: Fed-PPI on a model that ``fedsim simulate`` trained.

From a results folder (``config.yaml`` and ``checkpoint.pt``) the run's clients and model are rebuilt; every
client keeps a random ``labelled_fraction`` of its training labels (at least one, and at least one point
unlabelled) and the model predicts on all its points (a decentralized run: each node's own model). The
estimand on a classification data set:

- ``mean``: the prevalence of each class (Y one-hot, or ``1{y = K}`` with ``target_class``); Yhat the
  predicted probabilities (``prediction="score"``) or the one-hot predicted class (``"label"``);
- ``quantile``: the q-quantile of the (ordinal) label, such as a digit; Yhat the expected label under the
  predicted probabilities (score) or the predicted label;
- ``ols`` / ``logistic``: coefficients of ``1{y = K}`` on an intercept and the input features ``features``
  (flattened indices); Yhat the predicted probability of K (score) or ``1{predicted = K}``.

The truth is the same quantity from every client's labels. ``ppi.json`` holds the Fed-PPI, classical and
centralized intervals, their widths and whether they cover the truth; ``ppi.png`` draws them side by side.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsim.config import load_config
from fedsim.core.errors import FedsimError
from fedsim.ppi import (
    fed_ppi_logistic_ci,
    fed_ppi_logistic_pointestimate,
    fed_ppi_mean_ci,
    fed_ppi_mean_pointestimate,
    fed_ppi_ols_ci,
    fed_ppi_ols_pointestimate,
    fed_ppi_quantile_ci,
    fed_ppi_quantile_pointestimate,
)
from fedsim.ppi.clients import ClientData
from fedsim.ppi.methods import ppi_py
from fedsim.ppi.moments import IMPUTED_VARIANCES
from fedsim.ppi.regression import LOGISTIC, solve
from fedsim.results import CHECKPOINT_FILE, CONFIG_FILE, ResultsDir
from fedsim.simulation import make_simulation

ESTIMANDS = ("mean", "quantile", "ols", "logistic")
PREDICTIONS = ("score", "label")
REPORTED = ("fed_ppi", "classical", "centralized")
RESULT_FILE, PLOT_FILE = "ppi.json", "ppi.png"
BATCH = 4096


def _check(estimand, fraction, alpha, target_class, prediction, q, features, lam_mode) -> None:
    if estimand not in ESTIMANDS:
        raise FedsimError(f"--estimand must be one of {', '.join(ESTIMANDS)}, got {estimand!r}")
    if not 0 < fraction < 1:
        raise FedsimError(f"--labelled-fraction must be in (0, 1), got {fraction}")
    if not 0 < alpha < 1:
        raise FedsimError(f"--alpha must be in (0, 1), got {alpha}")
    if prediction not in PREDICTIONS:
        raise FedsimError(f"--prediction must be score or label, got {prediction!r}")
    if lam_mode not in (None, "client", "global"):
        raise FedsimError(f"--lam-mode must be client or global, got {lam_mode!r}")
    if lam_mode is not None and estimand == "quantile":
        raise FedsimError("the quantile has no power tuning; drop --lam-mode")
    if estimand in ("ols", "logistic") and target_class is None:
        raise FedsimError(f"--estimand {estimand} regresses 1{{y = K}}: give --class K")
    if estimand == "quantile" and target_class is not None:
        raise FedsimError("the quantile is of the label itself; drop --class")
    if q is not None and estimand != "quantile":
        raise FedsimError("--q applies to --estimand quantile only")
    if q is not None and not 0 < q < 1:
        raise FedsimError(f"--q must be in (0, 1), got {q}")
    if features and estimand not in ("ols", "logistic"):
        raise FedsimError("--features applies to --estimand ols or logistic only")


def _load(run_dir: Path) -> tuple[Any, dict[str, Any]]:
    """The run's rebuilt simulation (local executor) and its trained parameters."""
    if not run_dir.is_dir():
        raise FedsimError(f"{run_dir} is not a folder")
    if not (run_dir / CONFIG_FILE).is_file():
        raise FedsimError(f"{run_dir} is not a results folder (no {CONFIG_FILE})")
    if not (run_dir / CHECKPOINT_FILE).is_file():
        raise FedsimError(
            f"{run_dir} has no {CHECKPOINT_FILE}: rerun fedsim simulate with --checkpoint-every N (N >= 1)"
        )
    payload = ResultsDir(run_dir).load_checkpoint()
    config = load_config(run_dir / CONFIG_FILE, {"executor": "local"})
    if config.minimax:
        raise FedsimError("fedsim ppi needs a classifier; this run trained a min-max problem")
    sim = make_simulation(config)
    _, state = sim.restore(payload)
    return sim, state.params


def _probabilities(sim: Any, params: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """Every client's predicted class probabilities on its training points (node c's model for client c in
    a decentralized run)."""
    from torch.func import functional_call

    store, stacked = sim.store, sim.config.topology is not None
    out = []
    with torch.no_grad():
        for c in range(store.num_clients):
            rows = store.order[store.offsets[c] : store.offsets[c + 1]]
            own = {k: v[c] for k, v in params.items()} if stacked else params
            logits = [
                functional_call(sim.model, own, (store.x[rows[i : i + BATCH]],)) for i in range(0, len(rows), BATCH)
            ]
            out.append(torch.softmax(torch.cat(logits).double(), dim=1).cpu().numpy())
    return out


def _targets(estimand, labels, probs, target_class, prediction, num_classes):
    """(Y, Yhat) of one client for the estimand."""
    predicted = probs.argmax(axis=1)
    if estimand == "quantile":
        yhat = predicted.astype(float) if prediction == "label" else probs @ np.arange(num_classes, dtype=float)
        return labels.astype(float), yhat
    if target_class is None:
        eye = np.eye(num_classes)
        return eye[labels], eye[predicted] if prediction == "label" else probs
    y = (labels == target_class).astype(float)
    return y, (predicted == target_class).astype(float) if prediction == "label" else probs[:, target_class]


def _truth(estimand: str, clients: list[dict[str, np.ndarray]], hidden: list[np.ndarray], q: float) -> np.ndarray:
    """The estimand from every client's labels (labelled and hidden)."""
    y = np.concatenate([np.concatenate([c["y"], h]) for c, h in zip(clients, hidden, strict=True)])
    if estimand == "mean":
        return np.atleast_1d(y.mean(axis=0))
    if estimand == "quantile":
        return np.atleast_1d(np.quantile(y, q, method="inverted_cdf"))
    x = np.concatenate([np.concatenate([c["x"], c["x_unlabeled"]]) for c in clients])
    if estimand == "ols":
        return np.linalg.lstsq(x, y, rcond=None)[0]
    whole = ClientData(y[:, None], y[:, None], y[:1, None], x, x[:1])
    return solve(LOGISTIC, [whole], [0.0])


@dataclass(frozen=True)
class RunPredictions:
    """A trained run's clients: labels, predicted probabilities and (flattened) inputs of each client."""

    run: str
    labels: list[np.ndarray]
    probabilities: list[np.ndarray]
    inputs: torch.Tensor
    rows: list[torch.Tensor]
    num_classes: int
    seed: int

    def features(self, client: int, columns: list[int]) -> np.ndarray:
        """An intercept and the chosen input columns of one client's points."""
        x = self.inputs[self.rows[client]][:, columns].cpu().double().numpy()
        return np.c_[np.ones(len(x)), x]


def load_predictions(run_dir: str | Path) -> RunPredictions:
    """Rebuild a run from its results folder and predict on every client's training points."""
    sim, params = _load(Path(run_dir))
    store = sim.store
    rows = [store.order[store.offsets[c] : store.offsets[c + 1]] for c in range(store.num_clients)]
    return RunPredictions(
        str(run_dir), [store.y[r].cpu().numpy() for r in rows], _probabilities(sim, params),
        store.x.reshape(len(store.x), -1), rows, sim.dataset.num_classes, sim.config.seed,
    )  # fmt: skip


def hide_labels(
    predictions: RunPredictions,
    estimand: str,
    labelled_fraction: float,
    seed: int,
    target_class: int | None = None,
    prediction: str = "score",
    features: list[int] | None = None,
) -> tuple[list[dict[str, np.ndarray]], list[np.ndarray]]:
    """Every client keeps ``floor(labelled_fraction * size)`` random labels: the Fed-PPI client dicts, and each
    client's hidden Y (for the truth)."""
    rng = np.random.default_rng(seed)
    clients, hidden = [], []
    for c, (labels, probs) in enumerate(zip(predictions.labels, predictions.probabilities, strict=True)):
        size, labelled = len(labels), int(np.floor(labelled_fraction * len(labels)))
        if labelled == 0 or labelled == size:
            raise FedsimError(
                f"--labelled-fraction {labelled_fraction} leaves client {c} ({size} samples) "
                f"{'no labels' if labelled == 0 else 'no unlabelled points'}"
            )
        mask = np.zeros(size, dtype=bool)
        mask[rng.choice(size, labelled, replace=False)] = True
        y, yhat = _targets(estimand, labels, probs, target_class, prediction, predictions.num_classes)
        client = {"y": y[mask], "yhat": yhat[mask], "yhat_unlabeled": yhat[~mask]}
        if estimand in ("ols", "logistic"):
            x = predictions.features(c, features or [])
            client.update(x=x[mask], x_unlabeled=x[~mask])
        clients.append(client)
        hidden.append(y[~mask])
    return clients, hidden


def federated_ppi(
    run_dir: str | Path | RunPredictions,
    estimand: str = "mean",
    labelled_fraction: float = 0.05,
    alpha: float = 0.1,
    *,
    seed: int | None = None,
    target_class: int | None = None,
    prediction: str = "score",
    q: float | None = None,
    features: list[int] | None = None,
    lam_mode: str | None = None,
    imputed_variance: str = "averaged",
) -> dict[str, Any]:
    """Fed-PPI, classical and centralized intervals for ``estimand`` on a trained run (its folder, or its
    :func:`load_predictions` to draw many labelled sets from one load; see the module docstring); returns what
    ``ppi.json`` holds. ``seed`` draws the labelled points (default: the run's)."""
    _check(estimand, labelled_fraction, alpha, target_class, prediction, q, features, lam_mode)
    if imputed_variance not in IMPUTED_VARIANCES:
        raise FedsimError(f"--imputed-variance must be averaged or pooled, got {imputed_variance!r}")
    ppi_py()  # the centralized oracle: fail before loading anything
    run = run_dir if isinstance(run_dir, RunPredictions) else load_predictions(run_dir)
    num_classes = run.num_classes
    if target_class is not None and not 0 <= target_class < num_classes:
        raise FedsimError(f"--class must be in [0, {num_classes - 1}], got {target_class}")
    if features and not all(0 <= f < run.inputs.shape[1] for f in features):
        raise FedsimError(f"--features must be input indices in [0, {run.inputs.shape[1] - 1}], got {features}")
    q = 0.5 if estimand == "quantile" and q is None else q
    seed = run.seed if seed is None else seed
    clients, hidden = hide_labels(run, estimand, labelled_fraction, seed, target_class, prediction, features)
    truth = _truth(estimand, clients, hidden, q)
    rows = {}
    for method in REPORTED:
        tuning = {"imputed_variance": imputed_variance} if method == "fed_ppi" else {}
        if method == "fed_ppi" and lam_mode:
            tuning["lam_mode"] = lam_mode
        lower, upper, point = _estimate(estimand, clients, alpha, q, method, tuning)
        rows[method] = {
            "lower": lower.tolist(), "upper": upper.tolist(), "point": point.tolist(),
            "width": (upper - lower).tolist(), "covers": ((lower <= truth) & (truth <= upper)).tolist(),
        }  # fmt: skip
    names = _coordinates(estimand, target_class, num_classes, features, q)
    result = {
        "run": run.run, "estimand": estimand, "coordinates": names, "labelled_fraction": labelled_fraction,
        "alpha": alpha, "seed": seed, "prediction": prediction, "lam_mode": lam_mode or "client",
        "imputed_variance": imputed_variance,
        "clients": len(clients), "labelled": int(sum(len(c["y"]) for c in clients)),
        "unlabelled": int(sum(len(c["yhat_unlabeled"]) for c in clients)), "truth": truth.tolist(),
        "methods": rows,
        "width_ratio": {m: _median_ratio(rows["fed_ppi"]["width"], rows[m]["width"])
                        for m in ("classical", "centralized")},
    }  # fmt: skip
    return result


def _median_ratio(widths: list[float], others: list[float]) -> float | None:
    """Median of ``widths / others`` over the coordinates where ``others`` is positive (a class with no
    labelled example has a classical width of 0); None when there is none."""
    ratios = [w / o for w, o in zip(widths, others, strict=True) if o > 0]
    return float(np.median(ratios)) if ratios else None


def _estimate(estimand, clients, alpha, q, method, tuning) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if estimand == "quantile":
        tuning.pop("lam_mode", None)
        lower, upper = fed_ppi_quantile_ci(clients, q, alpha, method=method, **tuning)
        point = fed_ppi_quantile_pointestimate(clients, q, method=method)
    else:
        ci, pointestimate = {
            "mean": (fed_ppi_mean_ci, fed_ppi_mean_pointestimate),
            "ols": (fed_ppi_ols_ci, fed_ppi_ols_pointestimate),
            "logistic": (fed_ppi_logistic_ci, fed_ppi_logistic_pointestimate),
        }[estimand]
        lower, upper = ci(clients, alpha, method=method, **tuning)
        point = pointestimate(clients, method=method, **{k: v for k, v in tuning.items() if k == "lam_mode"})
    return tuple(np.atleast_1d(np.asarray(v, dtype=float)) for v in (lower, upper, point))


def _coordinates(estimand, target_class, num_classes, features, q) -> list[str]:
    if estimand == "mean":
        return [f"P(y={k})" for k in (range(num_classes) if target_class is None else [target_class])]
    if estimand == "quantile":
        return [f"quantile {q:g} of y"]
    return ["intercept"] + [f"x[{f}]" for f in features or []]


def write_report(result: dict[str, Any], out_dir: str | Path, overwrite: bool = False) -> tuple[Path, Path]:
    """``ppi.json`` and ``ppi.png`` in ``out_dir`` (refusing to replace them unless ``overwrite``)."""
    out_dir = Path(out_dir)
    json_path, png_path = out_dir / RESULT_FILE, out_dir / PLOT_FILE
    for path in (json_path, png_path):
        if path.exists() and not overwrite:
            raise FedsimError(f"{path} exists; pass --overwrite to replace it, or --out DIR")
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_intervals(result, png_path)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    return json_path, png_path


def plot_intervals(result: dict[str, Any], out: Path) -> Path:
    """One row per coordinate: the methods' intervals side by side and the truth as a dashed line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from fedsim.plots import DPI, _save

    names = result["coordinates"]
    fig = Figure(figsize=(7.0, 1.0 + 1.4 * len(names)), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(names), 1, squeeze=False)[:, 0]
    colors = {"fed_ppi": "tab:blue", "classical": "tab:gray", "centralized": "tab:green"}
    for j, (ax, name) in enumerate(zip(axes, names, strict=True)):
        for i, method in enumerate(REPORTED):
            row = result["methods"][method]
            ax.plot(
                [row["lower"][j], row["upper"][j]], [i, i], color=colors[method], linewidth=6, solid_capstyle="butt"
            )
            ax.plot([row["point"][j]], [i], "k|", markersize=10)
        ax.axvline(result["truth"][j], color="k", linestyle="--", linewidth=1)
        ax.set_yticks(range(len(REPORTED)), REPORTED)
        ax.set_ylim(-0.7, len(REPORTED) - 0.3)
        ax.set_title(name, fontsize=9, loc="left")
    fig.suptitle(f"{result['estimand']}: {1 - result['alpha']:.0%} intervals, "
                 f"{result['labelled']} labelled / {result['unlabelled']} unlabelled over {result['clients']} clients",
                 fontsize=10)  # fmt: skip
    return _save(fig, out)
