"""Stability probe: twin runs on training sets S and S' that differ in one sample of one node.

ALGORITHMS.md, "Stability probe" (inferred from the algorithmic-stability analyses of SGD, Hardt, Recht & Singer,
ICML 2016, and of decentralized SGD, Sun, Li & Wang, AAAI 2021): run the same experiment twice, with the same seed
and therefore the same initial model, client selection and sample path (samplers return *positions* in each
client's sample list, not values), once on S and once on S', where position ``sample`` of client/node ``node``
holds a different point z' instead of z. After every round t:

- ``stability_distance``      = (1/m) sum_i ||x_i^t - x_i'^t||   (2-norm over all parameters of node i),
- ``stability_distance_max``  = max_i ||x_i^t - x_i'^t||,
- ``stability_distance_node`` = ||x_node^t - x_node'^t||         (the node holding the replaced sample),

and on evaluation rounds ``stability_loss_diff`` = (1/n) sum_{z in test set} |l(x_bar^t; z) - l(x_bar'^t; z)| with
x_bar the average of the node models. A federated run has one model (the global one): all three distances are
its distance ||x^t - x'^t|| and x_bar is that model. The per-node distances go to ``stability.csv``.

The replacement z' (our choice, inferred): the first test-set point, in test-set order, whose label differs from
z's. ``replace_with="self"`` puts z itself back (S' = S): a null probe whose distances must be exactly 0 on a
deterministic device (a check of the twin machinery). The run on S is an ordinary run: its results folder
(config.yaml, metrics.jsonl, summary.json, plots) holds the same metrics as ``fedsim simulate`` plus the
stability ones; it keeps no checkpoint (``checkpoint_every`` is set to 0), so a probe cannot be resumed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsim.config import RunConfig, dump_config, make_config
from fedsim.core.errors import DivergenceError, FedsimError, unknown
from fedsim.core.protocol import ServerState
from fedsim.core.pytree import Tree, all_finite
from fedsim.decentralized import DecentralizedMode
from fedsim.engine.evaluate import per_sample
from fedsim.results import CONFIG_FILE, STABILITY_FILE, SUMMARY_FILE, ResultsDir
from fedsim.rounds import RoundCallback, Simulation
from fedsim.simulation import make_simulation

PROBES = ("stability",)
REPLACEMENTS = ("test", "self")
PROBE_OPTIONS = ("node", "sample", "replace_with")  # keyword options of run_stability_probe a caller may set
STABILITY_PLOT = "stability.png"
STABILITY_METRICS = ("stability_distance", "stability_distance_max", "stability_distance_node", "stability_loss_diff")


def check_probe(name: str) -> None:
    """Raise a one-line :class:`FedsimError` unless ``name`` is a known probe."""
    if name not in PROBES:
        raise unknown("probe", name, PROBES)


def check_probe_options(node: int = 0, sample: int = 0, replace_with: str = "test") -> None:
    """Checks that need no data: non-negative integer node and sample, a known replacement."""
    for name, value in (("node", node), ("sample", sample)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise FedsimError(f"stability probe: {name} must be a non-negative integer, got {value!r}")
    if replace_with not in REPLACEMENTS:
        raise unknown("stability-probe replacement", replace_with, REPLACEMENTS)


def is_decentralized(sim: Simulation) -> bool:
    """True when the state holds one model per node (stacked rows), as in :mod:`fedsim.decentralized`."""
    return isinstance(sim.mode, DecentralizedMode)


def perturb(sim: Simulation, node: int, sample: int, replace_with: str = "test") -> dict[str, Any]:
    """Replace the training point at position ``sample`` of client ``node`` in ``sim``'s store (S -> S').

    The new point is appended as an extra row of the store and the client's list is pointed at it, so every
    other client's data and the original arrays stay untouched. Returns a description of the swap.
    """
    check_probe_options(node, sample, replace_with)
    store = sim.store
    if node >= store.num_clients:
        raise FedsimError(f"stability probe: node {node} is out of range; the run has {store.num_clients} nodes")
    size = int(store.sizes[node])
    if sample >= size:
        raise FedsimError(f"stability probe: sample {sample} is out of range; node {node} has {size} training samples")
    slot = int(store.offsets[node]) + sample
    row = int(store.order[slot])
    label = int(store.y[row])
    if replace_with == "self":
        x_new, y_new, source = store.x[row], store.y[row], "self"
    else:
        others = torch.nonzero(sim.y_test != label).flatten()
        if len(others) == 0:
            raise FedsimError(f"stability probe: no test point has a label other than {label} to swap in")
        j = int(others[0])
        x_new, y_new, source = sim.x_test[j].to(store.x.dtype), sim.y_test[j], f"test[{j}]"
    store.x = torch.cat([store.x, x_new[None]])
    store.y = torch.cat([store.y, y_new[None].to(store.y.dtype)])
    order = store.order.clone()
    order[slot] = store.x.shape[0] - 1
    store.order = order
    return {
        "node": node, "sample": sample, "train_row": row, "label": label,
        "replacement": source, "replacement_label": int(y_new),
    }  # fmt: skip


@torch.no_grad()
def node_distances(a: Tree, b: Tree, stacked: bool) -> np.ndarray:
    """``||a_i - b_i||`` per node (rows of stacked trees) in float64, or ``[||a - b||]`` for one model."""
    total = None
    for k in a:
        diff = (a[k].double() - b[k].double()) ** 2
        part = diff.reshape(diff.shape[0], -1).sum(1) if stacked else diff.sum().reshape(1)
        total = part if total is None else total + part
    return total.sqrt().cpu().numpy()


def average_model(params: Tree, stacked: bool) -> Tree:
    """x_bar: the mean of the node models (stacked), or the model itself."""
    return {k: v.mean(0) for k, v in params.items()} if stacked else params


class _TwinTracker:
    """The ``extend`` hook of :meth:`Simulation.run`: advances the twin on S' and adds the stability metrics."""

    def __init__(self, sim: Simulation, twin: Simulation, node: int, csv_path: Path | None) -> None:
        self.sim, self.twin, self.node, self.csv_path = sim, twin, node, csv_path
        self.stacked = is_decentralized(sim)
        self.state: ServerState = twin.initial_state()
        self.history: list[dict[str, Any]] = []  # the stability metrics of every round so far

    def header(self) -> str:
        m = self.sim.config.clients if self.stacked else 0
        return "round," + (",".join(f"node_{i}" for i in range(m)) if self.stacked else "global") + "\n"

    def __call__(self, round_: int, state: ServerState, record: dict[str, Any]) -> bool:
        self.state, twin_record = self.twin.round(round_, self.state)
        d = node_distances(state.params, self.state.params, self.stacked)
        record["stability_distance"] = float(d.mean())
        record["stability_distance_max"] = float(d.max())
        record["stability_distance_node"] = float(d[self.node if self.stacked else 0])
        record["stability_loss_diff"] = self.loss_diff(state) if record.get("test_loss") is not None else None
        self.history.append({k: record[k] for k in STABILITY_METRICS})
        if self.csv_path is not None:
            with open(self.csv_path, "a") as f:
                f.write(f"{round_}," + ",".join(repr(float(v)) for v in d) + "\n")
        loss = twin_record.get("train_loss")
        diverged = (loss is not None and not math.isfinite(loss)) or not all_finite(self.state.params)
        if diverged:
            record["stability_twin_diverged"] = True
        return diverged

    def loss_diff(self, state: ServerState) -> float:
        """Mean over the test points of |l(x_bar; z) - l(x_bar'; z)|."""
        sim, twin = self.sim, self.twin
        mine, _ = per_sample(sim.model, average_model(state.params, self.stacked), sim.x_test, sim.y_test, sim.loss_fn)
        theirs, _ = per_sample(
            twin.model, average_model(self.state.params, self.stacked), twin.x_test, twin.y_test, twin.loss_fn
        )
        return float((mine - theirs).abs().mean())


