"""Samplers: per-client batch positions for every local step, for a whole chunk of clients at once.

A sampler returns :class:`Batches`: ``positions[C, K, B]`` (indices into each client's own sample list)
and ``mask[C, K, B]`` (False on padding: a client with fewer samples than a batch, or a client that has
finished its local epochs while others go on). Randomness is a pure function of
(seed, round, client id, step, slot) (see :mod:`fedsim.core.rng`), so the batches of a client do not depend
on which other clients share its chunk.

Local work is either ``steps`` (K steps for every client) or ``epochs`` (E passes over each client's data,
``E * ceil(n_c / B)`` steps, ragged across clients). Samplers with memory across rounds (the Markov-chain
samplers of the decentralized issue) keep it in ``state``: a dict of arrays indexed by client id that the
engine checkpoints; stateless samplers ignore it.

Samplers that are Markov chains (``iid`` as the trivial one, ``markov-ring``, ``markov-regular``) also have
``spectral_gaps(sizes, client_ids, seed)``: the gap of every client's chain (see :mod:`fedsim.data.markov`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Protocol

import numpy as np

from fedsim.core import components, rng
from fedsim.core.components import option
from fedsim.core.errors import FedsimError
from fedsim.data import markov


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


def sample_by_key(
    sampler: Sampler, seed: int, round_keys: np.ndarray, client_ids: np.ndarray, sizes: np.ndarray, *,
    steps: int | None, epochs: int | None, batch_size: int, state: SamplerState | None = None,
) -> tuple[Batches, SamplerState | None]:  # fmt: skip
    """The batches of clients that draw for different rounds (``round_keys[c]`` for client ``c``): one sampler
    call per distinct key, in key order (the state threads through them), padded to the longest with masked
    steps. One key is a plain :meth:`Sampler.sample` call."""
    keys = np.asarray(round_keys, dtype=np.int64)
    client_ids, sizes = np.asarray(client_ids, dtype=np.int64), np.asarray(sizes)
    if getattr(sampler, "keyed_rounds", False) and len(keys) and keys.min() != keys.max():
        return sampler.sample(seed, keys, client_ids, sizes, steps=steps, epochs=epochs, batch_size=batch_size,
                              state=state)  # fmt: skip
    parts = []
    for key in np.unique(keys):
        rows = np.flatnonzero(keys == key)
        got, state = sampler.sample(seed, int(key), client_ids[rows], sizes[rows], steps=steps, epochs=epochs,
                                    batch_size=batch_size, state=state)  # fmt: skip
        parts.append((rows, got))
    if len(parts) == 1:
        return parts[0][1], state
    width = max(got.positions.shape[1] for _, got in parts)
    positions = np.zeros((len(client_ids), width, batch_size), dtype=np.int64)
    mask = np.zeros(positions.shape, dtype=bool)
    for rows, got in parts:
        positions[rows, : got.positions.shape[1]] = got.positions
        mask[rows, : got.mask.shape[1]] = got.mask
    return Batches(positions, mask), state


def _per_client(round_: int | np.ndarray, dims: int) -> int | np.ndarray:
    """A round, or per-client rounds shaped to broadcast along the client axis of ``dims``-dimensional keys."""
    rounds = np.asarray(round_)
    return rounds.reshape(-1, *([1] * (dims - 1))) if rounds.ndim else round_


def planned_samples(
    sampler: Sampler, seed: int, round_keys: np.ndarray, client_ids: np.ndarray, sizes: np.ndarray, *,
    steps: int | None, epochs: int | None, batch_size: int,
) -> np.ndarray:  # fmt: skip
    """Samples each client's planned local steps process (float64): the sampler's ``samples_per_client`` when
    it has one (no batches are drawn), else the valid entries of its batches (drawn without sampler state)."""
    fast = getattr(sampler, "samples_per_client", None)
    if fast is not None:
        return np.asarray(fast(sizes, steps=steps, epochs=epochs, batch_size=batch_size), dtype=np.float64)
    batches, _ = sample_by_key(sampler, seed, round_keys, client_ids, sizes, steps=steps, epochs=epochs,
                               batch_size=batch_size)  # fmt: skip
    return batches.mask.sum(axis=(1, 2)).astype(np.float64)


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
    keyed_rounds = True
    """``sample`` also takes one round per client (an array): the same batches as one call per round."""

    @staticmethod
    def samples_per_client(sizes, *, steps, epochs, batch_size) -> np.ndarray:
        """Samples each client's planned steps process: ``B`` per step (the mask of :meth:`sample`)."""
        return steps_per_client(sizes, steps, epochs, batch_size) * batch_size

    def sample(self, seed, round_, client_ids, sizes, *, steps, epochs, batch_size, state=None):
        sizes = np.asarray(sizes, dtype=np.int64)
        n_steps = steps_per_client(sizes, steps, epochs, batch_size)
        k_max = int(n_steps.max(initial=0))
        c = np.asarray(client_ids, dtype=np.int64)[:, None, None]
        k = np.arange(k_max)[None, :, None]
        b = np.arange(batch_size)[None, None, :]
        positions = rng.randint(sizes[:, None, None], seed, rng.STREAM_SAMPLER, _per_client(round_, 3), c, k, b)
        mask = np.broadcast_to(k < n_steps[:, None, None], positions.shape).copy()
        return Batches(positions, mask), state

    def spectral_gaps(self, sizes: np.ndarray, client_ids: np.ndarray, seed: int) -> np.ndarray:
        """i.i.d. sampling is the Markov chain ``P = 1 pi^T`` (every row uniform): its other eigenvalues are 0,
        so the gap is 1 for every client."""
        return np.ones(len(sizes))


