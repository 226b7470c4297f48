"""Option declarations shared by the local optimizers' factories (``Annotated`` types carrying help text and
bounds; see :mod:`fedsim.core.components`), and the model-dependent choice of compressed parameters."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field
from torch import nn

from fedsim.core.components import option

from .groups import compressible_names

Beta = Annotated[float, Field(ge=0, lt=1)]
Betas = Annotated[tuple[Beta, Beta], option("Adam's (beta1, beta2), each in [0, 1)")]
Eps = Annotated[float, option("term added to the denominator", gt=0)]
WeightDecay = Annotated[float, option("weight decay (decoupled for adamw, foam, gwt, mols)", ge=0)]
StateBits = Annotated[
    Literal[8, 32], option("bits of the moment state: 32, or 8 (blockwise dynamic quantization, Dettmers et al.)")
]
EpsMode = Annotated[Literal["torch", "authors"], option("where eps enters (see fedsim.optim.compressed)")]
CompressParams = Annotated[
    Literal["body", "all"], option("parameters transformed: body = matrices minus embeddings and output head")
]


def compressed_names(
    model: nn.Module | None, compress_params: str, compress: frozenset[str] | None
) -> frozenset[str] | None:
    """The parameter names FOAM/GWT transform: ``compress`` when given, else those of ``model`` chosen by
    ``compress_params`` (None without a model: every parameter with at least two dimensions)."""
    if compress is not None or model is None:
        return compress
    return compressible_names(model, include_head_and_embeddings=compress_params == "all")
