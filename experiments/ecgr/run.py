"""Reproduce the ECGR paper's comparisons (and BHerd's) from a table config; write a markdown table and plots.

A table config (``table_*.yaml`` next to this script) names a base config (the paper's setup,
``base.yaml``), an optional grid over config keys (e.g. data sets, or a component option as a dotted key:
``partition.alpha``), the seeds and the methods (rows), each a set of config overrides in the nested form
(``regulator: {name: ecgr, beta: 0.2}``). A method may name the row it is compared with (``vs``);
``X+ECGR`` is compared with ``X`` by default. Every (grid point, method, seed) is one ``fedsim`` run in
``--runs``, in a folder named after a hash of its config's non-default values: runs are kept, so an
interrupted sweep resumes where it stopped, and tables that share a configuration (the FedAvg baseline of
several tables) share its run.

Outputs in ``--out`` (default ``experiments/results/ecgr``), for table ``T``:

- ``T.md``: per grid point and method, final and best test accuracy, the final oscillation (std of test
  accuracy over the last 10 evaluations) and the mean oscillation (that rolling std averaged over all rounds:
  with the step-decayed learning rate the final one is near zero for every method), as mean +- std over
  seeds, rounds to the target accuracy when the table sets one,
  ECGR's damped norm fraction, and the paired difference to the compared row (mean +- std over seeds);
- ``T.json``: the same numbers, the per-round mean curves and the exact protocol (overrides included);
- ``T_<grid point>.png``: test accuracy and client drift per round (mean over seeds, band: min-max).

    python experiments/ecgr/run.py experiments/ecgr/table_main.yaml --jobs 2
    python experiments/ecgr/run.py experiments/ecgr/table_main.yaml --set train_samples=6000 --set lr=0.01
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# experiments/ holds a topologies/ folder of graph files that would shadow the package.
sys.path = [p for p in sys.path if Path(p or ".").resolve() not in (HERE, HERE.parent)]

from fedsim.config import COMPONENT_KEYS, DEFAULTS, load_config, make_config, nest  # noqa: E402
from fedsim.core import components  # noqa: E402
from fedsim.core.errors import FedsimError  # noqa: E402

SUMMARY_KEYS = ("final_test_accuracy", "best_test_accuracy", "final_oscillation")
COMPARED_KEYS = (*SUMMARY_KEYS, "mean_oscillation")


def read_table(path: Path) -> dict[str, Any]:
    table = yaml.safe_load(Path(path).read_text())
    if not isinstance(table, dict) or "methods" not in table:
        raise SystemExit(f"error: {path} is not a table config (needs 'methods')")
    table.setdefault("grid", {})
    table.setdefault("seeds", [0])
    table["name"] = Path(path).stem
    table["base_path"] = str((Path(path).parent / table.get("base", "base.yaml")).resolve())
    return table


def grid_points(grid: dict[str, list]) -> list[dict[str, Any]]:
    """The cartesian product of the grid's value lists, in order."""
    points: list[dict[str, Any]] = [{}]
    for key, values in grid.items():
        points = [{**p, key: v} for p in points for v in values]
    return points


def point_key(point: dict[str, Any]) -> str:
    return "-".join(f"{k}={v}" for k, v in point.items()) or "all"


def slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def compared_with(name: str, method: dict[str, Any]) -> str | None:
    if "vs" in method:
        return method["vs"]
    return name.split("+")[0] if "+" in name else None


def overrides_of(method: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in method.items() if k != "vs"}


def plan_runs(table: dict[str, Any], runs: Path, extra: dict[str, Any], seeds: list[int]) -> list[dict[str, Any]]:
    """Every run of the table: its config (validated now, so a bad table fails before anything runs)."""
    plan = []
    for point in grid_points(table["grid"]):
        for name, method in table["methods"].items():
            for seed in seeds:
                values = {**point, **overrides_of(method), **extra, "seed": seed}
                config = load_config(table["base_path"], values)
                out = runs / f"{config.dataset}-{slug(name)}-s{seed}-{config_digest(config)}"
                plan.append({"point": point, "method": name, "seed": seed, "config": config, "out": out})
    return plan


