"""README.md against the code: the generated component tables, the `fedsim simulate` flag table, no removed
flag or key, every run config it shows validates, and every `fedsim simulate` command it shows runs."""

from __future__ import annotations

import re
import shlex
import textwrap
from pathlib import Path

import pytest
import yaml

from fedsim.cli import OPTION_FLAGS, app, main
from fedsim.config import RunConfig, load_config, make_config
from fedsim.core.components import split_spec
from fedsim.docs import END, START, readme_block

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "README.md").read_text(encoding="utf-8")
FENCE = re.compile(r"^([ \t]*)```(\w*)[ \t]*\n(.*?)^\1```[ \t]*$", re.M | re.S)
REMOVED = ("--ecgr-", "--bherd-", "--foam-", "--gwt-", "--mols-", "flwr_options", "model_args")
RUNNABLE_DATASETS = ("digits", "synthetic")


def code_blocks(lang: str) -> list[str]:
    return [textwrap.dedent(body) for _, kind, body in FENCE.findall(TEXT) if kind == lang]


def generated_block() -> str:
    assert TEXT.count(START) == 1 and TEXT.count(END) == 1, "README needs exactly one pair of component markers"
    return TEXT[TEXT.index(START) : TEXT.index(END) + len(END)]


def run_configs() -> list[tuple[int, dict]]:
    """The yaml blocks that are fedsim run configs: a mapping with a run config key (``dataset``,
    ``strategy``, ``rounds``, ...; a dotted key counts by its component)."""
    keys = set(RunConfig.model_fields)
    configs = []
    for i, block in enumerate(code_blocks("yaml")):
        data = yaml.safe_load(block)
        if isinstance(data, dict) and keys & {str(k).split(".")[0] for k in data}:
            configs.append((i, data))
    return configs


def fedsim_commands(command: str) -> list[list[str]]:
    """``fedsim COMMAND ...`` lines of the bash blocks (continuations joined, comments dropped), without
    ``fedsim``."""
    commands = []
    for block in code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                tokens = shlex.split(part, comments=True)
                if tokens[:2] == ["fedsim", command]:
                    commands.append(tokens[1:])
    return commands


def simulate_commands() -> list[list[str]]:
    return fedsim_commands("simulate")


def simulate_params():
    import typer.main

    return typer.main.get_command(app).commands["simulate"].params


def test_component_tables_are_generated_from_the_code():
    assert generated_block() == readme_block()


def test_no_removed_flag_or_key():
    """Outside the generated mapping table (old key -> new place), the old flags and keys are gone."""
    text = TEXT.replace(generated_block(), "")
    found = {token: text.count(token) for token in REMOVED if token in text}
    assert not found, f"removed flags/keys still in README.md: {found}"


def test_flag_table_lists_exactly_the_cli_flags():
    start = TEXT.index("`fedsim simulate` flags.")
    table = TEXT[TEXT.index("\n| flag |", start) + 1 :]
    table = table[: table.index("\n\n")]
    documented = set()
    for row in table.splitlines()[2:]:
        documented.update(re.findall(r"--[a-z][a-z0-9-]*", row.split("|")[1]))
    flags = {opt for p in simulate_params() for opt in p.opts if opt.startswith("--")} - {"--help"}
    assert documented == flags, f"missing: {sorted(flags - documented)}, not a flag: {sorted(documented - flags)}"
    for name, (target, _, _) in OPTION_FLAGS.items():  # each shortcut documented as the option it sets
        flag = "--" + name.replace("_", "-")
        rows = [r for r in table.splitlines() if flag in r.split("|")[1]]
        assert rows and f"--set {target}=VALUE" in rows[0], flag


def test_example_config_is_the_shipped_file():
    start = TEXT.index("Example config (`experiments/configs/fedprox_mnist5k.yaml`):")
    block = FENCE.search(TEXT, start)
    assert block.group(2) == "yaml"
    assert block.group(3) == (ROOT / "experiments/configs/fedprox_mnist5k.yaml").read_text(encoding="utf-8")


def test_readme_has_run_configs_and_commands():
    assert len(run_configs()) >= 9
    assert len(simulate_commands()) >= 15


@pytest.mark.parametrize("index,data", run_configs(), ids=lambda v: f"yaml{v}" if isinstance(v, int) else "")
def test_yaml_run_config_validates(index, data):
    data = dict(data)
    if data.get("topology") and not Path(data["topology"]).is_absolute():
        data["topology"] = str(ROOT / data["topology"])
    cfg = make_config(data)
    for key, value in data.items():  # every option written in the README is in the validated config
        if isinstance(value, dict):
            name, options = split_spec(key, value)
            spec = getattr(cfg, key)
            assert spec.name == name
            assert {k: spec.options[k] for k in options} == {
                k: tuple(v) if isinstance(v, list) and isinstance(spec.options[k], tuple) else v
                for k, v in options.items()
            }


