"""Weights <-> bytes: round trips, sizes, and refusal of malformed bytes."""

from __future__ import annotations

import contextlib
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedhet.codec import ENCODINGS, CodecError, decode, encode, encoded_size


def sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(4, 1, 3, 3, generator=g),
        "fc.bias": torch.randn(5, generator=g),
        "steps": torch.tensor(12),
        "empty": torch.zeros(0, 3),
    }


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_round_trip_and_size(encoding: str) -> None:
    w = sample()
    data = encode(w, encoding)
    assert len(data) == encoded_size(w, encoding)
    out = decode(data)
    assert list(out) == list(w)
    for k, v in w.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape
        tolerance = {"fp32": 0.0, "fp16": 1e-3, "bf16": 1e-2}[encoding]
        torch.testing.assert_close(out[k], v, atol=tolerance * 4, rtol=tolerance)
    assert torch.equal(out["steps"], w["steps"])  # integers travel exactly


def test_half_precision_halves_the_payload() -> None:
    w = {"w": torch.zeros(10_000)}
    assert encoded_size(w, "fp16") < 0.51 * encoded_size(w, "fp32")


def test_unknown_encoding() -> None:
    with pytest.raises(CodecError, match="unknown encoding 'int3'"):
        encode(sample(), "int3")


def test_malformed_payloads_are_refused() -> None:
    data = encode(sample())
    with pytest.raises(CodecError, match="shorter"):
        decode(b"\x01")
    with pytest.raises(CodecError, match="header length"):
        decode(struct.pack("<Q", 10**9) + data[8:])
    with pytest.raises(CodecError):
        decode(data[:-3])
    with pytest.raises(CodecError, match="trailing"):
        decode(data + b"\x00")
    header = b'[["w",[2],"float32","fp32",4]]'
    with pytest.raises(CodecError, match="declared"):
        decode(struct.pack("<Q", len(header)) + header + b"\x00" * 4)
    header = b'[["w",[1],"complex128","fp32",8]]'
    with pytest.raises(CodecError, match="unsupported"):
        decode(struct.pack("<Q", len(header)) + header + b"\x00" * 8)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash_the_decoder(data: bytes) -> None:
    with contextlib.suppress(CodecError):
        decode(data)
