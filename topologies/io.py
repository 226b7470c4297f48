"""Reading and writing topology files.

Formats, chosen by extension:

- ``.graphml`` (GraphML), ``.gml`` (GML), ``.json`` (node-link JSON: ``nodes`` with ``id``, and ``edges`` or
  ``links`` with ``source``/``target`` and optional attributes);
- ``.edgelist``, ``.edges``, ``.txt``: one edge ``u v [weight]`` per line, ``#`` comments. A first line
  holding a single integer is decentralizepy's node count (nodes ``0..n-1``). A ``# nodes: a b c`` comment
  before the edges fixes the node order and keeps isolated nodes (written by :func:`save`);
- ``.adjlist``: networkx adjacency list, each line ``node nbr nbr ...``;
- ``.adj``: decentralizepy adjacency: first line the node count n, then line i (``i = 0..n-1``) lists the
  neighbour ids of node i separated by spaces.

:func:`load` returns an undirected ``nx.Graph`` on nodes ``0..n-1`` in FILE ORDER, each with the node
attribute ``name``: the id in the file, as a ``str`` (JSON: its original type). Other node and edge
attributes are kept (edge ``weight`` as float in the text formats). Self-loops are dropped (mixing matrices
set their own diagonal) and directed or multi-graphs are made simple and undirected.
"""

from __future__ import annotations

import json
import os
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import networkx as nx

from fedsim.core.errors import FedsimWarning

from .errors import TopologyError

__all__ = ["EXTENSIONS", "load", "save"]

PathLike = str | os.PathLike


def _canonical(G: nx.Graph, names: list[object] | None = None) -> nx.Graph:
    """Relabel ``G`` to ``0..n-1`` in its node order, storing the old id as ``name``; simple, undirected,
    no self-loops."""
    order = list(G.nodes)
    index = {v: i for i, v in enumerate(order)}
    H = nx.Graph()
    for i, v in enumerate(order):
        attrs = dict(G.nodes[v])
        attrs["name"] = v if names is None else names[i]
        H.add_node(i, **attrs)
    for u, v, data in G.edges(data=True):
        if u != v:
            H.add_edge(index[u], index[v], **data)
    loops = nx.number_of_selfloops(G)
    one_way = sum(1 for u, v in G.edges() if u != v and not G.has_edge(v, u)) if G.is_directed() else 0
    if loops or one_way:
        changes = [f"{n} one-way edge{'s' * (n != 1)} made two-way" for n in [one_way] if n]
        changes += [f"{n} self-loop{'s' * (n != 1)} dropped" for n in [loops] if n]
        warnings.warn(
            f"topology: {', '.join(changes)} (gossip needs an undirected graph; weights set their own diagonal)",
            FedsimWarning,
            stacklevel=3,
        )
    return H


def _fail(path: Path, line: int | None, msg: str) -> TopologyError:
    where = f"{path}:{line}" if line is not None else f"{path}"
    return TopologyError(f"{where}: {msg}")


def _lines(path: Path) -> list[tuple[int, list[str], str]]:
    """Non-empty, non-comment lines as ``(line number, tokens, raw)``; ``# nodes:`` headers kept as tokens."""
    out = []
    with open(path, encoding="utf-8") as f:
        for no, raw in enumerate(f, 1):
            text = raw.strip()
            if text.lower().startswith("# nodes:"):
                out.append((no, ["#nodes", *text[len("# nodes:") :].split()], text))
                continue
            text = text.split("#", 1)[0].strip()
            if text:
                out.append((no, text.split(), text))
    return out


