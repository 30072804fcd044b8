"""The tensor wire codec and chunk assembly, and a fuzz test of every decoder the server runs on client bytes."""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
import struct

import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fedhet import quant
from fedhet.codec import CodecError
from fedhet.codec import decode as codec_decode
from fedhet.codec import encode as codec_encode
from fedhet.server.validation import check_update_manifest
from fedhet.updates import NonFiniteError, UpdateError, check_finite, meta_of
from fedhet.v1 import service_pb2 as spb
from fedhet.v1 import tensor_pb2 as tpb
from fedhet.v1.wire import (
    ChunkError,
    ManifestError,
    PayloadAssembler,
    PayloadError,
    PayloadTooLarge,
    chunks,
    decode,
    encode,
)

WEIGHTS = {
    "conv.weight": torch.randn(4, 1, 3, 3),
    "fc.bias": torch.randn(7),
    "bn.num_batches_tracked": torch.tensor(12, dtype=torch.int64),
    "scalar": torch.tensor(1.5),
    "empty": torch.zeros(0, 3),
}


def assemble(manifest: tpb.Manifest, payload: bytes, size: int, cap: int = 1 << 30) -> bytearray:
    assembler = PayloadAssembler(manifest, cap)
    for chunk in chunks(payload, size):
        assembler.add(chunk)
    return assembler.finish()


@pytest.mark.parametrize("encoding", ["fp32", "fp16", "bf16"])
def test_round_trip_keeps_names_shapes_dtypes(encoding: str) -> None:
    manifest, payload = encode(WEIGHTS, encoding)
    assert manifest.total_bytes == len(payload)
    assert manifest.sha256 == hashlib.sha256(payload).digest()
    out = decode(manifest, assemble(manifest, payload, 7))
    assert list(out) == list(WEIGHTS)
    for name, tensor in WEIGHTS.items():
        assert out[name].shape == tensor.shape and out[name].dtype == tensor.dtype
    assert torch.equal(out["bn.num_batches_tracked"], WEIGHTS["bn.num_batches_tracked"])
    if encoding == "fp32":
        assert all(torch.equal(out[k], v) for k, v in WEIGHTS.items())
    else:
        wire = {"fp16": torch.float16, "bf16": torch.bfloat16}[encoding]
        assert torch.equal(out["fc.bias"], WEIGHTS["fc.bias"].to(wire).float())


def test_payload_in_many_chunks_checks_order_and_checksum() -> None:
    manifest, payload = encode(WEIGHTS)
    parts = list(chunks(payload, 16))
    reordered = PayloadAssembler(manifest, 1 << 20)
    reordered.add(parts[0])
    with pytest.raises(ChunkError, match="expected offset 16"):
        reordered.add(parts[2])
    missing = PayloadAssembler(manifest, 1 << 20)
    for part in parts[:-1]:
        missing.add(part)
    with pytest.raises(ChunkError, match="ended after"):
        missing.finish()
    corrupted = PayloadAssembler(manifest, 1 << 20)
    for part in parts:
        corrupted.add(tpb.Chunk(offset=part.offset, data=bytes(b ^ (i == 3) for i, b in enumerate(part.data))))
    with pytest.raises(ChunkError, match="SHA-256"):
        corrupted.finish()


def test_declared_size_over_the_cap_is_refused_before_any_chunk() -> None:
    manifest, _ = encode(WEIGHTS)
    with pytest.raises(PayloadTooLarge, match="exceeds the cap"):
        PayloadAssembler(manifest, manifest.total_bytes - 1)


def test_stream_past_the_declared_size_is_cut_at_the_first_extra_chunk() -> None:
    manifest, payload = encode(WEIGHTS)
    assembler = PayloadAssembler(manifest, 1 << 20)
    accepted = 0
    with pytest.raises(PayloadTooLarge):
        for chunk in chunks(payload + bytes(1000), 64):
            assembler.add(chunk)
            accepted += 1
    assert accepted == len(payload) // 64  # the chunk that crossed the declared end was the one refused


