"""Graph topologies for decentralized learning: files, generators, mixing matrices, time-varying schedules.

Depends on networkx and numpy only (plus :mod:`fedsim.core.errors` for the error base class).
"""

from .analysis import analyze, mixing_time_estimate, spectral_gap
from .errors import TopologyError, check_nodes, validate_connected
from .generators import GENERATORS, build
from .io import load, save
from .mixing import MIXING_METHODS, mixing_matrix
from .schedules import FileSchedule, OnePeerExponential, RandomMatchings

__all__ = [
    "GENERATORS",
    "MIXING_METHODS",
    "FileSchedule",
    "OnePeerExponential",
    "RandomMatchings",
    "TopologyError",
    "analyze",
    "build",
    "check_nodes",
    "load",
    "mixing_matrix",
    "mixing_time_estimate",
    "save",
    "spectral_gap",
    "validate_connected",
]
