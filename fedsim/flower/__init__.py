"""Flower interoperability (flwr 1.41 Message API; needs the ``flower`` extra).

- Our strategies as Flower strategies: :class:`FlowerStrategy` (any fedsim strategy) and the ones Flower
  lacks, :class:`SCAFFOLD`, :class:`FedNova`, :class:`FedDyn`, :class:`FedCM` (:mod:`.server`);
- our local training in a Flower ``ClientApp``: :class:`FedsimClient` (:mod:`.client`);
- Flower's strategies in our engine: :class:`EngineGrid`, :class:`FlowerHosted` (:mod:`.engine`);
- the record conventions and reply checks: :mod:`.records`.
"""

from .records import FLOWER_EXTRA, FlowerReplyError, require_flower

require_flower()

from .client import FedsimClient  # noqa: E402
from .engine import EngineGrid, FlowerHosted, flower_strategies, hosted_strategy, make_flower_strategy  # noqa: E402
from .server import SCAFFOLD, FedCM, FedDyn, FedNova, FlowerStrategy  # noqa: E402

__all__ = [
    "FLOWER_EXTRA",
    "SCAFFOLD",
    "EngineGrid",
    "FedCM",
    "FedDyn",
    "FedNova",
    "FedsimClient",
    "FlowerHosted",
    "FlowerReplyError",
    "FlowerStrategy",
    "flower_strategies",
    "hosted_strategy",
    "make_flower_strategy",
]
