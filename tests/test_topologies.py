"""Tests for the topologies package: mixing matrices, spectral gaps, file I/O, generators, schedules, errors."""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import topologies as T
from fedsim.core.errors import FedsimError

# --------------------------------------------------------------------------- helpers


def _err(fn, *args, match: str | None = None, **kw) -> str:
    """Call fn, expect a one-line TopologyError (a FedsimError and a ValueError), return its message."""
    with pytest.raises(T.TopologyError) as info:
        fn(*args, **kw)
    e = info.value
    assert isinstance(e, FedsimError) and isinstance(e, ValueError)
    msg = str(e)
    assert "\n" not in msg and msg
    if match is not None:
        assert match in msg, msg
    return msg


def _assert_doubly_stochastic(W: np.ndarray) -> None:
    assert W.dtype == np.float64
    assert W.min() >= 0.0
    np.testing.assert_allclose(W.sum(axis=0), 1.0, atol=1e-12)
    np.testing.assert_allclose(W.sum(axis=1), 1.0, atol=1e-12)


# --------------------------------------------------------------------------- mixing matrices, hand-computed


def test_metropolis_hastings_path3_hand_computed():
    W = T.mixing_matrix(T.build("path", 3))
    expected = np.array([[2 / 3, 1 / 3, 0], [1 / 3, 1 / 3, 1 / 3], [0, 1 / 3, 2 / 3]])
    np.testing.assert_allclose(W, expected, atol=1e-15)


def test_max_degree_star4_hand_computed():
    # hub 0 has degree 3: every edge 1/4, hub diagonal 1 - 3/4, leaves 1 - 1/4
    W = T.mixing_matrix(T.build("star", 4), "max_degree")
    expected = np.array(
        [[1 / 4, 1 / 4, 1 / 4, 1 / 4], [1 / 4, 3 / 4, 0, 0], [1 / 4, 0, 3 / 4, 0], [1 / 4, 0, 0, 3 / 4]]
    )
    np.testing.assert_allclose(W, expected, atol=1e-15)


def test_uniform_ring4_hand_computed():
    W = T.mixing_matrix(T.build("ring", 4), "uniform")
    t = 1 / 3
    expected = np.array([[t, t, 0, t], [t, t, t, 0], [0, t, t, t], [t, 0, t, t]])
    np.testing.assert_allclose(W, expected, atol=1e-15)


def test_laplacian_path3_hand_computed():
    # L of the path 0-1-2 has eigenvalues 0, 1, 3: W = I - L/3
    W = T.mixing_matrix(T.build("path", 3), "laplacian")
    expected = np.array([[2 / 3, 1 / 3, 0], [1 / 3, 1 / 3, 1 / 3], [0, 1 / 3, 2 / 3]])
    np.testing.assert_allclose(W, expected, atol=1e-12)
    assert np.linalg.eigvalsh(T.mixing_matrix(T.build("ring", 6), "laplacian")).min() >= -1e-12


def test_weights_from_file(tmp_path):
    p = tmp_path / "w.edgelist"
    p.write_text("# a weighted triangle plus a pendant\na b 0.25\nb c 0.25\na c 0.5\nc d 0.25\n")
    G = T.load(p)
    W = T.mixing_matrix(G, "weights")
    expected = np.array([[0.25, 0.25, 0.5, 0], [0.25, 0.5, 0.25, 0], [0.5, 0.25, 0.0, 0.25], [0, 0, 0.25, 0.75]])
    np.testing.assert_allclose(W, expected, atol=1e-15)
    assert [G.nodes[v]["name"] for v in G] == ["a", "b", "c", "d"]


def test_weights_with_self_weight_attribute():
    G = nx.Graph()
    G.add_node(0, self_weight=0.5)
    G.add_node(1, self_weight=0.5)
    G.add_edge(0, 1, weight=0.5)
    np.testing.assert_allclose(T.mixing_matrix(G, "weights"), [[0.5, 0.5], [0.5, 0.5]])
    G.nodes[0]["self_weight"] = 0.7
    msg = _err(T.mixing_matrix, G, "weights", match="not doubly stochastic")
    assert "row of node 0 sums to 1.2" in msg


# --------------------------------------------------------------------------- property test


