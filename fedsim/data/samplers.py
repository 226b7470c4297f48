"""Samplers: per-client batch positions for every local step, for a whole chunk of clients at once.

A sampler returns :class:`Batches`: ``positions[C, K, B]`` (indices into each client's own sample list)
and ``mask[C, K, B]`` (False on padding: a client with fewer samples than a batch, or a client that has
finished its local epochs while others go on). Randomness is a pure function of
(seed, round, client id, step, slot) (see :mod:`fedsim.rng`), so the batches of a client do not depend
on which other clients share its chunk.

Local work is either ``steps`` (K steps for every client) or ``epochs`` (E passes over each client's data,
``E * ceil(n_c / B)`` steps, ragged across clients). Samplers with memory across rounds (the Markov-chain
samplers of the decentralized issue) keep it in ``state``: a dict of arrays indexed by client id that the
engine checkpoints; stateless samplers ignore it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fedsim import rng
from fedsim.errors import FedsimError, unknown


@dataclass
class Batches:
    """Per-client batch positions ``[C, K, B]`` (int64) and their validity mask (bool)."""

    positions: np.ndarray
    mask: np.ndarray

    @property
    def step_active(self) -> np.ndarray:
        """``[C, K]``: True where the client takes a real optimizer step."""
        return self.mask.any(axis=2)


SamplerState = dict[str, np.ndarray]


class Sampler(Protocol):
    """Draws every selected client's local batches for one round."""

    name: str

    def sample(
        self,
        seed: int,
        round_: int,
        client_ids: np.ndarray,
        sizes: np.ndarray,
        *,
        steps: int | None,
        epochs: int | None,
        batch_size: int,
        state: SamplerState | None = None,
    ) -> tuple[Batches, SamplerState | None]: ...


def steps_per_client(sizes: np.ndarray, steps: int | None, epochs: int | None, batch_size: int) -> np.ndarray:
    """Local steps of each client: ``steps`` for all, or ``epochs * ceil(n_c / batch_size)``."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if epochs is not None:
        return epochs * -(-sizes // batch_size)
    if steps is None:
        raise FedsimError("local work needs either local_steps or local_epochs")
    return np.full(len(sizes), steps, dtype=np.int64)


class IIDSampler:
    """Uniform sampling with replacement: every slot is an independent uniform index in ``[0, n_c)``.
    Every step uses a full batch of ``B``; in epoch mode a client takes ``E * ceil(n_c / B)`` steps."""

    name = "iid"

    def sample(self, seed, round_, client_ids, sizes, *, steps, epochs, batch_size, state=None):
        sizes = np.asarray(sizes, dtype=np.int64)
        n_steps = steps_per_client(sizes, steps, epochs, batch_size)
        k_max = int(n_steps.max(initial=0))
        c = np.asarray(client_ids, dtype=np.int64)[:, None, None]
        k = np.arange(k_max)[None, :, None]
        b = np.arange(batch_size)[None, None, :]
        positions = rng.randint(sizes[:, None, None], seed, rng.STREAM_SAMPLER, round_, c, k, b)
        mask = np.broadcast_to(k < n_steps[:, None, None], positions.shape).copy()
        return Batches(positions, mask), state


class ShuffleSampler:
    """Epoch shuffling without replacement (``DataLoader(shuffle=True)`` per client).

    Epoch ``e`` of client ``c`` visits a fresh random permutation of its ``n_c`` samples. In epoch mode
    each epoch is cut into ``ceil(n_c / B)`` batches (the last one partial, masked). In step mode the
    permutations are concatenated into one stream and each step takes the next ``min(B, n_c)`` samples.
    Permutations are drawn for all clients at once by sorting counter-based random keys inside
    ``(client, epoch)`` segments.
    """

    name = "shuffle"

    def sample(self, seed, round_, client_ids, sizes, *, steps, epochs, batch_size, state=None):
        sizes = np.asarray(sizes, dtype=np.int64)
        client_ids = np.asarray(client_ids, dtype=np.int64)
        if (sizes <= 0).any():
            raise FedsimError("shuffle sampler: a selected client has no training samples")
        n_steps = steps_per_client(sizes, steps, epochs, batch_size)
        k_max = int(n_steps.max(initial=0))
        per_batch = np.minimum(batch_size, sizes) if epochs is None else np.full_like(sizes, batch_size)
        n_epochs = -(-(n_steps * per_batch) // sizes) if epochs is None else np.full_like(sizes, epochs)
        perm, seg_offset = _segment_permutations(seed, round_, client_ids, sizes, n_epochs)

        k = np.arange(k_max)[None, :, None]
        b = np.arange(batch_size)[None, None, :]
        n = sizes[:, None, None]
        if epochs is None:
            s = k * per_batch[:, None, None] + b
            valid = (b < per_batch[:, None, None]) & (k < n_steps[:, None, None])
            epoch, within = s // n, s % n
        else:
            spe = (-(-sizes // batch_size))[:, None, None]
            epoch, within = k // spe, (k % spe) * batch_size + b
            valid = (k < n_steps[:, None, None]) & (within < n)
        flat = seg_offset[:, None, None] + np.where(valid, epoch * n + within, 0)
        positions = np.where(valid, perm[flat], 0)
        return Batches(positions.astype(np.int64), valid), state


def _segment_permutations(
    seed: int, round_: int, client_ids: np.ndarray, sizes: np.ndarray, n_epochs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Random permutations of ``range(n_c)`` for every (client, epoch), concatenated.

    Returns ``perm`` (flat) and ``seg_offset[c]``, the start of client ``c``'s first epoch; epoch ``e`` of
    client ``c`` is ``perm[seg_offset[c] + e * n_c : ... + n_c]``.
    """
    lengths = sizes * n_epochs
    seg_offset = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    total = int(lengths.sum())
    owner = np.repeat(np.arange(len(sizes)), lengths)
    local = np.arange(total) - seg_offset[owner]
    epoch, j = local // sizes[owner], local % sizes[owner]
    keys = rng.hash_keys(seed, rng.STREAM_SAMPLER, round_, client_ids[owner], epoch, j)
    segment = seg_offset[owner] + epoch * sizes[owner]
    order = np.lexsort((keys, segment))
    return j[order], seg_offset


SAMPLERS: dict[str, type] = {"iid": IIDSampler, "shuffle": ShuffleSampler}


def make_sampler(name: str, **options) -> Sampler:
    """Build a sampler by name."""
    if name not in SAMPLERS:
        raise unknown("sampler", name, SAMPLERS)
    return SAMPLERS[name](**options)
