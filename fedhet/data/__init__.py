"""Datasets (Fashion-MNIST, FedProx Synthetic), loaded by registry name, and client partitioners."""

from __future__ import annotations

from fedhet.data.base import DATASETS, Dataset, DatasetLoader, IndexArray, load_dataset
from fedhet.data.config import DatasetConfig, PartitionConfig
from fedhet.data.fashion_mnist import load_fashion_mnist
from fedhet.data.federated import ClientSplit, as_dataset, check_dataset, client_splits, load_configured
from fedhet.data.partition import (
    PARTITIONERS,
    Partitioner,
    dirichlet,
    dual_dirichlet,
    iid,
    partition,
    shards,
    split_train_test,
)
from fedhet.data.synthetic import make_synthetic

__all__ = [
    "DATASETS",
    "PARTITIONERS",
    "ClientSplit",
    "Dataset",
    "DatasetConfig",
    "DatasetLoader",
    "IndexArray",
    "PartitionConfig",
    "Partitioner",
    "as_dataset",
    "check_dataset",
    "client_splits",
    "dirichlet",
    "dual_dirichlet",
    "iid",
    "load_configured",
    "load_dataset",
    "load_fashion_mnist",
    "make_synthetic",
    "partition",
    "shards",
    "split_train_test",
]
