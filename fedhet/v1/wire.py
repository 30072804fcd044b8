"""Weights <-> (manifest, payload bytes) <-> chunks, for both ends of the wire.

A payload is the concatenation of each tensor's bytes in manifest order; the manifest (``fedhet.v1.Manifest``)
names every tensor with its shape, dtype, encoding (and its packed or sparse layout) and byte length, and carries the
payload's total length and SHA-256. A tensor's bytes are those of :mod:`fedhet.codec`'s tensor layouts (raw, dense
float, packed ``int<b>`` as ``ENCODING_PACKED_INT`` with fp32 per-output-channel scales, sparse bitmap); this module
maps them to and from manifest entries. Decoding never trusts the sender: every length, dtype, layout and byte is
checked and every failure is a :class:`PayloadError` subclass that says what was wrong and names the tensor. Nothing
here unpickles anything.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping
from typing import cast

import torch

from fedhet import quant
from fedhet.codec import (
    DTYPES,
    ENCODINGS,
    RAW,
    SPARSE_ENCODINGS,
    CodecError,
    TensorFormat,
    decode_tensor,
    encode_tensor,
    tensor_format,
)
from fedhet.types import Weights
from fedhet.updates import UpdateError
from fedhet.v1 import tensor_pb2 as pb

__all__ = [
    "DENSE_ENCODINGS",
    "DTYPE_CODES",
    "ChunkError",
    "ManifestError",
    "PayloadAssembler",
    "PayloadError",
    "PayloadTooLarge",
    "check_manifest",
    "chunks",
    "decode",
    "dtype_name",
    "encode",
    "encoding_name",
]


class PayloadError(UpdateError):
    """A payload or its manifest is unusable; the message says what is wrong (gRPC ``INVALID_ARGUMENT``)."""


class ManifestError(PayloadError):
    """A tensor spec is inconsistent or unreadable (unknown dtype, encoding or layout, a packed layout other than fp32
    per-output-channel scales without zero points, negative dimension, wrong byte length, duplicate), or its bytes
    break their layout (mask or padding bits, scales, packed values)."""


class ChunkError(PayloadError):
    """A chunk is missing, out of order or corrupted (the payload's length or SHA-256 disagrees)."""


class PayloadTooLarge(PayloadError):
    """A payload declares, or a stream delivers, more bytes than allowed (gRPC ``RESOURCE_EXHAUSTED``)."""


#: proto dtype code of every dtype a tensor may have (:data:`fedhet.codec.DTYPES`: the proto names them alike)
DTYPE_CODES: Mapping[torch.dtype, pb.DType] = {
    dtype: cast(pb.DType, pb.DType.Value(f"DTYPE_{name.upper()}")) for name, dtype in DTYPES.items()
}
_DTYPES: Mapping[int, torch.dtype] = {code: dtype for dtype, code in DTYPE_CODES.items()}

#: dense floating-point wire encodings by config name (:data:`fedhet.codec.ENCODINGS`)
DENSE_ENCODINGS: Mapping[str, pb.Encoding] = {
    name: cast(pb.Encoding, pb.Encoding.Value(f"ENCODING_{name.upper()}")) for name in ENCODINGS
}
_FLOAT_NAMES: Mapping[int, str] = {code: name for name, code in DENSE_ENCODINGS.items()}
#: the oneof layout each encoding needs (the others take none)
_LAYOUTS: Mapping[int, str] = {pb.ENCODING_PACKED_INT: "quant", pb.ENCODING_SPARSE: "sparse"}


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


def _group_size(shape: tuple[int, ...]) -> int:
    """A packed tensor's ``QuantLayout.group_size``: values per scale with one scale per output channel, 0 when one
    scale covers the whole tensor."""
    channels = quant.num_channels(shape)
    return math.prod(shape) // channels if channels > 1 else 0


def _spec(fmt: TensorFormat) -> pb.TensorSpec:
    """The manifest entry of a tensor in layout ``fmt``."""
    spec = pb.TensorSpec(name=fmt.name, shape=list(fmt.shape), dtype=DTYPE_CODES[fmt.dtype], byte_length=fmt.nbytes)
    if fmt.encoding == RAW:
        spec.encoding = pb.ENCODING_RAW
    elif fmt.encoding in SPARSE_ENCODINGS:
        spec.encoding = pb.ENCODING_SPARSE
        value_encoding = DENSE_ENCODINGS[SPARSE_ENCODINGS[fmt.encoding]]
        spec.sparse.CopyFrom(pb.SparseLayout(nnz=fmt.nnz, bitmap=True, value_encoding=value_encoding))
    elif fmt.bits:
        spec.encoding = pb.ENCODING_PACKED_INT
        spec.quant.CopyFrom(
            pb.QuantLayout(
                bits=fmt.bits, group_size=_group_size(fmt.shape), scale_encoding=pb.ENCODING_FP32, has_zero_point=False
            )
        )
    else:
        spec.encoding = DENSE_ENCODINGS[fmt.encoding]
    return spec


def encode(
    weights: Weights,
    encoding: str = "fp32",
    sparse: frozenset[str] = frozenset(),
    sparse_bits: int = quant.FULL_PRECISION,
) -> tuple[pb.Manifest, bytes]:
    """The manifest and payload of ``weights``: floating-point tensors travel at ``encoding`` (fp32, fp16, bf16
    cast; int2 ... int16 packed as ``ENCODING_PACKED_INT``), others exactly (``ENCODING_RAW``); at a float encoding
    the floating-point tensors named in ``sparse`` (pruned) travel as ``ENCODING_SPARSE``: a bitmap of their nonzero
    positions, then those values (with ``sparse_bits`` below 32: ``ENCODING_PACKED_INT`` at that many bits).
    Raises :class:`ManifestError` for an unknown encoding or dtype, or inf/NaN values to pack."""
    manifest = pb.Manifest()
    parts: list[bytes] = []
    try:
        for name, tensor in weights.items():
            fmt = tensor_format(name, tensor, encoding, name in sparse, sparse_bits)
            parts.append(encode_tensor(fmt, tensor))
            manifest.tensors.append(_spec(fmt))
    except CodecError as error:
        raise ManifestError(str(error)) from None
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


def _packed_encoding(spec: pb.TensorSpec) -> str:
    """The codec's ``int<b>`` of a packed spec whose QuantLayout this peer reads: fp32 scales, one per output
    channel, no zero point, ``b`` in :data:`fedhet.quant.BITWIDTHS`."""
    layout = spec.quant
    if layout.bits not in quant.BITWIDTHS:
        raise ManifestError(
            f"tensor {spec.name!r}: cannot read {layout.bits}-bit packed values; bits must be one of "
            f"{', '.join(map(str, quant.BITWIDTHS))}"
        )
    if layout.has_zero_point:
        raise ManifestError(f"tensor {spec.name!r}: packed values with zero points cannot be read (symmetric only)")
    if layout.scale_encoding != pb.ENCODING_FP32:
        raise ManifestError(
            f"tensor {spec.name!r}: packed scales must be ENCODING_FP32, not {encoding_name(layout.scale_encoding)}"
        )
    return f"int{layout.bits}"


def _format(spec: pb.TensorSpec) -> TensorFormat:
    """The layout a spec declares, when this peer can read it and its byte length is right; else ManifestError
    naming the tensor."""
    name = spec.name
    if spec.dtype not in _DTYPES:
        raise ManifestError(f"tensor {name!r}: unknown dtype {dtype_name(spec.dtype)}")
    layout = spec.WhichOneof("layout")
    needed = _LAYOUTS.get(spec.encoding)
    if layout != needed:
        raise ManifestError(
            f"tensor {name!r}: encoding {encoding_name(spec.encoding)} takes "
            + (f"a {needed} layout" if needed else "no layout")
            + (f", not a {layout} layout" if layout else "")
        )
    nnz = 0
    if spec.encoding == pb.ENCODING_RAW:
        encoding = RAW
    elif spec.encoding in _FLOAT_NAMES:
        encoding = _FLOAT_NAMES[spec.encoding]
    elif spec.encoding == pb.ENCODING_PACKED_INT:
        encoding = _packed_encoding(spec)
    elif spec.encoding == pb.ENCODING_SPARSE:
        sparse = spec.sparse
        if not sparse.bitmap or sparse.value_encoding not in _FLOAT_NAMES:
            raise ManifestError(
                f"tensor {name!r}: a sparse tensor needs a bitmap sparse layout (no index lists) with fp32, fp16 or "
                "bf16 values"
            )
        encoding, nnz = f"sparse-{_FLOAT_NAMES[sparse.value_encoding]}", sparse.nnz
    else:
        raise ManifestError(f"tensor {name!r}: unknown encoding {encoding_name(spec.encoding)}")
    try:
        fmt = TensorFormat(name, tuple(spec.shape), _DTYPES[spec.dtype], encoding, nnz)
    except CodecError as error:
        raise ManifestError(str(error)) from None
    if fmt.bits and spec.quant.group_size != _group_size(fmt.shape):
        raise ManifestError(
            f"tensor {name!r}: group_size {spec.quant.group_size} is not one scale per output channel of shape "
            f"{list(fmt.shape)} (group_size {_group_size(fmt.shape)})"
        )
    if spec.byte_length != fmt.nbytes:
        raise ManifestError(
            f"tensor {name!r}: {spec.byte_length} bytes declared, but shape {list(spec.shape)} "
            f"at {encoding_name(spec.encoding)} needs {fmt.nbytes}"
        )
    return fmt


def _formats(manifest: pb.Manifest) -> list[TensorFormat]:
    """Every tensor's layout, checked: unique names, readable layouts, byte lengths summing to the total."""
    seen: set[str] = set()
    formats = []
    for spec in manifest.tensors:
        if spec.name in seen:
            raise ManifestError(f"tensor {spec.name!r} appears twice")
        seen.add(spec.name)
        formats.append(_format(spec))
    total = sum(f.nbytes for f in formats)
    if total != manifest.total_bytes:
        raise ManifestError(f"tensors need {total} bytes but the manifest declares {manifest.total_bytes}")
    if len(manifest.sha256) != hashlib.sha256().digest_size:
        raise ManifestError(f"the manifest's sha256 has {len(manifest.sha256)} bytes, not 32")
    return formats


def check_manifest(manifest: pb.Manifest) -> None:
    """Self-consistency of a manifest: unique names, layouts this peer reads, byte lengths that fit the shapes and
    sum to the total, a 32-byte checksum."""
    _formats(manifest)


def decode(manifest: pb.Manifest, payload: bytes | bytearray) -> dict[str, torch.Tensor]:
    """The tensors of a payload, checked against its manifest (:func:`fedhet.codec.decode_tensor` checks every
    byte); each comes back as its declared dtype (packed tensors dequantized)."""
    formats = _formats(manifest)
    if len(payload) != manifest.total_bytes:
        raise ChunkError(f"payload has {len(payload)} bytes, the manifest declares {manifest.total_bytes}")
    buffer = payload if isinstance(payload, bytearray) else bytearray(payload)
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for fmt in formats:
        try:
            out[fmt.name] = decode_tensor(fmt, buffer, offset)
        except CodecError as error:
            raise ManifestError(str(error)) from None
        offset += fmt.nbytes
    return out


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
        self._pieces: list[bytes] = []
        self._received = 0

    @property
    def received(self) -> int:
        """Bytes received so far."""
        return self._received

    def add(self, chunk: pb.Chunk) -> None:
        """Append one chunk; it must start where the previous one ended. Its bytes are kept as they came (no copy:
        a server's event loop calls this), joined by :meth:`finish`."""
        if chunk.offset != self._received:
            raise ChunkError(f"chunk at offset {chunk.offset}, expected offset {self._received} (missing or reordered)")
        data = chunk.data
        end = self._received + len(data)
        if end > self.manifest.total_bytes:
            raise PayloadTooLarge(f"stream passed its declared {self.manifest.total_bytes} bytes (at {end} bytes)")
        self._pieces.append(data)
        self._received = end

    def finish(self) -> bytearray:
        """The whole payload, once every byte arrived and the SHA-256 matches (the hashing and the one copy that
        joins the chunks release, or hold briefly, the GIL: a server runs this in a worker thread)."""
        if self._received != self.manifest.total_bytes:
            raise ChunkError(f"stream ended after {self._received} of {self.manifest.total_bytes} bytes")
        digest = hashlib.sha256()
        buffer = bytearray(self._received)
        offset = 0
        for piece in self._pieces:
            digest.update(piece)
            buffer[offset : offset + len(piece)] = piece
            offset += len(piece)
        self._pieces = []
        if digest.digest() != self.manifest.sha256:
            raise ChunkError("payload SHA-256 differs from the manifest's (corrupted chunk)")
        return buffer
