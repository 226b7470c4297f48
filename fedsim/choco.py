"""CHOCO-SGD gossip: decentralized averaging with compressed messages (Koloskova, Stich and Jaggi, ICML 2019,
"Decentralized stochastic optimization and gossip algorithms with compressed communication", Algorithm 2).

Every node ``i`` keeps a public copy ``x_hat_i`` of what it is mixing, known to itself and to its neighbours
(one copy per node serves all of them on a fixed graph). A gossip step on the stacked ``x`` is

    q_i      = C(x_i - x_hat_i)                                (the only message: i sends q_i to its neighbours)
    x_hat_i <- x_hat_i + q_i
    x_i     <- x_i + gamma sum_j W_ij (x_hat_j - x_hat_i)      (= x + gamma (W - I) x_hat)

with the consensus step size ``gamma`` in (0, 1] (``choco_gamma``) and ``x_hat = 0`` at the start (the paper).
CHOCO needs a contraction, so the unbiased operators are rescaled as in the paper: rand-k drops its ``n / k``
and QSGD is divided by ``1 + min(n / s^2, sqrt(n) / s)`` (:meth:`fedsim.compressors.Compressor.contraction`).
With the identity compressor and ``gamma = 1`` it is plain gossip ``x <- W x`` (tested). It replaces every
``X <- W X`` of a decentralized strategy (:func:`strategies.decentralized.gossip`): once for D-SGD, twice for
DSGT (parameters and tracker, each with its own public copies), in the order the strategy gossips.

Public copies live with the nodes' state (``ServerState.extras``, keys ``choco.SLOT.NAME``) and are
checkpointed; a compressor's own error-feedback state, if any, is the uplink channel's. Bytes: each node sends
its compressed ``q_i`` once per gossip to every out-neighbour (counted per directed edge).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from fedsim.compression import GOSSIP, Compression
from fedsim.core.pytree import Tree

DEFAULT_GAMMA = 0.5
"""``choco_gamma`` when not given (our choice; the paper tunes gamma per compressor and graph)."""


class ChocoGossip:
    """One round's CHOCO-SGD gossip operator: ``mix(x)`` replaces ``W x`` (see the module docstring).

    ``public``: the public copies from the nodes' state (``SLOT.NAME`` keys; missing ones start at zero);
    after the round :attr:`public` holds the updated copies and :attr:`calls` the gossip steps taken."""

    def __init__(self, w: Tensor, compression: Compression, gamma: float, seed: int, round_: int, public: Tree) -> None:
        self.w, self.compression, self.gamma = w, compression, gamma
        compression.contractive = True
        self.seed, self.round = seed, round_
        self.public = dict(public)
        self.calls = 0

    def mix(self, x: Tree) -> Tree:
        slot, self.calls = self.calls, self.calls + 1
        m = next(iter(x.values())).shape[0]
        names = {k: f"{slot}.{k}" for k in x}
        hat = {k: self.public.get(names[k], torch.zeros_like(v)) for k, v in x.items()}
        diff = {names[k]: x[k] - hat[k] for k in x}
        q = self.compression.compress(diff, np.arange(m), m, self.seed, GOSSIP + slot, self.round)
        out = {}
        for k, v in x.items():
            new_hat = hat[k] + q[names[k]]
            self.public[names[k]] = new_hat
            flat = new_hat.reshape(m, -1)
            out[k] = v + self.gamma * (torch.sparse.mm(self.w, flat) - flat).reshape(v.shape)
        return out
