"""Compressed communication (component kind ``compressor``; config keys ``uplink`` and ``downlink``).

A *channel* compresses every tensor of a message with one operator of :mod:`fedsim.compressors`, vectorized
over the client axis, wraps it in an error-feedback rule, and keeps that rule's per-client state in host
memory (rows of ``[N, ...]`` tensors, moved to the device only for the clients of a round, like SCAFFOLD's
control variates):

- ``feedback: none``: the receiver decodes ``C(x)``;
- ``feedback: ef`` (Seide et al. 2014; Karimireddy et al. 2019): send ``s = C(x + e)``, keep ``e <- x + e - s``;
- ``feedback: ef21`` (Richtarik, Sokolov and Fatkhullin 2021): both sides keep ``g``; send ``c = C(x - g)``,
  both set ``g <- g + c``, and the receiver uses ``g``.

Error feedback needs a contraction: with ``ef`` or ``ef21`` the unbiased operators are rescaled, rand-k without
its ``n / k`` and QSGD divided by ``1 + min(n / s^2, sqrt(n) / s)`` (:attr:`Compression.contractive`). Unscaled,
their residuals grow without bound (measured: rand-k 10% with ``ef`` fell from 0.89 to 0.26 test accuracy).

**Uplink** (federated rounds): ``x`` is a client's model delta ``Delta_k`` (a strategy's extra uploads, such
as SCAFFOLD's control-variate deltas, travel uncompressed and are counted at 32 bits). The state lives per
client and persists across the rounds it is not selected in; it is checkpointed.

**Downlink** (:class:`Downlink`): the server's broadcast of the global model ``w_t``. With ``feedback: none``
clients train from ``C(w_t)``. With ``ef21`` the clients hold a copy ``w_hat`` (``w_hat_0 = w_0``, which both
sides know from the seed) updated by ``C(w_t - w_hat)``; with ``ef`` the server sends ``C(w_t - w_{t-1} + e)``
and clients add it to their copy. Both give ``w_hat_t = w_t - e_t`` (the same numbers; tested). Either way the
server keeps and updates its exact model; one copy serves every client (the broadcast goes to all; bytes are
counted for the selected clients, our simplification).

**Bytes** are exact per tensor (:meth:`Compression.tensor_bits`, the formulas of :mod:`fedsim.compressors`); a
message's bytes are ``ceil(bits / 8)`` of the sum over its tensors.

Randomness (rand-k, QSGD) is counter-based on (seed, round, channel, tensor, client, entry): results do not
depend on the chunk size or on which other clients share a round.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from fedsim.compressors import (
    QSGD,
    Blockwise,
    Compressor,
    NoCompression,
    PowerSGD,
    RandK,
    Sign,
    TopK,
    ef21,
    error_feedback,
)
from fedsim.core import components
from fedsim.core.components import option
from fedsim.core.errors import FedsimError
from fedsim.core.pytree import Tree

Feedback = Literal["none", "ef", "ef21"]
FeedbackOption = Annotated[Feedback, option("error feedback: none, ef (residual memory) or ef21 (Richtarik et al.)")]
Ratio = Annotated[float, option("share of the entries sent, k = max(1, floor(ratio n))", gt=0, le=1)]
Block = Annotated[int, option("entries per block, each with its own 32-bit scale", ge=1)]

CACHE_ENTRIES = 2**18
"""Entries an operator processes at once (rows of clients): 1 MB of float32, so its temporaries stay in cache
(QSGD on 100 clients' 50k-entry tensors: 45 ms -> 33 ms)."""

UPLINK, DOWNLINK, GOSSIP = 0, 1, 2
"""Channel numbers in the randomness keys (gossip slot s uses ``GOSSIP + s``)."""


def _index(clients: np.ndarray) -> slice | Tensor:
    """Rows ``clients`` of a state tensor: a slice when they are consecutive (a chunk of a full round: no
    gather), else an index tensor."""
    if len(clients) and clients[-1] - clients[0] == len(clients) - 1 and (np.diff(clients) == 1).all():
        return slice(int(clients[0]), int(clients[-1]) + 1)
    return torch.as_tensor(clients)


class Compression:
    """A channel's compressor and error-feedback rule, with per-client state (see the module docstring).

    Subclasses give :meth:`operator` (and PowerSGD its own :meth:`encode`)."""

    name: ClassVar[str] = "compression"

    def __init__(self, feedback: FeedbackOption = "none") -> None:
        if feedback not in ("none", "ef", "ef21"):
            raise FedsimError(f"feedback must be none, ef or ef21, got {feedback!r}")
        self.feedback: Feedback = feedback
        self.state: dict[str, Tensor] = {}
        """Per-client state in host memory: ``residual.K`` (ef), ``estimate.K`` (ef21), ``q.K`` (PowerSGD)."""
        self.contractive = feedback != "none"
        """Scale unbiased operators into contractions (:meth:`fedsim.compressors.Compressor.contraction`): error
        feedback and CHOCO gossip need ``E||C(x) - x||^2 <= (1 - delta) ||x||^2``, which rand-k (n/k-scaled) and
        QSGD on large tensors violate (their residuals grow without bound). On with ``ef``/``ef21`` (Stich and
        Karimireddy 2019's rescaling ``C / (1 + omega)``); CHOCO gossip sets it too."""

    def operator(self) -> Compressor:
        raise NotImplementedError

    def check_model(self, params: Tree) -> None:
        """Refuse a model the compressor cannot serve (PowerSGD needs a matrix)."""

    def tensor_bits(self, shape: tuple[int, ...]) -> int:
        """Bits one client sends for one tensor of ``shape``."""
        return self.operator().bits(math.prod(shape))

    def message_bytes(self, params: Tree) -> int:
        """Bytes of one compressed message carrying every tensor of ``params`` (one client's, unstacked)."""
        return math.ceil(sum(self.tensor_bits(tuple(v.shape)) for v in params.values()) / 8)

    def encode(self, key: str, x: Tensor, clients: np.ndarray, population: int, keys: tuple[int, ...]) -> Tensor:
        """What the receiver decodes from the stack ``x`` ``[C, ...]`` of tensor ``key``."""
        flat, op = x.reshape(len(x), -1), self.operator()
        decoded = op.compress(flat, clients, keys)
        factor = op.contraction(flat.shape[1]) if self.contractive else 1.0
        if factor != 1.0:
            decoded = decoded * factor
        return decoded.reshape(x.shape)

    def compress(self, stack: Tree, clients: np.ndarray, population: int, seed: int, channel: int, round_: int) -> Tree:
        """What the receiver uses for each client of the stacked message ``stack`` (clients ``clients`` out of
        ``population``), after the error-feedback rule; updates the clients' state. Randomness is keyed
        ``(seed, channel, tensor, round, client, entry)``."""
        clients = np.asarray(clients, dtype=np.int64)
        out = {}
        for i, (key, x) in enumerate(stack.items()):
            keys = (seed, channel, i, round_)
            rows = max(1, CACHE_ENTRIES // max(1, x[0].numel()))
            if rows >= len(x):
                out[key] = self._received(key, x, clients, population, keys)
                continue
            out[key] = torch.empty_like(x)  # a few clients at a time: temporaries stay in cache (rows are independent)
            for first in range(0, len(x), rows):
                part = slice(first, first + rows)
                out[key][part] = self._received(key, x[part], clients[part], population, keys)
        return out

    def _received(self, key: str, x: Tensor, clients: np.ndarray, population: int, keys: tuple[int, ...]) -> Tensor:
        """What the receiver uses for tensor ``key`` of these clients, after the feedback rule."""

        def encode(v: Tensor) -> Tensor:
            return self.encode(key, v, clients, population, keys)

        if self.feedback == "none":
            return encode(x)
        if self.feedback == "ef":
            sent, residual = error_feedback(x, self.rows(f"residual.{key}", x, clients, population), encode)
            self.store(f"residual.{key}", clients, residual)
            return sent
        _, estimate = ef21(x, self.rows(f"estimate.{key}", x, clients, population), encode)
        self.store(f"estimate.{key}", clients, estimate)
        return estimate

    def rows(self, name: str, like: Tensor, clients: np.ndarray, population: int) -> Tensor:
        """The clients' rows of state ``name`` on ``like``'s device (zeros the first time)."""
        if name not in self.state:
            self.state[name] = torch.zeros((population, *like.shape[1:]), dtype=like.dtype)
        return self.state[name][_index(clients)].to(like.device)

    def store(self, name: str, clients: np.ndarray, value: Tensor) -> None:
        self.state[name][_index(clients)] = value.detach().to("cpu", self.state[name].dtype)

    def state_bytes(self) -> int:
        """Host memory of the channel's state."""
        return sum(v.numel() * v.element_size() for v in self.state.values())

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self.state.items()}

    def load_state_dict(self, state: dict[str, Tensor] | None) -> None:
        self.state = {k: v.clone() for k, v in (state or {}).items()}


class Identity(Compression):
    """No compression as an explicit channel (32 bits per entry); CHOCO-SGD with it is plain gossip."""

    name = "identity"

    def operator(self) -> Compressor:
        return NoCompression()


class TopKCompression(Compression):
    """Top-k sparsification: the k = max(1, floor(ratio n)) largest-magnitude entries of every tensor, sent as k
    float32 values and k 32-bit indices. Biased: pair it with error feedback."""

    name = "topk"

    def __init__(self, ratio: Ratio = 0.01, feedback: FeedbackOption = "none") -> None:
        super().__init__(feedback)
        self.ratio = ratio
        self.op = TopK(ratio)

    def operator(self) -> Compressor:
        return self.op


class RandKCompression(TopKCompression):
    """Rand-k sparsification: k = max(1, floor(ratio n)) random entries scaled by n / k (unbiased); same bits as
    top-k."""

    name = "randk"

    def __init__(self, ratio: Ratio = 0.01, feedback: FeedbackOption = "none") -> None:
        super().__init__(ratio, feedback)
        self.op = RandK(ratio)


class QSGDCompression(Compression):
    """QSGD (Alistarh et al. 2017): s levels, stochastic rounding, scaled by the tensor's norm; unbiased. Bits:
    ``n (1 + ceil(log2(s + 1))) + 32``."""

    name = "qsgd"

    def __init__(
        self,
        levels: Annotated[int, option("quantization levels s", ge=1)] = 16,
        feedback: FeedbackOption = "none",
    ) -> None:
        super().__init__(feedback)
        self.levels = levels
        self.op = QSGD(levels)

    def operator(self) -> Compressor:
        return self.op


class SignCompression(Compression):
    """1-bit sign with the L1 scale ``||x||_1 / n`` (signSGD; EF-signSGD with feedback ef). Bits: ``n + 32``."""

    name = "sign"

    def operator(self) -> Compressor:
        return Sign()


class BlockwiseCompression(Compression):
    """Blockwise absmax quantization to ``bits`` bits (1, 2, 4 or 8) per entry, a 32-bit scale per ``block``
    entries. Bits: ``bits n + 32 ceil(n / block)``."""

    name = "blockwise"

    def __init__(
        self,
        bits: Annotated[int, option("bits per entry: 1, 2, 4 or 8")] = 8,
        block: Block = 64,
        feedback: FeedbackOption = "none",
    ) -> None:
        super().__init__(feedback)
        self.bits = bits
        if self.bits not in (1, 2, 4, 8):
            raise FedsimError(f"bits must be one of 1, 2, 4, 8, got {self.bits!r}")
        self.block = block
        self.op = Blockwise(self.bits, block)

    def operator(self) -> Compressor:
        return self.op


class Int8Compression(BlockwiseCompression):
    """int8: blockwise absmax quantization to 8 bits per entry and a 32-bit scale per block."""

    name = "int8"

    def __init__(self, block: Block = 64, feedback: FeedbackOption = "none") -> None:
        super().__init__(8, block, feedback)


class Int4Compression(BlockwiseCompression):
    """int4: blockwise absmax quantization to 4 bits per entry and a 32-bit scale per block."""

    name = "int4"

    def __init__(self, block: Block = 64, feedback: FeedbackOption = "none") -> None:
        super().__init__(4, block, feedback)


FALLBACKS: dict[str, Any] = {"none": NoCompression, "int8": lambda: Blockwise(8), "int4": lambda: Blockwise(4),
                             "sign": Sign}  # fmt: skip


class PowerSGDCompression(Compression):
    """PowerSGD (Vogels, Karimireddy and Jaggi 2019): every tensor of two or more dimensions, viewed as an
    ``a x b`` matrix (first dimension by the rest), is sent as rank-r factors ``P``, ``Q'`` after one power
    iteration from a warm-started ``Q`` kept per client; ``r = min(rank, a, b)``. Bits: ``32 r (a + b)``. Other
    tensors (biases) use ``fallback`` (none: 32 bits per entry). Error feedback defaults to ``ef``, as in the
    paper."""

    name = "powersgd"

    def __init__(
        self,
        rank: Annotated[int, option("rank r of the factors", ge=1)] = 4,
        fallback: Annotated[Literal["none", "int8", "int4", "sign"], option("compressor of vectors")] = "none",
        feedback: FeedbackOption = "ef",
    ) -> None:
        super().__init__(feedback)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise FedsimError(f"rank must be an integer >= 1, got {rank!r}")
        self.rank, self.fallback = rank, fallback
        self.vector_op = FALLBACKS[fallback]()

    def check_model(self, params: Tree) -> None:
        if not any(v.dim() >= 2 for v in params.values()):
            raise FedsimError("compressor 'powersgd' needs a model with a weight matrix; this one has only vectors")

    def matrix_rank(self, shape: tuple[int, ...]) -> int:
        return min(self.rank, shape[0], math.prod(shape[1:]))

    def operator(self) -> Compressor:
        return self.vector_op

    def tensor_bits(self, shape: tuple[int, ...]) -> int:
        if len(shape) < 2:
            return self.vector_op.bits(math.prod(shape))
        return PowerSGD(self.matrix_rank(shape)).bits(shape[0], math.prod(shape[1:]))

    def encode(self, key: str, x: Tensor, clients: np.ndarray, population: int, keys: tuple[int, ...]) -> Tensor:
        if x.dim() < 3:  # a stacked vector
            return super().encode(key, x, clients, population, keys)
        op = PowerSGD(self.matrix_rank(tuple(x.shape[1:])))
        m = x.reshape(len(x), x.shape[1], -1)
        name = f"q.{key}"
        if name not in self.state:  # every client's start, a pure function of (keys, client)
            start = op.initial_q((population, m.shape[1], m.shape[2]), np.arange(population), keys[:3])  # no round
            self.state[name] = start
        decoded, q_next = op.compress(m, self.state[name][torch.as_tensor(clients)].to(m.device, m.dtype))
        self.store(name, clients, q_next)
        return decoded.reshape(x.shape)


class Downlink:
    """The server's compressed broadcast of the global model (see the module docstring): :meth:`broadcast`
    returns the model the selected clients train from this round."""

    def __init__(self, compression: Compression, initial: Tree) -> None:
        self.compression = compression
        if compression.feedback == "ef21":
            compression.state.update({f"estimate.{k}": v.detach().cpu()[None].clone() for k, v in initial.items()})
        elif compression.feedback == "ef":
            compression.state.update({f"copy.{k}": v.detach().cpu()[None].clone() for k, v in initial.items()})
            compression.state.update({f"last.{k}": v.detach().cpu()[None].clone() for k, v in initial.items()})

    def broadcast(self, params: Tree, seed: int, round_: int) -> Tree:
        c, one = self.compression, np.zeros(1, dtype=np.int64)
        stacked = {k: v[None] for k, v in params.items()}
        if c.feedback != "ef":  # none: C(w); ef21: the clients' copy, moved by C(w - w_hat)
            return {k: v[0] for k, v in c.compress(stacked, one, 1, seed, DOWNLINK, round_).items()}
        step = {k: v - c.rows(f"last.{k}", v, one, 1) for k, v in stacked.items()}
        sent = c.compress(step, one, 1, seed, DOWNLINK, round_)
        out = {}
        for k, v in stacked.items():
            copy = c.rows(f"copy.{k}", v, one, 1) + sent[k]
            c.store(f"copy.{k}", one, copy)
            c.store(f"last.{k}", one, v)
            out[k] = copy[0]
        return out


for _cls in (Identity, TopKCompression, RandKCompression, QSGDCompression, SignCompression, Int8Compression,
             Int4Compression, BlockwiseCompression, PowerSGDCompression):  # fmt: skip
    components.register("compressor", _cls.name, _cls)
