"""Asynchronous server strategies: FedAsync (Xie, Koyejo & Gupta 2019) and FedBuff (Nguyen et al. 2022).

Clients train from the model version ``tau`` they pulled and arrive later, when the server is at version
``t``; their staleness is ``t - tau``. The engine (:mod:`fedsim.asynchronous`) keeps ``concurrency`` clients in
flight on the virtual clock and hands each arrival to the strategy, which says when the server steps:

- **FedAsync**: every arrival is a server step, ``w <- (1 - a_t) w + a_t w_k`` with ``w_k = w_tau - Delta_k``
  the client's final model and ``a_t = alpha * s(t - tau)``.
- **FedBuff**: arrivals fill a buffer of ``buffer_size`` (K) deltas; when it is full the server steps with
  their mean ``Delta = sum_i q_i s(t - tau_i) Delta_i`` (``q_i = 1/K``, or sample weights ``n_i / sum_j n_j``),
  ``w <- w - eta_g Delta`` (``server_optimizer: sgd``) or a FedOpt server optimizer (Reddi et al. 2021) on the
  pseudo-gradient ``-Delta``.

Staleness functions ``s`` (Xie et al. 2019, section 5.2): ``constant`` 1; ``polynomial`` ``(t - tau + 1)^(-a)``;
``hinge`` 1 if ``t - tau <= b``, else ``1 / (a (t - tau - b) + 1)``. FedBuff's paper scales by
``1 / sqrt(1 + staleness)``: ``polynomial`` with ``a = 0.5``, its default here. FedAsync's defaults
(alpha 0.6, polynomial a 0.5, hinge a 10 b 4) are among the paper's settings. Clients run plain local
training (FedAsync's proximal variant is not included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch
from torch import Tensor

from fedsim.core.components import option
from fedsim.core.errors import FedsimError
from fedsim.core.protocol import ClientUpdates, Plan, ServerState
from fedsim.core.pytree import Tree

from .base import Strategy, apply_step
from .fedopt import FedAdagrad, FedAdam, FedYogi

Staleness = Literal["constant", "polynomial", "hinge"]
STALENESS: tuple[str, ...] = ("constant", "polynomial", "hinge")


def staleness_weight(staleness: int, kind: str = "constant", a: float = 0.5, b: float = 4.0) -> float:
    """``s(staleness)`` of Xie et al. 2019: constant 1, polynomial ``(staleness + 1)^(-a)``, hinge 1 up to
    ``b`` and ``1 / (a (staleness - b) + 1)`` beyond."""
    if kind == "constant":
        return 1.0
    if kind == "polynomial":
        return float((staleness + 1.0) ** (-a))
    if kind == "hinge":
        return 1.0 if staleness <= b else 1.0 / (a * (staleness - b) + 1.0)
    raise FedsimError(f"unknown staleness function {kind!r}; choose one of {', '.join(STALENESS)}")


@dataclass
class Arrival:
    """One client's result as it reaches the server: its delta ``w_tau - w_k`` (unstacked), the model it
    started from, its staleness ``t - tau`` and its number of training samples."""

    client: int
    delta: Tree
    start: Tree
    staleness: int
    num_samples: float


def _check_staleness(options: dict) -> None:
    kind = options.get("staleness")
    unused = {"constant": ("a", "b"), "polynomial": ("b",), "hinge": ()}.get(kind, ())
    for name in unused:
        if options.get(name) is not None:
            raise FedsimError(f"strategy option '{name}' does not apply to staleness '{kind}'; drop it")


Concurrency = Annotated[
    int | None, option("clients in flight at any time, C (default: FedAsync min(10, N), FedBuff min(100, N))", ge=1)
]
StalenessOption = Annotated[Staleness, option("staleness function s: constant | polynomial | hinge")]
AOption = Annotated[float | None, option("staleness exponent/slope a (polynomial default 0.5, hinge 10)", ge=0)]
BOption = Annotated[float | None, option("hinge: staleness up to b is not discounted (default 4)", ge=0)]


class AsyncStrategy(Strategy):
    """Base of the asynchronous strategies: ``concurrency`` clients in flight, :meth:`step_size` arrivals per
    server step, :meth:`server_step` from those arrivals."""

    asynchronous: ClassVar[bool] = True
    default_a: ClassVar[dict[str, float]] = {"polynomial": 0.5, "hinge": 10.0}

    default_concurrency: ClassVar[int] = 10

    def __init__(
        self,
        concurrency: Concurrency = None,
        staleness: StalenessOption = "constant",
        a: AOption = None,
        b: BOption = None,
        **kwargs,
    ) -> None:
        if kwargs.get("aggregator") is not None:
            raise FedsimError(f"strategy '{self.name}' applies arrivals one buffer at a time; drop the aggregator")
        if kwargs.get("fraction", 1.0) != 1.0 or kwargs.get("min_clients", 1) != 1:
            raise FedsimError(
                f"strategy '{self.name}' keeps strategy.concurrency clients in flight; drop fraction/min_clients"
            )
        super().__init__(**kwargs)
        _check_staleness({"staleness": staleness, "a": a, "b": b})
        self.concurrency = int(concurrency) if concurrency is not None else None
        self.staleness = staleness
        self.a = float(a) if a is not None else self.default_a.get(staleness, 0.0)
        self.b = float(b) if b is not None else 4.0

    check_options = staticmethod(_check_staleness)

    def clients_in_flight(self, num_clients: int) -> int:
        """C: ``concurrency``, or ``min(default_concurrency, N)`` when it is not set."""
        return self.concurrency if self.concurrency is not None else min(self.default_concurrency, num_clients)

    def weight(self, staleness: int) -> float:
        return staleness_weight(staleness, self.staleness, self.a, self.b)

    @property
    def step_size(self) -> int:
        """Arrivals per server step."""
        raise NotImplementedError

    def server_step(self, version: int, state: ServerState, arrivals: list[Arrival]) -> ServerState:
        raise NotImplementedError

    def configure(self, *args, **kwargs) -> Plan:
        raise FedsimError(f"strategy '{self.name}' is asynchronous: it runs on fedsim's event loop, not in rounds")

    def aggregate(self, round_: int, state: ServerState, updates: ClientUpdates) -> ServerState:
        raise FedsimError(f"strategy '{self.name}' is asynchronous: it runs on fedsim's event loop, not in rounds")

    def reductions(self):
        return None


class FedAsync(AsyncStrategy):
    """FedAsync: ``w <- (1 - a_t) w + a_t w_k``, ``a_t = alpha s(t - tau)`` at every arrival."""

    name = "fedasync"

    def __init__(
        self,
        alpha: Annotated[float, option("mixing weight alpha of an arriving model", gt=0, le=1)] = 0.6,
        concurrency: Concurrency = None,
        staleness: StalenessOption = "polynomial",
        a: AOption = None,
        b: BOption = None,
        **kwargs,
    ):
        super().__init__(concurrency, staleness, a, b, **kwargs)
        self.alpha = float(alpha)

    @property
    def step_size(self) -> int:
        return 1

    def mixing(self, staleness: int) -> float:
        """``a_t = alpha s(t - tau)``."""
        return self.alpha * self.weight(staleness)

    def server_step(self, version: int, state: ServerState, arrivals: list[Arrival]) -> ServerState:
        (arrival,) = arrivals
        a = self.mixing(arrival.staleness)
        params = {
            k: (1.0 - a) * w + a * (arrival.start[k] - arrival.delta[k]) for k, w in state.params.items()
        }  # fmt: skip
        return ServerState(params, state.extras)


SERVER_OPTIMIZERS = {"adam": FedAdam, "yogi": FedYogi, "adagrad": FedAdagrad}


class FedBuff(AsyncStrategy):
    """FedBuff: a buffer of K staleness-weighted deltas, then one server optimizer step on their mean."""

    name = "fedbuff"
    default_concurrency = 100

    def __init__(
        self,
        buffer_size: Annotated[int, option("arrivals per server step (K)", ge=1)] = 10,
        concurrency: Concurrency = None,
        server_lr: Annotated[float | None, option("server learning rate (default: sgd 1, else FedOpt's)", gt=0)] = None,
        server_optimizer: Annotated[
            Literal["sgd", "adam", "yogi", "adagrad"], option("server optimizer: sgd | adam | yogi | adagrad (FedOpt)")
        ] = "sgd",
        weighting: Annotated[Literal["uniform", "samples"], option("buffer weights q_i: 1/K or sample counts")] = (
            "uniform"
        ),
        staleness: StalenessOption = "polynomial",
        a: AOption = None,
        b: BOption = None,
        **kwargs,
    ):
        super().__init__(concurrency, staleness, a, b, **kwargs)
        self.buffer_size, self.weighting, self.server_optimizer = int(buffer_size), weighting, server_optimizer
        self.server_lr = server_lr if server_lr is not None else 1.0
        self.inner = None
        if server_optimizer != "sgd":
            given = {"server_lr": server_lr} if server_lr is not None else {}
            self.inner = SERVER_OPTIMIZERS[server_optimizer](**given)
            self.server_lr = self.inner.server_lr

    @property
    def step_size(self) -> int:
        return self.buffer_size

    def init(self, params: Tree) -> ServerState:
        return self.inner.init(params) if self.inner is not None else super().init(params)

    def buffer_mean(self, arrivals: list[Arrival]) -> Tree:
        """``sum_i q_i s(t - tau_i) Delta_i`` (in float64)."""
        if self.weighting == "samples":
            total = sum(x.num_samples for x in arrivals)
            q = [x.num_samples / total for x in arrivals]
        else:
            q = [1.0 / len(arrivals)] * len(arrivals)
        first = arrivals[0].delta
        scale = torch.tensor([qi * self.weight(x.staleness) for qi, x in zip(q, arrivals, strict=True)],
                             dtype=torch.float64, device=next(iter(first.values())).device)  # fmt: skip
        out: dict[str, Tensor] = {}
        for k, d in first.items():
            stacked = torch.stack([x.delta[k] for x in arrivals]).double()
            out[k] = torch.tensordot(scale, stacked, dims=1).to(d.dtype)
        return out

    def server_step(self, version: int, state: ServerState, arrivals: list[Arrival]) -> ServerState:
        mean = self.buffer_mean(arrivals)
        if self.inner is not None:
            return self.inner.server_update(version, state, mean)
        return ServerState(apply_step(state.params, mean, self.server_lr), state.extras)


def is_asynchronous(strategy: object) -> bool:
    """Whether ``strategy`` runs on the asynchronous event loop."""
    return bool(getattr(strategy, "asynchronous", False))


__all__ = ["Arrival", "AsyncStrategy", "FedAsync", "FedBuff", "is_asynchronous", "staleness_weight"]
