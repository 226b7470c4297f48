"""Datasets (offline sources, standardized) and client partitioners."""

from .datasets import DATASETS, Dataset, load_dataset, subsample_train
from .partition import PARTITIONERS, label_histogram, partition, split_clients

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