def _read_edgelist(path: Path) -> nx.Graph:
    G = nx.Graph()
    lines = _lines(path)
    if lines and len(lines[0][1]) == 1 and lines[0][1][0].isdigit():  # decentralizepy header: node count
        G.add_nodes_from(str(i) for i in range(int(lines[0][1][0])))
        lines = lines[1:]
        fixed = True
    else:
        fixed = False
    for no, tok, raw in lines:
        if tok[0] == "#nodes":
            G.add_nodes_from(tok[1:])
            continue
        if len(tok) not in (2, 3):
            raise _fail(path, no, f"expected 'u v' or 'u v weight', got {raw!r}")
        u, v = tok[0], tok[1]
        if fixed and not all(x in G for x in (u, v)):
            raise _fail(path, no, f"node id outside 0..{G.number_of_nodes() - 1} in {raw!r}")
        data = {}
        if len(tok) == 3:
            try:
                data["weight"] = float(tok[2])
            except ValueError:
                raise _fail(path, no, f"weight {tok[2]!r} is not a number in {raw!r}") from None
        G.add_edge(u, v, **data)
    return _canonical(G)


def _read_adjlist(path: Path) -> nx.Graph:
    G = nx.Graph()
    rows = _lines(path)
    for _, tok, _ in rows:  # each node has its own line in networkx's format: line heads fix the order
        if tok[0] != "#nodes":
            G.add_node(tok[0])
    for _, tok, _ in rows:
        if tok[0] == "#nodes":
            continue
        G.add_edges_from((tok[0], v) for v in tok[1:])
    return _canonical(G)


def _read_adj(path: Path) -> nx.Graph:
    with open(path, encoding="utf-8") as f:
        raw = f.read().splitlines()
    if not raw or not raw[0].strip().isdigit():
        first = raw[0] if raw else ""
        raise _fail(path, 1, f"first line must be the node count, got {first!r}")
    n = int(raw[0].strip())
    body = raw[1:]
    while len(body) > n and not body[-1].strip():  # trailing blank lines; a blank line i < n is isolated
        body.pop()
    if len(body) != n:
        raise _fail(path, len(raw), f"node count on line 1 is {n} but {len(body)} neighbour lines follow")
    G = nx.Graph()
    G.add_nodes_from(range(n))
    for i, line in enumerate(body):
        for tok in line.split():
            if not tok.isdigit() or int(tok) >= n:
                raise _fail(path, i + 2, f"neighbour {tok!r} of node {i} is not a node id in 0..{n - 1}")
            G.add_edge(i, int(tok))
    return _canonical(G, names=[str(i) for i in range(n)])


def _read_graphml(path: Path) -> nx.Graph:
    try:
        G = nx.read_graphml(path)
    except ET.ParseError as e:
        raise _fail(path, e.position[0], f"not valid GraphML XML: {e}") from None
    except (nx.NetworkXError, KeyError, ValueError) as e:
        raise _fail(path, None, f"cannot read GraphML: {e}") from None
    return _canonical(G)


def _read_gml(path: Path) -> nx.Graph:
    try:
        try:
            G = nx.read_gml(path, label="label")
        except nx.NetworkXError as e:
            if "label" not in str(e):
                raise
            G = nx.read_gml(path, label="id")
    except (nx.NetworkXError, ValueError) as e:
        raise _fail(path, None, f"cannot read GML: {e}") from None
    G = _canonical(G, names=[str(v) for v in G.nodes])
    for _, data in G.nodes(data=True):
        data.pop("label", None)
    return G


def _read_json(path: Path) -> nx.Graph:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise _fail(path, e.lineno, f"invalid JSON: {e.msg}") from None
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), list):
        raise _fail(path, None, "node-link JSON needs an object with a 'nodes' list and an 'edges' (or 'links') list")
    edges = data.get("edges", data.get("links", []))
    G = nx.Graph()
    for k, node in enumerate(data["nodes"]):
        if not isinstance(node, dict) or "id" not in node:
            raise _fail(path, None, f"node #{k} has no 'id': {node!r}")
        G.add_node(node["id"], **{a: b for a, b in node.items() if a != "id"})
    for k, e in enumerate(edges):
        if not isinstance(e, dict) or "source" not in e or "target" not in e:
            raise _fail(path, None, f"edge #{k} needs 'source' and 'target': {e!r}")
        if e["source"] not in G or e["target"] not in G:
            raise _fail(path, None, f"edge #{k} names an unknown node: {e!r}")
        G.add_edge(e["source"], e["target"], **{a: b for a, b in e.items() if a not in ("source", "target")})
    return _canonical(G)


