"""Byzantine attacks on federated training (component kind ``attack``), computed on the stacked client axis.

A ``fraction`` of the clients is Byzantine, fixed for the run: the ``round(fraction * N)`` clients with the
smallest counter-based hash keys of (seed, client) (:func:`byzantine_clients`). Every round the Byzantine
clients among the selected ones attack:

- **data attacks** (their training samples are changed once, before training): ``label_flip`` trains on
  flipped labels ``y -> C - 1 - y``; ``backdoor`` stamps a pixel-pattern trigger on a share of their samples
  and labels them ``target`` (:class:`Backdoor`; evaluated rows report ``attack_success_rate``);
- **model attacks** replace what they upload, computed from the round's updates in one tensor operation
  (omniscient attacks see the honest updates ``H`` of the round: mean ``mu``, coordinate-wise std ``sigma``):

  - ``sign_flip``: ``-scale * Delta_k`` (their own update, negated);
  - ``gaussian``: ``N(0, std^2 I)``, drawn from a generator seeded by (seed, round);
  - ``ipm`` (inner-product manipulation; Xie, Koyejo & Gupta 2020): ``-eps * mu``;
  - ``alie`` ("a little is enough"; Baruch, Baruch & Goldberg 2019): ``mu - z sigma`` with
    ``z = Phi^{-1}((n - s) / n)``, ``s = floor(n / 2 + 1) - f`` (n selected clients, f Byzantine among them),
    or a given ``z``;
  - ``minmax`` / ``minsum`` (Shejwalkar & Houmansadr, NDSS 2021, the AGR-agnostic attacks):
    ``mu + gamma p`` with the perturbation ``p`` = ``-sigma`` (``std``), ``-mu / ||mu||`` (``unit``) or
    ``-sign(mu)`` (``sign``), and the largest ``gamma`` (found by the paper's halving search from 10 down to
    a step of 1e-5) such that the malicious update is no farther from every honest update than the honest
    updates are from each other (min-max: ``max_i ||m - h_i|| <= max_{i,j} ||h_i - h_j||``; min-sum:
    ``sum_i ||m - h_i||^2 <= max_i sum_j ||h_i - h_j||^2``).

  ALIE, IPM, min-max and min-sum send one malicious update from all Byzantine clients, as in their papers.

Attacks apply to synchronous federated rounds with the stacked updates (streamed means are switched off);
they are refused over a topology, with asynchronous strategies and with ``--backend flower``.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Annotated, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from fedsim.core import components, rng
from fedsim.core.components import option
from fedsim.core.errors import FedsimError
from fedsim.core.pytree import Tree, flatten, unflatten

STREAM_ATTACK = 11

Fraction = Annotated[float, option("fraction of the clients that are Byzantine", ge=0, lt=0.5)]


def byzantine_clients(num_clients: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted ids of the ``round(fraction * N)`` Byzantine clients: those with the smallest hash keys of
    (seed, client), a pure function of the seed."""
    count = int(math.floor(fraction * num_clients + 0.5))
    keys = rng.hash_keys(seed, STREAM_ATTACK, np.arange(num_clients))
    return np.sort(np.argsort(keys, kind="stable")[:count])


class Attack:
    """Base attack: ``fraction`` Byzantine; :meth:`poison_labels` (data) and :meth:`malicious` (model)."""

    name: ClassVar[str] = "attack"
    model_attack: ClassVar[bool] = False
    """Whether it replaces uploads (then the round keeps its stacked updates)."""

    def __init__(self, fraction: float = 0.2) -> None:
        if not 0.0 <= fraction < 0.5:
            raise FedsimError(f"attack fraction must be in [0, 0.5), got {fraction}")
        self.fraction = float(fraction)

    def clients(self, num_clients: int, seed: int) -> np.ndarray:
        return byzantine_clients(num_clients, self.fraction, seed)

    def poison_samples(self, x: Tensor, y: Tensor, rows: Tensor, num_classes: int, seed: int) -> None:
        """Change the Byzantine clients' training samples ``x[rows]``, ``y[rows]`` in place (data attacks)."""

    def malicious(self, flat: Tensor, byzantine: Tensor, seed: int, round_: int) -> Tensor:
        """The uploads ``[S, D]`` with the Byzantine rows (``byzantine[S]``, boolean) replaced."""
        return flat


