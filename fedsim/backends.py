"""Backends (component kind ``backend``): who drives a run's rounds once it is assembled.

- ``fedsim`` (default): our round loop in this process (:meth:`fedsim.rounds.Simulation.run`).
- ``flower``: the same loop inside a Flower ``ServerApp`` on Flower's simulation engine, every client a
  Flower ``ClientApp`` (:mod:`fedsim.flower_backend`); its client state lives on the Flower nodes, so such a
  run writes no checkpoints and cannot resume.
"""

from __future__ import annotations

from typing import Annotated, Any

from fedsim.core import components
from fedsim.core.components import option


class FedsimBackend:
    """Our round loop, in this process."""

    resumable = True

    def run(self, sim, results, on_round) -> dict[str, Any]:
        return sim.run(results, on_round=on_round)


class FlowerBackend:
    """Every client a Flower ``ClientApp`` on Flower's simulation engine (Ray)."""

    resumable = False

    def __init__(self, cpus_per_client: Annotated[float, option("CPUs per Flower client", gt=0)] = 1.0) -> None:
        self.cpus_per_client = cpus_per_client

    @staticmethod
    def preflight() -> None:
        from fedsim.flower.records import require_flower  # optional dependency: flwr

        require_flower()

    def run(self, sim, results, on_round) -> dict[str, Any]:
        from fedsim.flower_backend import run_with_flower  # optional dependency: flwr

        return run_with_flower(sim, results, on_round, cpus_per_client=self.cpus_per_client)


components.register("backend", "fedsim", FedsimBackend)
components.register("backend", "flower", FlowerBackend)