def final_values(history: list[dict[str, Any]]) -> dict[str, Any]:
    """``final_<metric>`` for each stability metric: its last non-null value."""
    out: dict[str, Any] = {}
    for key in STABILITY_METRICS:
        values = [h[key] for h in history if h.get(key) is not None]
        out[f"final_{key}"] = values[-1] if values else None
    return out


def run_stability_probe(
    config: RunConfig | Mapping[str, Any],
    out: str | Path | None,
    *,
    node: int = 0,
    sample: int = 0,
    overwrite: bool = False,
    on_round: RoundCallback | None = None,
    replace_with: str = "test",
    plots: bool = True,
) -> dict[str, Any]:
    """Twin runs on S and S' (see the module docstring); returns the run's summary with the final stability
    values (``final_stability_distance``, ...) and a ``stability_probe`` entry describing the swap.

    With ``out`` the results folder of the run on S is written, plus ``stability.csv`` (round, per-node
    distances) and ``stability.png``. Bad input fails before anything is written.
    """
    cfg = config if isinstance(config, RunConfig) else make_config(dict(config))
    cfg = make_config({**cfg.model_dump(exclude_unset=True), "checkpoint_every": 0})
    check_probe_options(node, sample, replace_with)
    if cfg.executor.name != "local" or cfg.backend.name != "fedsim":
        raise FedsimError(
            "the stability probe perturbs the twin's data in-process; run it with --executor local --backend fedsim"
        )
    if out is not None:
        ResultsDir.check_new(out, overwrite)  # before loading data: fail fast, touch nothing
    sim, twin = make_simulation(cfg), make_simulation(cfg)
    swap = perturb(twin, node, sample, replace_with)
    results = None
    if out is not None:
        results = ResultsDir.create(out, overwrite=overwrite)
        results.write_text(CONFIG_FILE, dump_config(sim.config))
        results.write_histogram(sim.histogram)
    tracker = _TwinTracker(sim, twin, node, results.file(STABILITY_FILE) if results else None)
    if results:
        results.write_text(STABILITY_FILE, tracker.header())
    try:
        summary = sim.run(results, on_round=on_round, extend=tracker)
    except DivergenceError:
        if results:  # run() wrote the summary so far; add the stability values to it
            written = json.loads(results.file(SUMMARY_FILE).read_text())
            results.write_json(SUMMARY_FILE, {**written, **final_values(tracker.history), "stability_probe": swap})
        raise
    summary = {**summary, **final_values(tracker.history), "stability_probe": swap}
    if results:
        results.write_json(SUMMARY_FILE, summary)
        if plots:
            from fedsim.plots import plot_run

            plot_run(results.path)
            plot_stability(results.path)
    return summary


def plot_stability(run_dir: str | Path) -> Path | None:
    """``stability.png``: distance mean / max / at the perturbed node vs round, and the held-out loss difference
    (log y axis when the positive values span more than two decades). None when the run has no stability
    metrics."""
    from fedsim.plots import _plot_panel_group, _run_title, read_config, read_metrics

    run = Path(run_dir)
    panels = [["stability_distance", "stability_distance_max", "stability_distance_node"], ["stability_loss_diff"]]
    title = f"stability probe: {_run_title(run, read_config(run))}"
    return _plot_panel_group(read_metrics(run), panels, run / STABILITY_PLOT, title)
