"""Quantization, bit packing and the codec's packed int-b encodings: error bounds, exact packing, strict decoding."""

from __future__ import annotations

import contextlib
import json
import math
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedhet import quant
from fedhet.codec import ALL_ENCODINGS, PACKED_ENCODINGS, CodecError, decode, encode, encoded_size
from fedhet.codec import encoding_for_bitwidth as enc_for

BITS = list(quant.BITWIDTHS)

finite = st.floats(min_value=-(2.0**100), max_value=2.0**100, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    shape = draw(st.sampled_from([(), (1,), (7,), (3, 5), (2, 3, 2, 2), (0, 4), (4, 0)]))
    values = draw(st.lists(finite, min_size=math.prod(shape), max_size=math.prod(shape)))
    scale = draw(st.sampled_from([1.0, 1e-3, 1e-30]))
    return (torch.tensor(values, dtype=torch.float32) * scale).reshape(shape)


@settings(max_examples=60, deadline=None)
@given(tensors(), st.sampled_from(BITS))
def test_round_trip_error_within_documented_bound(w: torch.Tensor, bits: int) -> None:
    q, scales = quant.quantize(w, bits)
    assert q.shape == w.shape and scales.shape == (quant.num_channels(w.shape),)
    assert bool((scales > 0).all()) and bool(torch.isfinite(scales).all())
    assert int(q.abs().max()) <= quant.qmax(bits) if q.numel() else True
    error = (w - quant.dequantize(q, scales)).abs()
    assert bool((error <= quant.error_bound(w, bits)).all())


@pytest.mark.parametrize("bits", [b for b in BITS if b > 2])
def test_bound_is_half_a_step_on_ordinary_weights(bits: int) -> None:
    w = torch.randn(16, 40, generator=torch.Generator().manual_seed(bits))
    step = w.abs().amax(dim=1, keepdim=True) / quant.qmax(bits)
    bound = quant.error_bound(w, bits)
    assert bool((bound <= step / 2 * 1.02).all())  # half a step, plus fp32 rounding (1.6% of it at 16 bits)
    error = (w - quant.fake_quantize(w, bits)).abs()
    assert bool((error <= bound).all())
    assert float(error.max()) > float(step.min()) / 4  # the bound is tight, not vacuous


def test_two_bits_are_ternary_weight_networks() -> None:
    """TWN: threshold 0.7 mean|w| per channel, scale the mean |w| above it; far nearer than a max-scaled grid, which
    rounds every weight under half the largest to zero."""
    w = torch.randn(32, 300, generator=torch.Generator().manual_seed(2))
    q, scales = quant.quantize(w, 2)
    threshold = w.abs().mean(dim=1, keepdim=True) * 0.7
    assert torch.equal(q.float(), torch.where(w.abs() > threshold, w.sign(), torch.zeros_like(w)))
    expected = (w.abs() * (q != 0)).sum(dim=1) / (q != 0).sum(dim=1)
    torch.testing.assert_close(scales, expected)
    torch.testing.assert_close(quant.channel_scales(w, 2).squeeze(1), scales)
    error = (w - quant.fake_quantize(w, 2)).pow(2).mean()
    absmax = w.abs().amax(dim=1, keepdim=True)
    max_scaled = (w / absmax).round().clamp(-1, 1) * absmax
    assert float(error) < 0.5 * float((w - max_scaled).pow(2).mean())
    assert 0.4 < float((q != 0).float().mean()) < 0.7  # about half the weights survive, not an eighth


@pytest.mark.parametrize("bits", BITS)
def test_quantization_is_idempotent(bits: int) -> None:
    w = torch.randn(8, 3, 3, generator=torch.Generator().manual_seed(0))
    once = quant.fake_quantize(w, bits)
    assert torch.equal(quant.fake_quantize(once, bits), once)


def test_zero_channel_scale_and_full_precision_passthrough() -> None:
    w = torch.zeros(2, 3)
    w[1] = torch.tensor([1.0, -2.0, 0.5])
    q, scales = quant.quantize(w, 8)
    assert float(scales[0]) > 0 and torch.equal(q[0], torch.zeros(3, dtype=torch.int8))
    assert float(scales[1]) == pytest.approx(2.0 / 127)
    assert quant.fake_quantize(w, 32) is w
    assert torch.equal(quant.round_trip(w, "bf16"), w.bfloat16().float())
    assert torch.equal(quant.round_trip(w, "int8"), quant.fake_quantize(w, 8))


def test_bad_bitwidths_and_values_are_refused() -> None:
    for bits in (0, 1, 3, 7, 32, 64):
        with pytest.raises(quant.QuantError, match="unsupported bitwidth"):
            quant.quantize(torch.ones(3), bits)
    with pytest.raises(quant.QuantError, match="inf or NaN"):
        quant.quantize(torch.tensor([1.0, float("nan")]), 8)
    with pytest.raises(quant.QuantError, match="unknown format"):
        quant.round_trip(torch.ones(2), "int5")
    with pytest.raises(quant.QuantError, match="outside"):
        quant.pack(torch.tensor([8], dtype=torch.int8), 4)


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(BITS), st.data())
def test_packing_round_trips_exactly(bits: int, data: st.DataObject) -> None:
    top = quant.qmax(bits)
    values = data.draw(st.lists(st.integers(-top, top), max_size=70))
    q = torch.tensor(values, dtype=torch.int16 if bits > 8 else torch.int8)
    packed = quant.pack(q, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(len(values) * bits / 8)
    assert torch.equal(quant.unpack(packed, bits, len(values)), q)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(BITS), st.integers(0, 30), st.binary(max_size=48))
