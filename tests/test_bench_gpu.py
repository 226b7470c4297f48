"""experiments/bench_gpu.sh: its CPU dry run writes the GPU run's JSON schema, and without CUDA (and without
--dry-run) it refuses with one line. No timing is asserted."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "bench_gpu.sh"
WORKLOAD_KEYS = {
    "name", "model", "dataset", "data_source", "clients", "local_steps", "batch_size", "repeats", "chunk_size",
    "num_params", "grad_mode", "samples_per_s", "centralized_samples_per_s", "ratio_to_centralized", "vectorized_s",
    "centralized_s", "peak_gpu_memory_bytes", "wall_s", "status", "note",
}  # fmt: skip
TOP_KEYS = {
    "benchmark", "dry_run", "device", "device_name", "torch", "cuda", "python", "threads", "tf32", "command",
    "time_budget_s", "total_wall_s", "workloads", "skipped", "target",
}  # fmt: skip


def run_script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_dry_run_writes_the_schema(tmp_path):
    out = tmp_path / "dry.json"
    proc = run_script("--dry-run", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert set(result) == TOP_KEYS
    assert result["dry_run"] is True and result["device"] == "cpu" and result["cuda"] is None
    assert "--dry-run" in result["command"] and result["total_wall_s"] > 0 and result["skipped"] == []
    rows = result["workloads"]
    assert [r["model"] for r in rows] == ["lenet5", "cnn", "mlp", "char_transformer", "mlp"]
    for row in rows:
        assert set(row) == WORKLOAD_KEYS
        assert row["status"] == "ok", row
        assert row["samples_per_s"] > 0 and row["centralized_samples_per_s"] > 0
        assert row["ratio_to_centralized"] > 0
        assert row["ratio_to_centralized"] == pytest.approx(row["samples_per_s"] / row["centralized_samples_per_s"])
        assert row["peak_gpu_memory_bytes"] is None
        assert row["chunk_size"] >= 1 and row["num_params"] > 0 and row["wall_s"] > 0
    assert set(result["target"]["met"]) == {"lenet5-1k", "cnn-1k"}
    assert result["target"]["min_ratio_to_centralized"] == 0.8


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available: the script would run the benchmark")
def test_without_cuda_refuses_with_one_line(tmp_path):
    out = tmp_path / "gpu.json"
    proc = run_script("--out", str(out), timeout=120)
    assert proc.returncode != 0
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDA" in lines[0] and "--dry-run" in lines[0]
    assert not out.exists()