def config_digest(config) -> str:
    """A short hash of the config's non-default values (run-level keys, and per component its name and the
    options that differ from the component's defaults): a new option with a default does not rename runs."""
    values = config.model_dump(mode="json", exclude_defaults=True)
    for key, kind in COMPONENT_KEYS.items():
        values.pop(key, None)
        spec = getattr(config, key)
        if spec is None:
            continue
        kind = "decentralized" if key == "strategy" and config.topology else kind
        declared = {} if spec.name == components.kind_of(kind).none else components.get(kind, spec.name).options()
        changed = {
            k: v for k, v in spec.options.items()
            if k not in declared or declared[k].is_required() or declared[k].default != v
        }  # fmt: skip
        if spec.name != DEFAULTS[key] or changed:
            values[key] = {"name": spec.name, **changed}
    return hashlib.sha1(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:10]


def is_done(run: dict[str, Any]) -> bool:
    """Finished, with the same resolved config (compared as values, so runs written before an option with a
    default existed still count)."""
    out = run["out"]
    if not (out / "summary.json").exists() or not (out / "config.yaml").exists():
        return False
    try:
        stored = load_config(out / "config.yaml")
    except Exception:  # an unreadable or outdated config: run again
        return False
    return stored.model_dump() == run["config"].model_dump()


def execute(run: dict[str, Any]) -> str:
    """One run in a worker process (single-threaded torch: the sweep parallelizes over runs)."""
    import torch

    from fedsim.core.errors import DivergenceError
    from fedsim.simulation import simulate

    torch.set_num_threads(1)
    try:
        simulate(run["config"], run["out"], overwrite=True, plots=False)
    except DivergenceError:  # the run wrote its metrics and a summary marked "diverged"
        return f"{run['out']} (diverged)"
    return str(run["out"])


def run_all(plan: list[dict[str, Any]], jobs: int) -> None:
    todo = [r for r in plan if not is_done(r)]
    print(f"{len(plan) - len(todo)} of {len(plan)} runs already done; running {len(todo)} with {jobs} job(s)")
    if jobs <= 1:
        for i, r in enumerate(todo, 1):
            execute(r)
            print(f"[{i}/{len(todo)}] {r['out']}", flush=True)
        return
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        for i, out in enumerate(pool.map(execute, todo), 1):
            print(f"[{i}/{len(todo)}] {out}", flush=True)


def read_run(out: Path) -> dict[str, Any]:
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"summary": summary, "rows": rows}


def rounds_to(rows: list[dict[str, Any]], target: float) -> int | None:
    """First round whose test accuracy reaches ``target``."""
    return next((r["round"] for r in rows if r.get("test_accuracy") is not None and r["test_accuracy"] >= target), None)


def stats(values: list[float | None]) -> dict[str, Any]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"n": 0, "mean": None, "std": None}
    return {
        "n": len(finite),
        "mean": float(np.mean(finite)),
        "std": float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0,
    }


def curve(runs: list[dict[str, Any]], key: str) -> dict[str, list[float | None]]:
    """Per-round mean, min and max of a metric over seeds."""
    length = min(len(r["rows"]) for r in runs)
    table = np.array(
        [[np.nan if r["rows"][i].get(key) is None else r["rows"][i][key] for i in range(length)] for r in runs]
    )
    with np.errstate(all="ignore"):
        mean, low, high = np.nanmean(table, 0), np.nanmin(table, 0), np.nanmax(table, 0)
    clean = lambda a: [None if not np.isfinite(v) else float(v) for v in a]  # noqa: E731
    return {"mean": clean(mean), "min": clean(low), "max": clean(high)}


