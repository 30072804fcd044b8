"""Weights <-> (manifest, payload bytes) <-> chunks, for both ends of the wire.

A payload is the concatenation of each tensor's bytes in manifest order; the manifest (``fedhet.v1.Manifest``)
names every tensor with its shape, dtype, encoding and byte length, and carries the payload's total length and
SHA-256. Decoding never trusts the sender: every length, dtype and offset is checked and every failure is a
:class:`PayloadError` subclass that says what was wrong. Nothing here unpickles anything.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from fedhet.codec import pack_mask, unpack_mask
from fedhet.types import Weights
from fedhet.v1 import tensor_pb2 as pb

__all__ = [
    "DENSE_ENCODINGS",
    "ChunkError",
    "ManifestError",
    "NonFiniteError",
    "PayloadAssembler",
    "PayloadError",
    "PayloadTooLarge",
    "TensorMeta",
    "check_finite",
    "check_manifest",
    "chunks",
    "decode",
    "dtype_name",
    "encode",
    "encoding_name",
    "meta_of",
]


class PayloadError(ValueError):
    """A payload or its manifest is unusable; the message says what is wrong (gRPC ``INVALID_ARGUMENT``)."""


class ManifestError(PayloadError):
    """A tensor spec is inconsistent: unknown dtype or encoding, negative dimension, wrong byte length, duplicate."""


class ChunkError(PayloadError):
    """A chunk is missing, out of order or corrupted (the payload's length or SHA-256 disagrees)."""


class PayloadTooLarge(PayloadError):
    """A payload declares, or a stream delivers, more bytes than allowed (gRPC ``RESOURCE_EXHAUSTED``)."""


class NonFiniteError(PayloadError):
    """A floating-point tensor holds NaN or Inf."""


_DTYPES: Mapping[int, torch.dtype] = {
    pb.DTYPE_FLOAT32: torch.float32,
    pb.DTYPE_FLOAT16: torch.float16,
    pb.DTYPE_BFLOAT16: torch.bfloat16,
    pb.DTYPE_FLOAT64: torch.float64,
    pb.DTYPE_INT64: torch.int64,
    pb.DTYPE_INT32: torch.int32,
    pb.DTYPE_UINT8: torch.uint8,
    pb.DTYPE_BOOL: torch.bool,
}
_DTYPE_CODES: Mapping[torch.dtype, int] = {v: k for k, v in _DTYPES.items()}

#: dense floating-point wire encodings by config name, and the dtype each stores values as
DENSE_ENCODINGS: Mapping[str, pb.Encoding] = {
    "fp32": pb.ENCODING_FP32,
    "fp16": pb.ENCODING_FP16,
    "bf16": pb.ENCODING_BF16,
}
_FLOAT_WIRE: Mapping[pb.Encoding, torch.dtype] = {
    pb.ENCODING_FP32: torch.float32,
    pb.ENCODING_FP16: torch.float16,
    pb.ENCODING_BF16: torch.bfloat16,
}


def encoding_name(code: int) -> str:
    """``ENCODING_FP16`` for 3: the proto enum name of an encoding (the number when unknown: proto3 enums are
    open, so a peer may send any value)."""
    try:
        return pb.Encoding.Name(code)
    except ValueError:
        return str(code)


def dtype_name(code: int) -> str:
    """``DTYPE_FLOAT32`` for 1: the proto enum name of a dtype (the number when unknown)."""
    try:
        return pb.DType.Name(code)
    except ValueError:
        return str(code)


@dataclass(frozen=True)
class TensorMeta:
    """What a receiver expects of one tensor: its name, shape and (decoded) dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


def meta_of(weights: Weights) -> dict[str, TensorMeta]:
    """Name -> :class:`TensorMeta` of every tensor in ``weights``."""
    return {k: TensorMeta(k, tuple(v.shape), v.dtype) for k, v in weights.items()}


def _wire_dtype(dtype: torch.dtype, encoding: pb.Encoding) -> torch.dtype:
    return _FLOAT_WIRE.get(encoding, dtype)


def encode(weights: Weights, encoding: str = "fp32", sparse: frozenset[str] = frozenset()) -> tuple[pb.Manifest, bytes]:
    """The manifest and payload of ``weights``; floating-point tensors travel at ``encoding`` (fp32/fp16/bf16),
    others exactly (``ENCODING_RAW``); the floating-point tensors named in ``sparse`` (pruned) travel as
    ``ENCODING_SPARSE``: a bitmap of their nonzero positions, then those values at ``encoding``."""
    if encoding not in DENSE_ENCODINGS:
        raise ManifestError(f"unknown encoding {encoding!r}; choose one of {', '.join(DENSE_ENCODINGS)}")
    manifest = pb.Manifest()
    parts: list[bytes] = []
    for name, tensor in weights.items():
        if tensor.dtype not in _DTYPE_CODES:
            raise ManifestError(f"tensor {name!r}: dtype {tensor.dtype} cannot travel")
        code = DENSE_ENCODINGS[encoding] if tensor.is_floating_point() else pb.ENCODING_RAW
        flat = tensor.detach().to("cpu").reshape(-1)
        spec = manifest.tensors.add(name=name, shape=list(tensor.shape), dtype=_DTYPE_CODES[tensor.dtype])
        if name in sparse and tensor.is_floating_point():
            kept = flat != 0
            values = flat[kept].to(_wire_dtype(tensor.dtype, code)).view(torch.uint8).numpy().tobytes()
            raw = pack_mask(kept).numpy().tobytes() + values
            spec.encoding = pb.ENCODING_SPARSE
            spec.sparse.CopyFrom(pb.SparseLayout(nnz=int(kept.sum()), bitmap=True, value_encoding=code))
        else:
            raw = flat.to(_wire_dtype(tensor.dtype, code)).contiguous().view(torch.uint8).numpy().tobytes()
            spec.encoding = code
        spec.byte_length = len(raw)
        parts.append(raw)
    payload = b"".join(parts)
    manifest.total_bytes = len(payload)
    manifest.sha256 = hashlib.sha256(payload).digest()
    return manifest, payload


def chunks(payload: bytes, chunk_bytes: int) -> Iterator[pb.Chunk]:
    """``payload`` as consecutive chunks of at most ``chunk_bytes`` bytes (one empty chunk for an empty payload)."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    view = memoryview(payload)
    if not view:
        yield pb.Chunk(offset=0, data=b"")
    for start in range(0, len(view), chunk_bytes):
        yield pb.Chunk(offset=start, data=bytes(view[start : start + chunk_bytes]))


def _expected_bytes(spec: pb.TensorSpec) -> tuple[torch.dtype, torch.dtype, int]:
    """(decoded dtype, wire dtype of the values, byte length) a spec needs; raises ManifestError when
    inconsistent. A sparse spec's length is its bitmap plus ``nnz`` values."""
    name = spec.name
    if spec.dtype not in _DTYPES:
        raise ManifestError(f"tensor {name!r}: unknown dtype {spec.dtype}")
    dtype = _DTYPES[spec.dtype]
    if any(d < 0 for d in spec.shape):
        raise ManifestError(f"tensor {name!r}: negative dimension in shape {list(spec.shape)}")
    numel = math.prod(spec.shape)
    layout = spec.WhichOneof("layout")
    if spec.encoding == pb.ENCODING_SPARSE:
        sparse = spec.sparse
        if layout != "sparse" or not sparse.bitmap:
            raise ManifestError(f"tensor {name!r}: a sparse tensor needs a bitmap sparse layout (no index lists)")
        if not dtype.is_floating_point or sparse.value_encoding not in _FLOAT_WIRE:
            raise ManifestError(f"tensor {name!r}: sparse values must be fp32/fp16/bf16 of a floating-point tensor")
        if sparse.nnz > numel:
            raise ManifestError(f"tensor {name!r}: {sparse.nnz} stored values for {numel} elements")
        wire = _FLOAT_WIRE[sparse.value_encoding]
        needed = (numel + 7) // 8 + sparse.nnz * wire.itemsize
    else:
        if spec.encoding == pb.ENCODING_PACKED_INT:
            raise ManifestError(
                f"tensor {name!r}: encoding {encoding_name(spec.encoding)} is not accepted by this peer"
            )
        if spec.encoding in _FLOAT_WIRE:
            if not dtype.is_floating_point:
                raise ManifestError(f"tensor {name!r}: {encoding_name(spec.encoding)} needs a floating-point dtype")
        elif spec.encoding != pb.ENCODING_RAW:
            raise ManifestError(f"tensor {name!r}: unknown encoding {encoding_name(spec.encoding)}")
        if layout is not None:
            raise ManifestError(f"tensor {name!r}: a dense encoding takes no {layout} layout")
        wire = _wire_dtype(dtype, spec.encoding)
        needed = numel * wire.itemsize
    if spec.byte_length != needed:
        raise ManifestError(
            f"tensor {name!r}: {spec.byte_length} bytes declared, but shape {list(spec.shape)} "
            f"at {encoding_name(spec.encoding)} needs {needed}"
        )
    return dtype, wire, needed


def check_manifest(manifest: pb.Manifest) -> None:
    """Self-consistency of a manifest: unique names, dense specs with correct lengths summing to the total."""
    seen: set[str] = set()
    total = 0
    for spec in manifest.tensors:
        if spec.name in seen:
            raise ManifestError(f"tensor {spec.name!r} appears twice")
        seen.add(spec.name)
        total += _expected_bytes(spec)[2]
    if total != manifest.total_bytes:
        raise ManifestError(f"tensors need {total} bytes but the manifest declares {manifest.total_bytes}")
    if len(manifest.sha256) != hashlib.sha256().digest_size:
        raise ManifestError(f"the manifest's sha256 has {len(manifest.sha256)} bytes, not 32")


def decode(manifest: pb.Manifest, payload: bytes | bytearray) -> dict[str, torch.Tensor]:
    """The tensors of a payload, checked against its manifest; each is cast to its declared dtype."""
    check_manifest(manifest)
    if len(payload) != manifest.total_bytes:
        raise ChunkError(f"payload has {len(payload)} bytes, the manifest declares {manifest.total_bytes}")
    buffer = payload if isinstance(payload, bytearray) else bytearray(payload)
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for spec in manifest.tensors:
        dtype, wire, nbytes = _expected_bytes(spec)
        if spec.encoding == pb.ENCODING_SPARSE:
            out[spec.name] = _decode_sparse(spec, dtype, wire, buffer[offset : offset + nbytes])
        else:
            count = nbytes // wire.itemsize
            values = torch.frombuffer(buffer, dtype=wire, count=count, offset=offset) if count else torch.empty(0)
            out[spec.name] = values.reshape(tuple(spec.shape)).to(dtype)
        offset += nbytes
    return out


def _decode_sparse(spec: pb.TensorSpec, dtype: torch.dtype, wire: torch.dtype, raw: bytearray) -> torch.Tensor:
    """A sparse tensor from its bitmap and values; the bitmap must mark exactly ``nnz`` elements."""
    numel = math.prod(spec.shape)
    mask_bytes = (numel + 7) // 8
    data = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    try:
        mask = unpack_mask(data[:mask_bytes], numel)
    except ValueError as error:
        raise ManifestError(f"tensor {spec.name!r}: {error}") from None
    marked = int(mask.sum())
    if marked != spec.sparse.nnz:
        raise ManifestError(f"tensor {spec.name!r}: the bitmap marks {marked} values, the layout {spec.sparse.nnz}")
    out = torch.zeros(numel, dtype=dtype)
    out[mask] = data[mask_bytes:].clone().view(wire).to(dtype)
    return out.reshape(tuple(spec.shape))


def check_finite(weights: Weights) -> None:
    """Raise :class:`NonFiniteError` naming the first floating-point tensor with a NaN or Inf."""
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteError(f"tensor {name!r} holds NaN or Inf")


class PayloadAssembler:
    """Collects the chunks of one payload, checking order, size and checksum as they arrive.

    Args:
        manifest: what the sender declared; checked for consistency first.
        max_bytes: the largest payload accepted; a larger declaration, or a stream that goes past the declared
            length, raises :class:`PayloadTooLarge` at the first chunk that crosses it.
    """

    def __init__(self, manifest: pb.Manifest, max_bytes: int) -> None:
        if manifest.total_bytes > max_bytes:
            raise PayloadTooLarge(f"payload of {manifest.total_bytes} bytes exceeds the cap of {max_bytes} bytes")
        check_manifest(manifest)
        self.manifest = manifest
        self._buffer = bytearray(manifest.total_bytes)
        self._received = 0

    @property
    def received(self) -> int:
        """Bytes received so far."""
        return self._received

    def add(self, chunk: pb.Chunk) -> None:
        """Append one chunk; it must start where the previous one ended."""
        if chunk.offset != self._received:
            raise ChunkError(f"chunk at offset {chunk.offset}, expected offset {self._received} (missing or reordered)")
        end = self._received + len(chunk.data)
        if end > len(self._buffer):
            raise PayloadTooLarge(f"stream passed its declared {len(self._buffer)} bytes (at {end} bytes)")
        self._buffer[self._received : end] = chunk.data
        self._received = end

    def finish(self) -> bytearray:
        """The whole payload, once every byte arrived and the SHA-256 matches."""
        if self._received != len(self._buffer):
            raise ChunkError(f"stream ended after {self._received} of {len(self._buffer)} bytes")
        if hashlib.sha256(self._buffer).digest() != self.manifest.sha256:  # releases the GIL: run it off the loop
            raise ChunkError("payload SHA-256 differs from the manifest's (corrupted chunk)")
        return self._buffer
