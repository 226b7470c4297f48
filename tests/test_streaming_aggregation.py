"""Aggregation chunk by chunk (fedsim.core.reduction, fedsim.engine.streamed): a strategy that declares its
weighted means gets, from updates folded as each chunk finishes, the same bits as from the stacked updates,
whatever the chunk size; nothing of the uploads is kept; a robust aggregator or a strategy that reads the stack
keeps the stack."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fedsim.config import make_config
from fedsim.core.errors import FedsimError
from fedsim.core.protocol import ClientUpdates, ServerState
from fedsim.core.reduction import Reduction, RowFold, mean_of
from fedsim.engine import streamed
from fedsim.engine.streamed import RowSpool, StreamedUpdates
from fedsim.simulation import make_simulation
from strategies.fedavg import FedAvg

BASE = dict(
    dataset="digits", clients=10, partition={"name": "dirichlet", "alpha": 0.3}, rounds=2, local_steps=3,
    batch_size=8, lr=0.05, seed=4, device="cpu", model={"name": "mlp", "hidden": [16]}, checkpoint_every=0,
    fraction=0.8,
)  # fmt: skip

STRATEGIES = {
    "fedavg": {},
    "fedprox": {"strategy": {"name": "fedprox", "mu": 0.1}},
    "fedavgm": {"strategy": "fedavgm"},
    "fedadam": {"strategy": "fedadam"},
    "fednova-general-epochs": {
        "strategy": {"name": "fednova", "form": "general"},
        "local_steps": None,
        "local_epochs": 1,
        "optimizer": {"name": "sgd", "momentum": 0.5},
    },  # fmt: skip
    "feddyn": {"strategy": "feddyn"},
    "fedcm": {"strategy": "fedcm"},
    "scaffold-uniform": {"strategy": {"name": "scaffold", "weighting": "uniform"}},
    "scaffold-m": {"strategy": "scaffold-m"},
    "ecgr": {"regulator": "ecgr"},
}


def one_round(overrides, *, keep_stack, chunk_size=None):
    """Round 1 and the start of round 2 of a run: (updates of round 1, server state after round 1, drift)."""
    values = {**BASE, **overrides, **({"chunk_size": chunk_size} if chunk_size else {})}
    cfg = make_config({k: v for k, v in values.items() if v is not None})
    sim = make_simulation(cfg)
    state = sim.initial_state()
    plan = sim.strategy.configure(1, state, sim.store.num_clients, cfg.seed)
    if keep_stack:
        plan = dataclasses.replace(plan, reductions=None)
    updates = sim.executor.train(plan, state.params, 1, sim.lr(1))
    drift = updates.drift()
    return updates, sim.strategy.aggregate(1, state, updates), drift


def assert_states_equal(a: ServerState, b: ServerState) -> None:
    for part in ("params", "extras"):
        x, y = getattr(a, part), getattr(b, part)
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), (part, k)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_streamed_round_has_the_bits_of_the_stacked_round_for_any_chunk_size(name):
    overrides = STRATEGIES[name]
    stacked_updates, stacked_state, stacked_drift = one_round(overrides, keep_stack=True)
    assert isinstance(stacked_updates, ClientUpdates)
    for chunk_size in (None, 1, 3):
        updates, state, drift = one_round(overrides, keep_stack=False, chunk_size=chunk_size)
        assert isinstance(updates, StreamedUpdates)
        assert_states_equal(state, stacked_state)
        assert drift == stacked_drift
        assert torch.equal(updates.train_loss, stacked_updates.train_loss)


def test_streamed_updates_keep_no_uploads_and_say_so():
    updates, _, _ = one_round({}, keep_stack=False)
    for what in ("deltas", "extras", "opt_state"):
        with pytest.raises(FedsimError, match="folded chunk by chunk and not kept"):
            getattr(updates, what)
    with pytest.raises(FedsimError, match="did not declare"):
        updates.mean("momentum")


def test_the_drift_spool_spills_to_a_file_with_the_same_bits(monkeypatch):
    in_memory, state_memory, drift_memory = one_round({}, keep_stack=False, chunk_size=3)
    assert in_memory.spool.file is None
    made = []
    original = RowSpool.__init__

    def record(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(streamed.RowSpool, "__init__", record)
    monkeypatch.setattr(streamed, "SPOOL_MEMORY_BYTES", 0)
    monkeypatch.setattr(streamed, "SPOOL_MEMORY_FRACTION", 0.0)
    on_disk, state_disk, drift_disk = one_round({}, keep_stack=False, chunk_size=3)
    assert made and made[0].file is not None and made[0].file.closed  # the second pass read it and closed it
    assert drift_disk == drift_memory
    assert_states_equal(state_disk, state_memory)


def test_robust_aggregators_and_stack_readers_keep_the_stack():
    cfg = make_config({**BASE, "aggregator": "median"})
    sim = make_simulation(cfg)
    assert sim.strategy.configure(1, sim.initial_state(), 10, 0).reductions is None

    class ReadsTheStack(FedAvg):
        def aggregate(self, round_, state, updates):
            return ServerState({k: v - updates.deltas[k].mean(0) for k, v in state.params.items()}, state.extras)

    assert ReadsTheStack().reductions() is None
    assert ReadsTheStack().configure(1, ServerState({"w": torch.zeros(2)}), 4, 0).reductions is None
    assert FedAvg().configure(1, ServerState({"w": torch.zeros(2)}), 4, 0).reductions == {"mean": Reduction()}


@pytest.mark.parametrize("width", [1, 7, 300])
def test_row_fold_has_the_same_bits_whatever_the_cuts_and_threads(width):
    rows = torch.randn(150, width, dtype=torch.float64) * torch.logspace(-8, 8, 150, dtype=torch.float64)[:, None]
    before, expected = rows.clone(), rows.sum(0)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)  # restored by the conftest fixture
        for cuts in ([150], [1] * 150, [3, 61, 64, 22], [149, 1], [64, 64, 22]):
            fold, start = RowFold(), 0
            for size in cuts:
                fold.add(rows[start : start + size])
                start += size
            results.append(fold.result())
    assert all(torch.equal(r, results[0]) for r in results)
    torch.testing.assert_close(results[0], expected, rtol=1e-12, atol=1e-12 * float(rows.abs().max()))
    assert torch.equal(rows, before)  # the fold never writes into what it is given


def test_declared_mean_formula_with_scale_and_subset():
    gen = torch.Generator().manual_seed(0)
    upload = {"w": torch.randn(5, 3, generator=gen), "b": torch.randn(5, generator=gen)}
    clients = ClientUpdates(
        client_ids=np.arange(5), deltas=upload, num_samples=torch.tensor([4.0, 1, 2, 8, 5], dtype=torch.float64),
        num_steps=torch.tensor([2, 0, 3, 1, 2]), train_loss=torch.zeros(5), lr=0.1,
    )  # fmt: skip
    rule = Reduction(scale=lambda c: 1.0 / c.num_steps.clamp_min(1), rows=lambda c: c.num_steps > 0)
    got = mean_of(rule, clients, upload)
    keep = clients.num_steps > 0
    n, s = clients.num_samples[keep], 1.0 / clients.num_steps[keep].double()
    for k, v in upload.items():
        expected = (v[keep].double() * (n * s).reshape(-1, *[1] * (v.dim() - 1))).sum(0) / n.sum()
        torch.testing.assert_close(got[k], expected.float())
    nobody = Reduction(rows=lambda c: c.num_steps > 5)
    assert mean_of(nobody, clients, upload) is None
    uniform = mean_of(Reduction(weight="uniform"), clients, upload)
    torch.testing.assert_close(uniform["w"], upload["w"].double().mean(0).float())


@pytest.mark.parametrize("sizes", [[10], [3, 4, 3], [1] * 10, [7, 3], [2, 8]])
@pytest.mark.parametrize("rows", [1, 3, 4, 10, 12])
def test_spool_reads_back_in_blocks_across_chunks(sizes, rows):
    data = torch.arange(10 * 2, dtype=torch.float32).reshape(10, 2)
    for memory_bytes in (10**9, 0):
        spool, start = RowSpool(2, torch.float32, 10, memory_bytes), 0
        for size in sizes:
            spool.append(data[start : start + size])
            start += size
        blocks = list(spool.blocks(rows))
        assert [len(b) for b in blocks] == [min(rows, 10 - i) for i in range(0, 10, rows)]
        assert torch.equal(torch.cat(blocks), data)
        spool.close()
