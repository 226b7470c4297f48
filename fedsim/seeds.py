"""Repeats of one experiment over seeds, with quantiles of the final metrics (``fedsim simulate --seeds 0-9``).

Seed ``s`` runs the experiment with ``seed: s`` (everything else unchanged) into ``OUT/seed-<s>/``, an ordinary
results folder (or a stability-probe folder, see :mod:`fedsim.probes`). Then, over the seeds:

- ``OUT/seeds_summary.json``: for every numeric key of the runs' ``summary.json`` (section ``final``) and every
  numeric metric of the last record of their ``metrics.jsonl`` (section ``last``, e.g. ``consensus_distance``,
  ``generalization_gap``): ``n`` (runs with a finite value), ``mean``, ``std`` (sample standard deviation,
  ``ddof=1``; 0 for a single value), ``min``, ``median``, ``q90``, ``q99``, ``max``. Quantiles are
  ``numpy.quantile(..., method="linear")``: linear interpolation between order statistics (Hyndman & Fan type 7),
  so with few seeds ``q90``/``q99`` lie between the two largest values;
- ``OUT/seeds.csv``: one row per seed with those values (last-record metrics prefixed ``last.``);
- ``OUT/seeds.png``: per round, the median over seeds with 10-90% and min-max bands.

``OUT/seeds_config.yaml`` (seeds, probe, base config) is written first: it marks the folder as a fedsim
results folder, so ``overwrite`` may replace it later, like a single run's folder.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedsim.config import RunConfig, make_config
from fedsim.core.errors import FedsimError
from fedsim.parallel import check_jobs, run_parallel
from fedsim.probes import PROBE_OPTIONS, check_probe, check_probe_options, run_stability_probe
from fedsim.results import SEEDS_FILE, SUMMARY_FILE, ResultsDir, read_metrics
from fedsim.simulation import RoundCallback, simulate

SEEDS_SUMMARY = "seeds_summary.json"
SEEDS_CSV = "seeds.csv"
SEEDS_PLOT = "seeds.png"
MAX_SEEDS = 10_000
QUANTILES = {"median": 0.5, "q90": 0.9, "q99": 0.99}
QUANTILE_METHOD = "linear"
BAND_METRICS = ("test_accuracy", "generalization_gap", "consensus_distance", "stability_distance")
_ITEM = re.compile(r"(\d+)(?:\s*-\s*(\d+))?")


def parse_seeds(text: str) -> list[int]:
    """Seeds from ``"0-9"`` (inclusive range), ``"0,3,7"``, ``"1-3,8"``; non-negative, ascending ranges, no
    duplicates, at most ``MAX_SEEDS``. Anything else is a one-line :class:`FedsimError`."""
    if not text or not text.strip():
        raise FedsimError("--seeds is empty; give seeds like 0-9, 0,3,7 or 1-3,8")
    seeds: list[int] = []
    for item in (part.strip() for part in text.split(",")):
        match = _ITEM.fullmatch(item)
        if not match:
            raise FedsimError(
                f"bad --seeds item {item!r} in {text!r}: expected N or A-B with non-negative integers (e.g. 0-9, 1-3,8)"
            )
        first = int(match[1])
        last = int(match[2]) if match[2] is not None else first
        if last < first:
            raise FedsimError(f"descending seed range {item!r} in --seeds; write {last}-{first}")
        if len(seeds) + last - first + 1 > MAX_SEEDS:
            raise FedsimError(f"--seeds {text!r} names more than {MAX_SEEDS} seeds")
        seeds.extend(range(first, last + 1))
    return check_seeds(seeds)


def check_seeds(seeds: Iterable[int]) -> list[int]:
    """A non-empty list of distinct non-negative integers, in the given order."""
    seeds = list(seeds)
    if not seeds:
        raise FedsimError("no seeds given")
    seen: set[int] = set()
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int | np.integer) or s < 0:
            raise FedsimError(f"seeds must be non-negative integers, got {s!r}")
        if s in seen:
            raise FedsimError(f"seed {s} is given twice")
        seen.add(int(s))
    return [int(s) for s in seeds]


def statistics(values: Sequence[float]) -> dict[str, float | int]:
    """n, mean, std (ddof=1; 0 for one value), min, median, q90, q99, max of finite values (numpy, linear)."""
    a = np.asarray(values, dtype=np.float64)
    q = np.quantile(a, list(QUANTILES.values()), method=QUANTILE_METHOD)
    return {
        "n": int(a.size),
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
        "min": float(a.min()),
        **{name: float(v) for name, v in zip(QUANTILES, q, strict=True)},
        "max": float(a.max()),
    }


def _numeric(record: Mapping[str, Any], skip: tuple[str, ...] = ()) -> dict[str, float]:
    return {
        k: v
        for k, v in record.items()
        if k not in skip and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


def final_values(run_dir: Path) -> tuple[dict[str, float], dict[str, float]]:
    """Numeric values of a run's ``summary.json`` and of the last record of its ``metrics.jsonl``."""
    path = run_dir / SUMMARY_FILE
    summary = json.loads(path.read_text()) if path.is_file() else {}
    records = read_metrics(run_dir)
    return _numeric(summary), _numeric(records[-1] if records else {}, skip=("round",))


