"""Counter-based randomness: every random number is a pure function of (seed, round, client, stream, ...).

Nothing here keeps a hidden generator, so results cannot depend on chunk size, executor or the order in
which clients are trained. The mixer is SplitMix64's finalizer (Steele, Lea & Flood, 2014) applied to a
running combination of the keys; it is vectorized with NumPy ``uint64`` arithmetic (wrapping on overflow).
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)

# Named streams so that different uses of randomness never collide.
STREAM_SAMPLER = 1
STREAM_SELECTION = 2
STREAM_INIT = 3
STREAM_AVAILABILITY = 4
STREAM_PARTITION = 5
STREAM_SUBSET = 6
STREAM_SYSTEM = 7


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer: a bijective avalanche on uint64."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def hash_keys(*keys: int | np.ndarray) -> np.ndarray:
    """Hash a tuple of integer keys (scalars or broadcastable arrays) to uniform uint64 values."""
    h = np.uint64(0x243F6A8885A308D3)
    with np.errstate(over="ignore"):
        for k in keys:
            k = np.asarray(k).astype(np.uint64)
            h = _mix(h ^ (k + _GOLDEN + (h << np.uint64(6)) + (h >> np.uint64(2))))
    return np.asarray(h)


def uniform(*keys: int | np.ndarray) -> np.ndarray:
    """Uniform float64 numbers in [0, 1), one per broadcast position of ``keys`` (53 random bits)."""
    return (hash_keys(*keys) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def randint(high: np.ndarray | int, *keys: int | np.ndarray) -> np.ndarray:
    """Integers uniform in [0, high) (``high`` broadcast against the keys); int64."""
    u = uniform(*keys)
    return np.minimum((u * np.asarray(high)).astype(np.int64), np.asarray(high, dtype=np.int64) - 1)


_MASK = (1 << 64) - 1


def _mix_int(x: int) -> int:
    """:func:`_mix` on one Python integer (the same bits, without NumPy's per-call cost)."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def hash_key(*keys: int) -> int:
    """:func:`hash_keys` of scalar keys (non-negative integers), as a Python integer: the same value, faster
    for one draw."""
    h = 0x243F6A8885A308D3
    for k in keys:
        h = _mix_int(h ^ ((k + 0x9E3779B97F4A7C15 + ((h << 6) & _MASK) + (h >> 2)) & _MASK))
    return h


def randint_scalar(high: int, *keys: int) -> int:
    """:func:`randint` of scalar keys: an integer uniform in [0, high)."""
    u = (hash_key(*keys) >> 11) * (1.0 / (1 << 53))
    return min(int(u * high), high - 1)


def seed_for(*keys: int) -> int:
    """A 63-bit integer seed for ``torch.Generator``/``numpy.random.default_rng`` derived from keys."""
    return int(hash_keys(*keys) >> np.uint64(1))


def uniform32(*keys: int | np.ndarray, rows: np.ndarray, count: int) -> np.ndarray:
    """float32 uniforms in [0, 1) with 24 random bits, ``[len(rows), count]``: entry ``(i, j)`` is the
    32-bit half ``j % 2`` (low first) of ``hash_keys(*keys, rows[i], j // 2)``, its top 24 bits. Half the hashing
    of :func:`uniform` for float32 draws (a compressor's stochastic rounding)."""
    h = hash_keys(*keys, np.asarray(rows)[:, None], np.arange((count + 1) // 2)[None, :])
    halves = np.ascontiguousarray(h).astype("<u8", copy=False).view("<u4")[:, :count]
    return (halves >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / (1 << 24))