_READERS: dict[str, Callable[[Path], nx.Graph]] = {
    ".graphml": _read_graphml,
    ".gml": _read_gml,
    ".edgelist": _read_edgelist,
    ".edges": _read_edgelist,
    ".txt": _read_edgelist,
    ".adjlist": _read_adjlist,
    ".adj": _read_adj,
    ".json": _read_json,
}

#: Supported file extensions.
EXTENSIONS: tuple[str, ...] = tuple(_READERS)


def _ext(path: Path) -> str:
    ext = path.suffix.lower()
    if ext not in _READERS:
        raise TopologyError(
            f"{path}: unknown topology file extension {ext or '(none)'!r}; supported: {', '.join(EXTENSIONS)}"
        )
    return ext


def load(path: PathLike) -> nx.Graph:
    """Read a topology file (format by extension, see the module docstring).

    Returns an undirected ``nx.Graph`` on nodes ``0..n-1`` in file order, original ids in the node attribute
    ``name``. Raises :class:`TopologyError` naming the file (and line where known) when it cannot be read.
    """
    path = Path(path)
    ext = _ext(path)
    if not path.is_file():
        raise TopologyError(f"{path}: topology file not found")
    try:
        return _READERS[ext](path)
    except UnicodeDecodeError as e:
        raise _fail(path, None, f"not a text file ({e.reason})") from None
    except OSError as e:
        raise _fail(path, None, f"cannot read: {e.strerror or e}") from None


def _named(G: nx.Graph) -> tuple[nx.Graph, list[str]]:
    """Copy of ``G`` relabelled by ``str(name)`` (node attribute ``name`` or the node), ``name`` dropped."""
    names = [str(G.nodes[v].get("name", v)) for v in G.nodes]
    if len(set(names)) != len(names):
        dup = next(x for x in names if names.count(x) > 1)
        raise TopologyError(f"cannot save: two nodes share the name {dup!r}")
    mapping = dict(zip(G.nodes, names, strict=True))
    H = nx.Graph()
    for v in G.nodes:
        H.add_node(mapping[v], **{a: b for a, b in G.nodes[v].items() if a != "name"})
    H.add_edges_from((mapping[u], mapping[v], d) for u, v, d in G.edges(data=True) if u != v)
    return H, names


def _plain(names: list[str], path: Path) -> None:
    bad = next((x for x in names if not x or any(c.isspace() for c in x) or "#" in x), None)
    if bad is not None:
        raise TopologyError(f"cannot save {path}: node name {bad!r} is empty or has whitespace or '#'")


def save(G: nx.Graph, path: PathLike) -> None:
    """Write ``G`` to ``path`` in the format given by its extension.

    Nodes are written under their ``name`` attribute (else their id), as strings, in ``G``'s node order, so
    ``load(path)`` gives back the same order and names. Edge ``weight`` is kept in every format except the
    adjacency lists. ``.adj`` writes node positions ``0..n-1`` (names are not stored).
    """
    path = Path(path)
    ext = _ext(path)
    H, names = _named(G)
    if ext == ".graphml":
        nx.write_graphml(H, path)
    elif ext == ".gml":
        nx.write_gml(H, path)
    elif ext == ".json":
        data = nx.node_link_data(H, edges="edges")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, default=str)
    elif ext in (".edgelist", ".edges", ".txt"):
        _plain(names, path)
        with open(path, "w", encoding="utf-8") as f:
            f.write("# nodes: " + " ".join(names) + "\n")
            for u, v, d in H.edges(data=True):
                f.write(f"{u} {v} {float(d['weight'])!r}\n" if "weight" in d else f"{u} {v}\n")
    elif ext == ".adjlist":
        _plain(names, path)
        with open(path, "w", encoding="utf-8") as f:
            for v in H.nodes:
                f.write(" ".join([v, *H.neighbors(v)]) + "\n")
    else:  # .adj
        index = {v: i for i, v in enumerate(H.nodes)}
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"{len(index)}\n")
            for v in H.nodes:
                f.write(" ".join(str(index[u]) for u in H.neighbors(v)) + "\n")