class ShuffleSampler:
    """Epoch shuffling without replacement (``DataLoader(shuffle=True)`` per client).

    Epoch ``e`` of client ``c`` visits a fresh random permutation of its ``n_c`` samples. In epoch mode
    each epoch is cut into ``ceil(n_c / B)`` batches (the last one partial, masked). In step mode the
    permutations are concatenated into one stream and each step takes the next ``min(B, n_c)`` samples.
    Permutations are drawn for all clients at once by sorting counter-based random keys inside
    ``(client, epoch)`` segments.
    """

    name = "shuffle"
    keyed_rounds = True

    @staticmethod
    def samples_per_client(sizes, *, steps, epochs, batch_size) -> np.ndarray:
        """Samples each client's planned steps process: ``E n_c`` in epoch mode, ``K min(B, n_c)`` in step
        mode (the mask of :meth:`sample`)."""
        sizes = np.asarray(sizes, dtype=np.int64)
        if epochs is not None:
            return epochs * sizes
        return steps_per_client(sizes, steps, epochs, batch_size) * np.minimum(batch_size, sizes)

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


class PoissonSampler:
    """Poisson sampling (DP-SGD's, Abadi et al. 2016): at every step each of client ``c``'s ``n_c`` samples
    joins the batch independently with probability ``p_c = min(1, B / n_c)``, so batches have a random size
    (expected ``B``, possibly 0: the step then sees a zero gradient). A client takes ``K`` steps, or
    ``E * ceil(n_c / B)`` in epoch mode (E expected passes). The batch axis is as wide as the round's largest
    draw; the draw of (client, step, sample) is a pure function of (seed, round, client, step, sample)."""

    name = "poisson"
    keyed_rounds = True

    @staticmethod
    def rates(sizes: np.ndarray, batch_size: int) -> np.ndarray:
        """Each client's sampling rate ``p_c = min(1, B / n_c)``."""
        return np.minimum(1.0, batch_size / np.maximum(np.asarray(sizes, dtype=np.float64), 1.0))

    def sample(self, seed, round_, client_ids, sizes, *, steps, epochs, batch_size, state=None):
        sizes = np.asarray(sizes, dtype=np.int64)
        client_ids = np.asarray(client_ids, dtype=np.int64)
        n_steps = steps_per_client(sizes, steps, epochs, batch_size)
        k_max, n_max = int(n_steps.max(initial=0)), int(sizes.max(initial=0))
        c = client_ids[:, None, None]
        k = np.arange(k_max)[None, :, None]
        s = np.arange(n_max)[None, None, :]
        rate = self.rates(sizes, batch_size)[:, None, None]
        live = (s < sizes[:, None, None]) & (k < n_steps[:, None, None])
        drawn = live & (rng.uniform(seed, rng.STREAM_SAMPLER, _per_client(round_, 3), c, k, s) < rate)
        width = max(int(drawn.sum(axis=2).max(initial=0)), 1)
        order = np.argsort(~drawn, axis=2, kind="stable")[:, :, :width]  # drawn samples first, in index order
        mask = np.take_along_axis(drawn, order, axis=2)
        return Batches(np.where(mask, order, 0).astype(np.int64), mask), state


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
    rounds = np.asarray(round_)
    keys = rng.hash_keys(
        seed, rng.STREAM_SAMPLER, rounds[owner] if rounds.ndim else rounds, client_ids[owner], epoch, j
    )
    segment = seg_offset[owner] + epoch * sizes[owner]
    order = np.lexsort((keys, segment))
    return j[order], seg_offset