def test_nan_and_inf_are_found() -> None:
    check_finite(WEIGHTS)
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(NonFiniteError, match="fc.bias"):
            check_finite({**WEIGHTS, "fc.bias": torch.tensor([0.0, bad])})


def test_inconsistent_specs_are_manifest_errors() -> None:
    manifest, payload = encode(WEIGHTS)
    manifest.tensors[0].byte_length += 4
    with pytest.raises(ManifestError, match="bytes declared"):
        decode(manifest, payload)
    manifest, payload = encode(WEIGHTS)
    manifest.tensors.add().CopyFrom(manifest.tensors[0])
    with pytest.raises(ManifestError, match="appears twice"):
        decode(manifest, payload)
    manifest, payload = encode(WEIGHTS)
    manifest.tensors[1].quant.bits = 4
    with pytest.raises(ManifestError, match="layout"):
        decode(manifest, payload)


@pytest.mark.slow
def test_big_model_round_trips_through_chunks_with_an_equal_checksum() -> None:
    """A model over 2 GiB (2**29 + 1 fp32 values) assembled from 64 MiB chunks (slow: about 7 GiB of memory)."""
    big = {"w": torch.ones(2**29 + 1)}
    manifest, payload = encode(big)
    assert len(payload) > 2**31
    received = assemble(manifest, payload, 64 << 20, cap=1 << 33)
    assert hashlib.sha256(received).digest() == manifest.sha256
    assert bool(decode(manifest, received)["w"].eq(1).all())


# ---------------------------------------------------------------- fuzz
PROTO_ERRORS = (DecodeError, PayloadError)
VALID_MANIFEST, VALID_PAYLOAD = encode(WEIGHTS)
VALID_HEADER = spb.ResultMessage(
    header=spb.ResultHeader(client_id=1, task_id=2, version=3, num_samples=4, manifest=VALID_MANIFEST)
).SerializeToString()
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    buf = bytearray(data)
    for pos, value in edits:
        if buf:
            buf[pos % len(buf)] = value
    return bytes(buf)


edits = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8)


@FUZZ
@given(st.binary(max_size=512) | st.builds(mutate, st.just(VALID_HEADER), edits))
@example(VALID_HEADER.replace(b"\x05empty\x12\x02\x00\x03\x18\x01", b"\x05empty\x12\x02\x00\x03\x18\x09"))  # dtype 9
def test_fuzz_protobuf_messages_and_the_tensor_decoder(data: bytes) -> None:
    """Random and mutated bytes parse to messages or fail with DecodeError; any manifest they hold fails only with
    typed payload errors when checked, assembled and decoded."""
    for message_type in (spb.ResultMessage, spb.TaskMessage, spb.RegisterRequest, tpb.Manifest):
        try:
            message = message_type.FromString(data)
        except DecodeError:
            continue
        if isinstance(message, spb.ResultMessage) and message.WhichOneof("kind") == "header":
            manifest = message.header.manifest
            try:
                check_update_manifest(manifest, meta_of(WEIGHTS))
                decode(manifest, assemble(manifest, VALID_PAYLOAD, 100, cap=1 << 20))
            except UpdateError:
                pass


@FUZZ
@given(st.builds(mutate, st.just(VALID_PAYLOAD), edits), st.integers(1, 300))
def test_fuzz_mutated_payloads_only_raise_typed_errors(payload: bytes, size: int) -> None:
    try:
        weights = decode(VALID_MANIFEST, assemble(VALID_MANIFEST, payload, size))
        check_finite(weights)
    except UpdateError:
        return
    assert payload == VALID_PAYLOAD  # anything else fails its checksum


@FUZZ
@given(st.binary(max_size=512) | st.builds(mutate, st.just(codec_encode(WEIGHTS)), edits))
def test_fuzz_the_shared_tensor_codec(data: bytes) -> None:
    with contextlib.suppress(CodecError):
        codec_decode(data)