def _skip_reason(argv: list[str]) -> str | None:
    """Why a README command is not run here (needs Ray, Flower's engine, several runs, other data, a file that
    only exists on the user's machine)."""
    params = {opt: p for p in simulate_params() for opt in (*p.opts, *p.secondary_opts)}
    values, positional, i = {}, [], 1
    while i < len(argv):
        token = argv[i]
        flag, eq, inline = token.partition("=")
        if flag in params:
            if getattr(params[flag], "is_flag", False):
                values[flag], i = True, i + 1
            else:
                values.setdefault(flag, []).append(inline if eq else argv[i + 1])
                i += 1 if eq else 2
        else:
            positional.append(token)
            i += 1
    if values.get("--executor", [None])[-1] == "ray" or values.get("--backend", [None])[-1] == "flower":
        return "Ray or Flower's engine"
    if {"--seeds", "--probe", "--resume"} & set(values):
        return "repeats, probes and resumes"
    files = positional + values.get("--topology", []) + values.get("--data-path", [])
    missing = [f for f in files if not (ROOT / f).exists()]
    if missing:
        return f"file not in the repository: {missing}"
    if "--dataset" in values:
        dataset = values["--dataset"][-1]
    else:
        dataset = load_config(ROOT / positional[0]).dataset.name if positional else "digits"
    if dataset not in RUNNABLE_DATASETS:
        return f"dataset {dataset}"
    strategy = values.get("--strategy", [""])[-1]
    if strategy.startswith("flwr:"):
        pytest.importorskip("flwr")
    return None


def _one_round(argv: list[str], out: Path) -> list[str]:
    """The command with one round, quiet, into ``out`` (its own --out, --overwrite, --rounds, --quiet dropped)."""
    kept, i = [], 0
    while i < len(argv):
        token = argv[i]
        if token in ("--out", "--rounds"):
            i += 2
            continue
        if token.split("=")[0] in ("--out", "--rounds") or token in ("--overwrite", "--quiet"):
            i += 1
            continue
        kept.append(token)
        i += 1
    return [*kept, "--rounds", "1", "--quiet", "--out", str(out)]


@pytest.mark.parametrize("argv", simulate_commands(), ids=lambda argv: " ".join(argv[1:])[:80])
def test_simulate_command_runs(argv, tmp_path, monkeypatch, capsys):
    reason = _skip_reason(argv)
    if reason:
        pytest.skip(reason)
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("fedsim.plots.plot_run", lambda path: None)  # plots have their own tests; they cost seconds
    code = main(_one_round(argv, tmp_path / "run"))
    err = capsys.readouterr().err
    assert code == 0, err
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


def test_command_line_examples_run_in_order(tmp_path, monkeypatch, capsys):
    """The "Command line" examples (simulate, plot, topology, bench) run as written, one after the other, in an
    empty folder (later lines read what earlier ones wrote)."""
    block = next(b for b in code_blocks("bash") if "fedsim topology build" in b)
    monkeypatch.chdir(tmp_path)
    commands = [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]
    assert {argv[1] for argv in commands} >= {"simulate", "plot", "topology", "bench"}
    for argv in commands:
        assert argv[0] == "fedsim"
        code = main(argv[1:])
        assert code == 0, f"{shlex.join(argv)}: {capsys.readouterr().err}"
    for written in ("cmp.png", "ring16.graphml", "ring16.png", "ring16.json", "runs/dsgd-ring16/metrics.jsonl"):
        assert (tmp_path / written).is_file(), written


@pytest.mark.parametrize("argv", fedsim_commands("list"), ids=lambda argv: " ".join(argv))
def test_list_command_runs(argv, cli, monkeypatch):
    """Every ``fedsim list`` line runs (with the test suite's plugin distribution importable, as the README's
    plugin example has it installed)."""
    from fedsim.core import components

    for kind in components.KINDS:
        components.names(kind)
    saved = {kind: dict(registered) for kind, registered in components._REGISTRY.items()}
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "plugin_dist"))
    try:
        code, out, err = cli(argv)
    finally:
        for kind, registered in saved.items():
            components._REGISTRY[kind] = registered
    assert code == 0, err
    assert argv[-1] in out


def test_virtual_clock_examples_run_in_order(tmp_path, monkeypatch, capsys):
    """The virtual-clock block (two runs, then ``fedsim plot ... --x virtual_time_s`` over them) runs as written,
    line after line, in an empty folder."""
    block = next(b for b in code_blocks("bash") if "--x virtual_time_s" in b)
    monkeypatch.chdir(tmp_path)
    for line in block.splitlines():
        argv = shlex.split(line, comments=True)
        if argv:
            assert main(argv[1:]) == 0, f"{line}: {capsys.readouterr().err}"
    assert (tmp_path / "by-time.png").is_file() and (tmp_path / "runs/dropouts/timeline.png").is_file()


def test_compare_runs_examples_run_in_order(tmp_path, monkeypatch, capsys):
    """The "Compare runs" block (tracked runs, a report of them, a grid sweep, a search) runs as written, line
    after line, in an empty folder."""
    pytest.importorskip("mlflow")
    pytest.importorskip("optuna")
    block = next(b for b in code_blocks("bash") if "fedsim sweep" in b and "fedsim report" in b)
    monkeypatch.chdir(tmp_path)
    for line in block.splitlines():
        argv = shlex.split(line, comments=True)
        code = main(argv[1:])
        assert code == 0, f"{line}: {capsys.readouterr().err}"
    for written in ("runs/tracked/tensorboard", "runs/tracked/mlruns/mlflow.db", "runs/tracked/wandb", "report.html",
                    "sweeps/grid/summary.csv", "sweeps/grid/report.html", "sweeps/search/optuna.db"):  # fmt: skip
        assert (tmp_path / written).exists(), written
