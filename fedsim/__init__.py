"""fedsim: a vectorized federated and decentralized learning simulator.

``fedsim.simulate(config, out, **overrides)`` runs an experiment (the CLI's ``fedsim simulate``).
Heavy modules are imported lazily so that ``import fedsim`` stays fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def simulate(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run a federated experiment; see :func:`fedsim.simulation.simulate`."""
    from fedsim.simulation import simulate as _simulate

    return _simulate(*args, **kwargs)


def resume(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Continue a killed run; see :func:`fedsim.simulation.resume`."""
    from fedsim.simulation import resume as _resume

    return _resume(*args, **kwargs)


__all__ = ["__version__", "resume", "simulate"]