@st.composite
def connected_graphs(draw) -> nx.Graph:
    n = draw(st.integers(2, 30))
    G = nx.Graph()
    G.add_nodes_from(range(n))
    for i in range(1, n):  # random tree
        G.add_edge(i, draw(st.integers(0, i - 1)))
    extra = draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=2 * n))
    G.add_edges_from((u, v) for u, v in extra if u != v)
    return G


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(connected_graphs())
def test_every_method_gives_valid_mixing_matrix(G):
    n = G.number_of_nodes()
    regular = len({d for _, d in G.degree()}) == 1
    A = nx.to_numpy_array(G, nodelist=list(G.nodes)) > 0
    for method in T.MIXING_METHODS:
        if method == "weights" or (method == "uniform" and not regular):
            continue
        W = T.mixing_matrix(G, method)
        assert W.shape == (n, n)
        _assert_doubly_stochastic(W)
        np.testing.assert_array_equal(W, W.T)
        off = (W > 0) & ~np.eye(n, dtype=bool)
        assert not np.any(off & ~A)
        gap = T.spectral_gap(W)
        assert 0.0 < gap <= 1.0
    if not regular:
        _err(T.mixing_matrix, G, "uniform", match="regular")
    # MH weights copied onto the edges reproduce W through the 'weights' method
    W = T.mixing_matrix(G)
    H = G.copy()
    for u, v in H.edges:
        H.edges[u, v]["weight"] = W[u, v]
    np.testing.assert_allclose(T.mixing_matrix(H, "weights"), W, atol=1e-12)


# --------------------------------------------------------------------------- spectral gap


def test_complete_graph_uniform_has_gap_one():
    for n in (2, 5, 9):
        W = T.mixing_matrix(T.build("complete", n), "uniform")
        np.testing.assert_allclose(W, np.full((n, n), 1 / n))
        assert T.spectral_gap(W) == pytest.approx(1.0, abs=1e-12)


def test_ring_gap_decreases_with_n():
    gaps = [T.spectral_gap(T.mixing_matrix(T.build("ring", n))) for n in (5, 8, 16, 32, 64)]
    assert all(a > b for a, b in zip(gaps, gaps[1:], strict=False))


@pytest.mark.parametrize("n", [3, 4, 7, 10, 25])
def test_ring_mh_gap_closed_form(n):
    W = T.mixing_matrix(T.build("ring", n))
    A = nx.to_numpy_array(T.build("ring", n))
    np.testing.assert_allclose(W, (np.eye(n) + A) / 3, atol=1e-15)
    eig = sorted((abs((1 + 2 * math.cos(2 * math.pi * k / n)) / 3) for k in range(1, n)), reverse=True)
    assert T.spectral_gap(W) == pytest.approx(1 - eig[0], abs=1e-12)


def test_spectral_gap_nonsymmetric_and_mixing_time():
    W = T.OnePeerExponential(8).matrix(0)  # (I + shift by 1)/2: |eigenvalues| = |cos(pi j / 8)|
    assert T.spectral_gap(W) == pytest.approx(1 - math.cos(math.pi / 8), abs=1e-12)
    Wr = T.mixing_matrix(T.build("ring", 16))
    assert T.mixing_time_estimate(Wr, 1e-3) == pytest.approx(math.log(1e3) / T.spectral_gap(Wr))
    assert T.mixing_time_estimate(np.eye(3)) == math.inf


def test_analyze():
    info = T.analyze(T.build("ring", 8))
    assert info["nodes"] == 8 and info["edges"] == 8 and info["diameter"] == 4
    assert info["degree_min"] == info["degree_max"] == 2 and info["degree_mean"] == 2.0
    assert info["spectral_gap"] == pytest.approx(1 - (1 + 2 * math.cos(2 * math.pi / 8)) / 3)
    assert info["mixing_time_estimate"] == pytest.approx(math.log(1e3) / info["spectral_gap"])


# --------------------------------------------------------------------------- file round trips


FORMATS = [".graphml", ".gml", ".edgelist", ".edges", ".txt", ".adjlist", ".json"]


def _names(G: nx.Graph) -> list:
    return [G.nodes[v]["name"] for v in G.nodes]


@pytest.mark.parametrize("ext", [*FORMATS, ".adj"])
def test_round_trip_generated(tmp_path, ext):
    G = T.build("erdos_renyi", 12, p=0.3, seed=3)
    G.add_node(99)  # a node out of numeric order, linked by one edge
    G.add_edge(99, 4)
    p = tmp_path / f"g{ext}"
    T.save(G, p)
    H = T.load(p)
    assert list(H.nodes) == list(range(13))
    want = list(map(str, range(13))) if ext == ".adj" else [str(v) for v in G.nodes]  # .adj stores positions
    assert [str(x) for x in _names(H)] == want
    assert _names(H)[-1] == ("12" if ext == ".adj" else "99")
    relabel = dict(zip(G.nodes, H.nodes, strict=True))
    assert {frozenset((relabel[u], relabel[v])) for u, v in G.edges} == {frozenset(e) for e in H.edges}


