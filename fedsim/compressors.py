"""Compression operators for client uploads and server broadcasts, vectorized over the client axis, with the
exact number of bits each would put on the wire, and the error-feedback rules around them.

Every operator maps a stack ``x`` of shape ``[C, n]`` (one flattened tensor per client) to what the receiver
decodes, ``C(x)`` of the same shape; ``bits(n)`` is what one client sends for one tensor of n entries (no entropy
coding). Randomness is counter-based (:mod:`fedsim.core.rng`): entry j of client c in a call keyed ``keys`` gets
``uniform(*keys, c, j)``, so a result never depends on how clients are chunked.

The engine's channels (component kind ``compressor``, per-client state, bytes of a message) are in
:mod:`fedsim.compression`; CHOCO-SGD gossip in :mod:`fedsim.choco`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fedsim.core import rng
from fedsim.core.errors import FedsimError

FLOAT_BITS = 32
INDEX_BITS = 32
STREAM_COMPRESSION = 18


def _uniform(x: Tensor, clients: np.ndarray, keys: tuple[int, ...]) -> Tensor:
    """Counter-based U(0, 1) of ``x``'s shape (24 random bits): entry (c, j) from ``(*keys, clients[c], j // 2)``
    (:func:`fedsim.core.rng.uniform32`)."""
    u = rng.uniform32(*keys, STREAM_COMPRESSION, rows=np.asarray(clients), count=x.shape[1])
    return torch.from_numpy(u).to(x.device, x.dtype)


def _check_ratio(ratio: float) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise FedsimError(f"ratio must be in (0, 1], got {ratio!r}")
    return float(ratio)


class Compressor:
    """Base: ``compress(x, clients, keys)`` gives the decoded ``[C, n]`` stack; ``bits(n)`` the bits per client."""

    name = "none"
    unbiased = True

    def compress(self, x: Tensor, clients: np.ndarray, keys: tuple[int, ...] = ()) -> Tensor:
        return x

    def bits(self, n: int) -> int:
        """``32 n``: every entry as a float32."""
        return FLOAT_BITS * n

    def contraction(self, n: int) -> float:
        """The factor that turns an unbiased compressor into a contraction, ``E||a C(x) - x||^2 <= (1 - delta)
        ||x||^2``, as CHOCO-SGD needs (Koloskova et al. 2019, section 3): 1 for the biased ones."""
        return 1.0


class NoCompression(Compressor):
    """The identity: 32 bits per entry."""


@dataclass
class TopK(Compressor):
    """Keep the ``k = max(1, floor(ratio n))`` entries of largest magnitude of each client's vector, zero the rest.
    Sends k float32 values and k 32-bit indices. Biased (use error feedback)."""

    ratio: float = 0.01
    name = "topk"
    unbiased = False

    def __post_init__(self) -> None:
        self.ratio = _check_ratio(self.ratio)

    def k(self, n: int) -> int:
        return max(1, math.floor(self.ratio * n))

    def compress(self, x: Tensor, clients: np.ndarray, keys: tuple[int, ...] = ()) -> Tensor:
        index = x.abs().topk(self.k(x.shape[1]), dim=1).indices
        return torch.zeros_like(x).scatter(1, index, x.gather(1, index))

    def bits(self, n: int) -> int:
        return (FLOAT_BITS + INDEX_BITS) * self.k(n)


@dataclass
class RandK(TopK):
    """Keep k = max(1, floor(ratio n)) uniformly random entries of each client's vector (without replacement),
    scaled by n / k so that ``E[C(x)] = x`` (Stich et al. 2018); same bits as top-k."""

    name = "randk"
    unbiased = True

    def compress(self, x: Tensor, clients: np.ndarray, keys: tuple[int, ...] = ()) -> Tensor:
        n, k = x.shape[1], self.k(x.shape[1])
        index = _uniform(x, clients, keys).topk(k, dim=1).indices  # the k largest of iid uniforms: k random entries
        return torch.zeros_like(x).scatter(1, index, x.gather(1, index) * (n / k))

    def contraction(self, n: int) -> float:
        """``k / n``: rand-k without its rescaling (delta = k / n)."""
        return self.k(n) / n


@dataclass
class QSGD(Compressor):
    """QSGD with s levels (Alistarh et al. 2017): ``C(x)_j = ||x||_2 sign(x_j) xi_j / s`` with
    ``xi_j = floor(s |x_j| / ||x||) + Bernoulli(frac)``, unbiased. Bits: ``n (1 + ceil(log2(s + 1)))`` (sign and
    level of every entry, no Elias coding) plus a 32-bit norm."""

    levels: int = 256
    name = "qsgd"

    def __post_init__(self) -> None:
        if isinstance(self.levels, bool) or not isinstance(self.levels, int) or self.levels < 1:
            raise FedsimError(f"levels must be an integer >= 1, got {self.levels!r}")

    def compress(self, x: Tensor, clients: np.ndarray, keys: tuple[int, ...] = ()) -> Tensor:
        norm = x.norm(dim=1, keepdim=True)
        scaled = x.abs().mul_(self.levels / torch.where(norm > 0, norm, torch.ones_like(norm)))
        level = scaled.floor()
        level.add_(_uniform(x, clients, keys).lt_(scaled.sub_(level)))  # + Bernoulli(fractional part)
        return torch.copysign(level, x).mul_(norm / self.levels)

    def bits(self, n: int) -> int:
        return n * (1 + math.ceil(math.log2(self.levels + 1))) + FLOAT_BITS

    def contraction(self, n: int) -> float:
        """``1 / tau`` with ``tau = 1 + min(n / s^2, sqrt(n) / s)``, QSGD's variance bound (the paper's rescaling)."""
        return 1.0 / (1.0 + min(n / self.levels**2, math.sqrt(n) / self.levels))


class Sign(Compressor):
    """1-bit sign with an L1 scale (EF-signSGD, Karimireddy et al. 2019): ``C(x) = (||x||_1 / n) sign(x)``.
    Bits: n plus one 32-bit scale. Biased."""

    name = "sign"
    unbiased = False

    def compress(self, x: Tensor, clients: np.ndarray, keys: tuple[int, ...] = ()) -> Tensor:
        return x.abs().mean(dim=1, keepdim=True) * x.sign()

    def bits(self, n: int) -> int:
        return n + FLOAT_BITS


@dataclass
class Blockwise(Compressor):
    """Blockwise absmax quantization to ``bits`` bits (8 or 4): each block of ``block`` entries is scaled by its
    largest magnitude m to the signed integers ``-(2^(b-1) - 1) .. 2^(b-1) - 1`` by rounding to nearest:
    ``C(x) = m / L round(L x / m)``, L = 2^(b-1) - 1 (b = 1: the block's mean magnitude times the sign). Bits:
    ``b n`` plus a 32-bit scale per block (the last block may be short). Deterministic; biased."""

    bits_per_entry: int = 8
    block: int = 64

    def __post_init__(self) -> None:
        if self.bits_per_entry not in (1, 2, 4, 8):
            raise FedsimError(f"bits must be one of 1, 2, 4, 8, got {self.bits_per_entry!r}")
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1:
            raise FedsimError(f"block must be an integer >= 1, got {self.block!r}")

    @property
    def name(self) -> str:
        return f"int{self.bits_per_entry}"

    @property
    def unbiased(self) -> bool:
        return False

    def compress(self, x: Tensor, clients: np.ndarray, keys: tuple[int, ...] = ()) -> Tensor:
        c, n = x.shape
        pad = (-n) % self.block
        blocks = torch.nn.functional.pad(x, (0, pad)).reshape(c, -1, self.block)
        if self.bits_per_entry == 1:  # one bit: the sign, scaled by the block's mean magnitude
            decoded = blocks.abs().mean(dim=2, keepdim=True) * blocks.sign()
            return decoded.reshape(c, -1)[:, :n]
        level = 2 ** (self.bits_per_entry - 1) - 1
        scale = blocks.abs().amax(dim=2, keepdim=True)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        decoded = (blocks * level / safe).round().clamp(-level, level) * safe / level
        return decoded.reshape(c, -1)[:, :n]

    def bits(self, n: int) -> int:
        return self.bits_per_entry * n + FLOAT_BITS * math.ceil(n / self.block)


@dataclass
class PowerSGD:
    """Rank-r PowerSGD on a stack of matrices ``M`` ``[C, a, b]`` (Vogels et al. 2019), one power iteration with
    a warm-started ``Q`` ``[C, b, r]`` kept per client: ``P = orth(M Q)``, ``Q' = M^T P``, ``C(M) = P Q'^T``.
    Bits: ``32 r (a + b)`` (P and Q'). Returns the decoded stack and the next Q."""

    rank: int = 4
    name = "powersgd"

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise FedsimError(f"rank must be an integer >= 1, got {self.rank!r}")

    def initial_q(self, shape: tuple[int, int, int], clients: np.ndarray, keys: tuple[int, ...] = ()) -> Tensor:
        """A counter-based Gaussian-like start ``[C, b, r]`` (uniform(-1, 1) entries; any full-rank start serves)."""
        c, _, b = shape
        u = rng.uniform(*keys, STREAM_COMPRESSION, np.asarray(clients)[:, None], np.arange(b * self.rank)[None, :])
        return torch.as_tensor(2 * u - 1, dtype=torch.float32).reshape(c, b, self.rank)

    def compress(self, m: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
        p, _ = torch.linalg.qr(m @ q.to(m.dtype))
        q_next = m.transpose(1, 2) @ p
        return p @ q_next.transpose(1, 2), q_next

    def bits(self, a: int, b: int) -> int:
        return FLOAT_BITS * self.rank * (a + b)


def error_feedback(x: Tensor, residual: Tensor, compress) -> tuple[Tensor, Tensor]:
    """Classic error feedback (Seide et al. 2014; Karimireddy et al. 2019): send ``s = C(x + e)`` and keep
    ``e' = x + e - s``, so that ``s + e' = x + e`` exactly. ``compress`` maps a stack to its decoded form."""
    corrected = x + residual
    sent = compress(corrected)
    return sent, corrected - sent


def ef21(x: Tensor, estimate: Tensor, compress) -> tuple[Tensor, Tensor]:
    """EF21 (Richtarik, Sokolov and Fatkhullin 2021): the client sends ``c = C(x - g)`` and both sides update
    the shared estimate ``g' = g + c``; the server uses g'. Returns (what is sent, g')."""
    sent = compress(x - estimate)
    return sent, estimate + sent
