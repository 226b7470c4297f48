"""README "Extending": every Python example runs as it is (each in a fresh registry, from the repo root),
and the built-in optimizer it describes is the one-file-one-line Lion."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedsim.core import components

ROOT = Path(__file__).resolve().parents[1]


def extending_section(text: str) -> str:
    start = text.index("\n## Extending\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def python_examples() -> list[str]:
    section = extending_section((ROOT / "README.md").read_text())
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.fixture
def fresh_registry(monkeypatch):
    monkeypatch.chdir(ROOT)
    for kind in components.KINDS:
        components.names(kind)
    saved = {kind: dict(registered) for kind, registered in components._REGISTRY.items()}
    yield
    for kind, registered in saved.items():
        components._REGISTRY[kind] = registered


def test_there_is_an_example_per_kind():
    examples = "\n".join(python_examples())
    missing = [kind for kind in components.KINDS if f'register("{kind}", ' not in examples]
    assert not missing


@pytest.mark.parametrize("index", range(len(python_examples())))
def test_readme_extending_example_runs(fresh_registry, index):
    code = python_examples()[index]
    exec(compile(code, f"README.md:Extending[{index}]", "exec"), {"__name__": f"readme_example_{index}"})


def test_builtin_optimizer_is_one_file_and_one_line():
    init = (ROOT / "fedsim" / "optim" / "__init__.py").read_text()
    assert init.count('register("optimizer", "lion", Lion)') == 1
    assert "from .lion import Lion" in init
    assert "lion" not in (ROOT / "fedsim" / "config.py").read_text().lower()
    assert "lion" not in (ROOT / "fedsim" / "cli.py").read_text().lower()
