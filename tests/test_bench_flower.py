"""``fedsim bench flower``: the workload's CLI flags give the same config as the Python call, and a tiny run
reports both sides and both ratios (no timing is asserted)."""

from __future__ import annotations

import pytest

from fedsim.benchmarks.versus_flower import WORKLOAD, bench_flower, cli_flags
from fedsim.config import make_config

TINY = {**WORKLOAD, "clients": 3, "rounds": 2, "local_steps": 2}


def test_cli_flags_spell_the_same_config(monkeypatch):
    """The whole-process side runs exactly the workload of the in-call side."""
    import fedsim.simulation
    from fedsim.cli import main
    from fedsim.core.errors import FedsimError

    seen = {}

    def capture(cfg, out, **kwargs):
        seen["cfg"] = cfg
        raise FedsimError("captured")

    monkeypatch.setattr(fedsim.simulation, "simulate", capture)
    assert main(["simulate", *cli_flags(WORKLOAD), "--quiet", "--no-plots", "--out", "unused"]) == 2
    assert seen["cfg"].to_dict() == make_config(WORKLOAD).to_dict()


def test_bench_flower_reports_both_sides():
    pytest.importorskip("flwr")
    result = bench_flower(repeats=1, workload=TINY)
    for key in ("fedsim_call_s", "fedsim_process_s", "fedsim_process_no_plots_s", "flower_call_s", "flower_process_s"):
        assert result[key] > 0, key
    assert result["ratio_call"] == result["flower_call_s"] / result["fedsim_call_s"]
    assert result["ratio_process"] == result["flower_process_s"] / result["fedsim_process_s"]
    assert 0 <= result["flower_final_test_accuracy"] <= 1 and 0 <= result["fedsim_final_test_accuracy"] <= 1


def test_flower_options_without_flower_are_refused(cli):
    code, _, err = cli(["bench", "flower", "--no-flower", "--cpus-per-client", "2"])
    assert code == 2 and "drop it with --no-flower" in err