def test_sparse_tensors_round_trip_and_malformed_bitmaps_are_refused() -> None:
    w = {"w": torch.tensor([[1.5, 0.0, -2.0], [0.0, 0.0, 3.0], [4.0, 0.0, 0.0]]), "b": torch.ones(3)}
    manifest, payload = encode(w, "fp32", frozenset({"w"}))
    spec = manifest.tensors[0]
    assert spec.encoding == tpb.ENCODING_SPARSE and spec.sparse.nnz == 4 and spec.sparse.bitmap
    assert spec.byte_length == 2 + 4 * 4  # 9 elements: 2 bitmap bytes, then 4 fp32 values
    out = decode(manifest, payload)
    assert torch.equal(out["w"], w["w"]) and torch.equal(out["b"], w["b"])

    def variant(change: object, data: bytes = payload) -> tuple[tpb.Manifest, bytes]:
        m = tpb.Manifest()
        m.CopyFrom(manifest)
        change(m.tensors[0])  # type: ignore[operator]
        m.sha256 = hashlib.sha256(data).digest()
        return m, data

    flipped = bytes([payload[0] ^ 0b10]) + payload[1:]  # one more element marked than nnz says
    with pytest.raises(ManifestError, match="mask marks 5 values, the layout 4"):
        decode(*variant(lambda s: None, flipped))
    padding = payload[:1] + bytes([payload[1] | 0b10]) + payload[2:]
    with pytest.raises(ManifestError, match="padding bits"):
        decode(*variant(lambda s: None, padding))
    with pytest.raises(ManifestError, match="bitmap sparse layout"):
        decode(*variant(lambda s: setattr(s.sparse, "bitmap", False)))
    with pytest.raises(ManifestError, match="stored values for 9 elements"):
        decode(*variant(lambda s: setattr(s.sparse, "nnz", 10)))
    with pytest.raises(ManifestError, match="bytes declared"):
        decode(*variant(lambda s: setattr(s.sparse, "nnz", 3)))


