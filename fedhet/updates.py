"""What an update must be before any arithmetic touches it: exactly the tensors its task asked for, with the task's
shapes and dtypes, finite, and within the run's norm bound. Every runtime checks a client's update here (the gRPC
server after decoding a payload, the Flower driver after reading a reply; the simulator applies the norm bound to
its simulated clients, so that an update a deployed server would clip or refuse is clipped or refused in
simulation too); every failure is an :class:`UpdateError` subclass whose message says what was wrong (gRPC
``INVALID_ARGUMENT``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedhet.types import StackedRow, Weights

__all__ = [
    "DEFAULT_RELATIVE_BOUND",
    "NORM_ACTIONS",
    "DtypeMismatch",
    "ExtraTensor",
    "MissingTensor",
    "NonFiniteError",
    "NormBound",
    "NormBoundExceeded",
    "NormCheck",
    "ShapeMismatch",
    "TensorMeta",
    "UpdateError",
    "check_finite",
    "check_update",
    "meta_of",
    "update_norm",
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


class NormBoundExceeded(UpdateError):
    """The update's L2 norm exceeds the run's bound and the run rejects such updates."""


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


#: the default bound on an update's L2 norm, relative to max(|start weights|, 1). Measured worst case of an honest
#: task: 0.5 (logreg, Synthetic, 5 epochs at lr 0.05), 0.08 (2NN and CNN, Fashion-MNIST, 1 epoch), 5.0 (logreg, 20
#: epochs at lr 0.5): 100 leaves 20x headroom and stops an update of float32's largest values (3.4e38).
DEFAULT_RELATIVE_BOUND = 100.0

#: what a run does with an update over its norm bound
NORM_ACTIONS = ("reject", "clip")


def update_norm(weights: Weights, start: Weights) -> float:
    """L2 norm of ``weights - start`` over the floating-point tensors: float32 differences, whose sums of squares
    are added in float64; NaN or inf when a value is not finite or the squares overflow float32. One pass over the
    update (a server takes in every update of a run through it). A row of a vectorized executor's chunk carries
    its norm against its task's start weights, computed with the chunk's (:attr:`StackedRow.norms`): read when
    ``start`` is those very weights."""
    if isinstance(weights, StackedRow) and weights.norms is not None and weights.starts[weights.row] is start:
        return weights.norms[weights.row]
    total = 0.0
    for name, value in weights.items():
        if value.is_floating_point():
            diff = (value.float() - start[name].float()).reshape(-1)
            total += float(torch.dot(diff, diff))
    return math.sqrt(total)


@dataclass(frozen=True)
class NormCheck:
    """Outcome of :meth:`NormBound.check`: the update to use, its norm and whether it was clipped."""

    weights: Weights
    norm: float
    clipped: bool


@dataclass(frozen=True)
class NormBound:
    """The largest L2 norm of an update (trained minus start weights) a run takes, and what it does with a larger one.

    The same rule in every runtime (``server.norm_bound`` of ``fedhet server``, ``sim.norm_bound`` of
    ``fedhet simulate``, ``DriverSettings.norm_bound`` of the Flower driver), so that a simulated client whose
    update a deployed server would clip or refuse is clipped or refused in simulation too.

    Attributes:
        bound: the largest norm; 0 = the default, :data:`DEFAULT_RELATIVE_BOUND` x max(norm of the start weights, 1).
        action: ``reject`` (the update is refused: :class:`NormBoundExceeded`) or ``clip`` (scaled onto the bound).
    """

    bound: float = 0.0
    action: str = "reject"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.bound) and self.bound >= 0):
            raise ValueError(f"norm_bound must be finite and >= 0 (0 = the default relative bound), got {self.bound}")
        if self.action not in NORM_ACTIONS:
            raise ValueError(f"norm_action must be one of {', '.join(NORM_ACTIONS)}, got {self.action!r}")

    def check(self, weights: Weights, start: Weights) -> NormCheck:
        """Bound the update ``weights - start``: ``reject`` raises :class:`NormBoundExceeded`, ``clip`` scales the
        update down onto the bound (integer tensors as they are). An update whose norm is not finite (NaN or Inf
        weights, or squares that overflow float32) cannot be scaled: it is refused under either action."""
        norm = update_norm(weights, start)
        if not math.isfinite(norm):
            raise NormBoundExceeded(
                f"update norm is {norm}: its weights hold NaN or Inf, or values near float32's largest"
            )
        bound = self.bound
        if bound <= 0:  # the default; the start weights' norm is needed only past its floor of 1 (never, honestly)
            start_norm = 0.0
            if norm > DEFAULT_RELATIVE_BOUND:
                squares = (float(torch.sum(v.double() ** 2)) for v in start.values() if v.is_floating_point())
                start_norm = math.sqrt(sum(squares))
            bound = DEFAULT_RELATIVE_BOUND * max(start_norm, 1.0)
        if norm <= bound:
            return NormCheck(weights, norm, False)
        if self.action == "reject":
            raise NormBoundExceeded(f"update norm {norm:.6g} exceeds the bound {bound:.6g}")
        scale = bound / norm
        clipped = {
            k: (start[k] + (v - start[k]) * scale).to(v.dtype) if v.is_floating_point() else v
            for k, v in weights.items()
        }
        return NormCheck(clipped, norm, True)
