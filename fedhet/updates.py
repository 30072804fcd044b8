"""What an update must be before any arithmetic touches it: exactly the tensors its task asked for, with the task's
shapes and dtypes, and finite. Every runtime checks a client's update here (the gRPC server after decoding a
payload, the Flower driver after reading a reply); every failure is an :class:`UpdateError` subclass whose message
says what was wrong (gRPC ``INVALID_ARGUMENT``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedhet.types import Weights

__all__ = [
    "DtypeMismatch",
    "ExtraTensor",
    "MissingTensor",
    "NonFiniteError",
    "ShapeMismatch",
    "TensorMeta",
    "UpdateError",
    "check_finite",
    "check_update",
    "meta_of",
]


class UpdateError(ValueError):
    """An update (or the payload it came in) is unusable; the message says what is wrong."""


class ShapeMismatch(UpdateError):
    """A tensor's shape differs from the task's, broadcastable or not."""


class DtypeMismatch(UpdateError):
    """A tensor's dtype differs from the task's, or its encoding does not fit its dtype."""


class MissingTensor(UpdateError):
    """The update lacks a tensor the task had."""


class ExtraTensor(UpdateError):
    """The update has a tensor the task did not."""


class NonFiniteError(UpdateError):
    """A floating-point tensor holds NaN or Inf."""


@dataclass(frozen=True)
class TensorMeta:
    """What a receiver expects of one tensor: its name, shape and (decoded) dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


def meta_of(weights: Weights) -> dict[str, TensorMeta]:
    """Name -> :class:`TensorMeta` of every tensor in ``weights``."""
    return {k: TensorMeta(k, tuple(v.shape), v.dtype) for k, v in weights.items()}


def check_finite(weights: Weights) -> None:
    """Raise :class:`NonFiniteError` naming the first floating-point tensor with a NaN or Inf."""
    for name, tensor in weights.items():
        # a finite sum proves every value finite (NaN and Inf propagate); only a sum that is not (or overflowed)
        # needs the exact, five times slower, element-wise check
        floating = tensor.is_floating_point()
        if floating and not math.isfinite(float(tensor.sum())) and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteError(f"tensor {name!r} holds NaN or Inf")


def check_update(weights: Weights, expected: Mapping[str, TensorMeta]) -> None:
    """Decoded tensors match the task exactly (names, shapes, dtypes) and hold no NaN or Inf."""
    if set(weights) != set(expected):
        raise MissingTensor(f"update tensors {sorted(weights)} differ from the task's {sorted(expected)}")
    for name, tensor in weights.items():
        meta = expected[name]
        if tuple(tensor.shape) != meta.shape:
            raise ShapeMismatch(f"tensor {name!r}: shape {tuple(tensor.shape)} sent for {meta.shape}")
        if tensor.dtype != meta.dtype:
            raise DtypeMismatch(f"tensor {name!r}: dtype {tensor.dtype} sent for {meta.dtype}")
    check_finite(weights)
