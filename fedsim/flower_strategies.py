"""The ``flwr:NAME`` names of kind ``strategy``: Flower's own strategies driving our engine (needs the
``flower`` extra; Flower is imported only when such a name is used)."""

from __future__ import annotations

from fedsim.core import components


def flower_strategy(name: str) -> components.Component:
    """The component ``flwr:NAME``: Flower's strategy ``NAME`` hosted by our engine."""
    from fedsim.flower.records import require_flower  # optional dependency: flwr (checked first)

    require_flower()
    from fedsim.flower.engine import flower_component

    return flower_component(name)


components.register_namespace("strategy", "flwr", flower_strategy)
