"""The ``flwr:NAME`` names of kind ``partitioner``: Flower Datasets' partitioners (``flwr-datasets``) splitting a
fedsim dataset (``partition: flwr:DirichletPartitioner``, options as their constructor keywords).

The partitioner sees a Hugging Face dataset with columns ``label`` (the training labels), ``client`` (the natural
client id of each sample, where the dataset has one) and ``index``; partition ``i`` of Flower becomes client
``i``. What fedsim sets: ``num_partitions`` is ``--clients``, ``seed`` the run's seed (Flower's default is 42),
and ``partition_by`` defaults to ``label`` (``client`` for the natural-id partitioners). A Flower partitioner
may leave samples out (``ShardPartitioner`` without ``keep_incomplete_shard``): that is reported as a warning,
never silently. Afterwards every client is brought up to ``--min-client-size`` like with every partitioner
(:func:`fedsim.data.partition.repair_min_size`). Vertical partitioners split features, not samples, and
``IdToSizeFncPartitioner`` takes a function: neither is offered.
"""

from __future__ import annotations

import inspect
import typing
import warnings
from typing import Any

import numpy as np
from pydantic import TypeAdapter

from fedsim.core import components
from fedsim.core.errors import FedsimError, FedsimWarning, unknown

from .partition import _rng, repair_min_size

NOT_OFFERED = ("Partitioner", "IdToSizeFncPartitioner", "VerticalEvenPartitioner", "VerticalSizePartitioner")
SET_BY_FEDSIM = ("num_partitions", "seed")
NATURAL = ("NaturalIdPartitioner", "GroupedNaturalIdPartitioner")


def flower_partitioners() -> dict[str, type]:
    """Flower Datasets' sample partitioners by class name (needs ``flwr-datasets``)."""
    try:
        import flwr_datasets.partitioner as module
    except ImportError:
        raise FedsimError("partitioners flwr:NAME need flwr-datasets (pip install fedsim[hf])") from None
    return {
        name: getattr(module, name)
        for name in module.__all__
        if inspect.isclass(getattr(module, name)) and name.endswith("Partitioner") and name not in NOT_OFFERED
    }


def _accepts_schema(hint: Any) -> bool:
    try:
        TypeAdapter(hint)
    except Exception:  # numpy arrays and callables have no pydantic schema
        return False
    return True


def _declared(cls: type) -> Any:
    """The options of Flower partitioner ``cls``: its constructor keywords without those fedsim sets, with
    ``partition_by`` defaulting to the label (or natural client) column; numpy-typed ones accept lists."""
    hints = typing.get_type_hints(cls.__init__)
    default_by = "client" if cls.__name__ in NATURAL else "label"
    params, annotations = [], {}
    for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if p.name in SET_BY_FEDSIM or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        if p.name == "partition_by":
            p = p.replace(default=default_by)
        params.append(p.replace(kind=p.KEYWORD_ONLY))
        hint = hints.get(p.name, Any)
        annotations[p.name] = hint if _accepts_schema(hint) else Any

    def options(**values: Any) -> None:
        """Flower partitioner options."""

    options.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    options.__annotations__ = annotations
    return options


def flower_partition(
    cls: type, options: dict[str, Any], y: np.ndarray, num_clients: int, seed: int, natural: np.ndarray | None
) -> list[np.ndarray]:
    """Flower's partitions of ``y`` (sorted index arrays), one per client; a one-line error when Flower makes a
    different number of partitions or fails."""
    import datasets

    hints = typing.get_type_hints(cls.__init__)
    kwargs = {
        k: np.asarray(v) if isinstance(v, list) and "ndarray" in str(hints.get(k, "")) else v
        for k, v in options.items()
    }
    if options.get("partition_by") == "client" and natural is None:
        raise FedsimError("partition_by 'client' needs a dataset with a natural client id per sample")
    if options.get("partition_by") not in (None, "label", "client"):
        raise FedsimError(f"partition_by must be 'label' or 'client', got {options['partition_by']!r}")
    taken = inspect.signature(cls.__init__).parameters
    if "num_partitions" in taken:
        kwargs["num_partitions"] = num_clients
    if "seed" in taken:
        kwargs["seed"] = seed
    table = {"label": np.asarray(y, dtype=np.int64), "index": np.arange(len(y), dtype=np.int64)}
    if natural is not None:
        table["client"] = np.asarray(natural, dtype=np.int64)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # pyarrow's deprecation notices from inside Flower
            partitioner = cls(**kwargs)
            partitioner.dataset = datasets.Dataset.from_dict(table)
            count = partitioner.num_partitions
            if count != num_clients:
                raise FedsimError(f"it makes {count} partitions but --clients is {num_clients}; set clients to {count}")
            parts = [np.sort(np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64)) for i in range(count)]
    except (ValueError, TypeError, KeyError) as exc:  # FedsimError is a ValueError; Flower raises ValueError
        raise FedsimError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    held = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if len(np.unique(held)) != len(held):
        raise FedsimError("its partitions overlap (a sample on two clients)")
    if len(held) < len(y):
        warnings.warn(f"flwr:{cls.__name__} left {len(y) - len(held)} of {len(y)} training samples on no client",
                      FedsimWarning, stacklevel=2)  # fmt: skip
    return parts


def flower_partitioner(name: str) -> components.Component:
    """The component ``flwr:NAME`` of kind ``partitioner``: Flower Datasets' partitioner class ``NAME``."""
    available = flower_partitioners()
    if name not in available:
        raise unknown("Flower partitioner", name, sorted(available))
    cls = available[name]
    default_by = "client" if name in NATURAL else "label"

    def build(
        *, y: np.ndarray, num_clients: int, seed: int = 0, min_size: int = 1, natural=None, **options: Any
    ) -> list[np.ndarray]:
        if "partition_by" in inspect.signature(cls.__init__).parameters:
            options.setdefault("partition_by", default_by)
        parts = flower_partition(cls, options, y, num_clients, seed, natural)
        return repair_min_size(parts, min_size, _rng(seed))

    summary = f"Flower Datasets' {name} ({cls.__module__})."
    return components.Component(
        components.kind_of("partitioner"), f"flwr:{name}", build, summary, origin="flwr-datasets",
        declared=_declared(cls),
    )  # fmt: skip


components.register_namespace("partitioner", "flwr", flower_partitioner)
