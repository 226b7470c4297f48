"""``fedsim report``: one self-contained HTML file, checked in a real headless browser (Debian's chromium): a
screenshot, no console errors, the expected number of rendered plots, and the page's JSON equal to metrics.jsonl.
Without chromium the browser tests skip with the reason; .ci/run installs it."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fedsim.report import build_report, expected_plots, load_group, numeric_metrics
from fedsim.results import read_metrics
from fedsim.simulation import simulate

pytest.importorskip("plotly")
pytest.importorskip("jinja2")

RUN = {"clients": 6, "rounds": 3, "local_steps": 2, "batch_size": 8, "checkpoint_every": 0}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two federated runs, a --seeds folder and a decentralized run over a ring."""
    import networkx as nx

    root = tmp_path_factory.mktemp("report")
    simulate({**RUN, "strategy": "fedavg"}, root / "fedavg", plots=False)
    simulate({**RUN, "strategy": "fedprox"}, root / "fedprox", plots=False)
    from fedsim.seeds import run_seeds

    run_seeds({**RUN, "rounds": 2}, [0, 1], root / "seeds", plots=False)
    nx.write_graphml(nx.cycle_graph(6), root / "ring.graphml")
    simulate({**RUN, "topology": str(root / "ring.graphml")}, root / "ring", plots=False)
    return root


def test_the_page_is_self_contained_and_embeds_metrics_jsonl(runs, tmp_path):
    out = build_report([runs / "fedavg", runs / "fedprox"], tmp_path / "report.html")
    page = out.read_text()
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=|@import", page)  # nothing fetched: no CDN
    assert "Plotly" in page and len(page) > 1_000_000  # plotly's bundle inlined
    payload = re.search(r'<script id="fedsim-data" type="application/json">(.*?)</script>', page, re.S).group(1)
    data = json.loads(payload)
    assert [g["name"] for g in data["groups"]] == ["fedavg", "fedprox"]
    assert data["groups"][0]["runs"][0]["metrics"] == read_metrics(runs / "fedavg")
    # the config diff shows the one key that differs, first
    assert re.search(r'<tr class="differs"><td>strategy.name</td><td>&#34;fedavg&#34;</td><td>&#34;fedprox&#34;</td>',
                     page)  # fmt: skip
    assert "None: every run finished its rounds." in page


def test_x_axes_of_a_run(runs):
    from fedsim.report import load_run

    run = load_run(runs / "fedavg")
    records = read_metrics(runs / "fedavg")
    assert run["x"]["round"] == [1, 2, 3]
    assert run["x"]["samples"] == [6 * 2 * 8 * k for k in (1, 2, 3)]  # clients x local steps x batch size
    assert run["x"]["total_mb"][-1] == pytest.approx(sum(r["bytes_up"] + r["bytes_down"] for r in records) / 1e6)
    assert run["x"]["virtual_time_s"] == [r["virtual_time_s"] for r in records]


