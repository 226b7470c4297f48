"""System heterogeneity on the virtual clock (fedsim.system): the models, trace files and their errors, the
exact duration formula, synchronous round time = slowest selected client, virtual_time_s, time_to_accuracy,
participation, and that a system model changes nothing but the time fields."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedsim.config import make_config
from fedsim.core.errors import FedsimError
from fedsim.rounds import participation_stats, time_to_accuracy
from fedsim.simulation import make_simulation, simulate
from fedsim.system import ClientProfiles, durations, lognormal, pareto, read_trace, trace, uniform

SMALL = dict(dataset="digits", clients=6, rounds=3, local_steps=3, batch_size=8, fraction=0.5, seed=2,
             model={"name": "mlp", "hidden": [16]}, checkpoint_every=0)  # fmt: skip
TIME_FIELDS = {"round_time_s", "virtual_time_s", "time_s", "timeline"}
HEADER = "client,compute_s_per_sample,down_mbps,up_mbps,latency_s\n"


def write_trace(path, rows, header=HEADER):
    path.write_text(header + "".join(",".join(str(v) for v in row) + "\n" for row in rows))
    return str(path)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_duration_is_the_formula():
    p = ClientProfiles(*(np.array(v, dtype=float) for v in ([1e-3, 2e-3], [10.0, 1.0], [5.0, 2.0], [0.1, 0.0])))
    got = durations(p, np.array([1, 0]), [1000, 2000], [500, 800], [30, 40])
    expected = [0.0 + 1000 * 8 / 1e6 + 30 * 2e-3 + 500 * 8 / 2e6, 0.1 + 2000 * 8 / 10e6 + 40 * 1e-3 + 800 * 8 / 5e6]
    np.testing.assert_allclose(got, expected, rtol=1e-15)


def test_synchronous_round_lasts_as_long_as_the_slowest_selected_client(tmp_path):
    rows = [(k, 1e-3 * (k + 1), 10.0 + k, 2.0 + k, 0.01 * k) for k in range(6)]
    path = write_trace(tmp_path / "trace.csv", rows[::-1])  # any row order
    config = {**SMALL, "system": {"name": "trace", "path": path}}
    out = tmp_path / "run"
    simulate(config, out, plots=False)
    sim = make_simulation(make_config(config))
    state = sim.initial_state()
    records = metrics(out)
    for record in records:
        plan = sim.strategy.configure(record["round"], state, 6, SMALL["seed"])
        ids = plan.client_ids
        samples = SMALL["local_steps"] * np.minimum(SMALL["batch_size"], sim.store.sizes[ids])  # shuffle, steps
        up = down = sim.model_bytes
        expected = max(
            rows[k][4] + down * 8 / (rows[k][2] * 1e6) + s * rows[k][1] + up * 8 / (rows[k][3] * 1e6)
            for k, s in zip(ids, samples, strict=True)
        )
        assert record["round_time_s"] == pytest.approx(expected, rel=1e-12)
        assert record["bytes_up"] == len(ids) * up
    assert [r["virtual_time_s"] for r in records] == pytest.approx(np.cumsum([r["round_time_s"] for r in records]))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["virtual_time_s"] == records[-1]["virtual_time_s"]


def test_a_system_model_changes_only_the_time_fields(tmp_path):
    simulate(SMALL, tmp_path / "uniform", plots=False)
    simulate({**SMALL, "system": {"name": "lognormal", "sigma": 1.5}}, tmp_path / "slow", plots=False)
    a, b = metrics(tmp_path / "uniform"), metrics(tmp_path / "slow")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIME_FIELDS} for r in rows]  # noqa: E731
    assert strip(a) == strip(b)
    assert [r["round_time_s"] for r in a] != [r["round_time_s"] for r in b]


def test_lognormal_and_pareto_draws():
    assert np.array_equal(lognormal(sigma=0.0).profiles(50).down_mbps, uniform().profiles(50).down_mbps)
    big = lognormal(sigma=1.0, seed=3).profiles(20_000)
    assert np.median(big.compute_s_per_sample) == pytest.approx(1e-3, rel=0.05)
    assert np.std(np.log(big.up_mbps)) == pytest.approx(1.0, rel=0.05)
    small = lognormal(sigma=1.0, seed=3).profiles(100)  # a pure function of (seed, client)
    assert np.array_equal(small.latency_s, big.latency_s[:100])
    assert not np.array_equal(small.latency_s, lognormal(sigma=1.0, seed=4).profiles(100).latency_s)
    heavy = pareto(shape=1.5, seed=1).profiles(20_000)
    assert np.median(heavy.compute_s_per_sample) == pytest.approx(1e-3, rel=0.05)
    assert heavy.compute_s_per_sample.max() > 50 * 1e-3  # heavy tail: P(f > 50) = (50 * 2^(2/3))^-1.5 ~ 1e-3
    assert (heavy.down_mbps <= 20.0 * 2 ** (1 / 1.5) + 1e-9).all()  # bandwidth = median / slowdown, f >= 2^-1/a


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("client,compute_s_per_sample,down_mbps,up_mbps\n0,1,1,1\n", "line 1: missing column(s) latency_s"),
        (HEADER + "0,0.001,10,x,0.1\n", "line 2, column up_mbps: 'x' is not a number"),
        (HEADER + "0,0.001,10,5,0.1\n1,0.001,0,5,0.1\n", "line 3, column down_mbps: must be finite and > 0"),
        (HEADER + "0,-0.001,10,5,0.1\n", "line 2, column compute_s_per_sample: must be finite and > 0"),
        (HEADER + "0,0.001,10,5,-1\n", "column latency_s: must be finite and >= 0"),
        (HEADER + "0,0.001,10,5,nan\n", "column latency_s: must be finite"),
        (HEADER + "0,0.001,10,5,0.1\n0,0.001,10,5,0.1\n", "line 3, column client: client 0 already on line 2"),
        (HEADER + "0,0.001,10,5,0.1\n2,0.001,10,5,0.1\n", "no row for client 1"),
        (HEADER + "0.5,0.001,10,5,0.1\n", "client ids are integers >= 0"),
        (HEADER + "0,0.001,10\n", "line 2, column up_mbps: missing value"),
        (HEADER, "no client rows"),
    ],
)
def test_bad_traces_are_refused_naming_file_line_and_column(tmp_path, text, message):
    path = tmp_path / "t.csv"
    path.write_text(text)
    with pytest.raises(FedsimError, match="system trace .*t.csv") as err:
        read_trace(path)
    assert message in str(err.value)


def test_trace_must_fit_the_run_and_the_cli_says_so_in_one_line(tmp_path, cli):
    path = write_trace(tmp_path / "t.csv", [(k, 1e-3, 10, 5, 0.1) for k in range(4)])
    with pytest.raises(FedsimError, match="has 4 clients"):
        trace(path).profiles(6)
    code, _, err = cli(["simulate", "--clients", "6", "--rounds", "1", "--system", "trace", "--set",
                        f"system.path={path}", "--quiet", "--out", str(tmp_path / "run")])  # fmt: skip
    assert code == 2 and "has 4 clients (0..3), the run has 6" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = cli(["simulate", "--rounds", "1", "--system", "lognormal", "--set", "system.sigma=-1", "--quiet",
                        "--out", str(tmp_path / "run2")])  # fmt: skip
    assert code == 2 and "sigma" in err


def test_time_to_accuracy_and_participation():
    history = [
        {"virtual_time_s": 1.0, "test_accuracy": 0.4},
        {"virtual_time_s": 2.5, "test_accuracy": None},
        {"virtual_time_s": 3.0, "test_accuracy": 0.75},
        {"virtual_time_s": 4.0, "test_accuracy": 0.72},
    ]
    assert time_to_accuracy(history) == {"0.5": 3.0, "0.7": 3.0, "0.8": None, "0.9": None}
    assert participation_stats(np.array([2, 2, 2])) == {"min": 2, "median": 2.0, "max": 2, "gini": 0.0}
    stats = participation_stats(np.array([0, 0, 0, 4]))
    assert stats["gini"] == pytest.approx(0.75) and stats["max"] == 4  # one client holds everything: (n-1)/n


def test_participation_and_virtual_time_survive_a_resume(tmp_path, cli):
    flags = ["--clients", "6", "--fraction", "0.5", "--local-steps", "2", "--system", "lognormal", "--quiet",
             "--no-plots", "--checkpoint-every", "1"]  # fmt: skip
    assert cli(["simulate", *flags, "--rounds", "4", "--out", str(tmp_path / "full")])[0] == 0
    assert cli(["simulate", *flags, "--rounds", "2", "--out", str(tmp_path / "part")])[0] == 0
    assert cli(["simulate", "--resume", str(tmp_path / "part"), "--rounds", "4", "--quiet", "--no-plots"])[0] == 0
    full, part = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("full", "part"))
    assert part["participation"] == full["participation"] and full["participation"]["max"] > 0
    assert part["virtual_time_s"] == full["virtual_time_s"] > 0
    assert [r["virtual_time_s"] for r in metrics(tmp_path / "part")] == [
        r["virtual_time_s"] for r in metrics(tmp_path / "full")
    ]
