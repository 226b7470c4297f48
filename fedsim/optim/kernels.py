"""Update kernels shared by the ``torch.optim`` classes and their functional, client-stacked forms.

Every kernel is pure: it takes the gradient and the current state tensors and returns the update direction
and the new state, without touching its inputs. A kernel reduces over the trailing dimensions of one
parameter starting at ``batch_dims`` (0 for a ``torch.optim`` parameter, 1 for a stack ``[C, ...]`` of
clients), so per-tensor statistics (norms, standard deviations) stay per client. Step sizes are floats or
tensors that broadcast against the parameter (per-client bias corrections).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .fold import blocks, folded_length
from .wavelet import SQRT_HALF, pairs_of


def reduce_dims(x: Tensor, batch_dims: int) -> tuple[int, ...]:
    """The dimensions of one parameter, after the ``batch_dims`` leading (client) ones."""
    return tuple(range(batch_dims, x.dim()))


def tensor_norm(x: Tensor, batch_dims: int) -> Tensor:
    """Frobenius norm of each parameter, kept broadcastable: shape ``x.shape[:batch_dims] + (1,) * rest``."""
    return torch.linalg.vector_norm(x, dim=reduce_dims(x, batch_dims), keepdim=True)


def gradient_snr(g: Tensor, batch_dims: int, eps: float) -> Tensor:
    """SGD-SaI's gradient signal-to-noise ratio of each parameter: ``||g||_2 / (std(g) + eps)`` with the
    unbiased standard deviation over the parameter's entries; 0 for a one-element parameter."""
    dims = reduce_dims(g, batch_dims)
    numel = 1
    for d in dims:
        numel *= g.shape[d]
    norm = torch.linalg.vector_norm(g, dim=dims, keepdim=True)
    if numel < 2:
        return torch.zeros_like(norm)
    return norm / (torch.std(g, dim=dims, keepdim=True, correction=1) + eps)


def adam_moments(g: Tensor, m: Tensor, v: Tensor, beta1: float, beta2: float) -> tuple[Tensor, Tensor]:
    """``m <- b1 m + (1 - b1) g``, ``v <- b2 v + (1 - b2) g^2`` (new tensors)."""
    return torch.lerp(m, g, 1 - beta1), torch.addcmul(v * beta2, g, g, value=1 - beta2)


class Direction(NamedTuple):
    """An update direction ``coef * numerator / denominator`` (``denominator`` None: 1), kept apart so that a
    ``torch.optim`` step applies it with one ``addcdiv_``/``add_`` and no extra full-size pass."""

    numerator: Tensor
    denominator: Tensor | None
    coef: float

    def materialize(self) -> Tensor:
        """The direction as one tensor."""
        u = self.numerator * self.coef
        return u / self.denominator if self.denominator is not None else u

    def apply_(self, p: Tensor, step_size: float) -> None:
        """``p <- p - step_size * direction`` in place."""
        if self.denominator is None:
            p.add_(self.numerator, alpha=-step_size * self.coef)
        else:
            p.addcdiv_(self.numerator, self.denominator, value=-step_size * self.coef)


def _block_means(padded: Tensor, block: int) -> Tensor:
    """Means of consecutive ``block``-sized groups along the last dim (length a multiple of ``block``),
    by average pooling: several times faster on CPU than ``view(..., block).mean(-1)``."""
    if block == 1:
        return padded
    lead = padded.shape[:-1]
    pooled = F.avg_pool1d(padded.reshape(-1, 1, padded.shape[-1]), block, block)
    return pooled.view(*lead, -1)


