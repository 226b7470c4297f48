"""SIGINT and SIGTERM mid-run: the run stops with one line saying how to resume, keeps every metrics line
and checkpoint it wrote, marks ``summary.json`` interrupted, and ``--resume`` ends with the metrics of an
uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ARGS = ["--rounds", "150", "--local-steps", "2", "--clients", "4", "--checkpoint-every", "3", "--quiet"]


def _fedsim(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedsim.cli", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def _metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


def _reference_and_a_run_stopped_after_ten_rounds(tmp_path: Path, stop) -> tuple[Path, Path, subprocess.Popen, str]:
    """An uninterrupted reference run, and a run stopped by ``stop(proc)`` once it has written 10 rounds."""
    reference = tmp_path / "reference"
    assert _fedsim("simulate", *ARGS, "--out", str(reference), cwd=tmp_path).returncode == 0
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fedsim.cli", "simulate", *ARGS, "--out", str(out)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 10):
        time.sleep(0.05)
    stop(proc)
    _, err = proc.communicate(timeout=120)
    return reference, out, proc, err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_run_then_resume_is_identical(tmp_path, signum):
    reference, out, proc, err = _reference_and_a_run_stopped_after_ten_rounds(tmp_path, lambda p: p.send_signal(signum))
    assert proc.returncode == 128 + signum, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"{signum.name}: interrupted after round" in lines[0]
    assert f"resume with: fedsim simulate --resume {out}" in lines[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and 10 <= summary["rounds_completed"] < 150
    assert len(_metrics(out)) == summary["rounds_completed"]  # every finished round kept, none half-written
    resumed = _fedsim("simulate", "--resume", str(out), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert _metrics(out) == _metrics(reference)
    assert "interrupted" not in json.loads((out / "summary.json").read_text())


def test_sigkill_mid_run_then_resume_is_identical(tmp_path):
    """SIGKILL gives the run no chance to say anything: every finished round's line stays (one write each), the
    checkpoint is the last complete one (written to a temporary file, then renamed), and the dead run's lock is
    taken over with a warning."""
    reference, out, proc, _ = _reference_and_a_run_stopped_after_ten_rounds(tmp_path, lambda p: p.kill())
    assert proc.returncode == -signal.SIGKILL
    assert (out / ".lock").exists() and not (out / "summary.json").exists()
    resumed = _fedsim("simulate", "--resume", str(out), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"taking over the lock of process {proc.pid}" in resumed.stderr
    assert _metrics(out) == _metrics(reference)


_KILL_MID_CHECKPOINT = """
import os, signal, sys
import torch
from fedsim.cli import main

real_save, saves = torch.save, []


def save(obj, f, *args, **kwargs):  # the third checkpoint write is cut off halfway by the signal
    saves.append(f)
    if len(saves) == 3:
        with open(f, "wb") as half:
            half.write(b"PK\\x03\\x04 half a checkpoint")
        os.kill(os.getpid(), int(sys.argv[1]))
    real_save(obj, f, *args, **kwargs)


torch.save = save
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize(
    "signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "SIGKILL"]
)
def test_signal_mid_checkpoint_write_then_resume_is_identical(tmp_path, signum):
    """A signal while the checkpoint is being written leaves a half-written temporary file, never a half-written
    checkpoint: the previous checkpoint stays, and ``--resume`` from it ends with an uninterrupted run's metrics."""
    args = ["--rounds", "12", "--local-steps", "2", "--clients", "4", "--checkpoint-every", "3", "--quiet"]
    reference, out = tmp_path / "reference", tmp_path / "run"
    assert _fedsim("simulate", *args, "--out", str(reference), cwd=tmp_path).returncode == 0
    killed = subprocess.run([sys.executable, "-c", _KILL_MID_CHECKPOINT, str(int(signum)), "simulate", *args, "--out",
                             str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert killed.returncode == (-signum if signum == signal.SIGKILL else 128 + signum), killed.stderr
    assert (out / "checkpoint.pt.tmp").read_bytes().endswith(b"half a checkpoint")
    if signum != signal.SIGKILL:
        assert "interrupted after round 9" in killed.stderr
        assert json.loads((out / "summary.json").read_text())["interrupted"] is True
    resumed = _fedsim("simulate", "--resume", str(out), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert _metrics(out) == _metrics(reference)


@pytest.mark.parametrize(("signum", "group"), [(signal.SIGINT, False), (signal.SIGTERM, True)],
                         ids=["SIGINT-to-the-parent", "SIGTERM-to-the-process-group"])  # fmt: skip
def test_signal_stops_seeds_running_side_by_side(tmp_path, signum, group):
    """--seeds with --jobs: a signal to the parent (or to every process, as Slurm sends it) stops the running
    workers as it stops one run (each keeps what it wrote, marked interrupted, its lock released), starts no
    more, and prints one line."""
    out = tmp_path / "seeds"
    proc = subprocess.Popen([sys.executable, "-m", "fedsim.cli", "simulate", "--seeds", "0-5", "--jobs", "2",
                             "--rounds", "2000", "--clients", "4", "--local-steps", "2", "--quiet", "--no-plots",
                             "--out", str(out)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=group)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(
        p.exists() and len(p.read_text().splitlines()) >= 5 for p in out.glob("seed-*/metrics.jsonl")
    ):
        time.sleep(0.05)
    if group:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{signum.name}: interrupted; finished:"), err
    started = sorted(out.glob("seed-*"))
    assert started and not (out / "seed-5").exists()  # the queued seeds never started
    for folder in started:  # every started worker stopped cleanly: its summary says so
        summary = json.loads((folder / "summary.json").read_text())
        assert summary.get("interrupted") is True or summary["rounds_completed"] == 2000
        assert not (folder / ".lock").exists()
