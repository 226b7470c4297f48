"""Which parameters the compressed-state optimizers (FOAM, GWT) transform, and the usual param groups.

The authors compress the weight matrices of attention and MLP blocks and leave embeddings and the output
head in plain Adam. :func:`compressible_names` applies that rule to any model: every parameter with at
least two dimensions except the weights of ``nn.Embedding`` modules and of the output head, which is the
module named ``head`` (or ``lm_head``, ``output``) when there is one, else the last ``nn.Linear``.
"""

from __future__ import annotations

from torch import nn

HEAD_NAMES = ("head", "lm_head", "output")


def output_head(model: nn.Module) -> str | None:
    """Name of the output head module: one named in ``HEAD_NAMES``, else the last ``nn.Linear`` (None if none)."""
    last_linear = None
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in HEAD_NAMES and any(True for _ in module.parameters(recurse=False)):
            return name
        if isinstance(module, nn.Linear):
            last_linear = name
    return last_linear


def compressible_names(model: nn.Module, include_head_and_embeddings: bool = False) -> frozenset[str]:
    """Names of the parameters to fold / wave: ``ndim >= 2``, minus embeddings and the output head unless
    ``include_head_and_embeddings``."""
    excluded: set[str] = set()
    if not include_head_and_embeddings:
        head = output_head(model)
        for name, module in model.named_modules():
            if isinstance(module, nn.Embedding) or (head is not None and name == head):
                prefix = f"{name}." if name else ""
                excluded.update(prefix + p for p, _ in module.named_parameters(recurse=False))
    return frozenset(n for n, p in model.named_parameters() if p.dim() >= 2 and n not in excluded)


def transformer_param_groups(model: nn.Module, weight_decay: float | None = None) -> list[dict]:
    """Param groups for :class:`fedsim.optim.FOAM` / :class:`fedsim.optim.GWT`: the compressible matrices
    (see :func:`compressible_names`) in one group, everything else in a group with ``fold=False`` and
    ``wave=False``. ``weight_decay``, when given, applies to the matrices only (a common transformer recipe)."""
    names = compressible_names(model)
    matrices = [p for n, p in model.named_parameters() if n in names]
    rest = [p for n, p in model.named_parameters() if n not in names]
    groups: list[dict] = []
    if matrices:
        groups.append({"params": matrices} | ({"weight_decay": weight_decay} if weight_decay is not None else {}))
    if rest:
        groups.append({"params": rest, "fold": False, "wave": False} | ({"weight_decay": 0.0} if weight_decay else {}))
    return groups
