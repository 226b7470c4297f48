"""Differential privacy (component kind ``privacy``): client-level DP-FedAvg and record-level DP-SGD with a real
accountant.

**DP-FedAvg** (McMahan, Ramage, Talwar & Zhang, ICLR 2018). Every round each client takes part independently
with probability ``q = fraction`` (Poisson sampling, counter-based on (seed, round, client); the round has a
random number of clients, possibly zero). Each update is clipped to L2 norm ``C``,
``clip(Delta_k) = Delta_k min(1, C / ||Delta_k||)``, and the server's mean is

    Delta = (sum_{k in S} w_k clip(Delta_k) + N(0, (z C w_max)^2 I)) / (q W)

with weights ``w_k = 1`` and ``W = N`` (``weighting: uniform``, the paper's estimator with uncapped unit
weights) or ``w_k = n_k`` and ``W = sum_k n_k`` over all N clients (``weighting: samples``), ``w_max`` the
largest weight, so the noise is calibrated to one client's largest contribution. ``mode: central`` adds the
noise at the server; ``mode: local`` lets every sampled client add ``N(0, (z C w_max)^2 / (q N) I)`` to its
weighted update, which sums to the central noise in expectation over the sampling (Flower's local-DP
wrapper does likewise). The strategy's server step (FedAvg, FedProx, FedAvgM, FedAdam, ...) then applies
``Delta``. With ``C = inf`` and ``z = 0``, ``weighting: samples`` and ``fraction: 1`` it is FedAvg exactly.

**Accounting** through ``dp-accounting``: every round is
``PoissonSampledDpEvent(q, GaussianDpEvent(z))``, composed over the rounds run, with the RDP accountant
(default orders) or the PLD accountant; ``epsilon`` at ``delta`` is in every metrics row (null without noise:
no privacy) and in ``summary.json``. ``target_epsilon`` stops the run cleanly before a round that would
exceed it.
"""

from __future__ import annotations

import logging
import math
from functools import cache
from typing import Annotated, Literal

import numpy as np
import torch
from torch import Tensor

from fedsim.core import components, rng
from fedsim.core.components import option
from fedsim.core.errors import FedsimError
from fedsim.core.pytree import Tree, flatten, unflatten
from fedsim.core.reduction import Reduction
from fedsim.engine.sample_clipping import SampleClipping

STREAM_POISSON = 12
STREAM_DP_NOISE = 13
STREAM_DP_COUNT = 17


@cache
def _accounting():
    """dp-accounting, imported on first use (with its absl warnings about RDP orders silenced)."""
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        import dp_accounting
        from dp_accounting import pld, rdp
    except ImportError:
        raise FedsimError('differential privacy needs dp-accounting: pip install "fedsim[privacy]"') from None

    return dp_accounting, rdp, pld


