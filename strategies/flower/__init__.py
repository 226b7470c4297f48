"""Flower interoperability at its published path: an alias of :mod:`fedsim.flower`.

The adapters (``FlowerStrategy``, ``SCAFFOLD``, ``FedNova``, ``FedDyn``, ``FedCM``, ``FedsimClient``,
``EngineGrid``, ``FlowerHosted``) run fedsim's engine, so they live on the engine's side; :mod:`strategies`
itself depends on the core contract only.
"""

from fedsim.flower import *  # noqa: F403
from fedsim.flower import __all__  # noqa: F401
