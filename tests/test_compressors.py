"""Compression operators (fedsim.compressors): identity limits, QSGD and rand-k unbiased, top-k against a sort,
the bits formulas by hand, the error-feedback algebra, PowerSGD at full rank, client-chunk independence, and
one-line refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedsim.compressors import (
    QSGD,
    Blockwise,
    NoCompression,
    PowerSGD,
    RandK,
    Sign,
    TopK,
    ef21,
    error_feedback,
)
from fedsim.core.errors import FedsimError

CLIENTS = np.arange(4)


def stack(c=4, n=300, seed=0):
    return torch.randn(c, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_limits_equal_no_compression():
    x = stack()
    for op in (NoCompression(), TopK(1.0), RandK(1.0)):
        torch.testing.assert_close(op.compress(x, CLIENTS, (1,)), x, rtol=0, atol=0)
    # QSGD with many levels and int8 with block 1 reconstruct to within their resolution
    assert (QSGD(2**20).compress(x, CLIENTS, (1,)) - x).abs().max() < x.norm(dim=1).max() / 2**20
    torch.testing.assert_close(Blockwise(8, block=1).compress(x, CLIENTS), x, rtol=1e-15, atol=0)


def test_topk_keeps_exactly_the_k_largest():
    x = stack(n=1000)
    op = TopK(0.05)
    out = op.compress(x, CLIENTS)
    for c in range(len(x)):
        order = x[c].abs().argsort(descending=True)
        kept = set(order[: op.k(1000)].tolist())
        assert set(out[c].nonzero().flatten().tolist()) == kept
        assert torch.equal(out[c, list(kept)], x[c, list(kept)])


@pytest.mark.parametrize("op", [QSGD(4), RandK(0.1)], ids=["qsgd", "randk"])
def test_random_compressors_are_unbiased(op):
    x = stack(c=2, n=50)
    mean = sum(op.compress(x, np.arange(2), (seed,)) for seed in range(4000)) / 4000
    spread = (x.abs().max() * (50 if isinstance(op, RandK) else 1)) / math.sqrt(4000)
    assert (mean - x).abs().max() < 4 * spread


def test_results_do_not_depend_on_the_chunk_of_clients():
    x = stack(c=6, n=200)
    for op in (QSGD(8), RandK(0.1)):
        whole = op.compress(x, np.arange(6), (3, 7))
        parts = torch.cat([op.compress(x[i : i + 2], np.arange(i, i + 2), (3, 7)) for i in (0, 2, 4)])
        torch.testing.assert_close(whole, parts, rtol=0, atol=0)
        loop = torch.cat([op.compress(x[i : i + 1], np.array([i]), (3, 7)) for i in range(6)])
        torch.testing.assert_close(whole, loop, rtol=0, atol=0)


def test_bits_by_hand():
    n = 1000
    assert NoCompression().bits(n) == 32 * 1000
    assert TopK(0.01).bits(n) == 10 * (32 + 32) and RandK(0.0001).bits(n) == 1 * 64  # k = max(1, floor(r n))
    assert Sign().bits(n) == 1000 + 32
    assert QSGD(1).bits(n) == 1000 * (1 + 1) + 32 and QSGD(255).bits(n) == 1000 * (1 + 8) + 32
    assert Blockwise(8, 64).bits(n) == 8 * 1000 + 32 * 16 and Blockwise(4, 100).bits(n) == 4 * 1000 + 32 * 10
    assert PowerSGD(4).bits(30, 20) == 32 * 4 * (30 + 20)


def test_sign_and_blockwise_rules():
    x = stack()
    torch.testing.assert_close(Sign().compress(x, CLIENTS), x.abs().mean(1, keepdim=True) * x.sign())
    out = Blockwise(4, 16).compress(x, CLIENTS)
    scale = x[:, :16].abs().amax(1, keepdim=True)
    torch.testing.assert_close(out[:, :16], (x[:, :16] * 7 / scale).round() * scale / 7)
    assert (out - x).abs().max() <= x.abs().max() / 14 + 1e-12


def test_error_feedback_algebra():
    x, e = stack(seed=1), stack(seed=2)
    op = TopK(0.02)
    sent, residual = error_feedback(x, e, lambda v: op.compress(v, CLIENTS))
    torch.testing.assert_close(sent + residual, x + e, rtol=0, atol=1e-15)
    g = stack(seed=3)
    sent, g_next = ef21(x, g, lambda v: op.compress(v, CLIENTS))
    torch.testing.assert_close(g_next, g + op.compress(x - g, CLIENTS))
    # over rounds, EF sends everything eventually: the sum of what was sent plus the residual is the sum of inputs
    total_sent, residual = torch.zeros_like(x), torch.zeros_like(x)
    for _ in range(5):
        sent, residual = error_feedback(x, residual, lambda v: op.compress(v, CLIENTS))
        total_sent += sent
    torch.testing.assert_close(total_sent + residual, 5 * x, rtol=0, atol=1e-12)


def test_powersgd_at_full_rank_reconstructs():
    m = stack(c=3, n=30, seed=4).reshape(3, 6, 5)
    op = PowerSGD(rank=5)
    q = op.initial_q(m.shape, np.arange(3), (1,)).double()
    approx, q_next = op.compress(m, q)
    torch.testing.assert_close(approx, m, rtol=0, atol=1e-12)
    low, _ = PowerSGD(rank=1).compress(m, q[..., :1])
    assert torch.linalg.matrix_rank(low[0]) == 1


@pytest.mark.parametrize(
    "build, match",
    [(lambda: TopK(0.0), "ratio must be in"), (lambda: RandK(1.5), "ratio must be in"),
     (lambda: Blockwise(3), "bits must be one of"), (lambda: PowerSGD(0), "rank must be"),
     (lambda: QSGD(0), "levels must be")],
)  # fmt: skip
def test_bad_options_are_refused_in_one_line(build, match):
    with pytest.raises(FedsimError, match=match) as e:
        build()
    assert "\n" not in str(e.value)