@pytest.mark.parametrize("ext", FORMATS)
def test_round_trip_names_order_and_weights(tmp_path, ext):
    G = nx.Graph()
    G.add_nodes_from(["d", "b", "a", "c"])  # file order, not sorted order
    G.add_edge("d", "a", weight=0.5)
    G.add_edge("a", "c", weight=0.25)
    G.add_edge("b", "c", weight=0.125)
    p = tmp_path / f"g{ext}"
    T.save(G, p)
    H = T.load(p)
    assert list(H.nodes) == [0, 1, 2, 3]
    assert _names(H) == ["d", "b", "a", "c"]
    assert nx.is_isomorphic(G, H)
    assert sorted(map(tuple, map(sorted, H.edges))) == [(0, 2), (1, 3), (2, 3)]
    if ext != ".adjlist":
        assert H.edges[0, 2]["weight"] == 0.5 and H.edges[1, 3]["weight"] == 0.125


def test_decentralizepy_adj_hand_written(tmp_path):
    p = tmp_path / "g.adj"
    p.write_text("4\n1 3\n0 2\n1 3\n2 0\n")
    G = T.load(p)
    assert list(G.nodes) == [0, 1, 2, 3] and _names(G) == ["0", "1", "2", "3"]
    assert nx.utils.edges_equal(sorted(map(tuple, map(sorted, G.edges))), [(0, 1), (0, 3), (1, 2), (2, 3)])
    # an isolated last node: empty last line of a 3-node file
    p.write_text("3\n1\n0\n\n")
    G = T.load(p)
    assert G.number_of_nodes() == 3 and G.number_of_edges() == 1


def test_decentralizepy_edges_with_count_header(tmp_path):
    p = tmp_path / "g.edges"
    p.write_text("4\n0 1\n1 0\n1 2\n2 1\n2 3\n3 2\n")
    G = T.load(p)
    assert _names(G) == ["0", "1", "2", "3"] and G.number_of_edges() == 3


def test_load_drops_self_loops_and_direction(tmp_path):
    p = tmp_path / "g.json"
    p.write_text(
        '{"directed": true, "nodes": [{"id": 5}, {"id": 1}, {"id": 2}],'
        ' "links": [{"source": 5, "target": 1}, {"source": 1, "target": 5}, {"source": 2, "target": 2},'
        ' {"source": 2, "target": 1}]}'
    )
    G = T.load(p)
    assert type(G) is nx.Graph and _names(G) == [5, 1, 2]
    assert sorted(map(tuple, map(sorted, G.edges))) == [(0, 1), (1, 2)]


def test_experiment_files_exist_and_are_valid():
    from pathlib import Path

    d = Path(__file__).resolve().parents[1] / "experiments" / "topologies"
    expect = {"ring16.graphml": 16, "torus4x4.graphml": 16, "exponential32.graphml": 32, "erdos_renyi64.graphml": 64}
    for name, n in expect.items():
        G = T.load(d / name)
        T.check_nodes(G, n)
        T.validate_connected(G)
    assert nx.is_isomorphic(T.load(d / "torus4x4.graphml"), T.build("torus", 16, rows=4, cols=4))


# --------------------------------------------------------------------------- generators


def test_generators_basic_facts():
    for name in T.GENERATORS:
        for n in (16, 32):
            G = T.build(name, n)
            assert list(G.nodes) == list(range(n)), name
            assert nx.is_connected(G), name
    deg = lambda G: {d for _, d in G.degree()}  # noqa: E731
    assert deg(T.build("ring", 10)) == {2}
    assert T.build("path", 5).number_of_edges() == 4
    assert deg(T.build("star", 6)) == {1, 5}
    assert deg(T.build("complete", 7)) == {6}
    assert deg(T.build("hypercube", 32)) == {5}
    assert deg(T.build("exponential", 32)) == {9}  # offsets +-1, +-2, +-4, +-8, 16
    assert deg(T.build("exponential", 10)) == {6}  # offsets +-1, +-2, +-4, +-8 mod 10 = {1, 2, 4, 6, 8, 9}
    assert deg(T.build("torus", 20, rows=4, cols=5)) == {4}
    assert deg(T.build("random_regular", 20, degree=4, seed=1)) == {4}
    assert deg(T.build("watts_strogatz", 20, k=4, p=0.0)) == {4}
    ba = T.build("barabasi_albert", 30, m=3)
    assert ba.number_of_edges() == 3 * (30 - 3) and min(deg(ba)) >= 1