class _MarkovSampler:
    """Shared machinery of the Markov-chain samplers (see :mod:`fedsim.data.markov` for the chains).

    Each client walks one chain over the positions ``0..n_c-1`` of its own sample list. A step with batch size
    B consumes B consecutive chain states, so the chain advances B times per optimizer step (inferred: the
    source describes one index per step; B = 1 is that case). Step mode: K steps; epoch mode:
    ``E * ceil(n_c / B)`` steps, every step a full batch of B states.

    Memory across rounds: ``state["markov_position"][client]`` (global client id, -1 = not started) is the
    last state the client consumed; its next round continues from there. A chain's first state is uniform,
    hashed from (seed, client). Transition ``t`` of a round uses the uniform number hashed from
    (seed, round, client, t), so paths do not depend on chunking, and a checkpointed state resumes the same path.
    """

    name: str
    _key: int
    STATE_KEY = "markov_position"
    keyed_rounds = True

    @staticmethod
    def samples_per_client(sizes, *, steps, epochs, batch_size) -> np.ndarray:
        """Samples each client's planned steps process: ``B`` chain states per step."""
        return steps_per_client(sizes, steps, epochs, batch_size) * batch_size

    def __init__(self, laziness: float):
        if not 0.0 <= float(laziness) < 1.0:
            raise FedsimError(f"{self.name} sampler: laziness must be in [0, 1), got {laziness}")
        self.laziness = float(laziness)

    def sample(self, seed, round_, client_ids, sizes, *, steps, epochs, batch_size, state=None):
        sizes = np.asarray(sizes, dtype=np.int64)
        client_ids = np.asarray(client_ids, dtype=np.int64)
        if (sizes <= 0).any():
            raise FedsimError(f"{self.name} sampler: a selected client has no training samples")
        n_steps = steps_per_client(sizes, steps, epochs, batch_size)
        k_max = int(n_steps.max(initial=0))
        state = dict(state or {})
        positions = _grown(state.get(self.STATE_KEY), int(client_ids.max(initial=-1)) + 1)
        current = positions[client_ids]
        if (current >= sizes).any():
            raise FedsimError(f"{self.name} sampler: saved chain state does not match the clients' data sizes")
        started = current >= 0
        start = np.where(started, current, markov.start_positions(seed, client_ids, sizes))
        t = np.arange(k_max * batch_size)[None, :]
        u = rng.uniform(seed, rng.STREAM_SAMPLER, self._key, _per_client(round_, 2), client_ids[:, None], t)
        # A chain that has not started consumes its uniform first state as is; past its last step it stays.
        moves = (t < (n_steps * batch_size)[:, None]) & ((t > 0) | started[:, None])
        path = self._walk(seed, client_ids, sizes, start, u, moves)
        if path.shape[1]:
            positions[client_ids] = path[:, -1]
        state[self.STATE_KEY] = positions
        path = path.reshape(len(client_ids), k_max, batch_size)
        mask = np.broadcast_to(np.arange(k_max)[None, :, None] < n_steps[:, None, None], path.shape).copy()
        return Batches(path, mask), state

    def _walk(self, seed, client_ids, sizes, start, u, moves) -> np.ndarray:
        raise NotImplementedError


def merge_states(states: list[SamplerState | None], shards: list[np.ndarray]) -> SamplerState | None:
    """One sampler state from the states of executors that each own a shard of the clients (sorted global
    ids): every array takes its shard's clients' entries from that shard's state; entries a state never grew
    to are -1 (not started, the convention of every stateful sampler here)."""
    keys = sorted({k for state in states if state for k in state})
    if not keys:
        return None
    merged = {}
    for key in keys:
        size = max(int(owned.max(initial=-1)) + 1 for owned in shards)
        out = np.full(size, -1, dtype=np.int64)
        for state, owned in zip(states, shards, strict=True):
            if state and key in state:
                own = _grown(state[key], size)
                out[owned] = own[owned]
        merged[key] = out
    return merged


def _grown(positions: np.ndarray | None, size: int) -> np.ndarray:
    """A copy of the per-client positions, grown with -1 (not started) to at least ``size`` entries."""
    old = np.asarray(positions if positions is not None else [], dtype=np.int64)
    out = np.full(max(size, len(old)), -1, dtype=np.int64)
    out[: len(old)] = old
    return out