@dataclass(frozen=True)
class FoamRule:
    """FOAM's folded-state Adam direction (zqOuO/FOAM; ALGORITHMS.md "FOAM"). For ``g[..., n]``, block
    ``b = 2^level``:

    ``g_f = fold(g)``, ``g2_f = fold(g * g)``, ``R = g - unfold(g_f)``;
    ``m <- b1 m + (1 - b1) g_f``, ``v <- b2 v + (1 - b2) g2_f`` (stored at ``ceil(n / b)`` columns);
    ``M = unfold(m) + s R``, ``V = unfold(v) + s^2 R^2``, ``U = alpha M / (sqrt(V) + eps)``.

    Computed as ``M = unfold(m - s g_f) + s g`` (one pass over ``g``), and ``U`` is returned as
    ``alpha * M / (sqrt(V) + eps)`` unevaluated (:class:`Direction`).
    """

    level: int = 2
    scale: float = 0.25
    res_scale: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.999

    def state_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of ``m`` and ``v`` for a parameter of ``shape``."""
        return (*shape[:-1], folded_length(shape[-1], self.level))

    def direction(
        self, g: Tensor, m: Tensor, v: Tensor, eps: float | Tensor, workspace: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Direction, Tensor, Tensor]:
        """``(U, m', v')``: the update direction (before ``-lr * bias correction``) and the new moments.
        ``workspace``: two scratch tensors shaped like the blocked gradient ``[..., ceil(n / b), b]``, reused
        across steps by the ``torch.optim`` form (the returned direction lives in them)."""
        n, s = g.shape[-1], self.res_scale
        gb = blocks(g, self.level)  # [..., n/b, b]
        size = gb.shape[-1]
        g_f = _block_means(gb.reshape(*gb.shape[:-2], -1), size)
        g2_f = torch.linalg.vector_norm(gb, dim=-1).square_().div_(size)
        m, v = torch.lerp(m, g_f, 1 - self.beta1), torch.add(v * self.beta2, g2_f, alpha=1 - self.beta2)
        if isinstance(eps, Tensor):  # per-client [C, 1, ...]: one more trailing dim for the blocks
            eps = eps.unsqueeze(-1)
        first, second = workspace if workspace is not None else (None, None)
        denominator = torch.sub(gb, g_f.unsqueeze(-1), out=first)  # the residual R, then V in place
        torch.addcmul(v.unsqueeze(-1), denominator, denominator, value=s * s, out=denominator)
        denominator.sqrt_().add_(eps)
        numerator = torch.add((m - s * g_f).unsqueeze(-1), gb, alpha=s, out=second)
        lead = g.shape[:-1]
        crop = (numerator.view(*lead, -1)[..., :n], denominator.view(*lead, -1)[..., :n])
        return Direction(*crop, self.scale), m, v


@dataclass(frozen=True)
class GwtRule:
    """GWT's wavelet-domain Adam direction (zqOuO/GWT; ALGORITHMS.md "GWT"). For ``g[..., n]``:

    ``[A_L, D_L, ..., D_1] = haar_dwt(g, L)``; ``m <- b1 m + (1 - b1) A_L``, ``v <- b2 v + (1 - b2) A_L^2``;
    ``den = sqrt(v) + eps``, ``N = m / den``; from the second step on ``lim = max(||N||_F / prev, gamma) /
    gamma`` (else 1), ``N <- N / lim``, ``prev <- ||N||_F``; each detail level, coarsest first,
    ``D <- D / (den[..., :len(D)] * lim)`` and then ``den`` repeats each entry twice;
    ``U = alpha * haar_idwt([N, D_L, ..., D_1])``.

    Computed without the ``1/sqrt 2`` of each butterfly: with ``c = 1/sqrt 2`` the true band ``j`` is
    ``c^j`` times the unnormalized one, and the inverse of level ``L`` is ``c^L`` times unnormalized
    butterflies whose band-``j`` details are scaled by ``c^(2j - L) / (den_j lim)``; that scale is applied
    at the coarse size and ``c^L alpha`` goes into the step. The same numbers as :func:`haar_dwt` /
    :func:`haar_idwt` up to rounding (tested against both and a brute-force reference).
    """

    level: int = 2
    scale: float = 0.25
    limiter: float = 1.01
    beta1: float = 0.9
    beta2: float = 0.999

    def state_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of ``m`` and ``v`` (the approximation band) for a parameter of ``shape``."""
        n = shape[-1]
        for _ in range(self.level):
            n = -(-n // 2)
        return (*shape[:-1], n)

    def direction(
        self, g: Tensor, m: Tensor, v: Tensor, prev: Tensor, eps: float | Tensor, batch_dims: int
    ) -> tuple[Direction, Tensor, Tensor, Tensor]:
        """``(U, m', v', prev')``. ``prev`` is the previous limited norm per parameter, 0 before the first
        step (then the limiter is 1)."""
        c, levels = SQRT_HALF, self.level
        approx, details = g, []
        for _ in range(levels):  # unnormalized butterflies, finest first
            both = pairs_of(approx)
            even, odd = both[..., 0], both[..., 1]
            details.append(even - odd)
            approx = even + odd
        m, v = adam_moments(approx.mul_(c**levels) if levels else approx, m, v, self.beta1, self.beta2)
        den = v.sqrt().add_(eps)
        normalized = m / den
        norm = tensor_norm(normalized, batch_dims)
        last = prev.reshape(norm.shape).to(norm.dtype)
        started = last > 0
        ratio = torch.where(started, norm / torch.where(started, last, torch.ones_like(last)), norm.new_zeros(()))
        lim = torch.clamp(ratio, min=self.limiter) / self.limiter
        normalized.div_(lim)
        new_prev = (norm / lim).reshape(prev.shape).to(prev.dtype)
        factor = torch.reciprocal(den.mul_(lim))  # 1 / (den lim) at the coarse size
        out = normalized
        for j in range(levels, 0, -1):  # coarsest band first
            d = details[j - 1]
            reps = 1 << (levels - j)
            coarse = factor * c ** (2 * j - levels)
            if d.shape[-1] == coarse.shape[-1] * reps:
                d = d.view(*d.shape[:-1], coarse.shape[-1], reps).mul_(coarse.unsqueeze(-1)).view(d.shape)
            else:
                d = d.mul_(coarse.repeat_interleave(reps, dim=-1)[..., : d.shape[-1]])
            length = g.shape[-1] if j == 1 else details[j - 2].shape[-1]
            pairs = torch.empty(*out.shape, 2, dtype=out.dtype, device=out.device)
            torch.add(out, d, out=pairs[..., 0])
            torch.sub(out, d, out=pairs[..., 1])
            out = pairs.view(*out.shape[:-1], -1)[..., :length]
        return Direction(out, None, self.scale * c**levels), m, v, new_prev