def test_exponential_definition():
    n = 10
    G = T.build("exponential", n)
    want = {frozenset((i, (i + s * 2**k) % n)) for i in range(n) for k in range(4) for s in (1, -1)}
    assert {frozenset(e) for e in G.edges} == want


def test_torus_shapes():
    G = T.build("torus", 12)  # near-square: 3 x 4
    assert {d for _, d in G.degree()} == {4}
    assert nx.is_isomorphic(T.build("torus", 7), T.build("ring", 7))  # prime: 1 x 7
    _err(T.build, "torus", 12, rows=5, match="rows=5")


def test_random_generators_deterministic_and_seeded():
    for name, kw in [("erdos_renyi", {"p": 0.2}), ("random_regular", {"degree": 3}), ("watts_strogatz", {})]:
        a, b = T.build(name, 20, seed=4, **kw), T.build(name, 20, seed=4, **kw)
        assert list(a.edges) == list(b.edges)
    assert list(T.build("erdos_renyi", 20, seed=1).edges) != list(T.build("erdos_renyi", 20, seed=2).edges)
    _err(T.build, "erdos_renyi", 30, p=0.01, max_tries=5, match="no connected sample for seeds 0..4")


# --------------------------------------------------------------------------- schedules


def test_one_peer_exponential():
    for n in (2, 8, 16):
        s = T.OnePeerExponential(n)
        m = int(math.log2(n))
        assert s.period == m
        prod = np.eye(n)
        for t in range(m):
            W = s.matrix(t)
            _assert_doubly_stochastic(W)
            assert W[0, 0] == 0.5 and W[0, 2**t % n] == 0.5
            prod = W @ prod
        np.testing.assert_allclose(prod, np.full((n, n), 1 / n), atol=1e-12)  # exact averaging in log2 n steps
        np.testing.assert_array_equal(s.matrix(m), s.matrix(0))
        assert nx.is_connected(s.union_graph())
        assert nx.is_isomorphic(s.union_graph(), T.build("exponential", n))
    _err(T.OnePeerExponential, 12, match="power of 2")


def test_random_matchings():
    s = T.RandomMatchings(9, seed=5)
    assert s.period is None
    W3 = s.matrix(3)
    _ = s.matrix(0), s.matrix(7)  # no hidden state: order of queries does not matter
    np.testing.assert_array_equal(W3, T.RandomMatchings(9, seed=5).matrix(3))
    assert not np.array_equal(s.matrix(3), T.RandomMatchings(9, seed=6).matrix(3))
    assert not all(np.array_equal(s.matrix(0), s.matrix(t)) for t in range(1, 5))
    for t in range(5):
        W = s.matrix(t)
        _assert_doubly_stochastic(W)
        np.testing.assert_array_equal(W, W.T)
        assert len(s.matching(t)) == 4 and (np.diag(W) == 1.0).sum() == 1


def test_file_schedule_cycles(tmp_path):
    T.save(T.build("path", 4), tmp_path / "a.edgelist")
    G = nx.Graph()
    G.add_nodes_from(range(4))
    G.add_edge(3, 0)  # alone: disconnected, fine inside a schedule
    T.save(G, tmp_path / "b.edgelist")
    (tmp_path / "s.yaml").write_text("graphs: [a.edgelist, b.edgelist]\nmethod: max_degree\n")
    s = T.FileSchedule(tmp_path / "s.yaml")
    assert s.period == 2 and s.n == 4
    np.testing.assert_array_equal(s.matrix(0), T.mixing_matrix(T.build("path", 4), "max_degree"))
    np.testing.assert_array_equal(s.matrix(2), s.matrix(0))
    np.testing.assert_array_equal(s.matrix(3), s.matrix(1))
    assert s.matrix(1)[0, 3] == 0.5 and s.matrix(1)[1, 1] == 1.0
    assert nx.is_isomorphic(s.union_graph(), T.build("ring", 4))
    (tmp_path / "l.yaml").write_text("- a.edgelist\n")  # plain list form
    assert T.FileSchedule(tmp_path / "l.yaml").period == 1