def test_unpack_accepts_only_canonical_bytes(bits: int, numel: int, raw: bytes) -> None:
    data = torch.tensor(list(raw), dtype=torch.uint8)
    try:
        q = quant.unpack(data, bits, numel)
    except quant.QuantError:
        return
    assert torch.equal(quant.pack(q, bits), data)  # whatever decodes re-encodes to the very same bytes


def test_malformed_packed_data_is_refused() -> None:
    q = torch.tensor([1, -2, 3], dtype=torch.int8)
    packed = quant.pack(q, 6)  # 18 bits -> 3 bytes, 6 padding bits
    with pytest.raises(quant.QuantError, match="need 3"):
        quant.unpack(packed[:2], 6, 3)
    with pytest.raises(quant.QuantError, match="need 3"):
        quant.unpack(torch.cat([packed, packed[:1]]), 6, 3)
    bad = packed.clone()
    bad[2] |= 0x80
    with pytest.raises(quant.QuantError, match="padding"):
        quant.unpack(bad, 6, 3)
    with pytest.raises(quant.QuantError, match="outside"):
        quant.unpack(torch.tensor([0xFF], dtype=torch.uint8), 8, 1)  # the never-used all-ones pattern
    good = quant.pack_tensor(torch.randn(3, 4), 4)
    for scales in (torch.tensor([1.0, 0.0, 1.0]), torch.tensor([1.0, float("nan"), 1.0]), torch.tensor([-1.0] * 3)):
        with pytest.raises(quant.QuantError, match="scales"):
            quant.unpack_tensor(quant.PackedTensor(4, (3, 4), scales, good.data))


@pytest.mark.parametrize("bits", BITS)
def test_packed_weights_memory(bits: int) -> None:
    weights = {"w": torch.randn(64, 800), "b": torch.randn(64), "n": torch.tensor(3)}
    packed = quant.pack_weights(weights, bits)
    w = packed["w"]
    assert isinstance(w, quant.PackedTensor)
    assert w.nbytes == 64 * 800 * bits // 8 + 4 * 64
    restored = quant.unpack_weights(packed)
    assert torch.equal(restored["w"], quant.fake_quantize(weights["w"], bits))
    assert torch.equal(restored["n"], weights["n"])


def test_sample_bitwidths_exact_mix_and_deterministic() -> None:
    mix = quant.sample_bitwidths(10, [6, 8, 12, 16], [0.3, 0.3, 0.2, 0.2], seed=1)
    assert sorted(mix) == [6, 6, 6, 8, 8, 8, 12, 12, 16, 16]
    assert mix == quant.sample_bitwidths(10, [6, 8, 12, 16], [0.3, 0.3, 0.2, 0.2], seed=1)
    assert sorted(quant.sample_bitwidths(5, [8, 32], [0.8, 0.2], 0)) == [8, 8, 8, 8, 32]
    with pytest.raises(ValueError, match="sum to 1"):
        quant.sample_bitwidths(5, [8, 32], [0.5, 0.6], 0)
    with pytest.raises(ValueError, match="bitwidth 5"):
        quant.sample_bitwidths(5, [5], [1.0], 0)


