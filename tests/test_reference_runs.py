"""Behaviour preservation: the reference runs recorded in ``tests/reference_runs`` (before the component
redesign) give the same ``metrics.jsonl``, timing fields aside. A deliberate change of numbers re-records
them (``python tests/reference_runs/record.py CASE``) and says why in the commit."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

REFERENCE = Path(__file__).parent / "reference_runs"
sys.path.insert(0, str(REFERENCE))
from record import cases, run_case  # noqa: E402

TIMING_FIELDS = {"time_s"}
RECORDING_THREADS = 2
"""torch threads when the runs were recorded (a 2-core machine): reductions, and the min-max case's L-BFGS
primal-dual gap after them, depend on the thread count."""


def _records(path: Path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS} for line in path.read_text().splitlines()
    ]


def _same(a, b) -> bool:
    """Equal values; floats to 1e-9 relative (bitwise on the recording machine; the margin absorbs a CPU
    whose BLAS kernels round differently)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isfinite(a) and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12))
    return a == b


@pytest.mark.parametrize("name", sorted(cases()))
def test_reference_run_unchanged(name, tmp_path):
    torch.set_num_threads(RECORDING_THREADS)  # restored by the conftest fixture
    out = run_case(name, cases()[name], tmp_path / "run")
    expected = sorted((REFERENCE / name).rglob("metrics.jsonl"))
    assert expected, f"no recorded metrics for {name}"
    for path in expected:
        got = _records(out / path.relative_to(REFERENCE / name))
        want = _records(path)
        assert len(got) == len(want)
        for round_got, round_want in zip(got, want, strict=True):
            assert round_got.keys() == round_want.keys()
            diff = {k: (round_got[k], round_want[k]) for k in round_want if not _same(round_got[k], round_want[k])}
            assert not diff, f"{name} round {round_want['round']}: {diff}"