class MarkovRingSampler(_MarkovSampler):
    """Lazy random walk on a ring of a client's sample positions (slow mixing, gap ``Theta(1/n^2)``): stay
    with probability ``laziness``, else step +1 or -1 (mod n_c) with probability ``(1 - laziness)/2`` each."""

    name = "markov-ring"
    _key = markov.KEY_RING

    def __init__(self, laziness: Annotated[float, option("probability the chain stays put", ge=0, lt=1)] = 0.5):
        super().__init__(laziness)

    def _walk(self, seed, client_ids, sizes, start, u, moves):
        return markov.ring_walk(start, u, moves, sizes, self.laziness)

    def transition_matrix(self, n: int, client_id: int = 0, seed: int = 0) -> np.ndarray:
        """The chain's explicit ``n x n`` transition matrix (the same for every client of that size)."""
        return markov.ring_transition_matrix(n, self.laziness)

    def spectral_gaps(self, sizes: np.ndarray, client_ids: np.ndarray, seed: int) -> np.ndarray:
        """Closed-form gap of every client's chain (see :func:`fedsim.data.markov.ring_spectral_gaps`)."""
        return markov.ring_spectral_gaps(sizes, self.laziness)


class MarkovRegularSampler(_MarkovSampler):
    """Lazy random walk on a random ``degree``-regular multigraph over a client's sample positions (fast
    mixing), permutation model: ``degree/2`` random permutations per client, drawn from (seed, client) and
    fixed for the whole run. Stays with probability ``laziness``, else moves along one of the ``degree``
    neighbour slots, chosen uniformly. The neighbour tables of recent chunks are cached."""

    name = "markov-regular"
    _key = markov.KEY_REGULAR
    _CACHE_SIZE = 64

    def __init__(
        self,
        degree: Annotated[int, option("degree of the random regular graph (even)", ge=2)] = 4,
        laziness: Annotated[float, option("probability the chain stays put", ge=0, lt=1)] = 0.0,
    ):
        super().__init__(laziness)
        self.check_options({"degree": degree})
        self.degree = int(degree)
        self._cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    @staticmethod
    def check_options(options: dict) -> None:
        degree = options.get("degree", 4)
        if isinstance(degree, bool) or not isinstance(degree, int | np.integer) or degree < 2 or degree % 2:
            raise FedsimError(f"markov-regular sampler: degree must be an even integer >= 2, got {degree!r}")

    def neighbours(self, seed: int, client_ids: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The clients' stacked neighbour table ``[sum n_c, degree]`` and each client's first row."""
        client_ids, sizes = np.asarray(client_ids, dtype=np.int64), np.asarray(sizes, dtype=np.int64)
        key = (seed, client_ids.tobytes(), sizes.tobytes())
        if key not in self._cache:
            if len(self._cache) >= self._CACHE_SIZE:
                self._cache.clear()
            table = markov.regular_neighbours(seed, client_ids, sizes, self.degree)
            self._cache[key] = table, np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        return self._cache[key]

    def _walk(self, seed, client_ids, sizes, start, u, moves):
        table, row_offset = self.neighbours(seed, client_ids, sizes)
        return markov.regular_walk(start, u, moves, table, row_offset, self.laziness)

    def transition_matrix(self, n: int, client_id: int = 0, seed: int = 0) -> np.ndarray:
        """Client ``client_id``'s explicit ``n x n`` transition matrix (symmetric, doubly stochastic)."""
        table, _ = self.neighbours(seed, np.array([client_id]), np.array([n]))
        return markov.regular_transition_matrix(table, self.laziness)

    def spectral_gaps(self, sizes: np.ndarray, client_ids: np.ndarray, seed: int) -> np.ndarray:
        """Gap of every client's chain by eigen-decomposition (dense, or sparse ``eigsh`` for large clients)."""
        sizes = np.asarray(sizes, dtype=np.int64)
        table = markov.regular_neighbours(seed, client_ids, sizes, self.degree)
        first = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        gaps = [markov.regular_spectral_gap(table[a : a + n], self.laziness) for a, n in zip(first, sizes, strict=True)]
        return np.array(gaps)


SAMPLERS: dict[str, type] = {
    "iid": IIDSampler,
    "shuffle": ShuffleSampler,
    "poisson": PoissonSampler,
    "markov-ring": MarkovRingSampler,
    "markov-regular": MarkovRegularSampler,
}
for _name, _cls in SAMPLERS.items():
    components.register("sampler", _name, _cls)


def make_sampler(spec: object, **options) -> Sampler:
    """Build a sampler from a name or ``{name: ..., option: ...}`` spec and its options."""
    return components.make("sampler", spec, **options)
