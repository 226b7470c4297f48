"""A results folder is locked for the whole run: two runs on one ``--out`` never both write it; runs on
different folders do not disturb each other; a lock left by a dead process is taken over with a warning."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

FAST = ["--rounds", "40", "--clients", "4", "--local-steps", "2", "--quiet"]
LONG = ["--rounds", "3000", "--clients", "4", "--local-steps", "1", "--eval-every", "1000", "--quiet"]


def _start(tmp_path: Path, *argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedsim.cli", *argv], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def _rounds(out: Path) -> list[int]:
    return [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_runs_on_one_folder_one_is_refused(tmp_path):
    out = tmp_path / "run"
    runs = [_start(tmp_path, "simulate", *FAST, "--out", str(out)) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "already exists" in refused or "is in use by process" in refused
    assert len(refused.strip().splitlines()) == 1
    assert _rounds(out) == list(range(1, 41))  # one run's history, not two interleaved
    assert not (out / ".lock").exists()


def test_a_running_folder_cannot_be_overwritten_or_resumed(tmp_path):
    out = tmp_path / "run"
    running = _start(tmp_path, "simulate", *LONG, "--out", str(out))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.05)
    for argv in (["simulate", "--rounds", "2", "--quiet", "--out", str(out), "--overwrite"],
                 ["simulate", "--resume", str(out)]):  # fmt: skip
        other = subprocess.run([sys.executable, "-m", "fedsim.cli", *argv], cwd=tmp_path, capture_output=True,
                               text=True, timeout=300)  # fmt: skip
        assert other.returncode == 2 and f"is in use by process {running.pid}" in other.stderr, other.stderr
    assert running.wait(timeout=300) == 0, running.stderr.read()
    assert _rounds(out) == list(range(1, 3001))


def test_runs_on_different_folders_both_finish(tmp_path):
    runs = {name: _start(tmp_path, "simulate", *FAST, "--out", str(tmp_path / name)) for name in ("a", "b")}
    for proc in runs.values():
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    strip = lambda p: [{k: v for k, v in json.loads(line).items() if k != "time_s"}  # noqa: E731
                       for line in (p / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    assert strip(tmp_path / "a") == strip(tmp_path / "b")


def test_a_stale_lock_is_taken_over_with_a_warning(cli, tmp_path):
    out = tmp_path / "run"
    assert cli(["simulate", *FAST, "--out", str(out)])[0] == 0
    (out / ".lock").write_text("999999999")  # a process that no longer runs
    code, _, err = cli(["simulate", "--resume", str(out), "--quiet"])
    assert code == 0, err
    assert "warning: results folder" in err and "taking over the lock of process 999999999" in err
    assert not (out / ".lock").exists()
