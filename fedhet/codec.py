"""Weights <-> bytes: the one tensor codec (per-tensor byte layouts), and the file format built on it.

**Tensor layouts.** A :class:`TensorFormat` names one tensor (name, shape, decoded dtype) and how its bytes are laid
out; :func:`encode_tensor` writes them and :func:`decode_tensor` reads them back, checking everything. The file format
below, the gRPC wire (:mod:`fedhet.v1.wire`, whose protobuf manifest names the same layouts) and the simulator's
payload sizes all go through these functions. Encodings:

- ``raw``: the dtype's own little-endian bytes; integer and bool tensors always travel this way, exactly.
- ``fp32``, ``fp16``, ``bf16`` (:data:`ENCODINGS`): floating-point values cast to that width.
- ``int2``, ``int4``, ``int6``, ``int8``, ``int12``, ``int16`` (:data:`PACKED_ENCODINGS`, :mod:`fedhet.quant`:
  symmetric per-output-channel quantization): the ``C`` fp32 scales (``C`` = dim 0 for 2 or more dims, else 1), then
  ``ceil(numel * b / 8)`` bytes of ``b``-bit values.
- ``sparse-<float encoding>`` (:data:`SPARSE_ENCODINGS`, pruned tensors): a bitmask of the nonzero positions
  (``ceil(numel / 8)`` bytes, little-endian bit order, padding bits zero) followed by the ``nnz`` nonzero values in
  order at the float encoding. At FedP3's default keep ratio of 0.9 an fp32 tensor takes 3.73 bytes per value
  instead of 4. In a packed payload (``int<b>``) pruned tensors are packed like the others, which is smaller. A
  float payload may send its pruned tensors packed instead (``sparse_bits`` below 32: FedP3's frozen layers at
  int8, 1 byte per value, zeros included).

**File format.** An 8-byte little-endian header length, a UTF-8 JSON header listing every tensor (name, shape, dtype
of the model, encoding, byte length; an integer tensor lists the payload's encoding and travels raw), then the
tensors' bytes in header order. No pickle anywhere: decoding untrusted bytes can only produce tensors or a
:class:`CodecError`.
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
    "DTYPES",
    "ENCODINGS",
    "PACKED_ENCODINGS",
    "RAW",
    "SPARSE_ENCODINGS",
    "CodecError",
    "TensorFormat",
    "decode",
    "decode_tensor",
    "encode",
    "encode_tensor",
    "encoded_size",
    "encoding_for_bitwidth",
    "pack_mask",
    "tensor_format",
    "unpack_mask",
]

_LEN = struct.Struct("<Q")
_MAX_HEADER_BYTES = 16 * 1024 * 1024
_MAX_NUMEL = 2**62

#: the encoding of a tensor stored as its own dtype's bytes (integer and bool tensors)
RAW = "raw"
#: wire encodings of floating-point tensors and the torch dtype each stores values as
ENCODINGS: Mapping[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: packed integer encodings of floating-point tensors and their bits per value
PACKED_ENCODINGS: Mapping[str, int] = {f"int{b}": b for b in quant.BITWIDTHS}
#: every encoding :func:`encode` accepts for a payload
ALL_ENCODINGS: tuple[str, ...] = (*ENCODINGS, *PACKED_ENCODINGS)
#: per-tensor encodings of pruned tensors: a bitmask, then the nonzero values at a float encoding
SPARSE_ENCODINGS: Mapping[str, str] = {f"sparse-{e}": e for e in ENCODINGS}
#: every dtype a tensor may have, by name (the names are torch's)
DTYPES: Mapping[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float64,
        torch.int64,
        torch.int32,
        torch.uint8,
        torch.bool,
    )
}


class CodecError(ValueError):
    """Bytes that do not decode to weights; the message says what is wrong and names the tensor."""


def encoding_for_bitwidth(bitwidth: int, full_precision: str = "fp32") -> str:
    """The encoding a client of ``bitwidth`` bits sends and receives: ``int<b>`` for a packed bitwidth,
    ``full_precision`` (the run's float encoding) for 32."""
    if bitwidth == quant.FULL_PRECISION:
        return full_precision
    if bitwidth not in quant.BITWIDTHS:
        raise CodecError(f"no encoding for bitwidth {bitwidth}; packed bitwidths are {list(quant.BITWIDTHS)} and 32")
    return f"int{bitwidth}"


# ---------------------------------------------------------------------------------------------- tensor layouts


def _mask_nbytes(numel: int) -> int:
    return (numel + 7) // 8


@dataclass(frozen=True)
class TensorFormat:
    """One tensor's layout; constructing it checks that the encoding fits the dtype and shape (:class:`CodecError`
    naming the tensor otherwise), so every format that exists can be read.

    Attributes:
        name: the tensor's state-dict key.
        shape: its dimensions once decoded.
        dtype: its dtype once decoded (one of :data:`DTYPES`).
        encoding: :data:`RAW`, a float, packed or sparse encoding (see the module docstring).
        nnz: values a sparse tensor stores (0 for other encodings).
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    encoding: str
    nnz: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES.values():
            raise CodecError(f"tensor {self.name!r}: dtype {self.dtype} cannot travel")
        if any(not 0 <= d < _MAX_NUMEL for d in self.shape) or self.numel >= _MAX_NUMEL:
            raise CodecError(f"tensor {self.name!r}: shape {list(self.shape)} is negative or too large")
        floating = self.encoding in (*ALL_ENCODINGS, *SPARSE_ENCODINGS)
        if self.encoding != RAW and not floating:
            raise CodecError(f"tensor {self.name!r}: unknown encoding {self.encoding!r}")
        if floating and not self.dtype.is_floating_point:
            raise CodecError(
                f"tensor {self.name!r}: {self.encoding} is for floating-point tensors, not {_dtype_name(self.dtype)}"
            )
        if self.encoding in SPARSE_ENCODINGS:
            if not 0 <= self.nnz <= self.numel:
                raise CodecError(f"tensor {self.name!r}: {self.nnz} stored values for {self.numel} elements")
        elif self.nnz:
            raise CodecError(f"tensor {self.name!r}: {self.encoding} stores no value count, got nnz {self.nnz}")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def bits(self) -> int:
        """Bits per value of a packed tensor (0 for other encodings)."""
        return PACKED_ENCODINGS.get(self.encoding, 0)

    @property
    def nbytes(self) -> int:
        """Bytes the tensor's layout takes."""
        if self.encoding == RAW:
            return self.numel * self.dtype.itemsize
        if self.encoding in SPARSE_ENCODINGS:
            return _mask_nbytes(self.numel) + self.nnz * ENCODINGS[SPARSE_ENCODINGS[self.encoding]].itemsize
        if self.bits:
            return 4 * quant.num_channels(self.shape) + quant.packed_nbytes(self.numel, self.bits)
        return self.numel * ENCODINGS[self.encoding].itemsize


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_format(
    name: str, tensor: torch.Tensor, encoding: str, sparse: bool = False, sparse_bits: int = quant.FULL_PRECISION
) -> TensorFormat:
    """The format ``tensor`` takes in a payload at ``encoding`` (a float or packed encoding): integer and bool
    tensors travel raw, and a pruned (``sparse``) floating-point tensor of a float-encoded payload travels sparse,
    or packed at ``sparse_bits`` when that is below 32."""
    if encoding not in ALL_ENCODINGS:
        raise CodecError(f"unknown encoding {encoding!r}; choose one of {sorted(ALL_ENCODINGS)}")
    shape = tuple(tensor.shape)
    if not tensor.is_floating_point():
        return TensorFormat(name, shape, tensor.dtype, RAW)
    if sparse and encoding in ENCODINGS:
        if sparse_bits != quant.FULL_PRECISION:
            return TensorFormat(name, shape, tensor.dtype, f"int{quant.check_bits(sparse_bits)}")
        return TensorFormat(name, shape, tensor.dtype, f"sparse-{encoding}", int(torch.count_nonzero(tensor)))
    return TensorFormat(name, shape, tensor.dtype, encoding)


def _raw(tensor: torch.Tensor) -> bytes:
    return tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


_BIT_WEIGHTS = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool vector as ``ceil(numel / 8)`` bytes, bit ``i`` of byte ``j`` holding element ``8 j + i``; padding
    bits are zero (the sparse encoding's mask)."""
    padded = torch.zeros(_mask_nbytes(mask.numel()) * 8, dtype=torch.uint8)
    padded[: mask.numel()] = mask.to(torch.uint8)
    return (padded.view(-1, 8) * _BIT_WEIGHTS).sum(1, dtype=torch.uint8)


def unpack_mask(data: torch.Tensor, numel: int) -> torch.Tensor:
    """The bool vector of :func:`pack_mask`'s ``ceil(numel / 8)`` bytes; raises ValueError for a wrong length or a
    padding bit that is set."""
    if data.numel() != _mask_nbytes(numel):
        raise ValueError(f"a mask of {numel} values takes {_mask_nbytes(numel)} bytes, got {data.numel()}")
    bits = (data.reshape(-1, 1) & _BIT_WEIGHTS).ne(0).reshape(-1)
    if bits[numel:].any():
        raise ValueError(f"mask padding bits past element {numel} are set")
    return bits[:numel]


def encode_tensor(fmt: TensorFormat, tensor: torch.Tensor) -> bytes:
    """The ``fmt.nbytes`` bytes of ``tensor`` in layout ``fmt`` (from :func:`tensor_format`); raises
    :class:`CodecError` when packing a tensor that holds inf or NaN."""
    if fmt.encoding in SPARSE_ENCODINGS:
        flat = tensor.detach().to("cpu").reshape(-1)
        kept = flat != 0
        values = flat[kept].to(ENCODINGS[SPARSE_ENCODINGS[fmt.encoding]])
        return _raw(pack_mask(kept)) + _raw(values)
    if fmt.bits:
        try:
            packed = quant.pack_tensor(tensor, fmt.bits)
        except quant.QuantError as error:
            raise CodecError(f"tensor {fmt.name!r}: {error}") from None
        return _raw(packed.scales) + _raw(packed.data)
    return _raw(tensor.to(fmt.dtype if fmt.encoding == RAW else ENCODINGS[fmt.encoding]))


def _view(buffer: bytearray, offset: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    """``count`` values of ``dtype`` at byte ``offset`` of ``buffer``, sharing its memory (any alignment)."""
    if count == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype, count=count, offset=offset)


def decode_tensor(fmt: TensorFormat, buffer: bytearray, offset: int = 0) -> torch.Tensor:
    """The tensor stored in layout ``fmt`` at byte ``offset`` of ``buffer``, as ``fmt.dtype``; checks every byte:
    mask padding and count, packed values, scales (finite, > 0) and that dequantized values stay finite. Raises
    :class:`CodecError` naming the tensor. A raw or float tensor of the decoded dtype shares ``buffer``'s memory."""
    if offset < 0 or offset + fmt.nbytes > len(buffer):
        raise CodecError(f"tensor {fmt.name!r}: needs {fmt.nbytes} bytes at offset {offset}, the payload holds fewer")
    numel = fmt.numel
    if fmt.encoding in SPARSE_ENCODINGS:
        return _decode_sparse(fmt, buffer, offset)
    if fmt.bits:
        return _decode_packed(fmt, buffer, offset)
    wire = fmt.dtype if fmt.encoding == RAW else ENCODINGS[fmt.encoding]
    return _view(buffer, offset, numel, wire).reshape(fmt.shape).to(fmt.dtype)


def _decode_sparse(fmt: TensorFormat, buffer: bytearray, offset: int) -> torch.Tensor:
    """A pruned tensor from its bitmask and values; the mask must mark exactly ``fmt.nnz`` elements."""
    numel = fmt.numel
    mask_bytes = _mask_nbytes(numel)
    try:
        mask = unpack_mask(_view(buffer, offset, mask_bytes, torch.uint8), numel)
    except ValueError as error:
        raise CodecError(f"tensor {fmt.name!r}: {error}") from None
    marked = int(mask.sum())
    if marked != fmt.nnz:
        raise CodecError(f"tensor {fmt.name!r}: the mask marks {marked} values, the layout {fmt.nnz}")
    wire = ENCODINGS[SPARSE_ENCODINGS[fmt.encoding]]
    out = torch.zeros(numel, dtype=fmt.dtype)
    out[mask] = _view(buffer, offset + mask_bytes, fmt.nnz, wire).to(fmt.dtype)
    return out.reshape(fmt.shape)


def _decode_packed(fmt: TensorFormat, buffer: bytearray, offset: int) -> torch.Tensor:
    """A packed tensor: per-channel fp32 scales, then packed values; dequantized values must be finite."""
    channels = quant.num_channels(fmt.shape)
    scales = _view(buffer, offset, channels, torch.float32)
    data = _view(buffer, offset + 4 * channels, quant.packed_nbytes(fmt.numel, fmt.bits), torch.uint8)
    try:
        values = quant.unpack_tensor(quant.PackedTensor(fmt.bits, fmt.shape, scales, data)).to(fmt.dtype)
    except quant.QuantError as error:
        raise CodecError(f"tensor {fmt.name!r} ({fmt.encoding}): {error}") from None
    if not bool(torch.isfinite(values).all()):
        raise CodecError(f"tensor {fmt.name!r} ({fmt.encoding}): scales times values overflow {fmt.dtype}")
    return values


# ---------------------------------------------------------------------------------------------- file format


@dataclass(frozen=True)
class _Entry:
    """One row of the file header."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    encoding: str
    nbytes: int


def _formats(weights: Weights, encoding: str, sparse: frozenset[str], sparse_bits: int) -> list[TensorFormat]:
    unknown = sparse - set(weights)
    if unknown:
        raise CodecError(f"sparse names tensors the payload does not hold: {sorted(unknown)}")
    return [tensor_format(name, tensor, encoding, name in sparse, sparse_bits) for name, tensor in weights.items()]


def _header_bytes(formats: list[TensorFormat], encoding: str) -> bytes:
    """The JSON header; a raw (integer) tensor lists the payload's encoding, as files always have."""
    rows = [
        [f.name, list(f.shape), _dtype_name(f.dtype), encoding if f.encoding == RAW else f.encoding, f.nbytes]
        for f in formats
    ]
    return json.dumps(rows, separators=(",", ":")).encode()


def encoded_size(
    weights: Weights,
    encoding: str = "fp32",
    sparse: frozenset[str] = frozenset(),
    sparse_bits: int = quant.FULL_PRECISION,
) -> int:
    """Bytes that ``encode(weights, encoding, sparse, sparse_bits)`` produces, without encoding anything."""
    formats = _formats(weights, encoding, sparse, sparse_bits)
    return _LEN.size + len(_header_bytes(formats, encoding)) + sum(f.nbytes for f in formats)


def encode(
    weights: Weights,
    encoding: str = "fp32",
    sparse: frozenset[str] = frozenset(),
    sparse_bits: int = quant.FULL_PRECISION,
) -> bytes:
    """Serialise ``weights``; floating-point tensors are cast to ``encoding`` (fp32, fp16, bf16) or quantized and
    packed (int2 ... int16), and the tensors named in ``sparse`` travel as a bitmask and their nonzero values (or,
    with ``sparse_bits`` below 32 in a float payload, packed at that many bits). Raises :class:`CodecError` for an
    unknown encoding or, when packing, inf/NaN values."""
    formats = _formats(weights, encoding, sparse, sparse_bits)
    header = _header_bytes(formats, encoding)
    body = [encode_tensor(f, t) for f, t in zip(formats, weights.values(), strict=True)]
    return b"".join([_LEN.pack(len(header)), header, *body])


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


def _format_of(entry: _Entry) -> TensorFormat:
    """The layout a header row declares; a sparse row's value count follows from its byte length."""
    dtype = DTYPES.get(entry.dtype)
    if dtype is None or entry.encoding not in (*ALL_ENCODINGS, *SPARSE_ENCODINGS):
        raise CodecError(f"tensor {entry.name!r}: unsupported dtype {entry.dtype} / encoding {entry.encoding}")
    if entry.encoding not in SPARSE_ENCODINGS:
        return TensorFormat(entry.name, entry.shape, dtype, entry.encoding if dtype.is_floating_point else RAW)
    fmt = TensorFormat(entry.name, entry.shape, dtype, entry.encoding)  # checks the shape before it is multiplied
    value_bytes = entry.nbytes - fmt.nbytes
    itemsize = ENCODINGS[SPARSE_ENCODINGS[entry.encoding]].itemsize
    if value_bytes < 0 or value_bytes % itemsize:
        raise CodecError(f"tensor {entry.name!r}: {entry.nbytes} bytes declared, not a mask and whole values")
    return TensorFormat(entry.name, entry.shape, dtype, entry.encoding, value_bytes // itemsize)


def decode(data: bytes) -> dict[str, torch.Tensor]:
    """Parse bytes from :func:`encode` back into tensors of their original dtypes; validates every length and
    byte (:func:`decode_tensor`)."""
    entries, offset = _parse_header(data)
    buffer = bytearray(data)
    out: dict[str, torch.Tensor] = {}
    for entry in entries:
        if entry.name in out:
            raise CodecError(f"tensor {entry.name!r} appears twice")
        fmt = _format_of(entry)
        if entry.nbytes != fmt.nbytes or offset + fmt.nbytes > len(data):
            raise CodecError(f"tensor {entry.name!r}: {entry.nbytes} bytes declared, shape needs {fmt.nbytes}")
        out[entry.name] = decode_tensor(fmt, buffer, offset)
        offset += fmt.nbytes
    if offset != len(data):
        raise CodecError(f"{len(data) - offset} trailing bytes after the last tensor")
    return out