def honest_stats(flat: Tensor, byzantine: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The honest rows ``H`` of ``flat`` and their mean and coordinate-wise std (population, ddof 0)."""
    honest = flat[~byzantine]
    if len(honest) == 0:
        raise FedsimError("an omniscient attack needs at least one honest client among the selected")
    return honest, honest.mean(0), honest.std(0, unbiased=False)


def _broadcast(flat: Tensor, byzantine: Tensor, update: Tensor) -> Tensor:
    out = flat.clone()
    out[byzantine] = update.to(flat.dtype)
    return out


class LabelFlip(Attack):
    """Byzantine clients train on labels ``C - 1 - y``."""

    name = "label_flip"

    def __init__(self, fraction: Fraction = 0.2) -> None:
        super().__init__(fraction)

    def poison_samples(self, x: Tensor, y: Tensor, rows: Tensor, num_classes: int, seed: int) -> None:
        y[rows] = num_classes - 1 - y[rows]


def stamp(x: Tensor, size: int) -> Tensor:
    """``x`` (samples first) with the backdoor trigger: the bottom-right ``size x size`` patch of every image set
    to the data's maximum. Images are the trailing two dimensions; a flat sample of a square length (digits:
    64 = 8 x 8) is read as a square image; other flat samples get their last ``size^2`` features set."""
    out = x.clone()
    top = x.max()
    if x.dim() >= 3:
        out[..., -size:, -size:] = top
        return out
    side = math.isqrt(x.shape[1])
    if side * side == x.shape[1] and side >= size:
        out.view(len(x), side, side)[:, -size:, -size:] = top
    else:
        out[:, -size * size :] = top
    return out


class Backdoor(Attack):
    """Pixel-pattern backdoor (Gu, Dolan-Gavitt & Garg 2017, BadNets): a share ``poison`` of every Byzantine
    client's training samples gets the trigger (:func:`stamp`) and the label ``target``. Evaluated rows report
    ``attack_success_rate``: the share of triggered test samples of other classes classified as ``target``."""

    name = "backdoor"

    def __init__(
        self,
        fraction: Fraction = 0.2,
        target: Annotated[int, option("label the trigger should cause", ge=0)] = 0,
        poison: Annotated[float, option("share of a Byzantine client's samples poisoned", gt=0, le=1)] = 0.5,
        size: Annotated[int, option("side of the square trigger patch, pixels", ge=1)] = 2,
    ) -> None:
        super().__init__(fraction)
        self.target, self.poison, self.size = int(target), float(poison), int(size)

    def poison_rows(self, rows: Tensor, seed: int) -> Tensor:
        """The ``ceil(poison * len(rows))`` rows with the smallest hash keys of (seed, row): the poisoned ones."""
        keys = rng.hash_keys(seed, STREAM_ATTACK, 1, rows.cpu().numpy())
        count = math.ceil(self.poison * len(rows) - 1e-12)
        return rows[torch.as_tensor(np.sort(np.argsort(keys, kind="stable")[:count]), device=rows.device)]

    def poison_samples(self, x: Tensor, y: Tensor, rows: Tensor, num_classes: int, seed: int) -> None:
        if self.target >= num_classes:
            raise FedsimError(f"backdoor target {self.target} is not a class of the data set (0..{num_classes - 1})")
        chosen = self.poison_rows(rows, seed)
        x[chosen] = stamp(x[chosen], self.size)
        y[chosen] = self.target

    def success_rate(self, predict, x_test: Tensor, y_test: Tensor) -> float | None:
        """The share of triggered test samples (labels other than ``target``) that ``predict`` labels
        ``target``."""
        others = y_test != self.target
        if not bool(others.any()):
            return None
        return float((predict(stamp(x_test[others], self.size)) == self.target).double().mean())


class SignFlip(Attack):
    """``-scale * Delta_k``: each Byzantine client uploads its own update negated."""

    name = "sign_flip"
    model_attack = True

    def __init__(self, fraction: Fraction = 0.2, scale: Annotated[float, option("factor", gt=0)] = 1.0) -> None:
        super().__init__(fraction)
        self.scale = float(scale)

    def malicious(self, flat, byzantine, seed, round_):
        out = flat.clone()
        out[byzantine] = -self.scale * flat[byzantine]
        return out


class Gaussian(Attack):
    """``N(0, std^2 I)`` uploads, from a generator seeded by (seed, round)."""

    name = "gaussian"
    model_attack = True

    def __init__(self, fraction: Fraction = 0.2, std: Annotated[float, option("noise std", gt=0)] = 1.0) -> None:
        super().__init__(fraction)
        self.std = float(std)

    def malicious(self, flat, byzantine, seed, round_):
        generator = torch.Generator(device="cpu").manual_seed(rng.seed_for(seed, STREAM_ATTACK, round_))
        noise = torch.randn((int(byzantine.sum()), flat.shape[1]), generator=generator, dtype=torch.float64)
        out = flat.clone()
        out[byzantine] = (self.std * noise).to(flat.dtype).to(flat.device)
        return out


class IPM(Attack):
    """Inner-product manipulation: ``-eps * mu`` (the honest mean)."""

    name = "ipm"
    model_attack = True

    def __init__(self, fraction: Fraction = 0.2, eps: Annotated[float, option("epsilon", gt=0)] = 0.1) -> None:
        super().__init__(fraction)
        self.eps = float(eps)

    def malicious(self, flat, byzantine, seed, round_):
        _, mu, _ = honest_stats(flat, byzantine)
        return _broadcast(flat, byzantine, -self.eps * mu)


def alie_z(n: int, f: int) -> float:
    """Baruch et al.'s ``z_max = Phi^{-1}((n - s) / n)`` with ``s = floor(n / 2 + 1) - f``."""
    s = math.floor(n / 2 + 1) - f
    p = (n - s) / n
    if not 0.0 < p < 1.0:
        return 0.0
    return NormalDist().inv_cdf(p)


