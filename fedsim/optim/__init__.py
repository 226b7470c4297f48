"""Local optimizers: functional (vmappable, stacked over clients) forms, the memory-efficient optimizers of
the seed family as ``torch.optim`` drop-ins (FOAM, GWT, MoLS-style, SGD-SaI), and learning-rate schedules.

Each local optimizer is a component of kind ``optimizer`` (:mod:`fedsim.core.components`): a factory whose
typed signature declares its options, registered below with one line."""

from fedsim.core.components import register

from .foam import FOAM, FunctionalFOAM, foam
from .functional import SGD, Adam, adam, adamw, make_optimizer, sgd
from .groups import compressible_names, transformer_param_groups
from .gwt import GWT, FunctionalGWT, gwt
from .lion import Lion
from .memory import state_bytes
from .mols import FunctionalMoLS, MoLS, mols
from .schedules import Constant, Cosine, Step, lr_at
from .sgd_sai import FunctionalSGDSaI, SGDSaI, sgd_sai
from .stacked import AppliesUpdate, step_counter

register("optimizer", "sgd", sgd)
register("optimizer", "adam", adam)
register("optimizer", "adamw", adamw)
register("optimizer", "foam", foam)
register("optimizer", "gwt", gwt)
register("optimizer", "mols", mols, summary="MoLS-style (reconstruction): Adam with module-wise SNR scaling.")
register("optimizer", "sgd-sai", sgd_sai)
register("optimizer", "lion", Lion)
register("lr_schedule", "constant", Constant)
register("lr_schedule", "step", Step)
register("lr_schedule", "cosine", Cosine)

FunctionalOptimizer = SGD | Adam | FunctionalFOAM | FunctionalGWT | FunctionalMoLS | FunctionalSGDSaI

__all__ = [
    "FOAM", "GWT", "SGD", "Adam", "AppliesUpdate", "FunctionalFOAM", "FunctionalGWT", "FunctionalMoLS",
    "FunctionalOptimizer", "FunctionalSGDSaI", "Lion", "MoLS", "SGDSaI", "compressible_names", "lr_at",
    "make_optimizer", "state_bytes", "step_counter", "transformer_param_groups",
]  # fmt: skip
