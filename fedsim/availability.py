"""Client availability in federated mode: which clients can take part in a round.

:class:`MarkovAvailability` turns every client on and off by its own two-state Markov chain over rounds
(the on/off chain of Gilbert (1960) and Elliott (1963), used here as a participation model; the
parameterization and the initial law below are our choices):

    P(off -> on) = p_on,        P(on -> off) = p_off,        0 < p_on, p_off <= 1.

Facts of the chain (standard two-state Markov chain algebra):

- stationary law: ``P(on) = p_on / (p_on + p_off)`` (:attr:`MarkovAvailability.stationary_on`);
- on-periods and off-periods are geometric: mean on-period ``1 / p_off`` rounds, mean off-period
  ``1 / p_on`` rounds (:attr:`~MarkovAvailability.expected_on_duration`,
  :attr:`~MarkovAvailability.expected_off_duration`);
- the transition matrix's second eigenvalue is ``lambda = 1 - p_on - p_off``: the state's lag-k
  autocorrelation is ``lambda^k`` and ``|lambda|`` sets the mixing speed (``lambda = 0``: independent
  rounds, ``p_on = p_off = 1``: ``lambda = -1``, the state alternates deterministically).

Round 1's states are drawn from the stationary law (inferred: so that availability is stationary from the
start and the fraction of available clients has the same distribution every round).

Randomness is counter-based (:mod:`fedsim.core.rng`, stream ``STREAM_AVAILABILITY``): client ``i``'s uniform at
round ``r`` is ``u(seed, STREAM_AVAILABILITY, r, i)``. Round 1: on iff ``u < P(on)``. Round ``r > 1``: an on
client turns off iff ``u < p_off``, an off client turns on iff ``u < p_on``. Client ``i``'s chain depends on
(seed, i) only, so :meth:`~MarkovAvailability.available` is a pure function of (seed, round, number of
clients) and a resumed run sees the same availability as an uninterrupted one.
"""

from __future__ import annotations

import math
from typing import Annotated

import numpy as np

from fedsim.core import components, rng
from fedsim.core.components import option
from fedsim.core.errors import FedsimError


class MarkovAvailability:
    """Independent two-state (off/on) Markov chains, one per client, over rounds 1, 2, ...

    The chain is simulated forward from round 1, vectorized over clients; the states reached so far are
    cached (one bit per client per round), so querying rounds in increasing order costs O(N) per round and
    any earlier round is a lookup.
    """

    def __init__(self, p_on: float, p_off: float, seed: int) -> None:
        for name, p in (("p_on", p_on), ("p_off", p_off)):
            if not (0.0 < p <= 1.0 and math.isfinite(p)):
                raise FedsimError(f"availability {name} must be in (0, 1], got {p}")
        self.p_on, self.p_off, self.seed = float(p_on), float(p_off), int(seed)
        self._num_clients: int | None = None
        self._states: list[np.ndarray] = []  # packed bits: _states[r - 1] is round r

    @property
    def stationary_on(self) -> float:
        """Stationary probability that a client is on: ``p_on / (p_on + p_off)``."""
        return self.p_on / (self.p_on + self.p_off)

    @property
    def expected_on_duration(self) -> float:
        """Mean length of an on-period in rounds: ``1 / p_off`` (geometric)."""
        return 1.0 / self.p_off

    @property
    def expected_off_duration(self) -> float:
        """Mean length of an off-period in rounds: ``1 / p_on`` (geometric)."""
        return 1.0 / self.p_on

    @property
    def second_eigenvalue(self) -> float:
        """``1 - p_on - p_off``: lag-k autocorrelation of a client's state is its k-th power."""
        return 1.0 - self.p_on - self.p_off

    def states(self, round_: int, num_clients: int) -> np.ndarray:
        """Boolean on/off state of every client at ``round_`` (>= 1), shape ``[num_clients]``."""
        if round_ < 1:
            raise FedsimError(f"rounds start at 1, got {round_}")
        if num_clients != self._num_clients:
            self._num_clients, self._states = num_clients, []
        clients = np.arange(num_clients)
        while len(self._states) < round_:
            r = len(self._states) + 1
            u = rng.uniform(self.seed, rng.STREAM_AVAILABILITY, r, clients)
            if r == 1:
                on = u < self.stationary_on
            else:
                prev = np.unpackbits(self._states[-1], count=num_clients).astype(bool)
                on = np.where(prev, u >= self.p_off, u < self.p_on)
            self._states.append(np.packbits(on))
        return np.unpackbits(self._states[round_ - 1], count=num_clients).astype(bool)

    def available(self, round_: int, num_clients: int) -> np.ndarray:
        """Sorted ids of the clients that are on at ``round_``."""
        return np.flatnonzero(self.states(round_, num_clients))


def markov(
    p_on: Annotated[float, option("P(off -> on) between rounds", gt=0, le=1)] = 0.5,
    p_off: Annotated[float, option("P(on -> off) between rounds", gt=0, le=1)] = 0.5,
    *,
    seed: int = 0,
) -> MarkovAvailability:
    """Each client switched on/off by its own two-state Markov chain over rounds (federated mode)."""
    return MarkovAvailability(p_on, p_off, seed)


components.register("availability", "markov", markov)
