"""``torch.compile``d in-place FOAM and GWT steps (``FOAM(..., fused=True)``, ``GWT(..., fused=True)``).

Eager PyTorch spends most of a FOAM/GWT step on full-size temporaries and on broadcasts along the short
block dimension (several times slower per element than plain elementwise ops on CPU); compiled, the step
becomes a few fused loops and runs at Adam's speed (README, "Performance"). The rules are the same as
:class:`fedsim.optim.kernels.FoamRule` / :class:`fedsim.optim.kernels.GwtRule` (tested equal to rounding),
written for a last dimension divisible by ``2^level``; other parameters take the eager path. One compiled
call steps all fusable matrices of a param group (the per-call overhead is paid once per group), so the
first step compiles a kernel specialized to the group's shapes (seconds to tens of seconds on a CPU; static
shapes: kernels compiled for dynamic shapes measured no faster than eager), and a group whose set of
parameters changes compiles again, up to torch's recompile limit (8), beyond which torch runs it eagerly.
Scalars that change every step (step sizes, eps) are passed as tensors so they do not trigger recompiles.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_compiled: dict[str, object] = {}


def _compile(name: str, fn):
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, dynamic=False)
    return _compiled[name]


def _foam_step(
    p: Tensor, g: Tensor, m: Tensor, v: Tensor, step_size: Tensor, eps: Tensor,
    beta1: float, beta2: float, res_scale: float, scale: float, block: int,
) -> None:  # fmt: skip
    n = g.shape[-1]
    gb = g.reshape(-1, n // block, block)
    m2, v2 = m.view(-1, n // block), v.view(-1, n // block)
    g_f = gb.mean(-1)
    m2.lerp_(g_f, 1 - beta1)
    v2.mul_(beta2).add_((gb * gb).mean(-1), alpha=1 - beta2)
    residual = gb - g_f.unsqueeze(-1)
    numerator = m2.unsqueeze(-1) + res_scale * residual
    denominator = (v2.unsqueeze(-1) + (res_scale * res_scale) * residual * residual).sqrt() + eps
    p.view(-1, n // block, block).sub_((step_size * scale) * numerator / denominator)


def _gwt_step(
    p: Tensor, g: Tensor, m: Tensor, v: Tensor, prev: Tensor, step_size: Tensor, eps: Tensor,
    beta1: float, beta2: float, scale: float, limiter: float, level: int,
) -> None:  # fmt: skip
    approx, details = g, []
    for _ in range(level):
        even, odd = approx[..., 0::2], approx[..., 1::2]
        details.append((even - odd) * _SQRT_HALF)
        approx = (even + odd) * _SQRT_HALF
    m.lerp_(approx, 1 - beta1)
    v.mul_(beta2).addcmul_(approx, approx, value=1 - beta2)
    den = v.sqrt() + eps
    normalized = m / den
    norm = torch.linalg.vector_norm(normalized)
    started = prev > 0
    ratio = norm / torch.where(started, prev, torch.ones_like(prev))
    lim = torch.where(started, torch.clamp(ratio, min=limiter) / limiter, torch.ones_like(ratio))
    prev.copy_(norm / lim)
    out = normalized / lim
    for j in range(level - 1, -1, -1):  # coarsest band first
        reps = 1 << (level - 1 - j)
        d = details[j]
        den_j = den.unsqueeze(-1).expand(*den.shape, reps).reshape(d.shape)
        d = d / (den_j * lim)
        out = torch.stack(((out + d) * _SQRT_HALF, (out - d) * _SQRT_HALF), dim=-1).reshape(d.shape[:-1] + (-1,))
    p.sub_((step_size * scale) * out)


def _foam_steps(ps, gs, ms, vs, step_sizes, eps, beta1, beta2, res_scale, scale, block) -> None:
    for i in range(len(ps)):
        _foam_step(ps[i], gs[i], ms[i], vs[i], step_sizes[i], eps[i], beta1, beta2, res_scale, scale, block)


def _gwt_steps(ps, gs, ms, vs, prevs, step_sizes, eps, beta1, beta2, scale, limiter, level) -> None:
    for i in range(len(ps)):
        _gwt_step(ps[i], gs[i], ms[i], vs[i], prevs[i], step_sizes[i], eps[i], beta1, beta2, scale, limiter, level)


def _scalars(values: list[float], like: Tensor) -> Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)


def foam_steps_(ps, gs, ms, vs, step_sizes: list[float], eps: list[float], beta1, beta2, res_scale, scale, level):
    """Compiled in-place FOAM steps for a list of parameters (one compiled call: the per-call overhead is paid
    once per group); every ``p.shape[-1] % 2^level == 0``."""
    steps, eps_t = _scalars(step_sizes, ps[0]), _scalars(eps, ps[0])
    _compile("foam", _foam_steps)(ps, gs, ms, vs, steps, eps_t, beta1, beta2, res_scale, scale, 1 << level)


def gwt_steps_(ps, gs, ms, vs, prevs, step_sizes: list[float], eps: list[float], beta1, beta2, scale, limiter, level):
    """Compiled in-place GWT steps for a list of parameters (``prevs``: the limiter norms, updated)."""
    steps, eps_t = _scalars(step_sizes, ps[0]), _scalars(eps, ps[0])
    _compile("gwt", _gwt_steps)(ps, gs, ms, vs, prevs, steps, eps_t, beta1, beta2, scale, limiter, level)
