"""Statistics over the client axis are streamed block by block in float64 (fedsim.core.protocol): they match
the all-at-once float64 computation to 1e-9 relative whatever the block size, and hold one block at a time."""

from __future__ import annotations

import pytest
import torch

from fedsim.core import protocol, pytree
from fedsim.core.pytree import flatten


def _all_at_once(deltas):
    flat = flatten(deltas).double()
    mean = flat.mean(dim=0)
    return float((flat - mean).norm(dim=1).mean() / mean.norm()), flat.sum(0)


@pytest.mark.parametrize("block_bytes", [1, 8 * 37, 8 * 1000, protocol.STAT_BLOCK_BYTES])
@pytest.mark.parametrize("clients", [1, 7, 300])
def test_streamed_drift_matches_the_all_at_once_formula(monkeypatch, block_bytes, clients):
    generator = torch.Generator().manual_seed(clients)
    deltas = {
        "w": torch.randn(clients, 5, 4, generator=generator) + 0.3,
        "b": torch.randn(clients, 4, generator=generator),
    }
    monkeypatch.setattr(pytree, "STAT_BLOCK_BYTES", block_bytes)
    blocks = list(protocol.client_blocks(deltas, block_bytes))
    assert sum(b.shape[0] for b in blocks) == clients and all(b.dtype == torch.float64 for b in blocks)
    assert max(b.shape[0] for b in blocks) == max(1, min(clients, block_bytes // (8 * 24)))
    expected_drift, expected_sum = _all_at_once(deltas)
    assert torch.allclose(protocol.delta_sum(deltas), expected_sum, rtol=1e-12, atol=1e-12)
    drift = protocol.client_drift(deltas)
    if clients == 1:
        assert drift == 0.0
    else:
        assert drift == pytest.approx(expected_drift, rel=1e-9)


def test_chunk_stacker_equals_concatenation_without_copying_a_single_chunk():
    from fedsim.engine.executor import ChunkStacker

    generator = torch.Generator().manual_seed(0)
    chunks = [
        {"w": torch.randn(n, 3, 2, generator=generator), "b": torch.randn(n, generator=generator)} for n in (4, 4, 2)
    ]
    stacker = ChunkStacker(10)
    first = 0
    for chunk in chunks:
        stacker.add(first, deltas=chunk, extras={})
        first += len(chunk["b"])
    for key in ("w", "b"):
        assert torch.equal(stacker.trees["deltas"][key], torch.cat([c[key] for c in chunks]))
    assert stacker.trees["extras"] == {}
    single = ChunkStacker(4)
    single.add(0, deltas=chunks[0])
    assert single.trees["deltas"] is chunks[0]  # one chunk: kept as it is, no second copy


@pytest.mark.parametrize("block_rows", [1, 3, 8192])
def test_blockwise_standardize_is_bitwise_the_float64_formula(monkeypatch, block_rows):
    import numpy as np

    from fedsim.data import datasets

    monkeypatch.setattr(datasets, "STANDARDIZE_BLOCK_ROWS", block_rows)
    rng = np.random.default_rng(block_rows)
    for dtype in (np.float32, np.uint8):
        x = (rng.standard_normal((257, 9)) * 40 + 100).astype(dtype)
        x[:, 0] = 7  # a constant feature: its deviation becomes 1
        test = (rng.standard_normal((5, 9)) * 40 + 100).astype(dtype)
        full = x.astype(np.float64)
        mean, std = full.mean(axis=0), full.std(axis=0)
        std = np.where(std > 0, std, 1.0)
        expected = (
            ((full - mean) / std).astype(np.float32),
            ((test.astype(np.float64) - mean) / std).astype(np.float32),
        )
        got = datasets.standardize(x, test)
        assert all(np.array_equal(e, g) and g.dtype == np.float32 for e, g in zip(expected, got, strict=True))