# ------------------------------------------------------------------------------------------- codec: int-b


def model_like() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(4, 1, 3, 3, generator=g),
        "conv.bias": torch.randn(4, generator=g),
        "fc.weight": torch.randn(5, 13, generator=g, dtype=torch.float64),
        "steps": torch.tensor(12),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(0.25),
    }


@pytest.mark.parametrize("encoding", list(PACKED_ENCODINGS))
def test_packed_encoding_round_trip_and_size(encoding: str) -> None:
    bits = PACKED_ENCODINGS[encoding]
    w = model_like()
    data = encode(w, encoding)
    assert len(data) == encoded_size(w, encoding)
    out = decode(data)
    assert list(out) == list(w)
    for k, v in w.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape
        if v.is_floating_point():
            assert bool(((out[k] - v).abs() <= quant.error_bound(v, bits).to(v.dtype) * 1.001).all())
    assert torch.equal(out["steps"], w["steps"])
    assert decode(encode(out, encoding)).keys() == out.keys()


def test_packed_payload_is_b_bits_per_value_plus_scales() -> None:
    w = {"w": torch.randn(64, 800), "b": torch.randn(64)}
    for encoding, bits in PACKED_ENCODINGS.items():
        data = encode(w, encoding)
        (header,) = struct.unpack_from("<Q", data)
        assert len(data) - 8 - header == (64 * 800 + 64) * bits // 8 + 4 * (64 + 1)
    assert encoded_size(w, "int4") / encoded_size(w, "fp32") < 0.127


def test_encoding_for_bitwidth() -> None:
    assert enc_for(4) == "int4" and enc_for(32) == "fp32" and enc_for(32, "bf16") == "bf16"
    assert all(enc_for(b) in ALL_ENCODINGS for b in quant.BITWIDTHS)
    with pytest.raises(CodecError, match="bitwidth 5"):
        enc_for(5)


def _payload(rows: list[list[object]], body: bytes) -> bytes:
    header = json.dumps(rows).encode()
    return struct.pack("<Q", len(header)) + header + body


def test_malformed_packed_payloads_are_refused() -> None:
    scales = struct.pack("<2f", 0.5, 0.25)
    good = _payload([["w", [2, 3], "float32", "int4", 11]], scales + b"\x77\x77\x07")
    assert decode(good)["w"].shape == (2, 3)
    cases = {
        "unsupported": [["w", [2, 3], "float32", "int5", 11]],
        "declared": [["w", [2, 3], "float32", "int4", 10]],
    }
    for message, rows in cases.items():
        with pytest.raises(CodecError, match=message):
            decode(_payload(rows, scales + b"\x77\x77\x07"))
    for bad_scales in (struct.pack("<2f", 0.0, 1.0), struct.pack("<2f", math.nan, 1.0), struct.pack("<2f", 1, -1)):
        with pytest.raises(CodecError, match="scales"):
            decode(_payload([["w", [2, 3], "float32", "int4", 11]], bad_scales + b"\x77\x77\x07"))
    with pytest.raises(CodecError, match="outside"):  # 0xF: the all-ones pattern is no int4 value
        decode(_payload([["w", [2, 3], "float32", "int4", 11]], scales + b"\x7f\x77\x07"))
    with pytest.raises(CodecError, match="padding"):
        decode(_payload([["w", [2, 3], "float32", "int6", 13]], scales + b"\x00" * 4 + b"\xc0"))
    with pytest.raises(CodecError, match="trailing"):
        decode(good + b"\x00")
    with pytest.raises(CodecError, match="inf or NaN"):
        encode({"w": torch.tensor([[1.0, math.inf]])}, "int8")


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(list(PACKED_ENCODINGS)), st.integers(0, 10_000), st.integers(0, 255))
def test_corrupted_packed_payloads_never_crash(encoding: str, position: int, value: int) -> None:
    data = bytearray(encode(model_like(), encoding))
    data[position % len(data)] = value
    with contextlib.suppress(CodecError):
        decode(bytes(data))