def epsilon(q: float, noise_multiplier: float, rounds: int, delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` of ``rounds`` Poisson-sampled Gaussian rounds (``inf`` without noise).

    RDP: the accountant's own ``compute_epsilon`` on ``rounds`` times the RDP of one round, which is what
    ``RdpAccountant().compose(event, rounds).get_epsilon(delta)`` computes, with the one-round RDP (the costly
    part, about 60 ms at q = 0.1) computed once per (q, z). PLD: a fresh ``PLDAccountant`` each time."""
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    dp_accounting, rdp, pld = _accounting()
    if accountant == "rdp":
        orders, one_round = _rdp_of_one_round(float(q), float(noise_multiplier))
        return float(rdp.rdp_privacy_accountant.compute_epsilon(orders, int(rounds) * one_round, delta)[0])
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(noise_multiplier))
    account = pld.PLDAccountant()
    account.compose(event, int(rounds))
    return float(account.get_epsilon(delta))


@cache
def _rdp_of_one_round(q: float, noise_multiplier: float) -> tuple[np.ndarray, np.ndarray]:
    """The default RDP orders and the RDP of one Poisson-sampled Gaussian round at them."""
    dp_accounting, rdp, _ = _accounting()
    account = rdp.RdpAccountant()
    account.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(noise_multiplier)), 1)
    return np.asarray(account._orders), np.asarray(account._rdp)  # dp-accounting 0.6.0 keeps them there


def noise_for(target: float, q: float, rounds: int, delta: float, accountant: str = "rdp") -> float:
    """The smallest noise multiplier (to 1e-4 relative) whose epsilon after ``rounds`` is at most ``target``."""
    low, high = 0.0, 1.0
    while epsilon(q, high, rounds, delta, accountant) > target:
        low, high = high, 2 * high
        if high > 1e6:
            raise FedsimError(f"no noise multiplier reaches epsilon {target} in {rounds} rounds")
    while high - low > 1e-4 * high:
        mid = (low + high) / 2
        low, high = (low, mid) if epsilon(q, mid, rounds, delta, accountant) <= target else (mid, high)
    return high


def poisson_clients(num_clients: int, q: float, seed: int, round_: int) -> np.ndarray:
    """Sorted ids of the clients sampled this round: each independently with probability ``q``."""
    ids = np.arange(num_clients)
    return ids[rng.uniform(seed, STREAM_POISSON, round_, ids) < q]


class DPFedAvg:
    """Client-level DP-FedAvg (see the module docstring)."""

    name = "dp-fedavg"
    record_level = False
    """Client-level: the round replaces the strategy's mean by :meth:`mean` (``epsilon(q, rounds)``)."""

    def __init__(
        self,
        clip: Annotated[float, option("L2 clipping norm C of each client's update", gt=0, allow_inf_nan=True)] = 1.0,
        noise_multiplier: Annotated[float, option("noise multiplier z (std z C of the summed noise)", ge=0)] = 1.0,
        delta: Annotated[float, option("delta of the reported (epsilon, delta)", gt=0, lt=1)] = 1e-5,
        mode: Annotated[Literal["central", "local"], option("noise added by the server or by every client")] = (
            "central"
        ),
        accountant: Annotated[Literal["rdp", "pld"], option("dp-accounting accountant: RDP or PLD")] = "rdp",
        target_epsilon: Annotated[float | None, option("stop before a round that would exceed it", gt=0)] = None,
        weighting: Annotated[Literal["uniform", "samples"], option("client weights w_k: 1, or sample counts")] = (
            "uniform"
        ),
        local_noise: Annotated[Literal["share", "full"], option(
            "mode local: each client adds 1/(qN) of the noise (private in the sum), or all of it (robust aggregators)"
        )] = "share",
        target_quantile: Annotated[float | None, option(
            "adaptive clipping: the share of unclipped clients C tracks (None: fixed C)", gt=0, lt=1
        )] = None,
        clip_lr: Annotated[float, option("adaptive clipping: geometric learning rate eta_C", gt=0)] = 0.2,
        count_noise: Annotated[float | None, option(
            "adaptive clipping: std sigma_b of the noise on the unclipped count (None: q N / 20)", gt=0
        )] = None,
    ) -> None:  # fmt: skip
        _check(clip, noise_multiplier, delta)
        self.clip, self.noise_multiplier, self.delta = float(clip), float(noise_multiplier), float(delta)
        self.mode, self.accountant, self.target_epsilon, self.weighting = mode, accountant, target_epsilon, weighting
        self.local_noise = local_noise
        if local_noise == "full" and mode != "local":
            raise FedsimError("privacy local_noise applies to mode local; set privacy.mode=local or drop it")
        self.target_quantile, self.clip_lr, self.count_noise = target_quantile, float(clip_lr), count_noise
        if target_quantile is None and count_noise is not None:
            raise FedsimError("privacy count_noise applies to adaptive clipping; set privacy.target_quantile")
        if target_quantile is not None and math.isinf(clip):
            raise FedsimError("adaptive clipping starts from a finite privacy clip")
        self.initial_clip = self.clip

    @property
    def adaptive(self) -> bool:
        return self.target_quantile is not None

    def count_std(self, q: float, num_clients: int) -> float:
        """``sigma_b``: the option, or ``q N / 20`` (Andrew et al.'s suggestion for the expected clients)."""
        return self.count_noise if self.count_noise is not None else q * num_clients / 20

    def update_noise_multiplier(self, q: float, num_clients: int) -> float:
        """The noise multiplier of the update: ``z``, or with adaptive clipping ``z_Delta = (z^-2 - (2
        sigma_b)^-2)^(-1/2)`` so that the update and the count together spend what ``z`` alone would
        (Andrew et al. 2021, Theorem 1)."""
        z = self.noise_multiplier
        if not self.adaptive or z == 0:
            return z
        rest = z**-2 - (2 * self.count_std(q, num_clients)) ** -2
        if rest <= 0:
            raise FedsimError(
                f"adaptive clipping: count_noise {self.count_std(q, num_clients):g} is too small for noise_multiplier "
                f"{z:g} (needs 2 sigma_b > 1/z); raise privacy.count_noise"
            )
        return rest**-0.5

    def adapt(self, q: float, num_clients: int, seed: int, round_: int) -> None:
        """``C <- C exp(-eta_C (b - gamma))`` with ``b = (sum_k 1[||Delta_k|| <= C] + N(0, sigma_b^2)) / (q N)``,
        the noised share of the round's clients that were not clipped (none sampled: ``b`` is the noise)."""
        if not self.adaptive:
            return
        unclipped = getattr(self, "_seen", 0) - getattr(self, "_clipped", 0)
        generator = torch.Generator().manual_seed(rng.seed_for(seed, STREAM_DP_COUNT, round_))
        noise = float(torch.randn((), generator=generator, dtype=torch.float64)) * self.count_std(q, num_clients)
        share = (unclipped + noise) / (q * num_clients)
        self.clip = self.clip * math.exp(-self.clip_lr * (share - self.target_quantile))
        self._clipped = self._seen = 0

    def state_dict(self) -> dict[str, Tensor]:
        return {"clip": torch.tensor(self.clip, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, Tensor] | None) -> None:
        if state is None or "clip" not in state:
            if self.adaptive:
                raise FedsimError("checkpoint has no adaptive clipping norm for privacy 'dp-fedavg'")
            return
        self.clip = float(state["clip"])

    def epsilon(self, q: float, rounds: int) -> float | None:
        """Epsilon after ``rounds`` rounds (None without noise: no privacy)."""
        value = epsilon(q, self.noise_multiplier, rounds, self.delta, self.accountant)
        return None if math.isinf(value) else value

    def clip_reduction(self) -> Reduction:
        """The clipped weighted mean ``sum_k w_k s_k Delta_k / sum_k w_k`` with ``s_k = min(1, C / ||Delta_k||)``
        as a declared reduction: the executor folds it chunk by chunk (the scale is computed from each chunk's
        deltas), so DP-FedAvg keeps FedAvg's memory and speed. Counts the clipped clients of the round."""

        self._clipped = self._seen = 0
        return Reduction(weight=self.weighting, scale=lambda clients: self.clip_scale(flatten(clients.deltas)))

    def clip_scale(self, flat: Tensor) -> Tensor:
        """``s_k = min(1, C / ||Delta_k||)`` of the flattened updates ``[S, D]`` (float64); counts the clipped."""
        scale = (self.clip / flat.double().norm(dim=1).clamp_min(1e-300)).clamp(max=1.0)
        self._clipped += int((scale < 1).sum())
        self._seen += len(scale)
        return scale

    def clipped_fraction(self) -> float | None:
        """The share of the round's clients whose update was clipped (None before any)."""
        return self._clipped / self._seen if getattr(self, "_seen", 0) else None

    def mean(
        self, updates, total_weight: float, max_weight: float, num_clients: int, q: float, seed: int, round_: int,
        template: Tree, reduction: Reduction | None = None, aggregator=None,
    ) -> Tree:  # fmt: skip
        """The private mean update of the sampled clients' ``updates`` (None: nobody sampled), ``W =
        total_weight``, ``w_max = max_weight``. ``reduction``: the :meth:`clip_reduction` the executor folded
        (central mode); its clipped mean times ``sum_{k in S} w_k / (q W)`` is the clipped sum over ``q W``,
        so without clipping or noise the result has FedAvg's bits. ``aggregator``: a robust aggregator
        (``local_noise: full``) combines the clipped, noised updates instead of the sum over ``q W``."""
        sigma = self.update_noise_multiplier(q, num_clients) * self.clip * max_weight
        generator = torch.Generator(device="cpu").manual_seed(rng.seed_for(seed, STREAM_DP_NOISE, round_))
        flat_template = flatten(template, stacked=False)
        if updates is None:
            mean = torch.zeros_like(flat_template)
        elif self.mode == "local":  # every sampled client adds its share of the noise to its weighted update
            flat = flatten(updates.deltas).double()
            self._clipped = self._seen = 0
            scale = self.clip_scale(flat)
            weights = updates.num_samples.double() if self.weighting == "samples" else torch.ones_like(scale)
            noisy = flat * (scale * weights.to(flat.device)).unsqueeze(1)
            share = 1.0 if self.local_noise == "full" else 1.0 / math.sqrt(q * num_clients)
            if sigma > 0:
                draw = torch.randn(noisy.shape, generator=generator, dtype=torch.float64)
                noisy = noisy + sigma * share * draw.to(flat.device)
            if aggregator is not None:
                ones = torch.full((len(noisy),), 1.0 / len(noisy), dtype=torch.float64, device=noisy.device)
                combined = aggregator(unflatten(noisy.to(flat_template.dtype), updates.deltas), ones.float())
                mean = flatten(combined, stacked=False)
            else:
                mean = (noisy.sum(0) / (q * total_weight)).to(flat_template.dtype)
        else:
            part = flatten(updates.mean("mean", reduction), stacked=False)
            weights = updates.num_samples.double() if self.weighting == "samples" else None
            selected = float(weights.sum()) if weights is not None else float(len(updates.client_ids))
            mean = part * (selected / (q * total_weight))
        if self.mode == "central" and sigma > 0:
            noise = torch.randn(mean.shape, generator=generator, dtype=torch.float64) * (sigma / (q * total_weight))
            mean = (mean.double() + noise.to(mean.device)).to(flat_template.dtype)
        return unflatten(mean, template)


class DPSGD:
    """Record-level DP-SGD on every client (Abadi et al. 2016).

    Each local step draws a Poisson batch (every record of client ``c`` with probability ``p_c = min(1, B /
    n_c)``, the ``poisson`` sampler, which ``dp-sgd`` uses), clips every per-sample gradient to ``clip``, sums,
    adds ``N(0, (z clip)^2 I)`` and divides by the expected batch ``B`` (:mod:`fedsim.engine.sample_clipping`).
    The strategy and its aggregator then combine the clients' updates as they would without privacy (any
    aggregation is post-processing).

    **Accounting, per client:** client ``c``'s record-level guarantee composes
    ``PoissonSampledDpEvent(p_c, GaussianDpEvent(z))`` over the local steps it has taken; ``epsilon`` in the
    rows and the summary is the largest over the clients. The client sampling of the rounds would amplify it
    further; that is not counted (the figure is an upper bound). ``target_epsilon`` stops before a round in
    which some client could pass it (counting every client's planned steps).
    """

    name = "dp-sgd"
    record_level = True

    def __init__(
        self,
        clip: Annotated[float, option("L2 clipping norm C of every per-sample gradient", gt=0)] = 1.0,
        noise_multiplier: Annotated[float, option("noise multiplier z (std z C on each step's sum)", ge=0)] = 1.0,
        delta: Annotated[float, option("delta of the reported (epsilon, delta)", gt=0, lt=1)] = 1e-5,
        accountant: Annotated[Literal["rdp", "pld"], option("dp-accounting accountant: RDP or PLD")] = "rdp",
        target_epsilon: Annotated[float | None, option("stop before a round that could exceed it", gt=0)] = None,
    ) -> None:
        _check(clip, noise_multiplier, delta)
        if math.isinf(clip):
            raise FedsimError("privacy clip must be finite for dp-sgd (it bounds every record's contribution)")
        self.clip, self.noise_multiplier, self.delta = float(clip), float(noise_multiplier), float(delta)
        self.accountant, self.target_epsilon = accountant, target_epsilon
        self.steps: np.ndarray | None = None
        """Local steps each client has taken (the accountant's state)."""

    def sample_clipping(self, batch_size: int, seed: int) -> SampleClipping:
        """What the trainer applies at every step."""
        return SampleClipping(self.clip, self.noise_multiplier, float(batch_size), seed)

    def start(self, rates: np.ndarray, planned: np.ndarray) -> None:
        """Every client's sampling rate ``p_c`` and planned steps per round, before the first round."""
        self.rates, self.planned = np.asarray(rates, dtype=np.float64), np.asarray(planned, dtype=np.int64)
        self.steps = np.zeros(len(self.rates), dtype=np.int64)

    def record(self, client_ids: np.ndarray, steps: np.ndarray) -> None:
        """Count the steps the round's clients took."""
        np.add.at(self.steps, np.asarray(client_ids, dtype=np.int64), np.asarray(steps, dtype=np.int64))

    def epsilon_of(self, steps: np.ndarray) -> float | None:
        """The largest client epsilon after ``steps`` (None without noise). Only the clients not dominated in
        (rate, steps) are accounted (epsilon grows with both)."""
        if self.noise_multiplier == 0:
            return None
        pairs = sorted({(float(p), int(k)) for p, k in zip(self.rates, steps, strict=True) if k > 0}, reverse=True)
        front, most = [], -1
        for rate, k in pairs:  # by decreasing rate: keep those with more steps than every higher-rate client
            if k > most:
                front.append((rate, k))
                most = k
        values = [epsilon(rate, self.noise_multiplier, k, self.delta, self.accountant) for rate, k in front]
        return max(values, default=0.0)

    def spent(self) -> float | None:
        """The largest client epsilon so far."""
        return self.epsilon_of(self.steps)

    def would_exceed(self) -> bool:
        """Whether one more round of every client's planned steps could pass ``target_epsilon``."""
        value = self.epsilon_of(self.steps + self.planned)
        return value is None or value > self.target_epsilon

    def state_dict(self) -> dict[str, Tensor]:
        return {"steps": torch.as_tensor(self.steps)}

    def load_state_dict(self, state: dict[str, Tensor] | None) -> None:
        if state is None or "steps" not in state or len(state["steps"]) != len(self.steps):
            raise FedsimError("checkpoint has no dp-sgd accountant state for this run's clients")
        self.steps = state["steps"].numpy().astype(np.int64).copy()


def _check(clip: float, noise_multiplier: float, delta: float) -> None:
    if not (clip > 0) or math.isnan(clip):
        raise FedsimError(f"privacy clip must be > 0, got {clip}")
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise FedsimError(f"privacy noise_multiplier must be a finite number >= 0, got {noise_multiplier}")
    if not 0 < delta < 1:
        raise FedsimError(f"privacy delta must be in (0, 1), got {delta}")


components.register("privacy", "dp-fedavg", DPFedAvg)
components.register("privacy", "dp-sgd", DPSGD)
