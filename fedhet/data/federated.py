"""A dataset as a run configures it, and its split among the run's clients.

The simulator, the server (for its test set) and every real client build their data through these two functions,
so a device with ``partition_id = k`` trains on exactly the samples simulated client k would.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from fedhet.data.base import DATASETS, Dataset
from fedhet.data.config import DatasetConfig
from fedhet.data.partition import PARTITIONERS, partition, split_train_test
from fedhet.errors import ConfigError, DataError
from fedhet.targets import call_target, locate

__all__ = ["ClientSplit", "as_dataset", "check_dataset", "client_splits", "load_configured"]

ClientSplit = tuple[np.ndarray, np.ndarray]  # (train indices, held-out indices) into the training arrays


def _accepted(factory: Callable[..., Any], available: Mapping[str, Any]) -> dict[str, Any]:
    """Those of ``available`` that ``factory`` takes: one config node carries the keys of several components
    (``dataset.alpha`` is Synthetic's; ``partition.classes_per_client`` is only for shards)."""
    accepted = inspect.signature(factory).parameters
    return {k: v for k, v in available.items() if k in accepted}


def check_dataset(config: DatasetConfig) -> Callable[..., Any]:
    """The function that loads the dataset ``config`` names; a :class:`ConfigError` naming the key when the name is
    not registered or the import path cannot be imported."""
    if config._target_:
        return locate("dataset._target_", config._target_)
    if config.name not in DATASETS:
        raise ConfigError(
            f"dataset.name: unknown dataset {config.name!r}; choose one of: {', '.join(DATASETS.names())}"
        )
    try:
        return DATASETS.get(config.name)
    except ImportError as error:
        raise ConfigError(f"dataset.name: {error}") from None


def load_configured(config: DatasetConfig, num_clients: int, seed: int) -> Dataset:
    """The dataset ``config`` names, generated for ``num_clients`` and ``seed`` where it is synthetic."""
    loader = check_dataset(config)
    offered = {
        "root": config.root,
        "alpha": config.alpha,
        "beta": config.beta,
        "num_clients": num_clients,
        "seed": seed,
    }
    data = as_dataset(config.label, call_target("dataset", loader, config.kwargs, offered))
    if num_clients > len(data.y_train):
        raise ConfigError(
            f"num_clients ({num_clients}) exceeds the {len(data.y_train)} training samples of {data.name}"
        )
    return data


def as_dataset(label: str, loaded: object) -> Dataset:
    """A user's loader's return value as a :class:`Dataset`: one already, or ``(x_train, y_train, x_test, y_test)``
    (tensors or arrays; inputs become float32, labels int64, and the classes are 0..the largest label)."""
    if isinstance(loaded, Dataset):
        return loaded
    if not isinstance(loaded, tuple | list) or len(loaded) != 4:
        raise DataError(
            f"dataset {label!r} returned a {type(loaded).__name__}: return a fedhet.data.Dataset or "
            "(x_train, y_train, x_test, y_test)"
        )
    try:
        x_train, y_train, x_test, y_test = (torch.as_tensor(np.asarray(a)) for a in loaded)
    except (TypeError, ValueError, RuntimeError) as error:
        raise DataError(f"dataset {label!r}: its arrays are not numeric: {error}") from None
    for split, y in (("train", y_train), ("test", y_test)):
        if y.is_floating_point() and y.numel() and not bool((y == y.round()).all()):
            raise DataError(f"dataset {label!r}: y_{split} holds non-integer labels")
    labels = torch.cat([y_train.reshape(-1), y_test.reshape(-1)])
    num_classes = int(labels.max()) + 1 if labels.numel() else 0
    return Dataset(label, x_train.float(), y_train.long(), x_test.float(), y_test.long(), num_classes)


def client_splits(config: DatasetConfig, data: Dataset, num_clients: int, seed: int) -> list[ClientSplit]:
    """Each client's (train, held-out) indices into ``data``'s training arrays, from ``config.partition``."""
    part = config.partition
    if part.name == "natural":
        if data.natural_partition is None:
            raise ConfigError(f"dataset.partition.name: dataset {data.name} has no natural per-client split")
        if len(data.natural_partition) != num_clients:
            raise ConfigError(
                f"num_clients ({num_clients}) must equal the {len(data.natural_partition)} clients "
                f"dataset {data.name} was generated for"
            )
        shards = list(data.natural_partition)
    else:
        if part.name not in PARTITIONERS:
            raise ConfigError(
                f"dataset.partition.name: unknown partitioner {part.name!r}; "
                f"choose one of: natural, {', '.join(PARTITIONERS.names())}"
            )
        available = {
            "alpha": part.alpha,
            "alpha2": part.alpha,
            "alpha1": part.alpha1 or float(num_clients),
            "classes_per_client": part.classes_per_client,
        }
        partitioner = PARTITIONERS.get(part.name)
        shards = partition(part.name, data.y_train.numpy(), num_clients, seed, **_accepted(partitioner, available))
    return [split_train_test(s, part.test_fraction, seed + i) for i, s in enumerate(shards)]
