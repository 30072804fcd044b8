"""Weights <-> bytes, for the wire and for checkpoints.

Format: an 8-byte little-endian header length, a UTF-8 JSON header listing every tensor (name, shape, dtype of the
model, encoding on the wire, byte length), then the tensors' raw bytes in header order. No pickle anywhere: decoding
untrusted bytes can only produce tensors or a :class:`CodecError`.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedhet.types import Weights

__all__ = ["ENCODINGS", "CodecError", "decode", "encode", "encoded_size"]

_LEN = struct.Struct("<Q")
_MAX_HEADER_BYTES = 16 * 1024 * 1024

#: wire encodings of floating-point tensors and the torch dtype each stores values as
ENCODINGS: Mapping[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _wire_dtype(tensor: torch.Tensor, encoding: str) -> torch.dtype:
    """Floating-point tensors travel at ``encoding``; integer and bool tensors travel exactly."""
    return ENCODINGS[encoding] if tensor.is_floating_point() else tensor.dtype


def _header(weights: Weights, encoding: str) -> list[_Entry]:
    if encoding not in ENCODINGS:
        raise CodecError(f"unknown encoding {encoding!r}; choose one of {sorted(ENCODINGS)}")
    entries = []
    for name, tensor in weights.items():
        wire = _wire_dtype(tensor, encoding)
        nbytes = tensor.numel() * torch.empty((), dtype=wire).element_size()
        entries.append(_Entry(name, tuple(tensor.shape), _dtype_name(tensor.dtype), encoding, nbytes))
    return entries


def _header_bytes(entries: list[_Entry]) -> bytes:
    rows = [[e.name, list(e.shape), e.dtype, e.encoding, e.nbytes] for e in entries]
    return json.dumps(rows, separators=(",", ":")).encode()


def encoded_size(weights: Weights, encoding: str = "fp32") -> int:
    """Bytes that ``encode(weights, encoding)`` produces, without encoding anything."""
    entries = _header(weights, encoding)
    return _LEN.size + len(_header_bytes(entries)) + sum(e.nbytes for e in entries)


def encode(weights: Weights, encoding: str = "fp32") -> bytes:
    """Serialise ``weights``; floating-point tensors are cast to ``encoding`` (fp32, fp16 or bf16)."""
    header = _header_bytes(_header(weights, encoding))
    parts = [_LEN.pack(len(header)), header]
    for tensor in weights.values():
        wire = tensor.detach().to("cpu", _wire_dtype(tensor, encoding)).contiguous()
        parts.append(wire.reshape(-1).view(torch.uint8).numpy().tobytes())
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


def decode(data: bytes) -> dict[str, torch.Tensor]:
    """Parse bytes from :func:`encode` back into tensors of their original dtypes; validates every length."""
    entries, offset = _parse_header(data)
    out: dict[str, torch.Tensor] = {}
    for entry in entries:
        if entry.name in out:
            raise CodecError(f"tensor {entry.name!r} appears twice")
        if entry.dtype not in _DTYPES or entry.encoding not in ENCODINGS:
            raise CodecError(f"tensor {entry.name!r}: unsupported dtype {entry.dtype} / encoding {entry.encoding}")
        if any(d < 0 for d in entry.shape):
            raise CodecError(f"tensor {entry.name!r}: negative dimension in shape {entry.shape}")
        dtype = _DTYPES[entry.dtype]
        wire = ENCODINGS[entry.encoding] if dtype.is_floating_point else dtype
        expected = math.prod(entry.shape) * torch.empty((), dtype=wire).element_size()
        if entry.nbytes != expected or offset + expected > len(data):
            raise CodecError(f"tensor {entry.name!r}: {entry.nbytes} bytes declared, shape needs {expected}")
        raw = torch.frombuffer(bytearray(data[offset : offset + expected]), dtype=torch.uint8) if expected else None
        values = raw.view(wire) if raw is not None else torch.empty(0, dtype=wire)
        out[entry.name] = values.reshape(entry.shape).to(dtype)
        offset += expected
    if offset != len(data):
        raise CodecError(f"{len(data) - offset} trailing bytes after the last tensor")
    return out
