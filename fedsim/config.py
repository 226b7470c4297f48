"""The validated run configuration: defaults < config file (YAML/TOML) < command-line flags.

Every field is checked by pydantic; an unknown key or a bad value becomes a one-line :class:`FedsimError`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedsim.core.errors import FedsimError, did_you_mean

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class RunConfig(BaseModel):
    """Everything that determines a run. Same config and seed give the same metrics."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # data
    dataset: str = "digits"
    data_path: str | None = None
    synthetic_alpha: float = Field(1.0, ge=0)
    synthetic_beta: float = Field(1.0, ge=0)
    shakespeare_min_samples: int = Field(1, ge=1)  # a speaker needs this many training windows (and a test one)
    shakespeare_max_samples: int | None = Field(None, ge=2)  # cap on each speaker's windows (train + test)
    train_samples: int | None = Field(None, ge=1)  # a seeded random subset of the training set
    clients: int = Field(20, ge=1)
    partition: str = "dirichlet"
    alpha: float = Field(0.5, gt=0)
    min_client_size: int = Field(2, ge=1)
    classes_per_client: int = Field(2, ge=1)
    client_test_fraction: float = Field(0.2, ge=0, lt=1)
    # model
    model: str = "mlp"
    model_args: dict[str, Any] = Field(default_factory=dict)
    # decentralized mode (a topology file turns it on)
    topology: str | None = None
    mixing: str = "metropolis_hastings"
    schedule: Literal["static", "one_peer_exponential", "random_matchings"] = "static"
    # decentralized min-max problems (strategy dsgda)
    problem: Literal["auc", "dro"] | None = None
    dual_lr: float | None = Field(None, gt=0)
    positive_classes: list[int] | None = None
    dro_lambda: float = Field(1.0, gt=0)
    # strategy
    strategy: str = "fedavg"
    fraction: float = Field(1.0, gt=0, le=1)
    min_clients: int = Field(1, ge=1)
    mu: float = Field(0.01, ge=0)
    server_lr: float | None = Field(None, gt=0)
    server_momentum: float = Field(0.9, ge=0, lt=1)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float | None = Field(None, gt=0)
    fedcm_beta: float = Field(0.1, gt=0, le=1)  # fedcm, scaffold-m: weight of the fresh gradient
    feddyn_alpha: float = Field(0.01, gt=0)
    fednova_form: Literal["simplified", "general"] = "simplified"
    scaffold_control: Literal["model_difference", "gradient_mean"] | None = None  # None: the strategy's default
    scaffold_correction: Literal["after_step", "gradient"] = "after_step"
    scaffold_weighting: Literal["samples", "uniform"] = "samples"
    # robust aggregation (any federated strategy)
    aggregator: Literal["mean", "median", "trimmed_mean", "krum", "gaf"] = "mean"
    trim_fraction: float = Field(0.1, ge=0, lt=0.5)
    krum_byzantine: int = Field(0, ge=0)
    krum_select: int = Field(1, ge=1)
    gaf_tau: float = Field(0.97, ge=0, le=2)
    # client-side regulators and filters (any federated strategy)
    regulator: Literal["none", "ecgr", "bherd"] = "none"
    ecgr_rho: float = Field(0.5, gt=0, le=1)
    ecgr_beta: float = Field(0.2, ge=0, le=1)
    ecgr_center: Literal["zero", "local_mean"] = "zero"
    bherd_unit: Literal["step", "microbatch", "sample"] = "step"
    bherd_ratio: float = Field(0.5, gt=0, le=1)
    bherd_scale: Literal["sum", "rescale"] = "sum"
    bherd_microbatches: int = Field(4, ge=2)
    trajectory_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    trajectory_device: Literal["same", "cpu"] = "same"
    client_filter: Literal["none", "gaf"] = "none"
    gaf_microbatches: int = Field(4, ge=2)
    # client availability (federated mode): "markov" turns each client on/off by a two-state chain
    availability: Literal["always", "markov"] = "always"
    availability_p_on: float = Field(0.5, gt=0, le=1)
    availability_p_off: float = Field(0.5, gt=0, le=1)
    # local training
    rounds: int = Field(20, ge=1)
    local_steps: int = Field(10, ge=1)
    local_epochs: int | None = Field(None, ge=1)
    batch_size: int = Field(32, ge=1)
    sampler: str = "shuffle"
    laziness: float | None = Field(None, ge=0, lt=1)  # markov samplers: probability the chain stays put
    markov_degree: int = Field(4, ge=2)  # markov-regular: degree of the random regular graph (even)
    optimizer: str = "sgd"
    lr: float = Field(0.05, gt=0)
    lr_schedule: Literal["constant", "step", "cosine"] = "constant"
    lr_decay: float = Field(0.5, gt=0, le=1)
    lr_step: int = Field(10, ge=1)
    min_lr: float = Field(0.0, ge=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float | None = Field(None, gt=0)  # None: the optimizer's default (1e-6 for gwt, else 1e-8)
    # memory-efficient local optimizers (fedsim.optim): options apply to the named optimizer only
    compress_params: Literal["body", "all"] = "body"  # foam/gwt: body = matrices minus embeddings and head
    eps_mode: Literal["torch", "authors"] = "torch"  # foam/gwt: where eps enters (see fedsim.optim.compressed)
    foam_level: int = Field(2, ge=0, le=16)
    foam_scale: float = Field(0.25, gt=0)
    foam_res_scale: float = Field(1.0, ge=0)
    gwt_level: int = Field(2, ge=0, le=16)
    gwt_scale: float = Field(0.25, gt=0)
    gwt_limiter: float = Field(1.01, gt=0)
    gwt_wavelet: Literal["haar"] = "haar"
    mols_estimator: Literal["sai", "ema"] = "sai"
    mols_refresh: int = Field(0, ge=0)
    sai_momentum: float = Field(0.9, ge=0, lt=1)
    # engine
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    chunk_size: int | None = Field(None, ge=1)
    grad_mode: Literal["sum", "vmap"] = "sum"
    sequential: bool = False
    executor: Literal["local", "ray"] = "local"
    num_actors: int | None = Field(None, ge=1)  # ray: default as many as the cluster's CPUs (GPUs) allow
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    ray_address: str | None = None  # ray: None starts Ray here; "auto" or an address joins a cluster
    backend: Literal["fedsim", "flower"] = "fedsim"  # flower: clients run as Flower ClientApps (simulation engine)
    flower_cpus_per_client: float = Field(1.0, gt=0)  # backend flower: CPUs per Flower client
    flwr_options: dict[str, Any] = Field(default_factory=dict)  # strategy flwr:NAME: its constructor keywords
    # evaluation and results
    eval_every: int = Field(1, ge=1)
    checkpoint_every: int = Field(10, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _default_strategy(cls, data: Any) -> Any:
        """Without an explicit strategy: ``dsgd`` over a topology, else ``fedavg``."""
        if isinstance(data, dict) and data.get("strategy") is None:
            data = {**data, "strategy": "dsgd" if data.get("topology") else "fedavg"}
        return data

    @model_validator(mode="after")
    def _check_names(self) -> RunConfig:
        from fedsim.core.errors import unknown
        from fedsim.data import DATASETS, PARTITIONERS
        from fedsim.data.samplers import SAMPLERS
        from fedsim.models import MODELS
        from fedsim.optim import OPTIMIZERS
        from strategies import DECENTRALIZED, STRATEGIES
        from topologies import MIXING_METHODS

        if self.topology and self.strategy in STRATEGIES:
            raise FedsimError(
                f"strategy '{self.strategy}' is federated; with a topology use one of: {', '.join(DECENTRALIZED)}"
            )
        if not self.topology and self.strategy in DECENTRALIZED:
            raise FedsimError(f"strategy '{self.strategy}' is decentralized and needs a topology (--topology FILE)")
        strategies = {**STRATEGIES, **DECENTRALIZED, **({self.strategy: None} if self.flower_hosted else {})}
        for kind, value, choices in (
            ("dataset", self.dataset, DATASETS),
            ("partition", self.partition, PARTITIONERS),
            ("sampler", self.sampler, SAMPLERS),
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("strategy", self.strategy, strategies),
            ("mixing method", self.mixing, MIXING_METHODS),
        ):
            if value not in choices:
                raise unknown(kind, value, choices)
        if ":" not in self.model and self.model not in MODELS:
            raise unknown("model", self.model, MODELS)
        if self.nesterov and self.momentum == 0:
            raise FedsimError("nesterov needs momentum > 0")
        if self.optimizer != "sgd" and (self.momentum or self.nesterov):
            raise FedsimError(
                f"momentum/nesterov apply to the sgd optimizer, not '{self.optimizer}' (adam-like optimizers use "
                "adam_betas, sgd-sai uses sai_momentum)"
            )
        if self.optimizer in ("sgd", "sgd-sai") and (self.adam_betas != (0.9, 0.999) or self.adam_eps is not None):
            raise FedsimError(
                f"adam_betas/adam_eps apply to the adam, adamw, foam, gwt and mols optimizers, not '{self.optimizer}'"
            )
        if not all(0 <= b < 1 for b in self.adam_betas):
            raise FedsimError(f"adam_betas must each be in [0, 1), got {list(self.adam_betas)}")
        self._check_optimizer_options()
        self._check_strategy_options()
        self._check_client_side_options()
        self._check_sampler_options()
        self._check_minimax_options()
        self._check_availability()
        self._check_dataset_options()
        self._check_executor_options()
        if self.dataset == "npz" and not self.data_path:
            raise FedsimError("dataset 'npz' needs data_path (--data-path FILE.npz)")
        return self

    def _changed(self, name: str) -> bool:
        """True when option ``name`` differs from its default (the user set it)."""
        return getattr(self, name) != type(self).model_fields[name].default

    def _check_dataset_options(self) -> None:
        """Shakespeare options need ``dataset: shakespeare``; a built-in sequence model needs token data."""
        from fedsim.data.datasets import TOKEN_DATASETS
        from fedsim.models import SEQUENCE_MODELS

        if self.dataset != "shakespeare":
            for name in SHAKESPEARE_FIELDS:
                if self._changed(name):
                    raise FedsimError(f"option '{name}' applies to dataset 'shakespeare' (--dataset shakespeare)")
        if self.model in SEQUENCE_MODELS and self.dataset not in (*TOKEN_DATASETS, "npz"):
            raise FedsimError(
                f"model '{self.model}' reads windows of character indices; use it with --dataset "
                f"{' or '.join(TOKEN_DATASETS)} (or an npz of token indices), not '{self.dataset}'"
            )

    def _check_executor_options(self) -> None:
        """Ray options need ``executor: ray``."""
        if self.executor != "ray":
            for name in RAY_FIELDS:
                if self._changed(name):
                    raise FedsimError(f"option '{name}' applies with --executor ray")

    def ray_options(self):
        """The :class:`~fedsim.engine.ray_executor.RayOptions` of this run."""
        from fedsim.engine.ray_executor import RayOptions

        return RayOptions(self.num_actors, self.cpus_per_actor, self.gpus_per_actor, self.ray_address)

    def _check_availability(self) -> None:
        """p_on/p_off only with ``availability: markov``; Markov availability only in federated mode."""
        if self.availability == "always":
            for name in ("availability_p_on", "availability_p_off"):
                if self._changed(name):
                    raise FedsimError(f"option '{name}' applies to availability 'markov' (--availability markov)")
        elif self.topology:
            raise FedsimError(
                "Markov availability is a federated participation model; drop --availability with a topology"
            )

    def _check_sampler_options(self) -> None:
        """A sampler option changed from its default must be one the chosen sampler uses."""
        from fedsim.data.samplers import SAMPLERS, sampler_options

        accepted = sampler_options(self.sampler)
        for name in SAMPLER_FIELDS:
            if name not in accepted and self._changed(name):
                users = sorted(s for s in SAMPLERS if name in sampler_options(s))
                raise FedsimError(
                    f"option '{name}' is not used by sampler '{self.sampler}' (it applies to: {', '.join(users)})"
                )
        if self.markov_degree % 2:
            raise FedsimError(f"markov_degree must be even (d/2 permutations), got {self.markov_degree}")

    def sampler_options(self) -> dict[str, Any]:
        """Options passed to the sampler constructor (an unset laziness keeps each sampler's default)."""
        from fedsim.data.samplers import sampler_options

        fields = sampler_options(self.sampler)
        return {arg: getattr(self, name) for name, arg in fields.items() if getattr(self, name) is not None}

    @property
    def flower_hosted(self) -> bool:
        """True for ``strategy: flwr:NAME`` (one of Flower's strategies inside our engine)."""
        return self.strategy.startswith("flwr:") and not self.topology

    def _check_flower_options(self) -> None:
        """``flwr:`` strategies aggregate themselves (no fedsim aggregator, regulator or filter); the Flower
        backend runs federated fedsim strategies with the local executor."""
        if self.flwr_options and not self.flower_hosted:
            raise FedsimError("option 'flwr_options' applies to Flower strategies (--strategy flwr:NAME)")
        if self.flower_hosted:
            for name, default in (("aggregator", "mean"), ("regulator", "none"), ("client_filter", "none")):
                if getattr(self, name) != default:
                    raise FedsimError(f"option '{name}' applies to fedsim strategies, not '{self.strategy}'")
        if self.backend == "flower":
            for bad, why in ((self.executor != "local", "--executor ray"), (bool(self.topology), "--topology"),
                             (self.flower_hosted, f"strategy '{self.strategy}'")):  # fmt: skip
                if bad:
                    raise FedsimError(f"--backend flower runs federated fedsim strategies; drop {why}")
        elif self._changed("flower_cpus_per_client"):
            raise FedsimError("option 'flower_cpus_per_client' applies with --backend flower")

    def _check_strategy_options(self) -> None:
        """A strategy option changed from its default must be one the chosen strategy uses."""
        from strategies import strategy_options

        self._check_flower_options()
        accepted = set() if self.flower_hosted else strategy_options(self.strategy)
        for name in STRATEGY_FIELDS:
            if name not in accepted and self._changed(name):
                users = sorted(s for s in _strategies_accepting(name))
                raise FedsimError(
                    f"option '{name}' is not used by strategy '{self.strategy}' (it applies to: {', '.join(users)})"
                )

    def _check_minimax_options(self) -> None:
        """Min-max options need ``strategy: dsgda`` and a problem that uses them."""
        given = [n for n in MINIMAX_FIELDS if self._changed(n)]
        if not self.strategy.startswith("dsgda"):
            if given:
                raise FedsimError(
                    f"option '{given[0]}' applies to the min-max strategies dsgda and dsgda-atc, not '{self.strategy}'"
                )
            return
        problem = self.problem or "auc"
        for name, users in (("positive_classes", "auc"), ("dro_lambda", "dro")):
            if name in given and problem != users:
                raise FedsimError(f"option '{name}' applies to problem '{users}', not '{problem}'")
        if self.weight_decay:
            raise FedsimError("weight_decay is not supported with dsgda: it would also shrink the dual variables")
        if self.dual_lr is not None and self.optimizer != "sgd":
            raise FedsimError(
                f"dual_lr needs the sgd optimizer: '{self.optimizer}' normalizes the gradient scale, cancelling the "
                "ratio dual_lr / lr"
            )

    def _check_optimizer_options(self) -> None:
        """Options of the memory-efficient optimizers apply to their optimizer only; the ema estimator of
        mols needs mols_refresh > 0."""
        for name, optimizers in OPTIMIZER_FIELDS.items():
            if self.optimizer not in optimizers and self._changed(name):
                raise FedsimError(f"option '{name}' applies with --optimizer {' or '.join(optimizers)}")
        if self.optimizer == "mols" and self.mols_estimator == "ema" and self.mols_refresh == 0:
            raise FedsimError("mols_estimator: ema needs mols_refresh > 0 (steps between SNR estimates)")

    def optimizer_options(self) -> dict[str, Any]:
        """Keyword options of :func:`fedsim.optim.make_optimizer` for this run's optimizer: its config keys
        without the optimizer's prefix (``foam_level`` -> ``level``; ``compress_params`` is resolved against the
        model by the simulation)."""
        return {
            name.removeprefix(f"{self.optimizer}_"): getattr(self, name)
            for name, users in OPTIMIZER_FIELDS.items()
            if self.optimizer in users and name != "compress_params"
        }

    def _check_client_side_options(self) -> None:
        """Regulator, aggregator and client-filter options need the component that uses them; all of them
        are federated; FedNova's general form needs plain or momentum SGD."""
        groups = (
            (REGULATOR_FIELDS["ecgr"], self.regulator == "ecgr", "--regulator ecgr"),
            (REGULATOR_FIELDS["bherd"], self.regulator == "bherd", "--regulator bherd"),
            (("trajectory_dtype", "trajectory_device"), self.regulator != "none", "a --regulator"),
            (("trim_fraction",), self.aggregator == "trimmed_mean", "--aggregator trimmed_mean"),
            (("krum_byzantine", "krum_select"), self.aggregator == "krum", "--aggregator krum"),
            (("gaf_tau",), "gaf" in (self.aggregator, self.client_filter), "--aggregator gaf or client_filter: gaf"),
            (("gaf_microbatches",), self.client_filter == "gaf", "client_filter: gaf"),
        )
        for names, used, needs in groups:
            for name in names:
                if not used and self._changed(name):
                    raise FedsimError(f"option '{name}' applies with {needs}")
        if self.bherd_unit != "microbatch" and self._changed("bherd_microbatches"):
            raise FedsimError("option 'bherd_microbatches' applies with bherd_unit: microbatch")
        for name, used in (
            ("gaf_microbatches", self.client_filter == "gaf"),
            ("bherd_microbatches", self.regulator == "bherd" and self.bherd_unit == "microbatch"),
        ):
            if used and self.batch_size % getattr(self, name):
                count = getattr(self, name)
                raise FedsimError(f"batch size {self.batch_size} does not split into {name} = {count} microbatches")
        if (
            self.client_filter == "gaf" and self.regulator == "bherd" and self.bherd_unit == "microbatch"
            and self.gaf_microbatches != self.bherd_microbatches
        ):  # fmt: skip
            raise FedsimError(
                f"gaf_microbatches ({self.gaf_microbatches}) and bherd_microbatches ({self.bherd_microbatches}) "
                "must agree: both split the same minibatch"
            )
        added = [n for n in ("regulator", "aggregator", "client_filter") if self._changed(n)]
        if self.topology and added:
            raise FedsimError(f"option '{added[0]}' applies to federated strategies, not to decentralized training")
        if self.fednova_form == "general" and (self.optimizer != "sgd" or self.nesterov or self.weight_decay):
            raise FedsimError(
                "fednova_form 'general' models local SGD with (heavy-ball) momentum and a proximal term; "
                f"use --optimizer sgd without nesterov/weight_decay (got '{self.optimizer}')"
            )

    def client_side(self) -> dict[str, Any]:
        """The aggregator, regulator and client filter objects of :func:`strategies.build_strategy`."""
        from strategies import make_aggregator, make_client_filter, make_regulator

        fields = {n: getattr(self, n) for n in CLIENT_SIDE_FIELDS}
        return {
            "aggregator": make_aggregator(self.aggregator, **fields),
            "regulator": make_regulator(self.regulator, **fields),
            "client_filter": make_client_filter(self.client_filter, **fields),
        }

    def strategy_options(self) -> dict[str, Any]:
        """Options passed to the strategy constructor (unset server_lr/tau/scaffold_control keep each
        strategy's default; FedNova gets ``mu`` only when set, and the local SGD momentum)."""
        opts: dict[str, Any] = {
            "fraction": self.fraction, "min_clients": self.min_clients,
            "server_momentum": self.server_momentum, "beta1": self.beta1, "beta2": self.beta2,
            "fedcm_beta": self.fedcm_beta, "feddyn_alpha": self.feddyn_alpha, "fednova_form": self.fednova_form,
            "local_momentum": self.momentum, "scaffold_correction": self.scaffold_correction,
            "scaffold_weighting": self.scaffold_weighting,
        }  # fmt: skip
        if self.strategy == "fedprox" or self._changed("mu"):
            opts["mu"] = self.mu
        for name in ("server_lr", "tau", "scaffold_control"):
            if getattr(self, name) is not None:
                opts[name] = getattr(self, name)
        return opts


OPTIMIZER_FIELDS: dict[str, tuple[str, ...]] = {
    "compress_params": ("foam", "gwt"), "eps_mode": ("foam", "gwt"),
    "foam_level": ("foam",), "foam_scale": ("foam",), "foam_res_scale": ("foam",),
    "gwt_level": ("gwt",), "gwt_scale": ("gwt",), "gwt_limiter": ("gwt",), "gwt_wavelet": ("gwt",),
    "mols_estimator": ("mols",), "mols_refresh": ("mols",), "sai_momentum": ("sgd-sai",),
}  # fmt: skip
MINIMAX_FIELDS = ("problem", "dual_lr", "positive_classes", "dro_lambda")
RAY_FIELDS = ("num_actors", "cpus_per_actor", "gpus_per_actor", "ray_address")
SHAKESPEARE_FIELDS = ("shakespeare_min_samples", "shakespeare_max_samples")
SAMPLER_FIELDS = ("laziness", "markov_degree")
STRATEGY_FIELDS = (
    "mu", "server_lr", "server_momentum", "beta1", "beta2", "tau",
    "fedcm_beta", "feddyn_alpha", "fednova_form", "scaffold_control", "scaffold_correction", "scaffold_weighting",
)  # fmt: skip
REGULATOR_FIELDS = {
    "ecgr": ("ecgr_rho", "ecgr_beta", "ecgr_center"),
    "bherd": ("bherd_unit", "bherd_ratio", "bherd_scale"),
}
CLIENT_SIDE_FIELDS = (
    *REGULATOR_FIELDS["ecgr"], *REGULATOR_FIELDS["bherd"], "bherd_microbatches", "trajectory_dtype",
    "trajectory_device", "trim_fraction", "krum_byzantine", "krum_select", "gaf_tau", "gaf_microbatches",
)  # fmt: skip


def _strategies_accepting(option: str) -> list[str]:
    from strategies import STRATEGIES, strategy_options

    return [name for name in STRATEGIES if option in strategy_options(name)]


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "config"
    if first["type"] == "extra_forbidden":
        return f"unknown config key {loc!r}{did_you_mean(loc, RunConfig.model_fields)}"
    msg = first["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if first["type"] in ("value_error", "assertion_error") and not first["loc"]:
        return msg
    return f"{loc}: {msg} (got {first.get('input')!r})"


def make_config(values: dict[str, Any]) -> RunConfig:
    """Validate a mapping into a :class:`RunConfig`, raising a one-line FedsimError."""
    try:
        return RunConfig(**values)
    except ValidationError as err:
        raise FedsimError(_format_validation_error(err)) from None


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
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        detail = str(e).replace("\n", " ")
        raise FedsimError(f"cannot parse config file {path}: {detail}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FedsimError(f"config file {path} must hold a mapping of keys to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Defaults, then the config file, then ``overrides`` (``None`` values are ignored)."""
    values = read_config_file(path) if path else {}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return make_config(values)


def dump_config(config: RunConfig) -> str:
    """The fully resolved config as YAML (readable back with :func:`load_config`)."""
    data = config.model_dump(mode="json")
    return yaml.safe_dump(data, sort_keys=False)
