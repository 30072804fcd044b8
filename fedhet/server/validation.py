"""Update validation: the aggregator never trusts a client.

Every check runs before any arithmetic on the global model. The manifest checks run before the payload is even
read, so a wrong-shaped update costs the server one header. Every failure is an :class:`~fedhet.updates.UpdateError`
(gRPC ``INVALID_ARGUMENT``; :class:`~fedhet.v1.wire.PayloadTooLarge` is ``RESOURCE_EXHAUSTED``); the checks of the
decoded tensors that every runtime shares live in :mod:`fedhet.updates`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from fedhet.quant import FULL_PRECISION
from fedhet.updates import DtypeMismatch, ExtraTensor, MissingTensor, ShapeMismatch, TensorMeta
from fedhet.v1 import tensor_pb2 as pb
from fedhet.v1.wire import (
    DENSE_ENCODINGS,
    DTYPE_CODES,
    PayloadError,
    check_manifest,
    dtype_name,
    encoding_name,
)

__all__ = [
    "BitwidthMismatch",
    "SampleCountError",
    "check_result_fields",
    "check_update_manifest",
]


class BitwidthMismatch(PayloadError):
    """A packed update's bits differ from the bitwidth its client registered."""


class SampleCountError(PayloadError):
    """The sample count (the update's weight) or another scalar field is zero, negative, non-finite or absurd."""


def check_update_manifest(
    manifest: pb.Manifest, expected: Mapping[str, TensorMeta], bitwidth: int = FULL_PRECISION
) -> None:
    """The manifest describes exactly the task's tensors: same names, shapes and dtypes; floating-point tensors
    dense (fp32, fp16, bf16) or packed at ``bitwidth``, the bits the client registered (never packed for a 32-bit
    client); others raw."""
    names = [spec.name for spec in manifest.tensors]
    missing = sorted(set(expected) - set(names))
    if missing:
        raise MissingTensor(
            f"update lacks tensor {missing[0]!r}" + (f" and {len(missing) - 1} more" * (len(missing) > 1))
        )
    extra = sorted(set(names) - set(expected))
    if extra:
        raise ExtraTensor(f"update has unexpected tensor {extra[0]!r}")
    for spec in manifest.tensors:
        meta = expected[spec.name]
        if tuple(spec.shape) != meta.shape:
            raise ShapeMismatch(f"tensor {spec.name!r}: shape {tuple(spec.shape)} sent for {meta.shape}")
        if spec.dtype != DTYPE_CODES.get(meta.dtype):
            raise DtypeMismatch(f"tensor {spec.name!r}: dtype {dtype_name(spec.dtype)} sent for {meta.dtype}")
        floating = meta.dtype.is_floating_point
        if floating and spec.encoding == pb.ENCODING_PACKED_INT and spec.quant.bits != bitwidth:
            raise BitwidthMismatch(
                f"tensor {spec.name!r}: packed at {spec.quant.bits} bits, but the client registered {bitwidth} bits"
            )
        allowed = {*DENSE_ENCODINGS.values(), pb.ENCODING_PACKED_INT} if floating else {pb.ENCODING_RAW}
        if spec.encoding not in allowed:
            raise DtypeMismatch(
                f"tensor {spec.name!r}: encoding {encoding_name(spec.encoding)} is not accepted for {meta.dtype}"
            )
    check_manifest(manifest)  # byte lengths against shapes, the total, the checksum's size


@dataclass(frozen=True)
class ResultFields:
    """The scalar fields of an uploaded result (``personal_accuracy``: None when the client reported none)."""

    num_samples: int
    local_steps: int
    train_seconds: float
    loss: float
    personal_accuracy: float | None = None


def check_result_fields(fields: ResultFields, registered_samples: int, max_train_seconds: float = math.inf) -> None:
    """The update's weight (its sample count) is in 1..the samples the client registered; its training time is
    finite and at most ``max_train_seconds`` (a task cannot have trained longer than the run has existed: a finite
    but absurd time would overflow a speed-aware scheduler); other scalars sane."""
    if not 1 <= fields.num_samples <= registered_samples:
        raise SampleCountError(
            f"num_samples {fields.num_samples} must be in 1..{registered_samples} (the samples the client registered)"
        )
    if fields.local_steps < 0:
        raise SampleCountError(f"local_steps must be >= 0, got {fields.local_steps}")
    if not (math.isfinite(fields.train_seconds) and 0 <= fields.train_seconds <= max_train_seconds):
        raise SampleCountError(
            f"train_seconds must be in [0, {max_train_seconds:.6g}] (the run's age), got {fields.train_seconds}"
        )
    if math.isnan(fields.loss):
        raise SampleCountError("loss is NaN")
    accuracy = fields.personal_accuracy
    if accuracy is not None and not (math.isfinite(accuracy) and 0.0 <= accuracy <= 1.0):
        raise SampleCountError(f"personal_accuracy must be in [0, 1], got {accuracy}")
