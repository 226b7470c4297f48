"""Executors as components (kind ``executor``): where the selected clients train.

The engine always builds the in-process :class:`~fedsim.engine.executor.LocalExecutor` first (it owns the
model, data store, sampler, optimizer and client algorithm); an executor component receives it as the
context value ``local`` and returns what the round loop calls through the
:class:`~fedsim.core.protocol.Executor` protocol.
"""

from __future__ import annotations

from typing import Annotated

from fedsim.core import components
from fedsim.core.components import option

from .executor import LocalExecutor
from .ray_executor import RayExecutor, RayOptions, import_ray


def local(*, local: LocalExecutor) -> LocalExecutor:
    """In-process: every client of a chunk trained at once on this process's CPU or GPU."""
    return local


def ray(
    num_actors: Annotated[int | None, option("actors (default: as many as GPUs/CPUs allow)", ge=1)] = None,
    cpus_per_actor: Annotated[float, option("CPUs reserved per actor (fractional allowed)", gt=0)] = 1.0,
    gpus_per_actor: Annotated[float, option("GPUs per actor (fractional: 0.5 is two actors per GPU)", ge=0)] = 0.0,
    address: Annotated[str | None, option("Ray cluster to join: auto or host:port (default: start Ray here)")] = None,
    *,
    local: LocalExecutor,
):
    """Long-lived Ray actors, each owning a shard of clients (their data and client state resident)."""
    return RayExecutor(local, RayOptions(num_actors, cpus_per_actor, gpus_per_actor, address))


ray.preflight = import_ray  # checked before any data loads
components.register("executor", "local", local)
components.register("executor", "ray", ray)