def summarize(table: dict[str, Any], plan: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
    target = table.get("target")
    results: dict[str, Any] = {
        "table": table["name"], "title": table.get("title", table["name"]), "base": table.get("base", "base.yaml"),
        "overrides": extra, "seeds": sorted({r["seed"] for r in plan}), "target": target, "points": [],
    }  # fmt: skip
    for point in grid_points(table["grid"]):
        entry: dict[str, Any] = {"point": point, "key": point_key(point), "methods": {}}
        per_seed: dict[str, dict[int, dict[str, Any]]] = {}
        for name in table["methods"]:
            runs = {r["seed"]: read_run(r["out"]) for r in plan if r["point"] == point and r["method"] == name}
            per_seed[name] = runs
            values: dict[str, list] = {key: [run["summary"].get(key) for run in runs.values()] for key in SUMMARY_KEYS}
            values["mean_oscillation"] = [
                float(np.mean([row["oscillation"] for row in run["rows"] if row.get("oscillation") is not None]))
                for run in runs.values()
            ]
            values["mean_drift"] = [
                float(np.mean([row["drift"] for row in run["rows"] if row.get("drift") is not None]))
                for run in runs.values()
            ]
            damped = [
                [row["damped_norm_fraction"] for row in run["rows"] if row.get("damped_norm_fraction") is not None]
                for run in runs.values()
            ]
            if any(damped):
                values["damped_norm_fraction"] = [float(np.mean(d)) if d else None for d in damped]
            if target is not None:
                values["rounds_to_target"] = [rounds_to(run["rows"], target) for run in runs.values()]
            values["diverged"] = [float(bool(run["summary"].get("diverged"))) for run in runs.values()]
            entry["methods"][name] = {
                "stats": {k: stats(v) for k, v in values.items()},
                "per_seed": {str(s): {k: values[k][i] for k in values} for i, s in enumerate(runs)},
                "curves": {k: curve(list(runs.values()), k) for k in ("test_accuracy", "drift")},
            }
        for name, method in table["methods"].items():
            other = compared_with(name, method)
            if other is None or other not in per_seed:
                continue
            diffs: dict[str, list] = {}
            mine, theirs = entry["methods"][name]["per_seed"], entry["methods"][other]["per_seed"]
            for key in COMPARED_KEYS:
                pairs = [(mine[s][key], theirs[s][key]) for s in mine if s in theirs]
                diffs[key] = [a - b if a is not None and b is not None else None for a, b in pairs]
            entry["methods"][name]["vs"] = {"method": other, **{k: stats(v) for k, v in diffs.items()}}
        results["points"].append(entry)
    return results


def fmt(s: dict[str, Any], scale: float = 100.0, digits: int = 2) -> str:
    if s.get("mean") is None:
        return "n/a"
    return f"{s['mean'] * scale:.{digits}f} ± {s['std'] * scale:.{digits}f}"


def markdown(results: dict[str, Any]) -> str:
    lines = [f"# {results['title']}", ""]
    lines.append(
        f"Base config `experiments/ecgr/{results['base']}`; overrides {json.dumps(results['overrides']) or '{}'}; "
        f"seeds {results['seeds']}. Accuracies and oscillations in percentage points, mean ± std over seeds; "
        "final osc. = std of test accuracy over the last 10 rounds, mean osc. = that rolling std averaged over "
        "all rounds; Δ is the paired difference to the compared row (same seed, same data split)."
    )
    target = results.get("target")
    for entry in results["points"]:
        lines += ["", f"## {entry['key']}", ""]
        head = (
            "| method | final acc | best acc | final osc. | mean osc. | mean drift | damped norm "
            "| Δ final | Δ best | Δ mean osc. |"
        )
        if target is not None:
            head += f" rounds to {target:.0%} |"
        lines.append(head)
        lines.append("|" + "---|" * (head.count("|") - 1))
        for name, m in entry["methods"].items():
            st, vs = m["stats"], m.get("vs")
            damped = fmt(st["damped_norm_fraction"], 1.0) if "damped_norm_fraction" in st else ""
            row = [
                name, fmt(st["final_test_accuracy"]), fmt(st["best_test_accuracy"]), fmt(st["final_oscillation"]),
                fmt(st["mean_oscillation"]), fmt(st["mean_drift"], 1.0), damped,
                fmt(vs["final_test_accuracy"]) if vs else "", fmt(vs["best_test_accuracy"]) if vs else "",
                fmt(vs["mean_oscillation"]) if vs else "",
            ]  # fmt: skip
            if target is not None:
                reached = [v for v in m["per_seed"].values() if v["rounds_to_target"] is not None]
                total = len(m["per_seed"])
                text = fmt(st["rounds_to_target"], 1.0, 1) + f" ({len(reached)}/{total} reached)"
                row.append(text)
            diverged = int(sum(v["diverged"] for v in m["per_seed"].values()))
            if diverged:
                row[0] += f" ({diverged} of {len(m['per_seed'])} diverged)"
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    arr = lambda a: np.array([np.nan if v is None else v for v in a])  # noqa: E731
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for entry in results["points"]:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        hosts = list(dict.fromkeys(m.get("vs", {}).get("method", name) for name, m in entry["methods"].items()))
        for name, m in entry["methods"].items():
            compared = m.get("vs", {}).get("method")
            # a host and its "+ECGR" row share a colour (dashed host, solid regulated); ablation rows get their own
            group = compared if compared is not None and "+" in name else name
            color = palette[(hosts.index(group) if group in hosts else len(hosts) + list(entry["methods"]).index(name))
                            % len(palette)]  # fmt: skip
            for ax, key in zip(axes, ("test_accuracy", "drift"), strict=True):
                c = m["curves"][key]
                x = np.arange(1, len(c["mean"]) + 1)
                ax.plot(x, arr(c["mean"]), label=name, lw=1.3, color=color, ls="-" if compared else "--")
                ax.fill_between(x, arr(c["min"]), arr(c["max"]), color=color, alpha=0.10, lw=0)
        axes[0].set(xlabel="round", ylabel="test accuracy", title=f"{results['table']}: {entry['key']}")
        axes[1].set(xlabel="round", ylabel="client drift", yscale="log", title="client drift (mean over seeds)")
        axes[0].legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = folder / f"{results['table']}_{slug(entry['key'])}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def parse_set(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --set expects KEY=VALUE, got {item!r}")
        out[key.replace("-", "_")] = yaml.safe_load(value)
    try:  # validate run-level keys, component names and dotted keys early; a component option
        nest(out)  # (regulator.rho) is validated with each method's component when the runs are planned
        make_config({k: v for k, v in out.items() if "." not in k})
    except FedsimError as err:
        raise SystemExit(f"error: {err}") from None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", type=Path, help="table config (experiments/ecgr/table_*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override KEY=VALUE")
    parser.add_argument("--seeds", help="comma-separated seeds (default: the table's)")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (one torch thread each)")
    parser.add_argument("--runs", type=Path, default=HERE / "runs", help="where the individual runs live")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "ecgr")
    parser.add_argument("--report-only", action="store_true", help="only summarize finished runs")
    args = parser.parse_args(argv)
    table = read_table(args.table)
    extra = parse_set(args.overrides)
    for key in extra:  # an override of a grid key collapses that axis to the override
        if key in table["grid"]:
            table["grid"][key] = [extra[key]]
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [int(s) for s in table["seeds"]]
    try:
        plan = plan_runs(table, args.runs, extra, seeds)
    except FedsimError as err:
        raise SystemExit(f"error: {err}") from None
    if not args.report_only:
        run_all(plan, args.jobs)
    missing = [str(r["out"]) for r in plan if not is_done(r)]
    if missing:
        raise SystemExit(f"error: {len(missing)} runs are not finished, e.g. {missing[0]}")
    results = summarize(table, plan, extra)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{table['name']}.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / f"{table['name']}.md").write_text(markdown(results))
    for path in plot(results, args.out):
        print(f"wrote {path}")
    print(f"wrote {args.out / (table['name'] + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