def test_file_schedule_disconnected_union(tmp_path):
    G = nx.Graph()
    G.add_nodes_from(range(4))
    G.add_edge(0, 1)
    T.save(G, tmp_path / "a.adj")
    G.add_edge(0, 2)
    T.save(G, tmp_path / "b.adj")
    (tmp_path / "s.yaml").write_text("graphs: [a.adj, b.adj]\n")
    msg = _err(T.FileSchedule, tmp_path / "s.yaml", match="disconnected: 2 components of sizes 3, 1")
    assert "s.yaml" in msg and "union" in msg
    (tmp_path / "bad.yaml").write_text("graphs: [a.adj]\nmethod: metropolis\n")
    _err(T.FileSchedule, tmp_path / "bad.yaml", match="unknown mixing method 'metropolis'")


# --------------------------------------------------------------------------- bad input


def test_disconnected_graph_message():
    G = nx.disjoint_union_all([T.build("ring", 10), T.build("path", 2), T.build("path", 4)])
    msg = _err(T.mixing_matrix, G, match="graph is disconnected: 3 components of sizes 10, 4, 2")
    assert "10, 11" in msg  # the smallest component's nodes
    _err(T.analyze, G, match="disconnected")


def test_negative_and_non_stochastic_weights():
    G = T.build("path", 3)
    G.edges[0, 1]["weight"] = -0.5
    G.edges[1, 2]["weight"] = 0.5
    _err(T.mixing_matrix, G, "weights", match="negative")
    G.edges[0, 1]["weight"] = 0.75
    msg = _err(T.mixing_matrix, G, "weights", match="not doubly stochastic")  # row 1: 0.75 + 0.5 > 1
    assert "worst row of node 1 has edge weights summing to 1.25" in msg
    del G.edges[0, 1]["weight"]
    _err(T.mixing_matrix, G, "weights", match="needs a 'weight' on every edge")


def test_check_doubly_stochastic_worst_sum():
    from topologies.mixing import check_doubly_stochastic

    W = np.array([[0.5, 0.5, 0.0], [0.5, 0.3, 0.0], [0.0, 0.2, 1.0]])
    msg = _err(check_doubly_stochastic, W, match="not doubly stochastic")
    assert "row of node 1 sums to 0.8" in msg


def test_bad_files(tmp_path):
    p = tmp_path / "g.edgelist"
    p.write_text("0 1\n1 2\n1 2 3 4\n")
    _err(T.load, p, match=f"{p}:3: expected 'u v' or 'u v weight'")
    p.write_text("# c\n0 1 heavy\n")
    _err(T.load, p, match=f"{p}:2: weight 'heavy' is not a number")
    a = tmp_path / "g.adj"
    a.write_text("3\n1\n0 7\n\n")
    _err(T.load, a, match=f"{a}:3: neighbour '7' of node 1")
    a.write_text("three\n1\n")
    _err(T.load, a, match=f"{a}:1: first line must be the node count")
    a.write_text("4\n1\n0\n")
    _err(T.load, a, match="node count on line 1 is 4 but 2 neighbour lines follow")
    _err(T.load, tmp_path / "g.csv", match="unknown topology file extension '.csv'; supported: .graphml, .gml")
    _err(T.load, tmp_path / "missing.graphml", match="missing.graphml: topology file not found")
    x = tmp_path / "bad.graphml"
    x.write_text("<graphml><graph>\n<node id='a'>\n</graphml>")
    _err(T.load, x, match=f"{x}:3: not valid GraphML XML")
    j = tmp_path / "bad.json"
    j.write_text('{"nodes": [\n{"id": 1},\n]}')
    _err(T.load, j, match=f"{j}:3: invalid JSON")


def test_bad_generator_calls():
    _err(T.build, "rign", 8, match="unknown topology 'rign' (did you mean 'ring'?)")
    _err(T.build, "hypercube", 12, match="power of 2, got n=12")
    _err(T.build, "ring", 8, degree=3, match="does not take degree")
    _err(T.build, "ring", 0, match="n >= 1")
    _err(T.build, "random_regular", 8, degree="three", match="bad argument value(s) n=8, degree='three'")
    _err(T.mixing_matrix, T.build("ring", 4), "metropolis", match="did you mean 'metropolis_hastings'")
    assert T.build("Random-Regular", 8, degree=3).number_of_nodes() == 8


def test_check_nodes():
    T.check_nodes(T.build("ring", 16), 16)
    _err(T.check_nodes, T.build("ring", 12), 16, match="topology has 12 nodes but --clients is 16")


def test_no_heavy_imports():
    import subprocess
    import sys

    code = "import sys, topologies; print(sorted(m for m in ('torch', 'scipy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