def summarize_seeds(run_dirs: Sequence[str | Path], seeds: Sequence[int]) -> tuple[dict[str, Any], list[dict]]:
    """The seeds summary (see the module docstring) and the per-seed rows of ``seeds.csv``."""
    rows, finals, lasts = [], [], []
    for seed, run in zip(seeds, run_dirs, strict=True):
        final, last = final_values(Path(run))
        finals.append(final)
        lasts.append(last)
        rows.append({"seed": seed, **final, **{f"last.{k}": v for k, v in last.items()}})

    def section(per_run: list[dict[str, float]]) -> dict[str, Any]:
        keys = list(dict.fromkeys(k for values in per_run for k in values))
        return {k: statistics([values[k] for values in per_run if k in values]) for k in keys}

    report = {
        "seeds": list(seeds),
        "runs": [Path(r).name for r in run_dirs],
        "statistics": "n, mean, std (ddof=1), min, median, q90, q99, max over seeds; quantiles by "
        f"numpy.quantile(method='{QUANTILE_METHOD}'), linear interpolation between order statistics",
        "final": section(finals),
        "last": section(lasts),
    }
    return report, rows


def csv_text(rows: list[dict]) -> str:
    """``rows`` as CSV text: the columns in first-seen order, floats written exactly (``repr``)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: repr(v) if isinstance(v, float) else v for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def run_seeds(
    config: RunConfig | Mapping[str, Any],
    seeds: Iterable[int],
    out: str | Path,
    *,
    overwrite: bool = False,
    on_round: RoundCallback | None = None,
    probe: str | None = None,
    probe_options: Mapping[str, Any] | None = None,
    plots: bool = True,
    jobs: int = 1,
) -> dict[str, Any]:
    """Run the experiment once per seed into ``OUT/seed-<s>/`` (the stability probe with ``probe="stability"``
    and ``probe_options`` such as ``node``/``sample``) and write the seeds summary, CSV and band plot.

    ``jobs`` > 1 runs that many seeds at once in worker processes that divide the CPUs between them
    (:mod:`fedsim.parallel`); with a fixed ``threads`` every folder is the same as with ``jobs=1``.

    Returns the seeds summary. ``on_round`` receives each round's record with an extra ``seed`` key. Bad
    input (seeds, config, probe name and options) fails before anything is written; a probe sample that is out
    of range for one seed's partition fails when that seed's run is set up.
    """
    base = config if isinstance(config, RunConfig) else make_config(dict(config))
    seeds = check_seeds(seeds)
    check_jobs(jobs)
    configs = {s: make_config({**base.model_dump(exclude_unset=True), "seed": s}) for s in seeds}
    options = dict(probe_options or {})
    if probe is not None:
        check_probe(probe)
        extra = sorted(set(options) - set(PROBE_OPTIONS))
        if extra:
            raise FedsimError(f"unknown probe option {extra[0]!r}; choose from: {', '.join(PROBE_OPTIONS)}")
        check_probe_options(**options)
    elif options:
        raise FedsimError("probe options need a probe (probe='stability')")
    ResultsDir.check_new(out, overwrite)
    folder = ResultsDir.create(out, overwrite=overwrite)
    marker = {"seeds": seeds, "probe": probe, "probe_options": options, "config": base.model_dump(mode="json")}
    marker["config"].pop("seed")
    folder.write_text(SEEDS_FILE, yaml.safe_dump(marker, sort_keys=False))

    run_dirs = [folder.path / f"seed-{s}" for s in seeds]
    run = run_stability_probe if probe is not None else simulate
    kwargs = {"plots": plots, **options}
    tasks = [(run, (configs[s], path), kwargs) for s, path in zip(seeds, run_dirs, strict=True)]
    callback = None
    if on_round is not None:
        callback = lambda record: on_round({**{k: v for k, v in record.items() if k != "task"},  # noqa: E731
                                            "seed": seeds[record["task"]]})  # fmt: skip
    run_parallel(tasks, jobs, callback, labels=[str(path) for path in run_dirs])

    report, rows = summarize_seeds(run_dirs, seeds)
    folder.write_json(SEEDS_SUMMARY, report)
    folder.write_text(SEEDS_CSV, csv_text(rows))
    if plots:
        from fedsim.plots import plot_seed_bands

        plot_seed_bands(run_dirs, BAND_METRICS, folder.path / SEEDS_PLOT)
    return report
