"""`fedsim topology build|show|convert`."""

import pytest

import topologies


def test_build_show_convert(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)  # `topology show` draws into the working directory
    graph_file = tmp_path / "ring16.graphml"
    code, out, err = cli(["topology", "build", "ring", "--n", "16", "-o", str(graph_file)])
    assert code == 0, err
    assert "16 nodes, 16 edges" in out
    code, out, err = cli(["topology", "show", str(graph_file)])
    assert code == 0, err
    assert "spectral_gap" in out and "mixing_time_estimate" in out
    png = tmp_path / "ring16.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the reported gap is the ring's Metropolis-Hastings gap
    expected = topologies.spectral_gap(topologies.mixing_matrix(topologies.load(graph_file)))
    line = next(line for line in out.splitlines() if line.startswith("spectral_gap:"))
    assert float(line.split()[1]) == pytest.approx(expected, rel=1e-5)
    edges = tmp_path / "ring16.edgelist"
    code, out, err = cli(["topology", "convert", str(graph_file), str(edges)])
    assert code == 0, err
    assert topologies.load(edges).number_of_edges() == 16


def test_build_with_params(tmp_path, cli):
    out_file = tmp_path / "er.gml"
    code, _, err = cli(
        ["topology", "build", "erdos_renyi", "--n", "20", "--param", "p=0.3", "--param", "seed=1", "-o", str(out_file)],
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
def test_bad_topology_input(tmp_path, cli, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(argv)
    assert code == 2 and message in err and "Traceback" not in err


def test_disconnected_graph_refused_by_show(tmp_path, cli):
    bad = tmp_path / "two.edgelist"
    bad.write_text("0 1\n2 3\n")
    code, _, err = cli(["topology", "show", str(bad)])
    assert code == 2 and "disconnected" in err
