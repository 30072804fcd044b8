"""Weights <-> bytes, for the wire and for checkpoints.

Format: an 8-byte little-endian header length, a UTF-8 JSON header listing every tensor (name, shape, dtype of the
model, encoding on the wire, byte length), then the tensors' raw bytes in header order. No pickle anywhere: decoding
untrusted bytes can only produce tensors or a :class:`CodecError`.

Encodings of floating-point tensors: ``fp32``, ``fp16``, ``bf16`` (cast), and the packed integer encodings
``int2``, ``int4``, ``int6``, ``int8``, ``int12``, ``int16`` (:mod:`fedhet.quant`: symmetric per-output-channel
quantization). A packed tensor's bytes are its ``C`` fp32 scales (``C`` = dim 0 for 2 or more dims, else 1) followed
by ``ceil(numel * b / 8)`` bytes of ``b``-bit values. Integer and bool tensors always travel exactly.

Pruned tensors (the names in ``sparse``) travel as ``sparse-<float encoding>``: a bitmask of the nonzero positions
(``ceil(numel / 8)`` bytes, little-endian bit order, padding bits zero) followed by the nonzero values in order at
the payload's float encoding. At FedP3's default keep ratio of 0.9 an fp32 tensor takes 3.73 bytes per value
instead of 4. In a packed payload (``int<b>``) pruned tensors are packed like the others, which is smaller.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedhet import quant
from fedhet.types import Weights

__all__ = [
    "ALL_ENCODINGS",
    "ENCODINGS",
    "PACKED_ENCODINGS",
    "SPARSE_ENCODINGS",
    "CodecError",
    "decode",
    "encode",
    "encoded_size",
    "encoding_for_bitwidth",
    "pack_mask",
    "unpack_mask",
]

_LEN = struct.Struct("<Q")
_MAX_HEADER_BYTES = 16 * 1024 * 1024

#: wire encodings of floating-point tensors and the torch dtype each stores values as
ENCODINGS: Mapping[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: packed integer encodings of floating-point tensors and their bits per value
PACKED_ENCODINGS: Mapping[str, int] = {f"int{b}": b for b in quant.BITWIDTHS}
#: every encoding :func:`encode` accepts
ALL_ENCODINGS: tuple[str, ...] = (*ENCODINGS, *PACKED_ENCODINGS)
#: per-tensor encodings of pruned tensors: a bitmask, then the nonzero values at a float encoding
SPARSE_ENCODINGS: Mapping[str, str] = {f"sparse-{e}": e for e in ENCODINGS}
_DTYPES: Mapping[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


class CodecError(ValueError):
    """Bytes that do not decode to weights; the message says what is wrong."""


@dataclass(frozen=True)
class _Entry:
    name: str
    shape: tuple[int, ...]
    dtype: str
    encoding: str
    nbytes: int


def encoding_for_bitwidth(bitwidth: int, full_precision: str = "fp32") -> str:
    """The encoding a client of ``bitwidth`` bits sends and receives: ``int<b>`` for a packed bitwidth,
    ``full_precision`` (the run's float encoding) for 32."""
    if bitwidth == quant.FULL_PRECISION:
        return full_precision
    if bitwidth not in quant.BITWIDTHS:
        raise CodecError(f"no encoding for bitwidth {bitwidth}; packed bitwidths are {list(quant.BITWIDTHS)} and 32")
    return f"int{bitwidth}"


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype, encoding: str) -> int:
    """Bytes of one tensor on the wire."""
    numel = math.prod(shape)
    if not dtype.is_floating_point:
        return numel * torch.empty((), dtype=dtype).element_size()
    bits = PACKED_ENCODINGS.get(encoding)
    if bits is not None:
        return 4 * quant.num_channels(shape) + quant.packed_nbytes(numel, bits)
    return numel * torch.empty((), dtype=ENCODINGS[encoding]).element_size()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _wire_dtype(tensor: torch.Tensor, encoding: str) -> torch.dtype:
    """Floating-point tensors travel at a float ``encoding``; integer and bool tensors travel exactly."""
    return ENCODINGS[encoding] if tensor.is_floating_point() else tensor.dtype


