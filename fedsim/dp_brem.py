"""DP-BREM (Gu, Li & Xiong, USENIX Security 2025): differentially private and Byzantine-robust FL with client
momentum (component kind ``privacy``, name ``dp-brem``). Official code: Emory-AIMS/DP-BREM.

Iteration ``t = 0..T-1`` (round ``t + 1``; ``T = rounds``), with schedules ``R_t = R (1 - (1 - rho) t / T)``,
``C_t = C (1 - (1 - rho) t / T)`` (``rho = clip_decay_final_ratio``, 0.3 in the authors' code) and
``eta_t = eta ((lr_decay_final_ratio - 1) t / T + 1)`` (``eta = lr``):

- **clients:** every client (with ``momentum`` beta > 0: every iteration, selected or not; with beta = 0: the
  selected ones) draws a Poisson batch (rate ``p_i = min(1, B / n_i)``, the ``poisson`` sampler), clips every
  per-sample gradient at the global model to ``R_t``, averages over the expected batch ``B_i = p_i n_i``:
  ``g_i = sum_b clip_{R_t}(g_ib) / B_i``, and updates ``m_i <- (1 - beta) g_i + beta m_i`` (``m_i`` starts at 0
  and is checkpointed);
- **server:** clients are selected by Poisson sampling with rate ``fraction`` (the authors' ``q``, 1 by
  default there); each selected client uploads ``m_i - m``; centered clipping and Gaussian noise give
  ``S = sum_{i in sel} clip_{C_t}(m_i - m) + N(0, (sigma R_t)^2 I)``; then ``m <- m + S / |sel|`` and
  ``w <- w - eta_t m`` (``m`` starts at 0; a round without clients leaves ``m`` as it is and still steps).

**DP-BREM+** (``secure_aggregation: true``): no trusted server; every selected client adds its share
``N(0, (sigma R_t)^2 / |sel| I)`` to its clipped upload and a simulated secure aggregation
(:class:`SecureSum`) hands the server only the sum, which has the same distribution as the central version.

**Attacks:** a model attack replaces the selected Byzantine clients' uploads ``m_i - m`` (omniscient attacks
see the honest uploads), before clipping; a data attack poisons their records (they then train honestly).

**Choices taken from the authors' code:** the linear decays of ``R_t``, ``C_t`` (to about 0.3x) and ``eta_t``;
noise ``sigma R_t`` added once to the sum and divided by ``|sel|``; zero initial momenta; every client updating
its momentum every iteration when beta > 0; the defaults R = 10, C = 5, sigma = 0.02, lr_decay_final_ratio =
0.1. **Ours:** ``g_i`` is divided by the expected batch ``B_i`` (the authors divide by the drawn size, whose
sensitivity is not bounded by ``R / B``); ``momentum`` defaults to 0.9 (the repository's default is 0 and the
paper's per-experiment values are not in it).

**Accounting (our inference; the repository has none).** One record of client ``i`` moves ``g_i`` by at most
``R_t / B_i``, and through the momentum ``m_i^t`` by at most ``Delta_t = sum_{k<=t} (1 - beta) beta^k
R_{t-k} / B_i`` (clipping is 1-Lipschitz, so the upload too). Iteration ``t`` is then a Gaussian mechanism with
noise multiplier ``z_t = sigma R_t / Delta_t``. With beta = 0 a record touches only the iterations whose batch
holds it, so each iteration is ``PoissonSampledDpEvent(p_i, GaussianDpEvent(sigma B_i))``; with beta > 0 it
lingers in the momentum and no sampling amplification is claimed: the iterations compose as
``GaussianDpEvent(z_t)``. The client sampling (``fraction``) would amplify further; it is not counted.
``epsilon`` is the worst client's.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Annotated, Any, Literal

import numpy as np
import torch
from torch import Tensor

from fedsim.core import components, rng
from fedsim.core.components import option
from fedsim.core.errors import FedsimError
from fedsim.core.protocol import ServerState
from fedsim.core.pytree import flatten, stack, unflatten
from fedsim.engine.sample_clipping import SampleClipping
from fedsim.privacy import _accounting, _check, epsilon, poisson_clients

STREAM_BREM_NOISE = 15
STREAM_BREM_SHARE = 16


class SecureSum:
    """A simulated secure aggregation: clients add their messages, the server learns only the total."""

    def __init__(self, like: Tensor) -> None:
        self._total = torch.zeros_like(like, dtype=torch.float64)
        self.count = 0

    def add(self, messages: Tensor) -> None:
        """Add the messages ``[S, D]`` of a batch of clients."""
        self._total += messages.double().sum(0)
        self.count += len(messages)

    def total(self) -> Tensor:
        """The sum of every message added (all the server sees)."""
        return self._total


class DPBREM:
    """DP-BREM and DP-BREM+ (see the module docstring)."""

    name = "dp-brem"
    record_level = False
    owns_round = True
    """The round is :meth:`round`: client momenta, centered clipping, noise and the server's momentum step."""

    def __init__(
        self,
        clip: Annotated[float, option("centered-clipping radius C (C_t decays to C * clip_decay_final_ratio)",
                                      gt=0)] = 5.0,
        record_clip: Annotated[float, option("per-sample clipping norm R (R_t decays likewise)", gt=0)] = 10.0,
        noise_multiplier: Annotated[float, option("sigma: the noise on the sum has std sigma R_t", ge=0)] = 0.02,
        momentum: Annotated[float, option("client momentum beta", ge=0, lt=1)] = 0.9,
        clip_decay_final_ratio: Annotated[float, option("R_t and C_t fall linearly towards this share", gt=0,
                                                        le=1)] = 0.3,
        lr_decay_final_ratio: Annotated[float, option("eta_t falls linearly towards this share of lr", gt=0,
                                                      le=1)] = 0.1,
        secure_aggregation: Annotated[bool, option("DP-BREM+: clients add noise shares, the server sees the sum")] = (
            False
        ),
        delta: Annotated[float, option("delta of the reported (epsilon, delta)", gt=0, lt=1)] = 1e-5,
        accountant: Annotated[Literal["rdp", "pld"], option("dp-accounting accountant: RDP or PLD")] = "rdp",
        target_epsilon: Annotated[float | None, option("stop before a round that would exceed it", gt=0)] = None,
    ) -> None:  # fmt: skip
        _check(clip, noise_multiplier, delta)
        if math.isinf(clip) or math.isinf(record_clip) or not record_clip > 0:
            raise FedsimError("dp-brem's clip and record_clip must be finite numbers > 0")
        self.clip, self.record_clip, self.noise_multiplier = float(clip), float(record_clip), float(noise_multiplier)
        self.momentum, self.secure_aggregation = float(momentum), bool(secure_aggregation)
        self.clip_decay_final_ratio, self.lr_decay_final_ratio = clip_decay_final_ratio, lr_decay_final_ratio
        self.delta, self.accountant, self.target_epsilon = float(delta), accountant, target_epsilon
        self.client_momentum: Tensor | None = None
        self.server_momentum: Tensor | None = None

    # -- set-up and state -------------------------------------------------------------------------------------

    def attach(self, sim) -> None:
        """Zero momenta for the run's clients and model; the clients' rates and expected batches."""
        dim = sum(v.numel() for v in sim.init_params.values())
        self.client_momentum = torch.zeros(sim.store.num_clients, dim, dtype=torch.float32)
        self.server_momentum = torch.zeros(dim, dtype=torch.float32)
        self.rates = sim.sampler.rates(sim.store.sizes, sim.config.batch_size)
        self.expected_batch = self.rates * np.asarray(sim.store.sizes, dtype=np.float64)
        self.rounds = sim.config.rounds

    def state_dict(self) -> dict[str, Tensor]:
        return {"client_momentum": self.client_momentum.clone(), "server_momentum": self.server_momentum.clone()}

    def load_state_dict(self, state: dict[str, Tensor] | None) -> None:
        momenta = (state or {}).get("client_momentum")
        if momenta is None or momenta.shape != self.client_momentum.shape:
            raise FedsimError("checkpoint has no dp-brem momenta for this run's clients and model")
        self.client_momentum = momenta.clone()
        self.server_momentum = state["server_momentum"].clone()

    # -- schedules and accounting -----------------------------------------------------------------------------

    def decay(self, t: int) -> float:
        """``R_t / R = C_t / C``."""
        return 1.0 - (1.0 - self.clip_decay_final_ratio) * min(t / self.rounds, 1.0)

    def lr(self, lr: float, t: int) -> float:
        """``eta_t``."""
        return lr * ((self.lr_decay_final_ratio - 1.0) * t / self.rounds + 1.0)

    def epsilon(self, q: float, rounds: int) -> float | None:
        """The worst client's epsilon after ``rounds`` iterations (None without noise); ``q`` (the client
        sampling) is not counted."""
        if self.noise_multiplier == 0:
            return None
        if rounds == 0:
            return 0.0
        pairs = sorted({(float(p), float(b)) for p, b in zip(self.rates, self.expected_batch, strict=True)})
        return max(self._client_epsilon(p, b, rounds) for p, b in pairs)

    def _client_epsilon(self, rate: float, batch: float, rounds: int) -> float:
        if self.momentum == 0:
            return epsilon(rate, self.noise_multiplier * batch, rounds, self.delta, self.accountant)
        return _gaussian_epsilon(tuple(self.noise_multipliers(batch, rounds)), self.delta, self.accountant)

    def noise_multipliers(self, batch: float, rounds: int) -> list[float]:
        """``z_t = sigma R_t / Delta_t`` of iterations ``0..rounds-1`` for a client with expected batch ``batch``
        (beta > 0; see the module docstring)."""
        beta, out, carried = self.momentum, [], 0.0
        for t in range(rounds):
            carried = beta * carried + (1 - beta) * self.decay(t)  # sum_k (1 - beta) beta^k R_{t-k} / R
            out.append(self.noise_multiplier * self.decay(t) * batch / carried)
        return out

    # -- the round --------------------------------------------------------------------------------------------

    def round(self, sim, round_: int, state: ServerState) -> tuple[ServerState, dict[str, Any]]:
        """One DP-BREM iteration (``t = round_ - 1``)."""
        c, t, n = sim.config, round_ - 1, sim.store.num_clients
        radius, record_clip, lr = self.clip * self.decay(t), self.record_clip * self.decay(t), self.lr(c.lr, t)
        selected = poisson_clients(n, c.fraction, c.seed, round_)
        trained = np.arange(n) if self.momentum > 0 else selected
        grads, losses = self.gradients(sim, state.params, trained, round_, record_clip)
        rows = torch.as_tensor(trained)
        self.client_momentum[rows] = (1 - self.momentum) * grads + self.momentum * self.client_momentum[rows]
        record: dict[str, Any] = {"round": round_, "lr": lr, "clients": len(selected)}
        if len(selected):
            uploads = self.client_momentum[torch.as_tensor(selected)] - self.server_momentum
            if sim.attack is not None:
                byzantine = torch.as_tensor(sim.byzantine[selected])
                record["byzantine"] = int(byzantine.sum())
                if sim.attack.model_attack and bool(byzantine.any()):
                    uploads = sim.attack.malicious(uploads, byzantine, c.seed, round_)
            norms = uploads.double().norm(dim=1)
            scale = (radius / norms.clamp_min(1e-300)).clamp(max=1.0)
            clipped = uploads.double() * scale.unsqueeze(1)
            total = self.noisy_sum(clipped, selected, c.seed, round_, self.noise_multiplier * record_clip)
            self.server_momentum = self.server_momentum + (total / len(selected)).float()
            record["clipped_fraction"] = float((scale < 1).double().mean())
            np.add.at(sim.participation, selected, 1)
        flat = flatten(state.params, stacked=False)
        new = ServerState(unflatten(flat - lr * self.server_momentum.to(flat.device), state.params), state.extras)
        mean_loss = float(losses[np.isin(trained, selected)].double().mean()) if len(selected) else None
        record.update({
            "train_loss": mean_loss,
            "drift": None,
            "update_norm": float(lr * self.server_momentum.norm()),
            "bytes_up": len(selected) * sim.model_bytes,
            "bytes_down": len(trained) * sim.model_bytes,
            "round_time_s": 0.0,
            "epsilon": self.epsilon(c.fraction, round_),
        })  # fmt: skip
        return new, record

    def noisy_sum(self, clipped: Tensor, selected: np.ndarray, seed: int, round_: int, std: float) -> Tensor:
        """``sum_i clipped_i + N(0, std^2 I)``: the server's noise, or (DP-BREM+) each client's share
        ``N(0, std^2 / |sel| I)`` summed by :class:`SecureSum`."""
        if not self.secure_aggregation:
            total = clipped.sum(0)
            if std > 0:
                generator = torch.Generator().manual_seed(rng.seed_for(seed, STREAM_BREM_NOISE, round_))
                total = total + std * torch.randn(total.shape, generator=generator, dtype=torch.float64)
            return total
        secure = SecureSum(clipped[0])
        share = std / math.sqrt(len(selected))
        for row, client in enumerate(selected.tolist()):  # each client's own noise share, then the secure sum
            generator = torch.Generator().manual_seed(rng.seed_for(seed, STREAM_BREM_SHARE, round_, client))
            noise = torch.randn(clipped.shape[1], generator=generator, dtype=torch.float64) * share
            secure.add((clipped[row] + noise).unsqueeze(0))
        return self.server_view(secure)

    @staticmethod
    def server_view(secure: SecureSum) -> Tensor:
        """What the server reads of a secure aggregation: the total alone."""
        return secure.total()

    def gradients(self, sim, params, clients: np.ndarray, round_: int, record_clip: float) -> tuple[Tensor, Tensor]:
        """Every client's ``g_i`` at the global model, ``[S, D]`` (float32), and its batch's mean loss ``[S]``,
        chunk by chunk (the executor's chunk size)."""
        executor, store = sim.executor, sim.store
        grads, losses = [], []
        chunk = executor.chunk_size or len(clients) or 1
        for first in range(0, len(clients), chunk):
            ids = clients[first : first + chunk]
            batches = executor.sample(ids, round_)
            index = store.global_index(ids, batches.positions)[:, 0]
            mask = torch.as_tensor(batches.mask[:, 0], device=executor.device).to(self.client_momentum.dtype)
            clipping = SampleClipping(record_clip, 0.0, 1.0, sim.config.seed)
            g, loss, _ = executor.trainer.private_grads(
                stack(params, len(ids)), store.x[index], store.y[index], mask, clipping, (round_, ids), 0
            )
            per_client = torch.as_tensor(self.expected_batch[ids], dtype=torch.float64).unsqueeze(1)
            grads.append((flatten(g).double() / per_client.to(store.x.device)).float().cpu())
            losses.append(loss.cpu())
        if not grads:
            return torch.zeros(0, self.client_momentum.shape[1]), torch.zeros(0)
        return torch.cat(grads), torch.cat(losses)


@cache
def _gaussian_epsilon(noise_multipliers: tuple[float, ...], delta: float, accountant: str) -> float:
    """Epsilon of Gaussian mechanisms with these noise multipliers, composed (dp-accounting)."""
    dp_accounting, rdp, pld = _accounting()
    account = rdp.RdpAccountant() if accountant == "rdp" else pld.PLDAccountant()
    account.compose(dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(z) for z in noise_multipliers]))
    return float(account.get_epsilon(delta))


components.register("privacy", "dp-brem", DPBREM)