# ---------------------------------------------------------------- packed int-b
@pytest.mark.parametrize("bits", quant.BITWIDTHS)
def test_packed_specs_declare_per_channel_fp32_scales(bits: int) -> None:
    manifest, payload = encode(WEIGHTS, f"int{bits}")
    specs = {s.name: s for s in manifest.tensors}
    for name, tensor in WEIGHTS.items():
        spec = specs[name]
        if not tensor.is_floating_point():
            assert spec.encoding == tpb.ENCODING_RAW and spec.WhichOneof("layout") is None
            continue
        assert spec.encoding == tpb.ENCODING_PACKED_INT and spec.WhichOneof("layout") == "quant"
        layout = spec.quant
        assert (layout.bits, layout.scale_encoding, layout.has_zero_point) == (bits, tpb.ENCODING_FP32, False)
        channels = quant.num_channels(tensor.shape)
        assert layout.group_size == (tensor.numel() // channels if channels > 1 else 0)
        assert spec.byte_length == 4 * channels + quant.packed_nbytes(tensor.numel(), bits)
    out = decode(manifest, assemble(manifest, payload, 5))
    assert all(out[k].dtype == v.dtype and out[k].shape == v.shape for k, v in WEIGHTS.items())


def test_packed_payloads_are_b_bits_per_value() -> None:
    model = {"w": torch.randn(64, 800), "b": torch.randn(64)}
    fp32 = encode(model)[0].total_bytes
    assert encode(model, "int8")[0].total_bytes / fp32 == pytest.approx(1 / 4, rel=0.01)
    assert encode(model, "int4")[0].total_bytes / fp32 == pytest.approx(1 / 8, rel=0.02)


def _packed(change: object, payload_change: object = None) -> tuple[tpb.Manifest, bytes]:
    """The int4 manifest and payload of a (3, 3) tensor ``w`` (12 bytes of scales, then 5 bytes of values whose
    last 4 bits are padding), with ``change`` applied to its spec and ``payload_change`` to its bytes; the checksum
    is recomputed."""
    w = torch.tensor([[0.5, -1.0, 3.5], [0.25, 0.0, -1.75], [1.0, 2.0, 7.0]])
    manifest, payload = encode({"w": w}, "int4")
    spec = manifest.tensors[0]
    change(spec)  # type: ignore[operator]
    data = bytearray(payload)
    if payload_change is not None:
        payload_change(data)  # type: ignore[operator]
    manifest.sha256 = hashlib.sha256(data).digest()
    return manifest, bytes(data)


def _set_quant(**fields: object) -> object:
    def change(spec: tpb.TensorSpec) -> None:
        for key, value in fields.items():
            setattr(spec.quant, key, value)

    return change


def _put(at: int, value: bytes) -> object:
    def change(data: bytearray) -> None:
        data[at : at + len(value)] = value

    return change


MALFORMED_PACKED = {
    "zero point": (_set_quant(has_zero_point=True), None, "zero points"),
    "fp16 scales": (_set_quant(scale_encoding=tpb.ENCODING_FP16), None, "scales must be ENCODING_FP32"),
    "one scale for the tensor": (_set_quant(group_size=0), None, "group_size 0 is not one scale per output channel"),
    "groups of two": (_set_quant(group_size=2), None, "group_size 2 is not one scale per output channel"),
    "3 bits": (_set_quant(bits=3), None, "3-bit packed values"),
    "32 bits": (_set_quant(bits=32), None, "32-bit packed values"),
    "no quant layout": (lambda s: s.ClearField("quant"), None, "takes a quant layout"),
    "a sparse layout": (lambda s: s.sparse.CopyFrom(tpb.SparseLayout(nnz=1)), None, "not a sparse layout"),
    "an integer tensor": (lambda s: setattr(s, "dtype", tpb.DTYPE_INT64), None, "floating-point tensors, not int64"),
    "wrong byte length": (lambda s: setattr(s, "byte_length", 12), None, "12 bytes declared"),
    "zero scale": (lambda s: None, _put(0, struct.pack("<f", 0.0)), "scales must be finite and > 0"),
    "negative scale": (lambda s: None, _put(4, struct.pack("<f", -1.0)), "scales must be finite and > 0"),
    "NaN scale": (lambda s: None, _put(0, struct.pack("<f", math.nan)), "scales must be finite and > 0"),
    "the all-ones pattern": (lambda s: None, _put(12, b"\xff"), "outside"),
    "a padding bit": (lambda s: None, _put(16, b"\xf7"), "padding"),
}


@pytest.mark.parametrize("case", list(MALFORMED_PACKED))
def test_malformed_packed_layouts_are_refused_naming_the_tensor(case: str) -> None:
    change, payload_change, message = MALFORMED_PACKED[case]
    manifest, payload = _packed(change, payload_change)
    with pytest.raises(ManifestError, match=f"tensor 'w'.*{re.escape(message)}"):
        decode(manifest, payload)


def test_scales_that_overflow_the_dtype_are_refused() -> None:
    w = {"w": torch.tensor([1.0, -60000.0]).half()}  # scale 60000 / 7 at int4: finite in fp32 and fp16
    manifest, payload = encode(w, "int4")
    data = bytearray(payload)
    data[0:4] = struct.pack("<f", 1.0e5)  # 7 x 1e5 is finite in fp32 but Inf in fp16
    manifest.sha256 = hashlib.sha256(data).digest()
    with pytest.raises(ManifestError, match="tensor 'w'.*overflow"):
        decode(manifest, bytes(data))


PACKED_MANIFEST, PACKED_PAYLOAD = encode(WEIGHTS, "int4")


@FUZZ
@given(st.builds(mutate, st.just(PACKED_PAYLOAD), edits))
def test_fuzz_packed_payloads_with_a_matching_checksum_only_raise_typed_errors(payload: bytes) -> None:
    """Corrupted packed bytes that pass the checksum (a sender that lies) reach the packed decoder: they decode to
    finite tensors or fail with an UpdateError."""
    manifest = tpb.Manifest()
    manifest.CopyFrom(PACKED_MANIFEST)
    manifest.sha256 = hashlib.sha256(payload).digest()
    with contextlib.suppress(UpdateError):
        check_finite(decode(manifest, payload))
