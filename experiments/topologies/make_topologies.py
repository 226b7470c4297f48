"""Write the ready-made topology files of this folder (GraphML), built with the topologies package.

Run from the repository root: ``python experiments/topologies/make_topologies.py``.
"""

from __future__ import annotations

from pathlib import Path

import topologies

HERE = Path(__file__).resolve().parent

SPECS = {
    "ring16.graphml": ("ring", 16, {}),
    "torus4x4.graphml": ("torus", 16, {"rows": 4, "cols": 4}),
    "exponential32.graphml": ("exponential", 32, {}),
    # p = 0.15, about 2.3x the connectivity threshold ln(64)/64 = 0.065; seed 0 is connected (0.1 is not)
    "erdos_renyi64.graphml": ("erdos_renyi", 64, {"p": 0.15, "seed": 0, "max_tries": 1}),
}


def main() -> None:
    for fname, (name, n, kw) in SPECS.items():
        G = topologies.build(name, n, **kw)
        topologies.save(G, HERE / fname)
        info = topologies.analyze(G)
        print(f"{fname}: {info['nodes']} nodes, {info['edges']} edges, spectral gap {info['spectral_gap']:.4f}")


if __name__ == "__main__":
    main()
