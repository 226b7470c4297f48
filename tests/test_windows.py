"""Availability windows in virtual time (fedsim.windows, ``system.availability``): the file and its errors,
synchronous selection among online clients, clients going offline mid-round, waiting for the next window,
asynchronous dispatch of online clients only, and an exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedsim.core.errors import FedsimError
from fedsim.simulation import simulate
from fedsim.windows import read_windows

SMALL = dict(dataset="digits", clients=6, rounds=6, local_steps=3, batch_size=8, seed=1, sampler="iid",
             model={"name": "mlp", "hidden": [16]}, checkpoint_every=0)  # fmt: skip
HEADER = "client,start_s,end_s\n"


def write(tmp_path, rows, name="w.csv"):
    path = tmp_path / name
    path.write_text(HEADER + "".join(",".join(str(v) for v in row) + "\n" for row in rows))
    return str(path)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_windows_answer_who_is_online(tmp_path):
    w = read_windows(write(tmp_path, [(0, 0, "inf"), (1, 0, 0.5), (1, 2, 3), (2, 1, 4)]))
    assert w.online(0.0, 3).tolist() == [0, 1] and w.online(1.0, 3).tolist() == [0, 2]
    assert w.online(2.5, 3).tolist() == [0, 1, 2]
    assert w.online_until(np.array([0, 1, 2]), 0.2).tolist() == [np.inf, 0.5, 0.2]
    assert w.next_start(0.5) == 1.0 and w.next_start(3.0) is None


@pytest.mark.parametrize(
    "text, message",
    [
        ("client,start_s\n0,1\n", "line 1: missing column(s) end_s"),
        (HEADER + "0,1,x\n", "line 2, column end_s: 'x' is not a number"),
        (HEADER + "0,1,2\n-1,0,1\n", "line 3, column client: client ids are integers >= 0"),
        (HEADER + "0,2,1\n", "line 2, column end_s: must be after start_s (2)"),
        (HEADER + "0,-1,1\n", "line 2, column start_s: must be finite and >= 0"),
        (HEADER, "no rows"),
    ],
)
def test_bad_window_files_name_file_line_and_column(tmp_path, text, message):
    path = tmp_path / "w.csv"
    path.write_text(text)
    with pytest.raises(FedsimError, match="availability windows .*w.csv") as err:
        read_windows(path)
    assert message in str(err.value)


def test_synchronous_rounds_select_online_clients_and_lose_those_that_go_offline(tmp_path):
    rows = [(0, 0, "inf"), (1, 0, 0.05), (2, 0.1, "inf"), (3, 0, "inf"), (4, 0.3, 0.6), (5, 0, 0.2)]
    path = write(tmp_path, rows)
    simulate({**SMALL, "system": {"name": "uniform", "availability": path}}, tmp_path / "run", plots=False)
    windows = read_windows(path)
    clock = 0.0
    for record in metrics(tmp_path / "run"):
        online = windows.online(clock, 6)
        assert record["available_clients"] == len(online)
        assert {e[0] for e in record["timeline"]} <= set(online.tolist())
        for client, start, download, compute, upload, status in record["timeline"]:
            end = windows.online_until(np.array([client]), clock)[0]
            assert (status == "offline") == (start + download + compute + upload > end)
            if status == "offline":
                assert record["wasted_samples"] > 0 and upload == 0.0
        clock = record["virtual_time_s"]
    assert any(e[5] == "offline" for r in metrics(tmp_path / "run") for e in r["timeline"])


def test_a_round_without_online_clients_waits_for_the_next_window(tmp_path):
    path = write(tmp_path, [(0, 5, "inf"), (1, 7, "inf")])
    simulate({**SMALL, "rounds": 2, "system": {"name": "uniform", "availability": path}}, tmp_path / "run",
             plots=False)  # fmt: skip
    first, second = metrics(tmp_path / "run")
    assert first["clients"] == 0 and first["round_time_s"] == 5.0 and first["virtual_time_s"] == 5.0
    assert second["clients"] == 1 and second["available_clients"] == 1


def test_windows_that_all_close_stop_the_run_in_one_line(tmp_path, cli):
    path = write(tmp_path, [(0, 0, 0.01)])
    code, _, err = cli(["simulate", "--clients", "6", "--rounds", "3", "--set", f"system.availability={path}",
                        "--quiet", "--no-plots", "--out", str(tmp_path / "run")])  # fmt: skip
    assert code == 2 and "availability windows" in err and "have all closed" in err
    assert len(err.strip().splitlines()) == 1
    too_many = write(tmp_path, [(9, 0, 1)], "many.csv")
    code, _, err = cli(["simulate", "--clients", "6", "--rounds", "1", "--set", f"system.availability={too_many}",
                        "--quiet", "--no-plots", "--out", str(tmp_path / "run2")])  # fmt: skip
    assert code == 2 and "name client 9, the run has 6" in err


def test_asynchronous_dispatch_only_online_clients_and_resume_exactly(tmp_path, cli):
    path = write(tmp_path, [(0, 0, "inf"), (1, 0, 0.3), (2, 0, "inf"), (3, 0.2, "inf"), (4, 0, 0.25),
                            (5, 1.0, "inf")])  # fmt: skip
    flags = ["--clients", "6", "--local-steps", "3", "--strategy", "fedbuff", "--set", "strategy.concurrency=3",
             "--set", "strategy.buffer_size=2", "--system", "lognormal", "--set", f"system.availability={path}",
             "--quiet", "--no-plots", "--checkpoint-every", "2"]  # fmt: skip
    assert cli(["simulate", *flags, "--rounds", "8", "--out", str(tmp_path / "full")])[0] == 0
    assert cli(["simulate", *flags, "--rounds", "3", "--out", str(tmp_path / "part")])[0] == 0
    assert cli(["simulate", "--resume", str(tmp_path / "part"), "--rounds", "8", "--quiet", "--no-plots"])[0] == 0
    full, part = metrics(tmp_path / "full"), metrics(tmp_path / "part")
    for a, b in zip(full, part, strict=True):
        a.pop("time_s"), b.pop("time_s")
        assert a == b
    windows = read_windows(path)
    for record in full:
        for client, start, download, compute, upload, _ in record["timeline"]:
            assert client in windows.online(start, 6)  # started while online
            assert start + download + compute + upload <= windows.online_until(np.array([client]), start)[0]
    assert sum(r["wasted_samples"] for r in full) > 0  # clients 1 and 4 go offline in flight


def test_windows_are_refused_where_they_would_be_ignored(tmp_path, cli):
    import networkx as nx

    path = write(tmp_path, [(0, 0, "inf")])
    ring = tmp_path / "ring.edgelist"
    nx.write_edgelist(nx.cycle_graph(4), ring, data=False)
    for flags, message in (
        (["--topology", str(ring)], "apply to federated rounds, not to training over a topology"),
        (["--backend", "flower"], "--backend flower runs federated fedsim strategies"),
    ):
        code, _, err = cli(["simulate", "--rounds", "1", "--clients", "4", "--set", f"system.availability={path}",
                            "--quiet", "--out", str(tmp_path / "r"), *flags])  # fmt: skip
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
