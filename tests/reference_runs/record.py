"""Record the reference runs of the behaviour-preservation check (``tests/test_reference_runs.py``).

Each case is a config (``cases.yaml``); running it writes ``<case>/metrics.jsonl`` here. Re-record only on
purpose (a deliberate change of numbers), with ``python tests/reference_runs/record.py [CASE ...]``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def machine() -> str:
    """What decides float rounding besides the code: CPU vendor, instruction set torch dispatches to, torch
    version (MKL and oneDNN pick different kernels on Intel and AMD, AVX2 and AVX-512)."""
    import platform

    import torch

    vendor = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                vendor = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.machine()} {vendor} {torch.backends.cpu.get_cpu_capability()} torch-{torch.__version__}"


def cases() -> dict[str, dict]:
    return yaml.safe_load((HERE / "cases.yaml").read_text())


def run_case(name: str, config: dict, out: Path) -> Path:
    """Run one case into ``out``; returns the metrics file (``--seeds`` cases: seed folders' files)."""
    from fedsim.seeds import parse_seeds, run_seeds
    from fedsim.simulation import simulate

    config = dict(config)
    if "topology" in config:
        config["topology"] = str(ROOT / config["topology"])
    seeds = config.pop("seeds", None)
    if seeds is not None:
        run_seeds(config, parse_seeds(seeds), out, plots=False)
    else:
        simulate(config, out, plots=False)
    return out


def main(names: list[str]) -> None:
    (HERE / "MACHINE").write_text(machine() + "\n")
    for name, config in cases().items():
        if names and name not in names:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = run_case(name, config, Path(tmp) / "run")
            target = HERE / name
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir()
            for metrics in sorted(out.rglob("metrics.jsonl")):
                rel = metrics.relative_to(out)
                dest = target / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(metrics, dest)
        print("recorded", name)


if __name__ == "__main__":
    main(sys.argv[1:])
