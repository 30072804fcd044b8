"""The ``Dataset`` value type, the registry of dataset loaders and ``load_dataset``."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import torch

from fedhet.errors import ConfigError, DataError
from fedhet.registry import Registry

__all__ = ["DATASETS", "Dataset", "DatasetLoader", "IndexArray", "call_with_params", "load_dataset"]

IndexArray = npt.NDArray[np.int64]
R = TypeVar("R")


@dataclass(frozen=True, eq=False)
class Dataset:
    """Train and test arrays of one dataset, as tensors (``eq=False``: tensors have no single truth value).

    Attributes:
        name: registry name of the dataset.
        x_train: float32 inputs, shape (N, *input_shape).
        y_train: int64 class labels in 0..num_classes-1, shape (N,).
        x_test: float32 inputs, shape (M, *input_shape); M may be 0.
        y_test: int64 class labels, shape (M,).
        num_classes: number of classes.
        natural_partition: per-client int64 indices into the training set when the data comes split by
            client (Synthetic); every training index appears in exactly one client. None otherwise.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    natural_partition: tuple[IndexArray, ...] | None = None

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise DataError(f"dataset {self.name!r}: num_classes must be >= 1, got {self.num_classes}")
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if x.dtype != torch.float32 or x.dim() < 2:
                raise DataError(
                    f"dataset {self.name!r}: x_{split} must be float32 of shape (N, *input_shape), "
                    f"got {x.dtype} of shape {tuple(x.shape)}"
                )
            if y.dtype != torch.int64 or y.dim() != 1 or y.shape[0] != x.shape[0]:
                raise DataError(
                    f"dataset {self.name!r}: y_{split} must be int64 of shape ({x.shape[0]},), "
                    f"got {y.dtype} of shape {tuple(y.shape)}"
                )
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise DataError(
                    f"dataset {self.name!r}: y_{split} labels must be in 0..{self.num_classes - 1}, "
                    f"found {int(y.min())}..{int(y.max())}"
                )
        if self.x_train.shape[0] == 0:
            raise DataError(f"dataset {self.name!r}: the training set is empty")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DataError(
                f"dataset {self.name!r}: train inputs have shape {tuple(self.x_train.shape[1:])} "
                f"but test inputs {tuple(self.x_test.shape[1:])}"
            )
        if self.natural_partition is not None:
            self._check_partition(self.natural_partition)

    def _check_partition(self, parts: tuple[IndexArray, ...]) -> None:
        n = self.x_train.shape[0]
        if not parts or any(p.dtype != np.int64 or p.ndim != 1 for p in parts):
            raise DataError(f"dataset {self.name!r}: natural_partition must be a non-empty tuple of 1-D int64")
        flat = np.concatenate(parts)
        if flat.size and (flat.min() < 0 or flat.max() >= n):
            raise DataError(f"dataset {self.name!r}: natural_partition indices must be in 0..{n - 1}")
        if flat.size != n or np.any(np.bincount(flat, minlength=n) != 1):
            raise DataError(f"dataset {self.name!r}: natural_partition must hold every training index exactly once")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample, e.g. (1, 28, 28)."""
        return tuple(self.x_train.shape[1:])


DatasetLoader = Callable[..., Dataset]
DATASETS: Registry[DatasetLoader] = Registry("dataset", group="fedhet.datasets")


def call_with_params(key: str, name: str, fn: Callable[..., R], *args: Any, **params: Any) -> R:
    """Call ``fn(*args, **params)``; unknown or missing ``params`` raise a ConfigError under ``key``."""
    try:
        inspect.signature(fn).bind(*args, **params)
    except TypeError as err:
        raise ConfigError(f"{key} ({name!r}): {err}; accepted: {_param_names(fn, len(args))}") from None
    return fn(*args, **params)


def _param_names(fn: Callable[..., object], skip: int) -> str:
    params: Mapping[str, inspect.Parameter] = inspect.signature(fn).parameters
    return ", ".join(list(params)[skip:]) or "none"


def load_dataset(name: str, **kwargs: Any) -> Dataset:
    """Load the dataset registered as ``name`` with loader keyword arguments ``kwargs``."""
    return call_with_params("dataset", name, DATASETS.get(name), **kwargs)
