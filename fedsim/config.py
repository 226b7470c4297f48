"""The validated run configuration: defaults < config file (YAML/TOML) < command-line flags.

Run-level keys are flat (``rounds``, ``clients``, ``lr``, ``local_steps``, ``batch_size``, ``seed``,
``topology``, ...). Every pluggable part is a component (:mod:`fedsim.core.components`) named by one key and
configured in its own mapping::

    strategy: {name: fedadam, server_lr: 0.01, tau: 0.001}
    optimizer: {name: foam, level: 2}
    regulator: {name: ecgr, rho: 0.5}

``strategy: fedadam`` is the shorthand with default options; ``strategy.server_lr: 0.01`` (a dotted key, as
``--set strategy.server_lr=0.01`` writes it) sets one option. A component's options are validated by the
schema derived from its signature, so an unknown option, one of another component, a wrong type or an
out-of-bounds value is a one-line :class:`FedsimError` that names the component and the option.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_serializer, model_validator

from fedsim.core import components
from fedsim.core.components import Spec
from fedsim.core.errors import FedsimError, FedsimWarning, did_you_mean, unknown

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

COMPONENT_KEYS: dict[str, str] = {
    "dataset": "dataset", "partition": "partitioner", "model": "model", "strategy": "strategy",
    "aggregator": "aggregator", "regulator": "regulator", "client_filter": "client_filter",
    "availability": "availability", "system": "system", "attack": "attack", "privacy": "privacy",
    "sampler": "sampler", "uplink": "compressor", "downlink": "compressor",
    "optimizer": "optimizer",
    "lr_schedule": "lr_schedule", "problem": "problem", "executor": "executor", "backend": "backend",
}  # fmt: skip
"""Config key -> component kind (``strategy`` is a ``decentralized`` strategy when a topology is given)."""

RECORD_LEVEL_PRIVACY = ("dp-sgd",)
"""Privacy components that clip and noise every local step."""
POISSON_BATCH_PRIVACY = ("dp-sgd", "dp-brem")
"""Privacy components whose accountant needs Poisson batches (the ``poisson`` sampler is their default)."""
DEFAULTS: dict[str, str | None] = {
    "dataset": "digits", "partition": "dirichlet", "model": "mlp", "strategy": None, "aggregator": "mean",
    "regulator": "none", "client_filter": "none", "availability": "always", "system": "uniform", "attack": "none",
    "privacy": "none", "sampler": "shuffle", "uplink": "none", "downlink": "none",
    "optimizer": "sgd", "lr_schedule": "constant", "problem": None, "executor": "local", "backend": "fedsim",
}  # fmt: skip

RENAMED: dict[str, str] = {
    "data_path": "dataset.path", "synthetic_alpha": "dataset.alpha", "synthetic_beta": "dataset.beta",
    "shakespeare_min_samples": "dataset.min_samples", "shakespeare_max_samples": "dataset.max_samples",
    "alpha": "partition.alpha", "classes_per_client": "partition.classes_per_client", "model_args": "model.<option>",
    "mu": "strategy.mu", "server_lr": "strategy.server_lr", "server_momentum": "strategy.server_momentum",
    "beta1": "strategy.beta1", "beta2": "strategy.beta2", "tau": "strategy.tau", "fedcm_beta": "strategy.beta",
    "feddyn_alpha": "strategy.alpha", "fednova_form": "strategy.form", "scaffold_control": "strategy.control",
    "scaffold_correction": "strategy.correction", "scaffold_weighting": "strategy.weighting",
    "flwr_options": "strategy.<option>", "dual_lr": "strategy.dual_lr", "positive_classes": "problem.positive_classes",
    "dro_lambda": "problem.lam", "trim_fraction": "aggregator.fraction", "krum_byzantine": "aggregator.byzantine",
    "krum_select": "aggregator.select", "gaf_tau": "aggregator.tau or client_filter.tau",
    "gaf_microbatches": "client_filter.microbatches", "ecgr_rho": "regulator.rho", "ecgr_beta": "regulator.beta",
    "ecgr_center": "regulator.center", "bherd_unit": "regulator.unit", "bherd_ratio": "regulator.ratio",
    "bherd_scale": "regulator.scale", "bherd_microbatches": "regulator.microbatches",
    "trajectory_dtype": "regulator.trajectory_dtype", "trajectory_device": "regulator.trajectory_device",
    "availability_p_on": "availability.p_on", "availability_p_off": "availability.p_off",
    "laziness": "sampler.laziness", "markov_degree": "sampler.degree", "lr_decay": "lr_schedule.decay",
    "lr_step": "lr_schedule.step", "min_lr": "lr_schedule.min_lr", "momentum": "optimizer.momentum",
    "nesterov": "optimizer.nesterov", "weight_decay": "optimizer.weight_decay", "adam_betas": "optimizer.betas",
    "adam_eps": "optimizer.eps", "compress_params": "optimizer.compress_params", "eps_mode": "optimizer.eps_mode",
    "foam_level": "optimizer.level", "foam_scale": "optimizer.scale", "foam_res_scale": "optimizer.res_scale",
    "gwt_level": "optimizer.level", "gwt_scale": "optimizer.scale", "gwt_limiter": "optimizer.limiter",
    "gwt_wavelet": "optimizer.wavelet", "mols_estimator": "optimizer.estimator", "mols_refresh": "optimizer.refresh",
    "sai_momentum": "optimizer.momentum", "num_actors": "executor.num_actors",
    "cpus_per_actor": "executor.cpus_per_actor", "gpus_per_actor": "executor.gpus_per_actor",
    "ray_address": "executor.address", "flower_cpus_per_client": "backend.cpus_per_client",
}  # fmt: skip
"""Flat keys of fedsim 0.1 and where each option lives now (the README's mapping table)."""

ALIASES: dict[str, str] = {
    "learning_rate": "lr", "learningrate": "lr", "step_size": "lr", "num_rounds": "rounds", "epochs": "local_epochs",
    "num_epochs": "local_epochs", "num_clients": "clients", "n_clients": "clients", "steps": "local_steps",
    "batch": "batch_size", "batchsize": "batch_size", "algorithm": "strategy", "optim": "optimizer",
}  # fmt: skip
"""Names other simulators use, for the did-you-mean of an unknown key (close spellings can mislead)."""


class RunConfig(BaseModel):
    """Everything that determines a run. Same config and seed give the same metrics."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    # data and partition
    dataset: Spec
    train_samples: int | None = Field(None, ge=1, description="Train on a seeded random subset of this many samples.")
    clients: int = Field(
        20, ge=1, le=10_000_000, description="Number of simulated clients (over a topology: its node count)."
    )
    partition: Spec
    min_client_size: int = Field(2, ge=1, description="Samples every client holds at least.")
    client_test_fraction: float = Field(0.2, ge=0, lt=1, description="Share of each client's samples held out.")
    # model
    model: Spec
    # decentralized mode (a topology file turns it on)
    topology: str | None = Field(None, description="Graph file: decentralized training over it.")
    mixing: str = Field("metropolis_hastings", description="Mixing matrix: metropolis_hastings | max_degree | ...")
    schedule: Literal["static", "one_peer_exponential", "random_matchings"] = Field(
        "static", description="Gossip over time: static | one_peer_exponential | random_matchings."
    )
    problem: Spec | None = None
    # strategy and what composes with it
    strategy: Spec
    fraction: float = Field(1.0, gt=0, le=1, description="Fraction of clients selected per round.")
    min_clients: int = Field(1, ge=1, description="Clients selected per round at least.")
    aggregator: Spec
    regulator: Spec
    client_filter: Spec
    availability: Spec
    system: Spec
    attack: Spec
    privacy: Spec
    uplink: Spec
    downlink: Spec
    choco_gamma: float | None = Field(
        None, gt=0, le=1, description="CHOCO-SGD consensus step size (with --topology and --uplink; default 0.5)."
    )
    deadline_s: float | None = Field(
        None, gt=0, description="Synchronous rounds: clients that would take longer are dropped (virtual seconds)."
    )
    partial_work: bool = Field(False, description="With deadline_s: keep the local steps done by the deadline.")
    over_selection: float = Field(
        0.0, ge=0, description="Select ceil(K(1+x)) clients, aggregate the first K to finish."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Per-round probability that a selected client drops out.")
    time_budget_s: float | None = Field(
        None, gt=0, description="Each client runs the local steps that fit this many virtual seconds."
    )
    # local training
    rounds: int = Field(20, ge=1, le=1_000_000, description="Communication rounds.")
    local_steps: int = Field(10, ge=1, le=1_000_000, description="Local optimizer steps per round.")
    local_epochs: int | None = Field(None, ge=1, le=100_000, description="Local epochs per round instead (ragged).")
    batch_size: int = Field(32, ge=1, le=1_000_000, description="Local minibatch size.")
    sampler: Spec
    optimizer: Spec
    lr: float = Field(0.05, gt=0, description="Local learning rate.")
    lr_schedule: Spec
    # engine
    seed: int = Field(0, ge=0, description="Run seed.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto | cpu | cuda")
    chunk_size: int | None = Field(None, ge=1, description="Clients per vectorized call (default: from memory).")
    grad_mode: Literal["sum", "vmap"] = Field("sum", description="Per-client gradients: sum | vmap.")
    sequential: bool = Field(False, description="Train clients one by one (the reference path).")
    threads: Annotated[int, Field(ge=1, le=4096)] | Literal["adaptive"] | None = Field(
        None,
        description="torch CPU threads: N, or adaptive (follow the free CPUs; may change last bits) "
        "(default: the CPUs this process may use, fixed for the run).",
    )
    executor: Spec
    backend: Spec
    # evaluation and results
    eval_every: int = Field(1, ge=1, description="Evaluate every N rounds.")
    checkpoint_every: int = Field(10, ge=0, description="Checkpoint every N rounds (0: never).")
    logger: tuple[Spec, ...] = Field(
        (), description="Experiment trackers, a comma list: tensorboard, mlflow, wandb (metrics.jsonl always)."
    )
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI (default: a SQLite store in OUT/mlruns/).")

    @model_validator(mode="before")
    @classmethod
    def _resolve_components(cls, data: Any) -> Any:
        """Nest dotted keys, fill default component names, and validate every component's options."""
        if not isinstance(data, Mapping):
            return data
        data = nest(data)
        if data.get("sampler") is None and data.get("privacy") is not None:
            privacy, _ = components.split_spec("privacy", data["privacy"])
            if privacy in POISSON_BATCH_PRIVACY:  # record-level DP draws Poisson batches unless told otherwise
                data["sampler"] = "poisson"
        for key, default in DEFAULTS.items():
            if data.get(key) is None:
                data[key] = default
        if data["strategy"] is None:
            data["strategy"] = _default_name("strategy", data)
        decentralized = bool(data.get("topology"))
        name, _ = components.split_spec("strategy", data["strategy"])
        _check_mode(name, decentralized)
        minimax = decentralized and getattr(_strategy_class(name, decentralized), "minimax", False)
        if minimax and data["problem"] is None:
            data["problem"] = "auc"
        data["logger"] = _logger_specs(data.get("logger"))
        for key, kind in COMPONENT_KEYS.items():
            if key == "problem" and data[key] is None:
                continue
            if key == "strategy" and decentralized:
                kind = "decentralized"
            data[key] = components.resolve_spec(kind, data[key])
        return data

    @model_validator(mode="after")
    def _check_combinations(self) -> RunConfig:
        """Rules that involve more than one component (each component checks its own options)."""
        from fedsim.data.datasets import TOKEN_DATASETS
        from fedsim.models import SEQUENCE_MODELS
        from topologies import MIXING_METHODS

        if self.mixing not in MIXING_METHODS:
            raise unknown("mixing method", self.mixing, MIXING_METHODS)
        if self.mlflow_uri is not None and "mlflow" not in [s.name for s in self.logger]:
            raise FedsimError("mlflow_uri is set but no mlflow logger would use it; add --logger mlflow")
        opt = self.optimizer
        if self.model.name in SEQUENCE_MODELS and self.dataset.name not in (*TOKEN_DATASETS, "npz"):
            raise FedsimError(
                f"model '{self.model.name}' reads windows of character indices; use it with --dataset "
                f"{' or '.join(TOKEN_DATASETS)} (or an npz of token indices), not '{self.dataset.name}'"
            )
        if self.topology and self.strategy.name in ("dsgd", "dsgda") and local_updates(self.to_dict()) > 1:
            warnings.warn(
                f"strategy '{self.strategy.name}' combines before adapting; with several local steps per round it "
                f"oscillates from round to round (use '{self.strategy.name}-atc', the default)",
                FedsimWarning,
                stacklevel=2,
            )
        if self.topology:
            added = [k for k in ("regulator", "aggregator", "client_filter", "availability", "attack", "privacy")
                     if getattr(self, k).name != DEFAULTS[k]]  # fmt: skip
            if added:
                raise FedsimError(f"option '{added[0]}' applies to federated strategies, not to decentralized training")
            if self.fraction != 1.0 or self.min_clients != 1:
                raise FedsimError("fraction/min_clients select federated clients; every node trains over a topology")
            if self.round_policy.active or self.system.get("availability"):
                raise FedsimError(
                    "deadline_s/over_selection/dropout/time_budget_s and system.availability apply to federated "
                    "rounds, not to training over a topology"
                )
        if self.problem is not None and not self.minimax:
            raise FedsimError(
                f"problem '{self.problem.name}' applies to the min-max strategies dsgda and dsgda-atc, "
                f"not '{self.strategy.name}'"
            )
        if self.minimax:
            if opt.get("weight_decay"):
                raise FedsimError("weight_decay is not supported with dsgda: it would also shrink the dual variables")
            if self.strategy.get("dual_lr") is not None and opt.name != "sgd":
                raise FedsimError(
                    f"dual_lr needs the sgd optimizer: '{opt.name}' normalizes the gradient scale, cancelling the "
                    "ratio dual_lr / lr"
                )
        general = self.strategy.name == "fednova" and self.strategy.get("form") == "general"
        if general and (opt.name != "sgd" or opt.get("nesterov") or opt.get("weight_decay")):
            raise FedsimError(
                "fednova form 'general' models local SGD with (heavy-ball) momentum and a proximal term; "
                f"use --optimizer sgd without nesterov/weight_decay (got '{opt.name}')"
            )
        if self.threads is not None and self.executor.name == "ray":
            raise FedsimError(
                "threads sets this process's torch threads, not the Ray actors' (they use executor.cpus_per_actor); "
                "drop it, or use the local executor"
            )
        self._check_microbatches()
        self._check_compression()
        self._check_flower()
        self._check_asynchronous()
        self._check_privacy()
        self.round_policy  # noqa: B018 (validates partial_work against deadline_s)
        return self

    def _check_microbatches(self) -> None:
        counts = {}
        if self.client_filter.name != "none":
            counts["client_filter.microbatches"] = self.client_filter.get("microbatches", 1)
        if self.regulator.get("unit") == "microbatch":
            counts["regulator.microbatches"] = self.regulator.get("microbatches", 1)
        for name, count in counts.items():
            if count and self.batch_size % count:
                raise FedsimError(f"batch size {self.batch_size} does not split into {name} = {count} microbatches")
        if len(set(counts.values())) > 1:
            raise FedsimError(
                f"client_filter.microbatches and regulator.microbatches must agree (both split the same minibatch); "
                f"got {counts['client_filter.microbatches']} and {counts['regulator.microbatches']}"
            )

    def _check_compression(self) -> None:
        """Uplink and downlink compression apply to synchronous federated rounds; over a topology the uplink
        compresses the gossip (CHOCO-SGD, step size ``choco_gamma``) and there is no downlink."""
        up, down = self.uplink.name != DEFAULTS["uplink"], self.downlink.name != DEFAULTS["downlink"]
        if self.topology:
            if down:
                raise FedsimError(
                    "downlink compresses a server's broadcast; over a topology there is none (--uplink compresses "
                    "the gossip messages, CHOCO-SGD)"
                )
            if self.choco_gamma is not None and not up:
                raise FedsimError("choco_gamma is CHOCO-SGD's consensus step size; it needs --uplink NAME")
            if up and self.schedule != "static":
                raise FedsimError(
                    f"CHOCO-SGD keeps public copies of the neighbours' models, which needs a fixed graph; drop "
                    f"schedule '{self.schedule}' or --uplink"
                )
            return
        if self.choco_gamma is not None:
            raise FedsimError(
                "choco_gamma applies to compressed gossip over a topology (--topology FILE, --uplink NAME)"
            )
        if not (up or down):
            return
        asynchronous = getattr(_strategy_class(self.strategy.name, False), "asynchronous", False)
        for bad, what in ((asynchronous, f"asynchronous strategy '{self.strategy.name}'"),
                          (self.privacy.name != DEFAULTS["privacy"], f"privacy '{self.privacy.name}'"),
                          (self.backend.name != "fedsim", f"--backend {self.backend.name}")):  # fmt: skip
            if bad:
                raise FedsimError(f"--uplink/--downlink compression does not combine with {what} yet; drop one")

    def _check_asynchronous(self) -> None:
        """FedAsync and FedBuff keep ``strategy.concurrency`` clients in flight on the virtual clock: round-based
        selection, availability and synchronous round policies do not apply."""
        if self.topology or not getattr(_strategy_class(self.strategy.name, False), "asynchronous", False):
            return
        name = self.strategy.name
        checks = (
            (self.fraction != 1.0 or self.min_clients != 1, "fraction/min_clients (use strategy.concurrency)"),
            (self.availability.name != DEFAULTS["availability"], f"availability '{self.availability.name}'"),
            (self.aggregator.name != DEFAULTS["aggregator"], f"aggregator '{self.aggregator.name}'"),
            (self.round_policy.active, "deadline_s/over_selection/dropout/time_budget_s"),
            (self.backend.name != "fedsim", f"--backend {self.backend.name}"),
            (self.attack.name != DEFAULTS["attack"], f"attack '{self.attack.name}'"),
            (self.privacy.name != DEFAULTS["privacy"], f"privacy '{self.privacy.name}'"),
        )
        for bad, what in checks:
            if bad:
                raise FedsimError(
                    f"strategy '{name}' is asynchronous (clients in flight on the virtual clock); drop {what}"
                )
        concurrency = self.strategy.get("concurrency")
        if concurrency is not None and concurrency > self.clients:
            raise FedsimError(f"strategy.concurrency {concurrency} exceeds the {self.clients} clients; lower it")

    def _check_privacy(self) -> None:
        """DP-FedAvg samples its own clients (Poisson, rate ``fraction``) and replaces the strategy's mean;
        DP-SGD needs Poisson batches and clients whose local steps are plain (clipped, noised) gradient steps."""
        if self.privacy.name == DEFAULTS["privacy"] or self.topology:
            return
        if self.privacy.name in POISSON_BATCH_PRIVACY and self.sampler.name != "poisson":
            raise FedsimError(
                f"privacy '{self.privacy.name}' accounts for Poisson-sampled records; use --sampler poisson "
                f"(the default with it), not '{self.sampler.name}'"
            )
        if self.privacy.name == "dp-brem":
            self._check_dp_brem()
            return
        if self.privacy.name in RECORD_LEVEL_PRIVACY:
            for name in ("regulator", "client_filter"):
                if getattr(self, name).name != DEFAULTS[name]:
                    raise FedsimError(
                        f"privacy '{self.privacy.name}' clips and noises every local gradient; {name} "
                        f"'{getattr(self, name).name}' reads the raw per-step gradients; drop it"
                    )
            if self.round_policy.active:
                raise FedsimError(
                    f"privacy '{self.privacy.name}' does not combine with deadline_s/over_selection/dropout/"
                    "time_budget_s yet; drop them"
                )
            return
        if self.aggregator.name != DEFAULTS["aggregator"]:
            p = self.privacy
            if p.get("mode") != "local" or p.get("local_noise") != "full" or p.get("weighting") != "uniform":
                raise FedsimError(
                    f"aggregator '{self.aggregator.name}' reads every client's update: with privacy "
                    f"'{p.name}' each client must add all the noise itself (privacy.mode=local, "
                    "privacy.local_noise=full, privacy.weighting=uniform)"
                )
        checks = (
            (self.availability.name != DEFAULTS["availability"], f"availability '{self.availability.name}'"),
            (self.round_policy.active or bool(self.system.get("availability")),
             "deadline_s/over_selection/dropout/time_budget_s/system.availability"),
            (self.min_clients != 1, "min_clients (clients are Poisson-sampled with rate fraction)"),
        )  # fmt: skip
        for bad, what in checks:
            if bad:
                raise FedsimError(f"privacy '{self.privacy.name}' does not combine with {what} yet; drop it")

    def _check_dp_brem(self) -> None:
        """DP-BREM runs its own round: one clipped gradient per client, its own server momentum and step."""
        plain = components.resolve_spec("optimizer", "sgd")
        checks = (
            (self.strategy.name != "fedavg", f"strategy '{self.strategy.name}' (its server step is DP-BREM's own)"),
            (self.local_epochs is not None or self.local_steps != 1,
             "local work other than --local-steps 1 (a client computes one gradient per round)"),
            (self.optimizer != plain, f"optimizer '{self.optimizer.name}' with options (clients take no local step)"),
            (self.lr_schedule.name != DEFAULTS["lr_schedule"],
             f"lr_schedule '{self.lr_schedule.name}' (lr decays by privacy.lr_decay_final_ratio)"),
            (self.aggregator.name != DEFAULTS["aggregator"], f"aggregator '{self.aggregator.name}'"),
            (self.regulator.name != DEFAULTS["regulator"], f"regulator '{self.regulator.name}'"),
            (self.client_filter.name != DEFAULTS["client_filter"], f"client_filter '{self.client_filter.name}'"),
            (self.availability.name != DEFAULTS["availability"], f"availability '{self.availability.name}'"),
            (self.round_policy.active or bool(self.system.get("availability")),
             "deadline_s/over_selection/dropout/time_budget_s/system.availability"),
            (self.min_clients != 1, "min_clients (clients are Poisson-sampled with rate fraction)"),
            (self.executor.name != "local", f"--executor {self.executor.name}"),
            (self.system.name != DEFAULTS["system"], f"system '{self.system.name}' (no virtual clock yet)"),
            (self.sequential, "sequential"),
        )  # fmt: skip
        for bad, what in checks:
            if bad:
                raise FedsimError(f"privacy 'dp-brem' does not combine with {what}; drop it")

    def _check_flower(self) -> None:
        """``flwr:`` strategies aggregate themselves; the Flower backend runs federated fedsim strategies with
        the local executor."""
        if self.flower_hosted:
            for name in ("aggregator", "regulator", "client_filter"):
                if getattr(self, name).name != DEFAULTS[name]:
                    raise FedsimError(f"option '{name}' applies to fedsim strategies, not '{self.strategy.name}'")
        if self.backend.name == "flower":
            for bad, why in ((self.executor.name != "local", f"--executor {self.executor.name}"),
                             (bool(self.topology), "--topology"),
                             (self.round_policy.active or bool(self.system.get("availability")),
                              "deadline_s/over_selection/dropout/time_budget_s/system.availability"),
                             (self.attack.name != DEFAULTS["attack"], f"--attack {self.attack.name}"),
                             (self.privacy.name != DEFAULTS["privacy"], f"--privacy {self.privacy.name}"),
                             (self.flower_hosted, f"strategy '{self.strategy.name}'")):  # fmt: skip
                if bad:
                    raise FedsimError(f"--backend flower runs federated fedsim strategies; drop {why}")

    @property
    def round_policy(self):
        """The synchronous round policies (:class:`fedsim.round_policy.RoundPolicy`)."""
        from fedsim.round_policy import RoundPolicy

        return RoundPolicy(self.deadline_s, self.partial_work, self.over_selection, self.dropout, self.time_budget_s)

    @property
    def flower_hosted(self) -> bool:
        """True for ``strategy: flwr:NAME`` (one of Flower's strategies inside our engine)."""
        return self.strategy.name.startswith("flwr:") and not self.topology

    @property
    def minimax(self) -> bool:
        """True for a min-max decentralized strategy (``dsgda``, ``dsgda-atc``, or a plugin marked ``minimax``)."""
        return bool(self.topology) and getattr(_strategy_class(self.strategy.name, True), "minimax", False)

    @field_serializer(*COMPONENT_KEYS)
    def _nested(self, spec: Spec | None) -> Any:
        return None if spec is None else spec.nested()

    @field_serializer("logger")
    def _nested_list(self, specs: tuple[Spec, ...]) -> list[Any]:
        return [spec.nested() for spec in specs]

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with ``changes`` applied (validated again)."""
        return make_config({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """The nested form (as written to ``config.yaml``), with every option resolved."""
        return self.model_dump(mode="json")


def run_parts(values: Mapping[str, Any]) -> list[str]:
    """What tells runs apart, for folder names and plot titles: the strategy with any non-default regulator,
    aggregator and client filter (``scaffold+ecgr``), the dataset, the model, and a non-default optimizer.
    ``values``: a nested config (``RunConfig.to_dict()`` or a results folder's ``config.yaml``)."""

    def name_of(key: str) -> str | None:
        value = values.get(key)
        value = value.get("name") if isinstance(value, Mapping) else value
        return None if value is None or value == DEFAULTS.get(key) else str(value)

    strategy = "+".join(n for n in map(name_of, ("strategy", "regulator", "aggregator", "client_filter")) if n)
    return [p for p in (strategy, name_of("dataset") or "digits", name_of("model") or "mlp", name_of("optimizer")) if p]


def local_updates(values: Mapping[str, Any]) -> int:
    """Local steps per round (epochs count as many)."""
    if values.get("local_epochs") is not None:
        return 2
    steps = values.get("local_steps")
    return RunConfig.model_fields["local_steps"].default if steps is None else int(steps)


def default_decentralized(values: Mapping[str, Any]) -> str:
    """The default strategy over a topology: adapt-then-combine D-SGD (``dsgd-atc``, the local-update form of
    D-SGD, Koloskova et al. 2020) with several local steps, combine-then-adapt ``dsgd`` with one. With many
    local steps CTA iterates roughly ``x <- (W - I) x + x*``, whose eigenvalues reach below -1 (-4/3 on a
    Metropolis-Hastings ring): every node metric then alternates from round to round."""
    return "dsgd-atc" if local_updates(values) > 1 else "dsgd"


def _strategy_class(name: str, decentralized: bool) -> Any:
    kind = "decentralized" if decentralized else "strategy"
    return components.get(kind, name).obj


def flat_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A nested config (``config.yaml``, :meth:`RunConfig.to_dict`) as dotted keys, every component as
    ``KEY.name`` plus ``KEY.OPTION`` (the shorthand ``strategy: fedavg`` too): ``{"strategy.name": "fedavg",
    "partition.alpha": 0.5, "rounds": 20, ...}``."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if key in COMPONENT_KEYS and isinstance(value, str):
            value = {"name": value}
        if isinstance(value, Mapping):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def _logger_specs(value: Any) -> tuple[Spec, ...]:
    """``logger``: a comma list of names (``tensorboard,mlflow``), or a list of names and mappings, each resolved
    and validated; a logger named twice is refused."""
    if value is None or value == "" or value == "none":
        return ()
    if isinstance(value, Spec):
        value = [value]
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    specs = tuple(components.resolve_spec("logger", item) for item in items)
    names = [s.name for s in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise FedsimError(f"logger {', '.join(map(repr, twice))} is named twice")
    return specs


def _check_mode(name: str, decentralized: bool, names: Callable[[str], list[str]] = components.names) -> None:
    """A federated strategy needs no topology; a decentralized one needs one (clear message either way)."""
    federated, other = set(names("strategy")), set(names("decentralized"))
    if decentralized and name in federated and name not in other:
        raise FedsimError(f"strategy '{name}' is federated; with a topology use one of: {', '.join(sorted(other))}")
    if not decentralized and name in other and name not in federated:
        raise FedsimError(f"strategy '{name}' is decentralized and needs a topology (--topology FILE)")


def nest(values: Mapping[str, Any], *, default_names: bool = True) -> dict[str, Any]:
    """Fold dotted keys into their component: ``{"strategy": "fedadam", "strategy.tau": 0.1}`` ->
    ``{"strategy": {"name": "fedadam", "tau": 0.1}}``. Keys may use ``-`` for ``_``. A component given only
    options gets the default component's name (unless ``default_names`` is False: :func:`merge` keeps the
    base's name then)."""
    out: dict[str, Any] = {}
    dotted: list[tuple[str, str, Any]] = []
    for raw, value in values.items():
        key = str(raw).replace("-", "_")
        head, sep, rest = key.partition(".")
        if sep:
            dotted.append((head, rest, value))
        else:
            out[key] = dict(value) if isinstance(value, Mapping) and key in COMPONENT_KEYS else value
    for head, rest, value in dotted:
        if head == "logger":
            raise FedsimError(
                f"'logger.{rest}': a logger's options go with its name, e.g. --set 'logger=[{{name: mlflow, "
                f"{rest}: {value!r}}}]'"
            )
        if head not in COMPONENT_KEYS:
            raise FedsimError(
                f"unknown component '{head}' in '{head}.{rest}'{did_you_mean(head, COMPONENT_KEYS)}; "
                f"components: {', '.join(COMPONENT_KEYS)}"
            )
        if "." in rest:
            raise FedsimError(f"'{head}.{rest}': options are one level deep ({head}.OPTION)")
        current = out.get(head)
        if isinstance(current, Spec):
            current = current.nested()
        spec = dict(current) if isinstance(current, Mapping) else ({"name": current} if current else {})
        spec[rest] = value
        out[head] = spec
    if default_names:
        for key, value in out.items():
            if key in COMPONENT_KEYS and isinstance(value, Mapping) and "name" not in value:
                out[key] = {"name": _default_name(key, out), **value}
    return out


def _default_name(key: str, values: Mapping[str, Any]) -> str:
    """The component a key names when the config gives only its options."""
    if key == "strategy":
        return default_decentralized(values) if values.get("topology") else "fedavg"
    if key == "problem":
        return "auc"  # the min-max strategies' default problem
    if DEFAULTS[key] is None:
        raise FedsimError(f"{key}: give a name ({key}: {{name: ..., ...}})")
    return DEFAULTS[key]


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "config"
    if first["type"] == "extra_forbidden":
        if loc in RENAMED:
            return (
                f"config key {loc!r} is now {RENAMED[loc]!r} (component options nest per component; "
                f"e.g. --set {RENAMED[loc].split(' ')[0].replace('<option>', 'OPTION')}=VALUE)"
            )
        if loc.lower().replace("-", "_") in ALIASES:
            return f"unknown config key {loc!r} (did you mean {ALIASES[loc.lower().replace('-', '_')]!r}?)"
        return f"unknown config key {loc!r}{did_you_mean(loc, [*RunConfig.model_fields, *RENAMED])}"
    msg = first["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if first["type"] in ("value_error", "assertion_error") and not first["loc"]:
        return msg
    return f"{loc}: {msg} (got {first.get('input')!r})"


def _run_level_model() -> type[BaseModel]:
    """RunConfig's run-level fields alone (components as opaque values): validating them needs no component,
    so no provider module and no torch."""
    fields = {
        name: (Any, None) if name in (*COMPONENT_KEYS, "logger") else (field.annotation, field)
        for name, field in RunConfig.model_fields.items()
    }
    return create_model("RunLevel", __config__=ConfigDict(extra="forbid", allow_inf_nan=False), **fields)


def check_run_level(*layers: Mapping[str, Any]) -> None:
    """Check unknown keys and run-level values of config layers (a file's mapping, flag overrides) before
    anything heavy is imported; components are checked by :func:`make_config`. One-line FedsimError."""
    values: dict[str, Any] = {}
    for layer in layers:
        values.update({k: v for k, v in nest(layer, default_names=False).items() if v is not None})
    try:
        _RUN_LEVEL(**values)
    except ValidationError as err:
        raise FedsimError(_format_validation_error(err)) from None


def precheck_components(values: Mapping[str, Any]) -> None:
    """Check the built-in components a merged config names against the catalog (:mod:`fedsim.core.catalog`)
    before any provider, and so torch, is loaded: an unknown name, an unknown option or a bad value answers at
    once. :func:`make_config` then checks everything again, cross-component rules included."""
    from fedsim.core import catalog

    data = nest(values)
    decentralized = bool(data.get("topology"))
    for key, kind in COMPONENT_KEYS.items():
        spec = data.get(key)
        if spec is None:
            continue
        if key == "strategy":
            _check_mode(components.split_spec(key, spec)[0], decentralized, catalog.names)
            kind = "decentralized" if decentralized else kind
        catalog.precheck(kind, spec)


def make_config(values: Mapping[str, Any]) -> RunConfig:
    """Validate a mapping into a :class:`RunConfig`, raising a one-line FedsimError."""
    try:
        return RunConfig(**nest(values))
    except ValidationError as err:
        raise FedsimError(_format_validation_error(err)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses a key given twice in one mapping (YAML would keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise FedsimError(f"duplicate key {key!r} (lines {seen[key]} and {line})")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (safe loader) or TOML config file into a mapping (keys may use '-' or '_')."""
    path = Path(path)
    if not path.is_file():
        raise FedsimError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as e:
        raise FedsimError(f"cannot read config file {path}: {str(e).splitlines()[0]}") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506
    except FedsimError as e:
        raise FedsimError(f"config file {path}: {e}") from None
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        detail = str(e).replace("\n", " ")
        raise FedsimError(f"cannot parse config file {path}: {detail}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FedsimError(f"config file {path} must hold a mapping of keys to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``overrides`` on top of ``base`` (``None`` values ignored). Options given without a name keep the
    base's component; a component named again keeps the options given for it (they are then validated
    against the new name: nothing is dropped silently)."""
    out = nest(base, default_names=False)
    for key, value in nest({k: v for k, v in overrides.items() if v is not None}, default_names=False).items():
        if key in COMPONENT_KEYS and out.get(key) is not None:
            old = out[key] if isinstance(out[key], Mapping) else {"name": out[key]}
            new = value if isinstance(value, Mapping) else {"name": value}
            out[key] = {**old, **new}
        else:
            out[key] = value
    return out


def parse_pairs(items: list[str] | None, flag: str = "--set") -> dict[str, Any]:
    """``KEY=VALUE`` pairs (``--set``, ``--param``); values parsed as YAML (safe loader: numbers, booleans,
    lists, mappings). A malformed pair or value is a one-line :class:`FedsimError`."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise FedsimError(f"{flag} expects KEY=VALUE, got '{item}'")
        try:
            out[key.strip().replace("-", "_")] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            problem = str(getattr(err, "problem", None) or err).splitlines()[0]
            raise FedsimError(f"{flag} {key.strip()}: cannot read the value {value!r} as YAML ({problem})") from None
    return out


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Defaults, then the config file, then ``overrides`` (``None`` values are ignored)."""
    return make_config(merge(config_file_values(path), overrides or {}))


def config_file_values(path: str | Path | None) -> dict[str, Any]:
    """A config file's mapping ({} without a file), with a relative topology path resolved beside the file
    when it exists there (a results folder's copy, or a path relative to the file)."""
    values = read_config_file(path) if path else {}
    topology = values.get("topology")
    if path and isinstance(topology, str) and not Path(topology).is_absolute():
        beside = Path(path).parent / topology
        if beside.exists():
            values["topology"] = str(beside)
    return values


def dump_config(config: RunConfig) -> str:
    """The fully resolved config as nested YAML (readable back with :func:`load_config`)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


_RUN_LEVEL = _run_level_model()
