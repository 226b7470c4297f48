"""Local optimizers: functional (vmappable, stacked over clients) forms, the memory-efficient optimizers of
the seed family as ``torch.optim`` drop-ins (FOAM, GWT, MoLS-style, SGD-SaI), and learning-rate schedules."""

from .foam import FOAM, FunctionalFOAM
from .functional import OPTIMIZER_OPTIONS, OPTIMIZERS, SGD, Adam, make_optimizer
from .groups import compressible_names, transformer_param_groups
from .gwt import GWT, FunctionalGWT
from .memory import state_bytes
from .mols import FunctionalMoLS, MoLS
from .schedules import SCHEDULES, lr_at
from .sgd_sai import FunctionalSGDSaI, SGDSaI

FunctionalOptimizer = SGD | Adam | FunctionalFOAM | FunctionalGWT | FunctionalMoLS | FunctionalSGDSaI

__all__ = [
    "FOAM", "GWT", "OPTIMIZERS", "OPTIMIZER_OPTIONS", "SCHEDULES", "SGD", "Adam", "FunctionalFOAM",
    "FunctionalGWT", "FunctionalMoLS", "FunctionalOptimizer", "FunctionalSGDSaI", "MoLS", "SGDSaI",
    "compressible_names", "lr_at", "make_optimizer", "state_bytes", "transformer_param_groups",
]  # fmt: skip
