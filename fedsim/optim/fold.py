"""Block folding along the last dimension, the state compression of FOAM (zqOuO/FOAM).

With block ``b = 2^level`` and last dimension ``n`` (zero-padded to a multiple of ``b``):

- ``fold(x)[..., j] = mean(x[..., j b : (j + 1) b])``, ``ceil(n / b)`` columns;
- ``unfold(z)[..., i] = z[..., floor(i / b)]``, cropped to ``n`` columns.

The padding zeros count in the last block's mean, as in the authors' code. Every function acts on the last
dimension only, so leading dimensions (a stacked client axis included) pass through.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def folded_length(n: int, level: int) -> int:
    """Columns after folding ``n`` columns at ``level``: ``ceil(n / 2^level)``."""
    block = 1 << level
    return -(-n // block)


def blocks(x: Tensor, level: int) -> Tensor:
    """``x[..., n]`` as ``[..., ceil(n / b), b]`` blocks (a view when ``b`` divides ``n``, else zero-padded)."""
    block = 1 << level
    n = x.shape[-1]
    pad = folded_length(n, level) * block - n
    if pad:
        x = F.pad(x, (0, pad))
    return x.view(*x.shape[:-1], -1, block)


def fold(x: Tensor, level: int) -> Tensor:
    """Block means along the last dimension: ``[..., n] -> [..., ceil(n / 2^level)]``."""
    return blocks(x, level).mean(dim=-1)


def unfold(z: Tensor, level: int, n: int) -> Tensor:
    """Repeat each column ``2^level`` times and crop to ``n`` columns: ``[..., m] -> [..., n]``."""
    return z.repeat_interleave(1 << level, dim=-1)[..., :n]