class ALIE(Attack):
    """A little is enough: ``mu - z sigma`` (z from the paper's formula unless given)."""

    name = "alie"
    model_attack = True

    def __init__(
        self,
        fraction: Fraction = 0.2,
        z: Annotated[float | None, option("deviation in stds (default: the paper's z_max)")] = None,
    ) -> None:
        super().__init__(fraction)
        self.z = z

    def malicious(self, flat, byzantine, seed, round_):
        _, mu, sigma = honest_stats(flat, byzantine)
        z = self.z if self.z is not None else alie_z(len(flat), int(byzantine.sum()))
        return _broadcast(flat, byzantine, mu - z * sigma)


Perturbation = Literal["std", "unit", "sign"]


class MinMax(Attack):
    """Shejwalkar & Houmansadr's min-max attack: ``mu + gamma p``, gamma as large as the honest spread allows."""

    name = "minmax"
    model_attack = True
    GAMMA_INIT, TOLERANCE = 10.0, 1e-5

    def __init__(
        self,
        fraction: Fraction = 0.2,
        perturbation: Annotated[Perturbation, option("direction p: -std, -unit mean, -sign of the mean")] = "std",
    ) -> None:
        super().__init__(fraction)
        self.perturbation = perturbation

    def direction(self, mu: Tensor, sigma: Tensor) -> Tensor:
        if self.perturbation == "std":
            return -sigma
        if self.perturbation == "unit":
            return -mu / mu.norm().clamp_min(1e-12)
        return -torch.sign(mu)

    def fits(self, candidate: Tensor, honest: Tensor, bound: Tensor) -> bool:
        """min-max: ``max_i ||m - h_i|| <= max_{i,j} ||h_i - h_j||``."""
        return bool((honest - candidate).norm(dim=1).max() <= bound)

    def bound(self, honest: Tensor) -> Tensor:
        return torch.cdist(honest, honest).max()

    def malicious(self, flat, byzantine, seed, round_):
        honest, mu, sigma = honest_stats(flat.double(), byzantine)
        p, bound = self.direction(mu, sigma), self.bound(honest)
        gamma, step, best = self.GAMMA_INIT, self.GAMMA_INIT / 2, 0.0
        while abs(best - gamma) > self.TOLERANCE:  # the paper's halving search
            if self.fits(mu + gamma * p, honest, bound):
                best = gamma
                gamma += step
            else:
                gamma -= step
            step /= 2
        return _broadcast(flat, byzantine, mu + best * p)


class MinSum(MinMax):
    """Shejwalkar & Houmansadr's min-sum attack: the sum of squared distances bounded instead of the max."""

    name = "minsum"

    def fits(self, candidate: Tensor, honest: Tensor, bound: Tensor) -> bool:
        """min-sum: ``sum_i ||m - h_i||^2 <= max_i sum_j ||h_i - h_j||^2``."""
        return bool((honest - candidate).pow(2).sum() <= bound)

    def bound(self, honest: Tensor) -> Tensor:
        return torch.cdist(honest, honest).pow(2).sum(1).max()


def attack_uploads(attack: Attack, deltas: Tree, byzantine: Tensor, seed: int, round_: int) -> Tree:
    """The stacked ``deltas`` with the Byzantine rows replaced by ``attack`` (one flattened tensor operation)."""
    if not bool(byzantine.any()):
        return deltas
    flat = flatten(deltas)
    return unflatten(attack.malicious(flat, byzantine.to(flat.device), seed, round_), deltas)


for _cls in (LabelFlip, Backdoor, SignFlip, Gaussian, IPM, ALIE, MinMax, MinSum):
    components.register("attack", _cls.name, _cls)