def _header(weights: Weights, encoding: str, sparse: frozenset[str] = frozenset()) -> list[_Entry]:
    if encoding not in ALL_ENCODINGS:
        raise CodecError(f"unknown encoding {encoding!r}; choose one of {sorted(ALL_ENCODINGS)}")
    unknown = sparse - set(weights)
    if unknown:
        raise CodecError(f"sparse names tensors the payload does not hold: {sorted(unknown)}")
    entries = []
    for name, tensor in weights.items():
        shape = tuple(tensor.shape)
        if name in sparse and tensor.is_floating_point() and encoding in ENCODINGS:
            enc = f"sparse-{encoding}"
            nnz = int(torch.count_nonzero(tensor))
            nbytes = _mask_nbytes(tensor.numel()) + nnz * ENCODINGS[SPARSE_ENCODINGS[enc]].itemsize
            entries.append(_Entry(name, shape, _dtype_name(tensor.dtype), enc, nbytes))
        else:
            entries.append(
                _Entry(name, shape, _dtype_name(tensor.dtype), encoding, _nbytes(shape, tensor.dtype, encoding))
            )
    return entries


def _mask_nbytes(numel: int) -> int:
    return (numel + 7) // 8


def _header_bytes(entries: list[_Entry]) -> bytes:
    rows = [[e.name, list(e.shape), e.dtype, e.encoding, e.nbytes] for e in entries]
    return json.dumps(rows, separators=(",", ":")).encode()


def encoded_size(weights: Weights, encoding: str = "fp32", sparse: frozenset[str] = frozenset()) -> int:
    """Bytes that ``encode(weights, encoding, sparse)`` produces, without encoding anything."""
    entries = _header(weights, encoding, sparse)
    return _LEN.size + len(_header_bytes(entries)) + sum(e.nbytes for e in entries)


def _raw(tensor: torch.Tensor) -> bytes:
    return tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


