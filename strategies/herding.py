"""Greedy herding over a set of vectors, in Gram-matrix form, batched over clients (shared by ECGR and BHerd).

Given units ``D_1..D_U`` (one client's local steps, microbatch or sample gradients) and a centre ``c``,
greedy herding builds a sequence: ``S = 0``; repeatedly pick the not yet chosen ``i`` minimizing
``||S + (D_i - c)||_2`` and add ``D_i - c`` to ``S`` (Welling 2009; Chen, Welling & Smola 2010). The first
picks are the units whose running mean tracks the centre best.

Only inner products are needed. With ``E_i = D_i - c`` and ``H = E E^T``,

    ||S + E_i||^2 = ||S||^2 + 2 <S, E_i> + H_ii,        <S, E_i> = sum_{j chosen} H_ji,

and ``||S||^2`` is the same for every candidate, so a step is ``argmin_i 2 s_i + H_ii`` followed by
``s <- s + H_{j,:}``: ``O(U)`` work per pick after the ``O(U^2 D)`` Gram matrix ``G = D D^T``. Centring is
done on the Gram matrix too: for the local mean ``c = (1/n) sum_j D_j``,
``H_ij = G_ij - r_i - r_j + q`` with ``r_i = (1/n) sum_j G_ij`` and ``q = (1/n) sum_i r_i``.

Ties go to the lowest index (``torch.argmin`` returns the first minimum), the same rule as a brute-force
loop over ``i`` in order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedsim.core.errors import unknown

CENTERS = ("zero", "local_mean")


def gram(units: Tensor) -> Tensor:
    """``G = D D^T`` over the last two dims: ``[..., U, D] -> [..., U, U]``."""
    return units @ units.transpose(-1, -2)


def centered_gram(g: Tensor, mask: Tensor, center: str) -> Tensor:
    """Gram matrix of ``E_i = D_i - c`` from that of ``D`` (``[C, U, U]``), with ``c = 0`` (``"zero"``) or the
    mean of the units where ``mask[C, U]`` is True (``"local_mean"``)."""
    if center == "zero":
        return g
    if center != "local_mean":
        raise unknown("herding center", center, CENTERS)
    m = mask.to(g.dtype)
    n = m.sum(1).clamp_min(1.0)
    r = (g * m.unsqueeze(1)).sum(2) / n.unsqueeze(1)  # r_i = <D_i, c>
    q = (r * m).sum(1) / n  # ||c||^2
    return g - r.unsqueeze(2) - r.unsqueeze(1) + q.reshape(-1, 1, 1)


def greedy_herding(g: Tensor, count: Tensor, mask: Tensor | None = None, center: str = "zero") -> tuple[Tensor, Tensor]:
    """Greedy herding on per-client Gram matrices ``g[C, U, U]`` (float64 recommended).

    Picks ``count[c]`` units for client ``c`` among those with ``mask[c]`` True (all by default). Returns
    ``order[C, max(count)]`` (the picks in order; -1 past a client's count) and ``selected[C, U]`` (bool).
    """
    num_clients, units, _ = g.shape
    mask = torch.ones(num_clients, units, dtype=torch.bool, device=g.device) if mask is None else mask.bool()
    count = torch.as_tensor(count, device=g.device).long()
    h = centered_gram(g, mask, center)
    diag = h.diagonal(dim1=1, dim2=2)
    s = torch.zeros(num_clients, units, dtype=h.dtype, device=h.device)
    available = mask.clone()
    picks = int(count.max()) if count.numel() else 0
    order = torch.full((num_clients, picks), -1, dtype=torch.long, device=g.device)
    rows = torch.arange(num_clients, device=g.device)
    inf = torch.tensor(float("inf"), dtype=h.dtype, device=h.device)
    for t in range(picks):
        live = (count > t) & available.any(1)
        cost = torch.where(available, 2.0 * s + diag, inf)
        j = cost.argmin(1)
        order[:, t] = torch.where(live, j, torch.full_like(j, -1))
        available[rows[live], j[live]] = False
        s = s + h[rows, j] * live.unsqueeze(1).to(h.dtype)
    selected = mask & ~available
    return order, selected


def safe_ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` elementwise, 0 where ``den == 0``."""
    tiny = torch.finfo(den.dtype).tiny
    return torch.where(den > 0, num / den.clamp_min(tiny), torch.zeros_like(num))
