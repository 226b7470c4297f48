"""Components: every pluggable thing in fedsim, its kind, its name and its options, in one mechanism.

A *component* is a class or factory function registered under a *kind* (``strategy``, ``optimizer``,
``dataset``, ...). Its options are its keyword parameters, declared once in its typed signature; the bounds and
help text of an option ride on the annotation::

    class FedProx(FedAvg):
        def __init__(self, mu: Annotated[float, option("proximal coefficient", ge=0)] = 0.01, **kwargs): ...

A rule across a component's own options (SGD's ``nesterov`` needs ``momentum``) is its optional
``check_options(options)``, called with the validated options; it raises :class:`FedsimError`.

From that one declaration :func:`option_schema` derives a pydantic model (name, type, default, bounds, help)
that validates config values, feeds ``fedsim list KIND NAME`` and the README tables. Parameters the engine
supplies (a kind's ``context``: the model's input shape, the run seed, the robust aggregator, ...) are not
options.

A component is named in three ways, wherever a name is accepted:

- a built-in or registered name (``register(kind, name, obj)``, the Python form of a plugin);
- ``package.module:Name`` (an importable class or factory);
- an installed plugin's entry point in the group ``fedsim.<kind>`` (e.g. ``fedsim.strategy``).

Why pydantic: it is already how the run config is validated; it reads typed signatures with ``Annotated``
bounds directly, reports every error with its location, and needs no second declaration. (jsonargparse would
also derive a CLI from signatures, but it would replace the typer CLI and its ``class_path``/``init_args``
nesting is heavier than the flat ``{name: ..., option: ...}`` form the issue asks for.)
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from importlib import metadata
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic.fields import FieldInfo

from .errors import FedsimError, did_you_mean

ENTRY_POINT_GROUP = "fedsim.{kind}"


def option(help: str, **constraints: Any) -> FieldInfo:
    """Metadata of one option for ``Annotated[type, option(help, ge=0, ...)]``: help text and bounds
    (pydantic's ``ge``, ``gt``, ``le``, ``lt``, ``min_length``, ...)."""
    return Field(description=help, **constraints)


@dataclass(frozen=True)
class Kind:
    """A kind of component.

    ``key``: the config key that names it (``strategy: fedadam``); ``provider``: the module(s) whose import
    registers the built-ins; ``context``: parameter names the engine supplies when it builds one (never
    options); ``required``: attributes a component of this kind must have (checked on the class or, for a
    factory, on what it returns); ``none``: the name meaning "no component" (``regulator: none``).
    """

    name: str
    key: str
    help: str
    provider: str | tuple[str, ...]
    context: frozenset[str] = frozenset()
    required: tuple[str, ...] = ()
    none: str | None = None
    positional: int = 0
    """Leading positional parameters the engine passes (a model factory's ``input_shape, num_classes``)."""


@dataclass
class Component:
    """A registered (or referenced) component: its kind, name, the object to call and a one-line summary."""

    kind: Kind
    name: str
    obj: Callable[..., Any]
    summary: str = ""
    origin: str = "built-in"
    declared: Callable[..., Any] | None = None
    """Where the options are declared when it is not ``obj`` itself (an adapter around a foreign class)."""

    @cached_property
    def parameters(self) -> list[inspect.Parameter]:
        """The keyword parameters of the declaring signature (through ``**kwargs`` to base classes)."""
        return _keyword_parameters(self.declared or self.obj, self.kind.positional)

    @property
    def open(self) -> bool:
        """True when the signature ends in a ``**kwargs`` that no base class closes: any option is passed."""
        return _accepts_any(self.declared or self.obj)

    @cached_property
    def schema(self) -> type[BaseModel]:
        return option_schema(self)

    def options(self) -> dict[str, FieldInfo]:
        """The user options: name -> pydantic field (annotation, default, bounds, description)."""
        return dict(self.schema.model_fields)

    def validate(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Validated options with defaults filled in; a one-line :class:`FedsimError` on an unknown option,
        a context parameter, a bad type or an out-of-bounds value."""
        values = dict(values)
        known = set(self.schema.model_fields)
        for key in values:
            if key in self.kind.context and key not in known:
                raise FedsimError(
                    f"{self.kind.name} '{self.name}': '{key}' is set by fedsim, not an option; {self._accepted()}"
                )
            if key not in known and not self.open:
                raise FedsimError(
                    f"{self.kind.name} '{self.name}' has no option '{key}'{did_you_mean(key, known)}"
                    f"{self._owners_hint(key)}; {self._accepted()}"
                )
        try:
            model = self.schema(**values)
        except ValidationError as err:
            raise FedsimError(self._format(err)) from None
        validated = {**model.model_dump(), **(model.model_extra or {})}
        check = getattr(self.declared or self.obj, "check_options", None)
        if check is not None:  # the component's rule across its own options
            try:
                check(validated)
            except ValueError as err:  # FedsimError is one
                raise FedsimError(f"{self.kind.name} '{self.name}': {err}") from None
        return validated

    def build(self, options: Mapping[str, Any] | None = None, **context: Any) -> Any:
        """Call the component with validated ``options`` and the context values its signature accepts."""
        values = self.validate(options or {})
        names = {p.name for p in _keyword_parameters(self.obj, self.kind.positional)}
        wanted = {k: v for k, v in context.items() if k in names}  # a component takes the context it names
        try:
            built = self.obj(**values, **wanted)
        except ValueError as err:  # FedsimError, or a constructor's own check of its arguments
            if f"'{self.name}'" in str(err) and isinstance(err, FedsimError):
                raise  # it names the component already (a missing data source says what to install)
            kind = type(err) if isinstance(err, FedsimError) else FedsimError
            raise kind(f"{self.kind.name} '{self.name}': {err}") from None
        if not inspect.isclass(self.obj):
            check_kind(self.kind, self.name, built)
        return built

    def _owners_hint(self, option_name: str) -> str:
        return owners_hint(option_name, self, _REGISTRY)

    def _accepted(self) -> str:
        names = sorted(self.schema.model_fields)
        return f"accepted options: {', '.join(names)}" if names else "it takes no options"

    def _format(self, err: ValidationError) -> str:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        return f"{self.kind.name} '{self.name}', option '{loc}': {msg} (got {first.get('input')!r})"


# --------------------------------------------------------------------------------------------------------
# Kinds and the registry
# --------------------------------------------------------------------------------------------------------

KINDS: dict[str, Kind] = {}
_REGISTRY: dict[str, dict[str, Component]] = {}
_NAMESPACES: dict[tuple[str, str], Callable[[str], Component]] = {}
_LOADED: set[str] = set()


def define_kind(kind: Kind) -> Kind:
    """Add a kind (later work adds kinds this way)."""
    KINDS[kind.name] = kind
    _REGISTRY.setdefault(kind.name, {})
    return kind


def kind_of(name: str) -> Kind:
    if name not in KINDS:
        raise FedsimError(f"unknown component kind {name!r}{did_you_mean(name, KINDS)}; kinds: {', '.join(KINDS)}")
    return KINDS[name]


def register(kind: str, name: str, obj: Callable[..., Any], *, summary: str | None = None) -> Component:
    """Register ``obj`` (a class or factory) as component ``name`` of ``kind``. Replacing a name is allowed
    (a later registration wins), so a user can shadow a built-in on purpose."""
    k = kind_of(kind)
    if not callable(obj):
        raise FedsimError(f"cannot register {name!r} as a {kind}: {obj!r} is not a class or function")
    if inspect.isclass(obj):
        check_kind(k, name, obj)
    component = Component(k, name, obj, summary if summary is not None else _summary(obj), _origin(obj))
    _REGISTRY[kind][name] = component
    return component


def register_namespace(kind: str, prefix: str, resolver: Callable[[str], Component]) -> None:
    """Names ``PREFIX:REST`` of ``kind`` are resolved by ``resolver(REST)`` (e.g. ``flwr:FedAdam``)."""
    _NAMESPACES[(kind, prefix)] = resolver


def _load(kind: Kind) -> None:
    if kind.name not in _LOADED:
        _LOADED.add(kind.name)
        for module in (kind.provider,) if isinstance(kind.provider, str) else kind.provider:
            importlib.import_module(module)


def names(kind: str) -> list[str]:
    """Built-in and registered names, then installed plugins' entry-point names, of ``kind``."""
    k = kind_of(kind)
    _load(k)
    found = list(_REGISTRY[kind])
    found += [ep.name for ep in _entry_points(kind) if ep.name not in _REGISTRY[kind]]
    return found


def components(kind: str) -> list[Component]:
    """Every component of ``kind`` (entry points loaded)."""
    return [get(kind, n) for n in names(kind)]


def get(kind: str, name: str) -> Component:
    """The component ``name`` of ``kind``: registered, an entry point, ``namespace:NAME`` or
    ``package.module:Name``; a one-line :class:`FedsimError` otherwise."""
    k = kind_of(kind)
    if not isinstance(name, str) or not name:
        raise FedsimError(f"{kind}: expected a name, got {name!r}")
    _load(k)
    if name in _REGISTRY[kind]:
        return _REGISTRY[kind][name]
    for ep in _entry_points(kind):
        if ep.name == name:
            return _from_entry_point(k, ep)
    prefix, sep, rest = name.partition(":")
    if sep and (kind, prefix) in _NAMESPACES:
        return _NAMESPACES[(kind, prefix)](rest)
    if sep:
        return _from_reference(k, name)
    raise unknown_component(k, name, names(kind))


def unknown_component(kind: Kind, name: str, known: Iterable[str]) -> FedsimError:
    """The one-line error for a name of ``kind`` that is none of ``known`` (nor its ``none`` name)."""
    choices = [*known, *([kind.none] if kind.none else [])]
    return FedsimError(
        f"unknown {kind.name} {name!r}{did_you_mean(name, choices)}; choose from: {', '.join(sorted(choices))} "
        "(or package.module:Name)"
    )


def build(kind: str, spec: Any, **context: Any) -> Any:
    """Build a component from a spec (a name, or a mapping ``{name: ..., option: value, ...}``); the kind's
    ``none`` name builds None."""
    name, options = split_spec(kind, spec)
    if name == kind_of(kind).none:
        if options:
            raise FedsimError(f"{kind} '{name}' takes no options; got {', '.join(options)}")
        return None
    return get(kind, name).build(options, **context)


def make(kind: str, spec: Any = None, **options: Any) -> Any:
    """Build ``spec`` (a name or mapping) of ``kind`` with extra ``options``; None gives None and an object
    that is already built is returned as it is (options with it are refused)."""
    if spec is None or (not isinstance(spec, str | Mapping | Spec)):
        if options:
            what = "without a" if spec is None else "with an already built"
            raise FedsimError(f"{kind} options {', '.join(sorted(options))} given {what} {kind}")
        return spec
    name, given = split_spec(kind, spec)
    return build(kind, {"name": name, **given, **options})


def split_spec(kind: str, spec: Any) -> tuple[str, dict[str, Any]]:
    """``"name"`` or ``{"name": ..., **options}`` (or a :class:`Spec`) -> (name, options)."""
    if isinstance(spec, Spec):
        return spec.name, dict(spec.options)
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, Mapping):
        options = {str(k).replace("-", "_"): v for k, v in spec.items()}
        if "name" not in options:
            raise FedsimError(f"{kind}: a mapping needs 'name' (e.g. {kind}: {{name: ..., option: value}})")
        return str(options.pop("name")), options
    raise FedsimError(f"{kind}: expected a name or a mapping with 'name', got {spec!r}")


class Spec(BaseModel):
    """A component as the config names it: ``name`` plus its validated ``options`` (defaults filled in).
    Written to YAML as ``{name: ..., option: value, ...}``."""

    model_config = ConfigDict(frozen=True)

    name: str
    options: dict[str, Any] = Field(default_factory=dict)

    def __str__(self) -> str:
        return self.name

    def get(self, option: str, default: Any = None) -> Any:
        return self.options.get(option, default)

    def nested(self) -> str | dict[str, Any]:
        """``{name: ..., option: value, ...}``, or just the name for a component without options."""
        return {"name": self.name, **self.options} if self.options else self.name


def resolve_spec(kind: str, spec: Any) -> Spec:
    """Validate a config spec of ``kind`` into a :class:`Spec` (component found, options validated)."""
    name, options = split_spec(kind, spec)
    if name == kind_of(kind).none:
        if options:
            raise FedsimError(f"{kind} '{name}' takes no options; got {', '.join(options)}")
        return Spec(name=name)
    return Spec(name=name, options=get(kind, name).validate(options))


# --------------------------------------------------------------------------------------------------------
# Signatures -> option schemas
# --------------------------------------------------------------------------------------------------------


def _signature_owners(obj: Callable[..., Any]) -> list[Callable[..., Any]]:
    """The functions whose keyword parameters are options: a function itself; for a class its ``__init__``
    and, while one ends in ``**kwargs``, the base classes' ``__init__`` it forwards to."""
    if not inspect.isclass(obj):
        return [obj]
    owners = []
    for klass in obj.__mro__:
        init = vars(klass).get("__init__")
        if init is None or klass is object:
            continue
        owners.append(init)
        params = inspect.signature(init).parameters.values()
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return owners


def _accepts_any(obj: Callable[..., Any]) -> bool:
    owners = _signature_owners(obj)
    return bool(owners) and any(p.kind is p.VAR_KEYWORD for p in inspect.signature(owners[-1]).parameters.values())


def _keyword_parameters(obj: Callable[..., Any], skip: int = 0) -> list[inspect.Parameter]:
    """Keyword parameters of ``obj``'s signature owners, without ``self`` and the first ``skip``."""
    seen: dict[str, inspect.Parameter] = {}
    for owner in _signature_owners(obj):
        try:
            hints = typing.get_type_hints(owner, include_extras=True)
        except Exception:  # unresolvable annotations in a user's code: fall back to untyped
            hints = {}
        first = (1 if inspect.isclass(obj) else 0) + (skip if owner is _signature_owners(obj)[0] else 0)
        for i, p in enumerate(inspect.signature(owner).parameters.values()):
            if i < first or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
                continue
            if p.name not in seen:
                seen[p.name] = p.replace(annotation=hints.get(p.name, p.annotation))
    return list(seen.values())


def option_schema(component: Component) -> type[BaseModel]:
    """A pydantic model of the component's options: every keyword parameter with a default that is not a
    context name. A parameter without a default that is not context is a required option."""
    fields: dict[str, Any] = {}
    for p in component.parameters:
        if p.name in component.kind.context:
            continue
        annotation = Any if p.annotation is inspect.Parameter.empty else p.annotation
        default = ... if p.default is inspect.Parameter.empty else p.default
        fields[p.name] = (annotation, default)
    return schema_model(component, fields)


def schema_model(component: Component, fields: Mapping[str, tuple[Any, Any]]) -> type[BaseModel]:
    """The pydantic model of ``fields`` (name -> (annotation, default or ``...``)) for ``component``."""
    extra = "allow" if component.open else "forbid"
    model_name = f"{component.kind.name}_{component.name}".replace("-", "_").replace(":", "_").replace(".", "_")
    return create_model(
        model_name,
        __config__=ConfigDict(extra=extra, arbitrary_types_allowed=True, strict=False, allow_inf_nan=False),
        **fields,
    )


def describe(component: Component) -> list[dict[str, Any]]:
    """One row per option: ``name``, ``type``, ``default``, ``help`` and ``bounds`` (for listings and docs)."""
    rows = []
    for name, info in component.options().items():
        bounds = []
        for meta in info.metadata:
            for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
                value = getattr(meta, attr, None)
                if value is not None:
                    bounds.append(f"{sym} {value}")
        rows.append(
            {
                "name": name,
                "type": _type_name(info.annotation),
                "default": None if info.is_required() else info.default,
                "required": info.is_required(),
                "help": info.description or "",
                "bounds": ", ".join(bounds),
            }
        )
    return rows


def _type_name(annotation: Any) -> str:
    """A short readable type: ``float``, ``sai | ema``, ``tuple[float, float]``, ``int | None``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if annotation is None or annotation is type(None):
        return "None"
    if annotation is Ellipsis:
        return "..."
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


# --------------------------------------------------------------------------------------------------------
# References and entry points
# --------------------------------------------------------------------------------------------------------


def check_kind(kind: Kind, name: str, obj: Any) -> None:
    """Refuse an object that lacks the kind's required attributes."""
    missing = [a for a in kind.required if not hasattr(obj, a)]
    if missing:
        what = obj.__name__ if inspect.isclass(obj) else type(obj).__name__
        article = "an" if kind.name[0] in "aeiou" else "a"
        raise FedsimError(
            f"'{name}' is not {article} {kind.name}: {what} has no {', '.join(missing)} "
            f"({article} {kind.name} needs {', '.join(kind.required)})"
        )


def _from_reference(kind: Kind, ref: str) -> Component:
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or the user's module failing on import
        raise FedsimError(f"{kind.name} '{ref}': cannot import module '{module_name}': {_first_line(e)}") from None
    obj = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise FedsimError(f"{kind.name} '{ref}': module '{module_name}' has no attribute '{attr}'")
    if not callable(obj):
        raise FedsimError(f"{kind.name} '{ref}': '{attr}' is not a class or function")
    if inspect.isclass(obj):
        check_kind(kind, ref, obj)
    return Component(kind, ref, obj, _summary(obj), origin=module_name)


def _entry_points(kind: str) -> Iterable[metadata.EntryPoint]:
    """The installed entry points of ``kind``, scanned once per ``sys.path`` (a scan reads every
    distribution's metadata)."""
    return _scan_entry_points(ENTRY_POINT_GROUP.format(kind=kind), tuple(sys.path))


@functools.lru_cache(maxsize=64)
def _scan_entry_points(group: str, path: tuple[str, ...]) -> tuple[metadata.EntryPoint, ...]:
    return tuple(metadata.entry_points(group=group))


def _from_entry_point(kind: Kind, ep: metadata.EntryPoint) -> Component:
    try:
        obj = ep.load()
    except Exception as e:
        raise FedsimError(f"{kind.name} '{ep.name}' (entry point {ep.value}): cannot load: {_first_line(e)}") from None
    if inspect.isclass(obj):
        check_kind(kind, ep.name, obj)
    dist = getattr(ep, "dist", None)
    component = Component(kind, ep.name, obj, _summary(obj), origin=f"plugin {dist.name if dist else ep.value}")
    _REGISTRY[kind.name][ep.name] = component
    return component


def owners_hint(option_name: str, asking: Component, registry: Mapping[str, Mapping[str, Component]]) -> str:
    """`` ('tau' is an option of aggregator 'gaf', ...)`` over the components of ``registry`` (kind -> name ->
    component; error path only)."""
    owners = []
    for kind, registered in registry.items():
        for name, component in registered.items():
            if component is asking:
                continue
            try:
                if option_name in component.schema.model_fields:
                    owners.append(f"{kind} '{name}'")
            except Exception:  # a plugin whose signature cannot be read: not a hint worth failing for
                continue
    if not owners:
        return ""
    more = f" and {len(owners) - 3} more" if len(owners) > 3 else ""
    return f" ('{option_name}' is an option of {', '.join(owners[:3])}{more})"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _summary(obj: Any) -> str:
    """The first sentence of the docstring's first paragraph."""
    doc = (inspect.getdoc(obj) or "").strip().split("\n\n")[0].replace("\n", " ")
    return re.split(r"(?<!\bal)(?<!e\.g)(?<!i\.e)\.\s+(?=[A-Z`(])", doc, maxsplit=1)[0].rstrip(".") + "."


def _origin(obj: Any) -> str:
    module = getattr(obj, "__module__", "") or ""
    return "built-in" if module.split(".")[0] in ("fedsim", "strategies", "topologies") else module


# --------------------------------------------------------------------------------------------------------
# The kinds of fedsim (config key, provider module that registers the built-ins, engine-supplied context)
# --------------------------------------------------------------------------------------------------------

for _kind in (
    Kind("dataset", "dataset", "training and test data (offline sources or your files)", "fedsim.data",
         frozenset({"seed", "num_clients"}), ("x_train",)),
    Kind("partitioner", "partition", "how training samples are split over clients", "fedsim.data",
         frozenset({"y", "num_clients", "seed", "min_size", "natural"})),
    Kind("sampler", "sampler", "how a client draws its minibatch indices", "fedsim.data.samplers",
         required=("sample",)),
    Kind("model", "model", "the network every client trains (factory(input_shape, num_classes, **options))",
         "fedsim.models", frozenset({"input_shape", "num_classes"}), positional=2),
    Kind("strategy", "strategy", "federated server strategy (selection, broadcast, aggregation)",
         ("strategies", "fedsim.flower_strategies"),
         frozenset({"aggregator", "fraction", "min_clients", "local_momentum", "simulation"}),
         ("init", "configure", "aggregate")),
    Kind("decentralized", "strategy", "decentralized strategy over a topology (local steps, then gossip)",
         "strategies", frozenset({"client_algorithm"}), ("init", "update")),
    Kind("regulator", "regulator", "client regulator rewriting the upload from the local trajectory",
         "strategies", required=("regulate",), none="none"),
    Kind("client_filter", "client_filter", "client micro-batch gradient filter", "strategies",
         required=("combine_microbatches",), none="none"),
    Kind("aggregator", "aggregator", "robust server aggregation in place of the weighted mean", "strategies",
         none="mean"),
    Kind("optimizer", "optimizer", "local optimizer of every client (functional, vmapped)", "fedsim.optim",
         frozenset({"model", "compress"}), ("init", "update", "step_")),
    Kind("lr_schedule", "lr_schedule", "per-round local learning rate", "fedsim.optim", required=("lr",)),
    Kind("availability", "availability", "which clients can take part in a round", "fedsim.availability",
         frozenset({"seed"}), none="always"),
    Kind("system", "system", "clients' compute speed, bandwidths and latency on the virtual clock", "fedsim.system",
         frozenset({"seed"}), required=("profiles",)),
    Kind("attack", "attack", "Byzantine clients: a data attack or an (omniscient) model attack on their uploads",
         "fedsim.attacks", required=("malicious", "poison_samples"), none="none"),
    Kind("privacy", "privacy", "differential privacy of the clients' updates or records, with its accountant",
         ("fedsim.privacy", "fedsim.dp_brem"), required=("record_level",), none="none"),
    Kind("compressor", "uplink", "compressed communication with error feedback (uplink and downlink)",
         "fedsim.compression", required=("compress", "message_bytes"), none="none"),
    Kind("problem", "problem", "min-max problem of the decentralized SGDA strategies", "fedsim.minimax",
         required=("loss", "wrap")),
    Kind("executor", "executor", "where client training runs", "fedsim.engine.executors",
         frozenset({"local"})),
    Kind("logger", "logger", "experiment tracking: every round's metrics also to TensorBoard, MLflow or W&B",
         "fedsim.tracking", frozenset({"run_dir", "config", "mlflow_uri"}), ("log", "close")),
    Kind("backend", "backend", "who drives the rounds: fedsim's loop, or Flower's simulation engine",
         "fedsim.backends", required=("run",)),
):  # fmt: skip
    define_kind(_kind)


__all__ = [
    "KINDS",
    "Component",
    "Kind",
    "Spec",
    "build",
    "components",
    "define_kind",
    "describe",
    "get",
    "make",
    "names",
    "option",
    "option_schema",
    "register",
    "register_namespace",
    "resolve_spec",
    "split_spec",
]
