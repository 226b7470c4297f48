"""Datasets (offline sources, standardized) and client partitioners, registered as components."""

from fedsim.core.components import register

from . import cifar as _cifar
from . import datasets as _datasets
from . import flower_partitioners as _flower_partitioners  # noqa: F401  (registers flwr:NAME)
from . import huggingface as _huggingface
from . import leaf as _leaf
from . import partition as _partition
from .datasets import DATASETS, Dataset, load_dataset, subsample_train
from .partition import PARTITIONERS, label_histogram, partition, split_clients

for _name in DATASETS:
    _module = {"leaf": _leaf, "cifar10": _cifar, "cifar100": _cifar, "hf": _huggingface}.get(_name, _datasets)
    register("dataset", _name, getattr(_module, _name.replace("-", "_")))
for _name in PARTITIONERS:
    register("partitioner", _name, getattr(_partition, _name))

__all__ = [
    "DATASETS",
    "PARTITIONERS",
    "Dataset",
    "label_histogram",
    "load_dataset",
    "partition",
    "split_clients",
    "subsample_train",
]
