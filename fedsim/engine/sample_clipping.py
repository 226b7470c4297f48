"""DP-SGD's private step gradient (Abadi et al. 2016), for a chunk of clients at once.

For client ``c`` with valid samples ``b`` of a Poisson-drawn batch (mask ``m_cb``) and per-sample gradients
``g_cb`` (``vmap`` over clients of ``vmap(grad)`` over samples), the step uses

    g_c = (sum_b m_cb min(1, C / ||g_cb||) g_cb + z C xi_c) / B,    xi_c ~ N(0, I)

with ``B`` the expected batch size (the Poisson sampler's ``p_c n_c``), so the estimator is unbiased for the
clipped mean and its sensitivity to one record is ``C / B``. The noise ``xi_c`` of (round, client, step) comes
from its own generator seeded by (seed, round, client, step): it does not depend on the chunk. The sum over
samples runs over the outer sample axis (a padding-invariant reduction on CPU), so it does not depend on how
wide the chunk's padded batch is.

For a model of ``Linear`` layers on flat features (:func:`fedsim.engine.stacked.stacked_linear_layers`) the
trainer never forms the per-sample gradients ("ghost clipping", Goodfellow 2015; Li et al. 2022): layer
``l``'s per-sample weight gradient is the outer product ``delta_lb a_lb^T`` of the gradient at its output and
its input, so ``||g_b||^2 = sum_l ||a_lb||^2 ||delta_lb||^2 (+ ||delta_lb||^2 for a bias)``, and the clipped
sum is one batched product ``sum_b s_b delta_lb a_lb^T``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fedsim.core import rng
from fedsim.core.pytree import Tree

STREAM_SAMPLE_NOISE = 14


@dataclass(frozen=True)
class SampleClipping:
    """Per-sample clipping to ``clip`` with noise ``noise_multiplier * clip`` per step (see the module)."""

    clip: float
    noise_multiplier: float
    expected_batch: float
    seed: int

    def norms(self, per_sample: Tree) -> Tensor:
        """``||g_cb||`` over all parameters, ``[C, B]``."""
        squares = [g.flatten(2).pow(2).sum(2) for g in per_sample.values()]
        return torch.stack(squares).sum(0).sqrt()

    def gradient(
        self, per_sample: Tree, mask: Tensor, round_: int, client_ids: np.ndarray, step: int
    ) -> tuple[Tree, Tensor]:
        """The private step gradients ``[C, ...]`` of per-sample gradients ``[C, B, ...]`` and how many valid
        samples were clipped per client."""
        norms = self.norms(per_sample)
        scale = self.scales(norms, mask)
        out = {}
        for name, g in per_sample.items():
            weights = scale.reshape(*scale.shape, *([1] * (g.dim() - 2))).to(g.dtype)
            out[name] = (g * weights).sum(1)
        return self.finish(out, round_, client_ids, step), self.clipped(norms, mask)

    def scales(self, norms: Tensor, mask: Tensor) -> Tensor:
        """``m_cb min(1, C / ||g_cb||)``, ``[C, B]``."""
        return (self.clip / norms.clamp_min(1e-12)).clamp(max=1.0) * mask

    def clipped(self, norms: Tensor, mask: Tensor) -> Tensor:
        """Valid samples per client whose gradient norm exceeds the clip, ``[C]``."""
        return ((norms > self.clip) & (mask > 0)).sum(1)

    def finish(self, clipped_sums: Tree, round_: int, client_ids: np.ndarray, step: int) -> Tree:
        """``(sum + z C xi_c) / B`` of the clients' clipped sums."""
        out = clipped_sums
        if self.noise_multiplier > 0:
            noise = self.noise(out, round_, client_ids, step)
            out = {name: v + noise[name] for name, v in out.items()}
        return {name: v / self.expected_batch for name, v in out.items()}

    def noise(self, like: Tree, round_: int, client_ids: np.ndarray, step: int) -> Tree:
        """``z C xi_c`` for every client of the chunk, each from its own (seed, round, client, step) generator."""
        sizes = [v[0].numel() for v in like.values()]
        first = next(iter(like.values()))
        ids = np.asarray(client_ids, dtype=np.int64)
        seeds = (rng.hash_keys(self.seed, STREAM_SAMPLE_NOISE, round_, ids, step) >> np.uint64(1)).tolist()
        flat = torch.empty(len(ids), sum(sizes), dtype=first.dtype)
        generator = torch.Generator()
        for row, seed in enumerate(seeds):
            torch.randn(flat.shape[1], generator=generator.manual_seed(seed), dtype=first.dtype, out=flat[row])
        flat = flat.mul_(self.noise_multiplier * self.clip).to(first.device)
        out, offset = {}, 0
        for (name, v), size in zip(like.items(), sizes, strict=True):
            out[name] = flat[:, offset : offset + size].reshape(v.shape)
            offset += size
        return out
