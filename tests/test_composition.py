"""The composition root and the contract: a results folder's nested config.yaml re-runs the same
experiment; the executors implement the Executor protocol; the layers import in one direction only."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedsim.core.protocol import Executor

ROOT = Path(__file__).resolve().parents[1]
RING = str(ROOT / "experiments" / "topologies" / "ring16.graphml")


def _metrics(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


@pytest.mark.parametrize(
    "flags",
    [
        [
            "--strategy",
            "scaffold",
            "--regulator",
            "ecgr",
            "--set",
            "regulator.rho=0.4",
            "--optimizer",
            "foam",
            "--set",
            "optimizer.level=1",
            "--lr",
            "0.01",
            "--fraction",
            "0.5",
            "--availability",
            "markov",
        ],
        [
            "--topology",
            RING,
            "--strategy",
            "dsgda-atc",
            "--set",
            "problem.positive_classes=[0,1]",
            "--model",
            "logreg",
            "--set",
            "strategy.dual_lr=0.02",
            "--set",
            "lr_schedule={name: step, step: 2}",
        ],
    ],
    ids=["federated", "decentralized"],
)
def test_config_yaml_reproduces_the_run(cli, tmp_path, flags):
    first, second = tmp_path / "first", tmp_path / "second"
    code, _, err = cli(["simulate", *flags, "--rounds", "3", "--clients", "16", "--quiet", "--out", str(first)])
    assert code == 0, err
    written = yaml.safe_load((first / "config.yaml").read_text())
    assert isinstance(written["strategy"], (dict, str)) and "regulator_rho" not in written
    code, _, err = cli(["simulate", str(first / "config.yaml"), "--quiet", "--out", str(second)])
    assert code == 0, err
    assert _metrics(first) == _metrics(second)
    assert (first / "config.yaml").read_text() == (second / "config.yaml").read_text()


def test_local_and_ray_executors_implement_the_protocol():
    from fedsim.config import make_config
    from fedsim.simulation import make_simulation

    with make_simulation(make_config({"rounds": 1, "clients": 4})) as sim:
        assert isinstance(sim.executor, Executor)
        assert sim.executor.checkpoints is True
    from fedsim.engine.ray_executor import RayExecutor

    for name in ("train", "close", "client_state", "sampler_state", "checkpoints", "chunk_size"):
        assert hasattr(RayExecutor, name) or name in RayExecutor.__init__.__code__.co_names, name


def test_flower_grid_executor_implements_the_protocol():
    pytest.importorskip("flwr")
    from fedsim.flower_backend import GridExecutor

    class Local:
        sampler, device, batch_size = None, "cpu", 32

    grid_executor = GridExecutor(grid=None, nodes=[1, 2], local=Local())
    assert isinstance(grid_executor, Executor)
    assert grid_executor.checkpoints is False


def _imports(package: str) -> set[str]:
    found = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
    return found


@pytest.mark.parametrize("package", ["strategies", "topologies", "fedsim/optim", "fedsim/core"])
def test_contract_layers_never_import_the_engine(package):
    engine = {m for m in _imports(package) if m == "fedsim.engine" or m.startswith("fedsim.engine.")}
    assert not engine, f"{package} imports {sorted(engine)}"


def test_core_imports_only_itself():
    outside = {m for m in _imports("fedsim/core") if m.startswith(("fedsim", "strategies", "topologies"))}
    assert outside <= {"fedsim.core"} | {m for m in outside if m.startswith("fedsim.core.")}


def test_no_import_cycles_and_function_imports_only_for_optional_or_heavy_dependencies():
    """Module graph with every import (also those inside functions): acyclic over fedsim, strategies and
    topologies; an import inside a function names an optional or heavy dependency, or a fedsim module that
    only the CLIs (torch-free start-up), the config (torch-free validation) or the package's lazy entry points
    defer."""
    modules: dict[str, Path] = {}
    for package in ("fedsim", "strategies", "topologies"):
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path
    deferrable = (
        "flwr",
        "ray",
        "matplotlib",
        "sklearn",
        "scipy",
        "torch",
        "rich",
        "typer",
        "click",
        "numpy",
        "dp_accounting",
        "ppi_py",
        "datasets",
        "flwr_datasets",
        "pyarrow",
        "PIL",
        "tensorboard",
        "mlflow",
        "wandb",
        "optuna",
        "plotly",
        "jinja2",
    )
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        inside = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
                  for n in ast.walk(f) if isinstance(n, ast.Import | ast.ImportFrom)}  # fmt: skip
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                targets = [a.name for a in node.names]
            internal = [t for t in targets if t in modules and t != name]
            graph[name].update(internal)
            if id(node) in inside and internal:
                lazy_ok = name in ("fedsim", "fedsim.cli", "fedsim.benchmarks.cli", "fedsim.config") or any(
                    t.startswith(("fedsim.flower", "fedsim.flower_backend", "fedsim.plots",
                                  "fedsim.engine.ray_executor", "fedsim.benchmarks.flower_baseline"))
                    for t in internal
                )  # fmt: skip
                assert lazy_ok, f"{name} imports {internal} inside a function"
            elif id(node) in inside:
                assert targets[0].split(".")[0] in deferrable, f"{name} defers {targets[0]}"
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(nxt) :] + [nxt])}")
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert np.all([v == 2 for v in state.values()])
