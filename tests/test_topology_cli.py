"""`fedsim topology build|show|convert`."""

import pytest

import topologies
from fedsim.cli import main


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_build_show_convert(tmp_path, capsys):
    graph_file = tmp_path / "ring16.graphml"
    code, out, err = run(["topology", "build", "ring", "--n", "16", "-o", str(graph_file)], capsys)
    assert code == 0, err
    assert "16 nodes, 16 edges" in out
    code, out, err = run(["topology", "show", str(graph_file)], capsys)
    assert code == 0, err
    assert "spectral_gap" in out and "mixing_time_estimate" in out
    png = tmp_path / "ring16.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the reported gap is the ring's Metropolis-Hastings gap
    expected = topologies.spectral_gap(topologies.mixing_matrix(topologies.load(graph_file)))
    line = next(line for line in out.splitlines() if line.startswith("spectral_gap:"))
    assert float(line.split()[1]) == pytest.approx(expected, rel=1e-5)
    edges = tmp_path / "ring16.edgelist"
    code, out, err = run(["topology", "convert", str(graph_file), str(edges)], capsys)
    assert code == 0, err
    assert topologies.load(edges).number_of_edges() == 16


def test_build_with_params(tmp_path, capsys):
    out_file = tmp_path / "er.gml"
    code, _, err = run(
        ["topology", "build", "erdos_renyi", "--n", "20", "--param", "p=0.3", "--param", "seed=1", "-o", str(out_file)],
        capsys,
    )
    assert code == 0, err
    assert topologies.load(out_file).number_of_nodes() == 20


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["topology", "build", "rin", "--n", "8", "-o", "x.graphml"], "did you mean 'ring'"),
        (["topology", "show", "missing.graphml"], "missing.graphml"),
        (["topology", "convert", "missing.graphml", "out.gml"], "missing.graphml"),
        (["topology", "build", "ring", "--n", "8", "--param", "oops", "-o", "x.graphml"], "--param expects"),
    ],
)
def test_bad_topology_input(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(argv, capsys)
    assert code == 2 and message in err and "Traceback" not in err


def test_disconnected_graph_refused_by_show(tmp_path, capsys):
    bad = tmp_path / "two.edgelist"
    bad.write_text("0 1\n2 3\n")
    code, _, err = run(["topology", "show", str(bad)], capsys)
    assert code == 2 and "disconnected" in err
