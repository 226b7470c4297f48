"""Multi-level Haar discrete wavelet transform along the last dimension, the transform of GWT (zqOuO/GWT).

One level maps ``x[..., n]`` (zero-padded to even length) to approximation and detail coefficients

    ``a_j = (x_{2j} + x_{2j+1}) / sqrt 2``,   ``d_j = (x_{2j} - x_{2j+1}) / sqrt 2``,   ``ceil(n / 2)`` each;

``level`` levels recurse on ``a`` and give ``[A_L, D_L, ..., D_1]``. The inverse ``x_{2j} = (a_j + d_j) /
sqrt 2``, ``x_{2j+1} = (a_j - d_j) / sqrt 2`` followed by cropping to the level's original length makes
``haar_idwt(haar_dwt(x, L), n) == x`` for odd and even ``n`` (the transform is orthonormal). Leading
dimensions pass through.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

SQRT_HALF = 1.0 / math.sqrt(2.0)


def pairs_of(x: Tensor) -> Tensor:
    """``x[..., n]`` as ``[..., ceil(n / 2), 2]`` (zero-padding an odd length)."""
    if x.shape[-1] % 2:
        x = F.pad(x, (0, 1))
    return x.view(*x.shape[:-1], -1, 2)


def haar_dwt(x: Tensor, level: int) -> list[Tensor]:
    """``[A_L, D_L, ..., D_1]``: ``level`` Haar levels along the last dimension (``level = 0``: ``[x]``)."""
    details = []
    a = x
    for _ in range(level):
        p = pairs_of(a)
        even, odd = p[..., 0], p[..., 1]
        details.append((even - odd).mul_(SQRT_HALF))
        a = (even + odd).mul_(SQRT_HALF)
    return [a, *reversed(details)]


def level_lengths(n: int, level: int) -> list[int]:
    """Lengths of the signal entering each level, finest first: ``[n, ceil(n/2), ...]`` (``level`` items)."""
    lengths = []
    for _ in range(level):
        lengths.append(n)
        n = -(-n // 2)
    return lengths


def haar_idwt(coeffs: list[Tensor], n: int) -> Tensor:
    """Invert :func:`haar_dwt`: ``coeffs = [A_L, D_L, ..., D_1]`` back to ``[..., n]``."""
    a, details = coeffs[0], coeffs[1:]
    lengths = level_lengths(n, len(details))
    for d, length in zip(details, reversed(lengths), strict=True):
        out = torch.empty(*a.shape[:-1], a.shape[-1], 2, dtype=a.dtype, device=a.device)
        torch.add(a, d, out=out[..., 0])
        torch.sub(a, d, out=out[..., 1])
        a = out.view(*a.shape[:-1], -1)[..., :length].mul_(SQRT_HALF)
    return a