_BIT_WEIGHTS = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool vector as ``ceil(numel / 8)`` bytes, bit ``i`` of byte ``j`` holding element ``8 j + i``; padding
    bits are zero (the sparse encoding's mask, here and on the gRPC wire)."""
    padded = torch.zeros(_mask_nbytes(mask.numel()) * 8, dtype=torch.uint8)
    padded[: mask.numel()] = mask.to(torch.uint8)
    return (padded.view(-1, 8) * _BIT_WEIGHTS).sum(1, dtype=torch.uint8)


def encode(weights: Weights, encoding: str = "fp32", sparse: frozenset[str] = frozenset()) -> bytes:
    """Serialise ``weights``; floating-point tensors are cast to ``encoding`` (fp32, fp16, bf16) or quantized and
    packed (int2 ... int16), and the tensors named in ``sparse`` travel as a bitmask and their nonzero values.
    Raises :class:`CodecError` for an unknown encoding or, when packing, inf/NaN values."""
    entries = _header(weights, encoding, sparse)
    header = _header_bytes(entries)
    parts = [_LEN.pack(len(header)), header]
    bits = PACKED_ENCODINGS.get(encoding)
    for entry, tensor in zip(entries, weights.values(), strict=True):
        if entry.encoding in SPARSE_ENCODINGS:
            flat = tensor.detach().to("cpu").reshape(-1)
            mask = flat != 0
            parts += [_raw(pack_mask(mask)), _raw(flat[mask].to(ENCODINGS[SPARSE_ENCODINGS[entry.encoding]]))]
        elif bits is not None and tensor.is_floating_point():
            try:
                packed = quant.pack_tensor(tensor, bits)
            except quant.QuantError as error:
                raise CodecError(f"tensor {entry.name!r}: {error}") from None
            parts += [_raw(packed.scales), _raw(packed.data)]
        else:
            parts.append(_raw(tensor.to(_wire_dtype(tensor, encoding))))
    return b"".join(parts)


def _parse_header(data: bytes) -> tuple[list[_Entry], int]:
    if len(data) < _LEN.size:
        raise CodecError(f"payload of {len(data)} bytes is shorter than its {_LEN.size}-byte length prefix")
    (length,) = _LEN.unpack_from(data)
    if length > min(_MAX_HEADER_BYTES, len(data) - _LEN.size):
        raise CodecError(f"header length {length} exceeds the payload ({len(data)} bytes)")
    try:
        rows = json.loads(data[_LEN.size : _LEN.size + length])
        entries = [_Entry(str(n), tuple(int(d) for d in s), str(dt), str(enc), int(nb)) for n, s, dt, enc, nb in rows]
    except (ValueError, TypeError) as error:
        raise CodecError(f"malformed header: {error}") from None
    return entries, _LEN.size + length


def _unpack(entry: _Entry, raw: torch.Tensor, bits: int) -> torch.Tensor:
    """fp32 values of a packed tensor: scales, then packed values; any invalid scale or byte is a CodecError."""
    channels = quant.num_channels(entry.shape)
    scales = raw[: 4 * channels].view(torch.float32)
    packed = quant.PackedTensor(bits, entry.shape, scales, raw[4 * channels :])
    try:
        return quant.unpack_tensor(packed)
    except quant.QuantError as error:
        raise CodecError(f"tensor {entry.name!r} ({entry.encoding}): {error}") from None


def decode(data: bytes) -> dict[str, torch.Tensor]:
    """Parse bytes from :func:`encode` back into tensors of their original dtypes; validates every length."""
    entries, offset = _parse_header(data)
    out: dict[str, torch.Tensor] = {}
    for entry in entries:
        if entry.name in out:
            raise CodecError(f"tensor {entry.name!r} appears twice")
        if entry.dtype not in _DTYPES or entry.encoding not in (*ALL_ENCODINGS, *SPARSE_ENCODINGS):
            raise CodecError(f"tensor {entry.name!r}: unsupported dtype {entry.dtype} / encoding {entry.encoding}")
        if any(not 0 <= d < 2**62 for d in entry.shape) or math.prod(entry.shape) >= 2**62:
            raise CodecError(f"tensor {entry.name!r}: shape {entry.shape} is negative or too large")
        dtype = _DTYPES[entry.dtype]
        if entry.encoding in SPARSE_ENCODINGS:
            out[entry.name] = _decode_sparse(entry, dtype, data, offset)
            offset += entry.nbytes
            continue
        expected = _nbytes(entry.shape, dtype, entry.encoding)
        if entry.nbytes != expected or offset + expected > len(data):
            raise CodecError(f"tensor {entry.name!r}: {entry.nbytes} bytes declared, shape needs {expected}")
        chunk = bytearray(data[offset : offset + expected])
        raw = torch.frombuffer(chunk, dtype=torch.uint8) if expected else torch.empty(0, dtype=torch.uint8)
        bits = PACKED_ENCODINGS.get(entry.encoding)
        if bits is not None and dtype.is_floating_point:
            out[entry.name] = _unpack(entry, raw, bits).to(dtype)
        else:
            wire = ENCODINGS[entry.encoding] if dtype.is_floating_point else dtype
            out[entry.name] = raw.view(wire).reshape(entry.shape).to(dtype)
        offset += expected
    if offset != len(data):
        raise CodecError(f"{len(data) - offset} trailing bytes after the last tensor")
    return out


def unpack_mask(data: torch.Tensor, numel: int) -> torch.Tensor:
    """The bool vector of :func:`pack_mask`'s ``ceil(numel / 8)`` bytes; raises ValueError for a wrong length or a
    padding bit that is set."""
    if data.numel() != _mask_nbytes(numel):
        raise ValueError(f"a mask of {numel} values takes {_mask_nbytes(numel)} bytes, got {data.numel()}")
    bits = (data.reshape(-1, 1) & _BIT_WEIGHTS).ne(0).reshape(-1)
    if bits[numel:].any():
        raise ValueError(f"mask padding bits past element {numel} are set")
    return bits[:numel]


def _decode_sparse(entry: _Entry, dtype: torch.dtype, data: bytes, offset: int) -> torch.Tensor:
    """A pruned tensor from its bitmask and nonzero values; any inconsistency is a CodecError."""
    if not dtype.is_floating_point:
        raise CodecError(f"tensor {entry.name!r}: {entry.encoding} is for floating-point tensors, not {entry.dtype}")
    numel = math.prod(entry.shape)
    mask_bytes = _mask_nbytes(numel)
    if entry.nbytes < mask_bytes or offset + entry.nbytes > len(data):
        raise CodecError(f"tensor {entry.name!r}: {entry.nbytes} bytes declared, the payload holds fewer")
    chunk = bytearray(data[offset : offset + entry.nbytes])
    raw = torch.frombuffer(chunk, dtype=torch.uint8) if chunk else torch.empty(0, dtype=torch.uint8)
    try:
        mask = unpack_mask(raw[:mask_bytes], numel)
    except ValueError as error:
        raise CodecError(f"tensor {entry.name!r}: {error}") from None
    wire = ENCODINGS[SPARSE_ENCODINGS[entry.encoding]]
    nnz = int(mask.sum())
    if entry.nbytes != mask_bytes + nnz * wire.itemsize:
        raise CodecError(
            f"tensor {entry.name!r}: mask marks {nnz} values, {entry.nbytes - mask_bytes} value bytes declared"
        )
    out = torch.zeros(numel, dtype=dtype)
    out[mask] = raw[mask_bytes:].clone().view(wire).to(dtype)  # clone: values start at any byte offset
    return out.reshape(entry.shape)