def test_seed_bands_and_warnings(runs, tmp_path):
    group = load_group(runs / "seeds")
    assert group["seeds"] and [r["name"] for r in group["runs"]] == ["seeds/seed-0", "seeds/seed-1"]
    band = group["bands"]["train_loss"]
    losses = [[r["train_loss"] for r in read_metrics(runs / "seeds" / f"seed-{s}")] for s in (0, 1)]
    assert band["round"] == [1, 2]
    assert band["min"] == [min(a, b) for a, b in zip(*losses, strict=True)]
    assert band["max"] == [max(a, b) for a, b in zip(*losses, strict=True)]
    # a run stopped after 2 of 3 rounds, and one that diverged, are flagged
    short = tmp_path / "short"
    shutil.copytree(runs / "fedavg", short)
    lines = (short / "metrics.jsonl").read_text().splitlines()
    (short / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    summary = json.loads((short / "summary.json").read_text())
    (short / "summary.json").write_text(json.dumps({**summary, "interrupted": True, "rounds_completed": 2}))
    page = build_report([short], tmp_path / "r.html").read_text()
    assert "short: interrupted after round 2" in html.unescape(page)


def test_report_of_a_folder_that_is_not_a_run_is_one_line(runs, tmp_path, cli):
    (tmp_path / "empty").mkdir()
    code, _, err = cli(["report", str(runs / "fedavg"), str(tmp_path / "empty"), "-o", str(tmp_path / "r.html")])
    assert code == 2 and "is not a fedsim results folder" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.html").exists()
    code, _, err = cli(["report", str(runs / "fedavg"), "-o", str(tmp_path / "r.png")])
    assert code == 2 and "should end in .html" in err
    code, out, err = cli(["report", str(runs / "fedavg"), "-o", str(tmp_path / "ok.html")])
    assert code == 0 and (tmp_path / "ok.html").is_file(), err


PROBE = """<script>
window.__errors = [];
window.addEventListener("error", (e) => window.__errors.push(String(e.message)));
const __consoleError = console.error;
console.error = (...args) => { window.__errors.push(args.map(String).join(" ")); __consoleError(...args); };
</script>"""
REPORT_BACK = """<script>
window.addEventListener("load", () => setTimeout(() => {
  const select = document.getElementById("x-axis");
  const axes = Array.from(select.options).map((o) => o.value);
  for (const axis of [...axes, "round"]) {  // every x axis redraws every metric plot
    select.value = axis;
    select.dispatchEvent(new Event("change"));
  }
  const pre = document.createElement("pre");
  pre.id = "__probe";
  pre.textContent = JSON.stringify({errors: window.__errors, axes: axes,
    plots: document.querySelectorAll(".js-plotly-plot").length,
    svgs: document.querySelectorAll(".js-plotly-plot .main-svg").length,
    data: JSON.parse(document.getElementById("fedsim-data").textContent)});
  document.body.appendChild(pre);
}, 0));
</script>"""


def browse(page: Path, *args: str) -> subprocess.CompletedProcess:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--virtual-time-budget=20000", "--window-size=1400,2200", *args, page.as_uri()]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


@needs_browser
def test_the_report_renders_in_a_headless_browser(runs, tmp_path):
    dirs = [runs / "fedavg", runs / "fedprox", runs / "seeds", runs / "ring"]
    out = build_report(dirs, tmp_path / "report.html")
    # the screenshot of the page as a user opens it
    shot = tmp_path / "report.png"
    result = browse(out, f"--screenshot={shot}")
    assert shot.is_file() and shot.stat().st_size > 20_000, result.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("FEDSIM_REPORT_SCREENSHOT"):  # how the README's picture is made
        shutil.copyfile(shot, os.environ["FEDSIM_REPORT_SCREENSHOT"])
    # the same page with a probe that records console errors and reports the rendered DOM
    page = out.read_text()
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("<head>", "<head>\n" + PROBE, 1).replace("</body>", REPORT_BACK + "</body>", 1))
    result = browse(probed, "--dump-dom")
    found = re.search(r'<pre id="__probe">(.*?)</pre>', result.stdout, re.S)
    assert found, f"the page did not finish loading: {result.stderr[-2000:]}"
    probe = json.loads(html.unescape(found.group(1)))
    assert probe["errors"] == []
    assert probe["axes"] == ["round", "samples", "total_mb", "virtual_time_s"]
    groups = [load_group(d) for d in dirs]
    metrics = numeric_metrics([r for g in groups for run in g["runs"] for r in run["metrics"]])
    assert probe["plots"] == expected_plots(groups, metrics) and probe["svgs"] >= probe["plots"]
    # the data the page plots is metrics.jsonl, record for record
    shown = {run["path"]: run["metrics"] for g in probe["data"]["groups"] for run in g["runs"]}
    for folder in [runs / "fedavg", runs / "fedprox", runs / "ring", runs / "seeds" / "seed-0"]:
        assert shown[str(folder)] == read_metrics(folder)
    assert any(run["topology"] for g in probe["data"]["groups"] for run in g["runs"])
