"""Weights <-> bytes: round trips, sizes, and refusal of malformed bytes; every encoding through both containers of
the one tensor codec (the file format and the gRPC wire)."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedhet import quant
from fedhet.codec import ALL_ENCODINGS, ENCODINGS, PACKED_ENCODINGS, CodecError, decode, encode, encoded_size
from fedhet.v1 import wire


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


# ---------------------------------------------------------------- one tensor codec, two containers
def _file(weights: dict[str, torch.Tensor], encoding: str, sparse: frozenset[str]) -> dict[str, torch.Tensor]:
    data = encode(weights, encoding, sparse)
    assert len(data) == encoded_size(weights, encoding, sparse)
    return decode(data)


def _wire(weights: dict[str, torch.Tensor], encoding: str, sparse: frozenset[str]) -> dict[str, torch.Tensor]:
    manifest, payload = wire.encode(weights, encoding, sparse)
    return wire.decode(manifest, payload)


Container = Callable[[dict[str, torch.Tensor], str, frozenset[str]], dict[str, torch.Tensor]]
CONTAINERS: dict[str, Container] = {"file": _file, "wire": _wire}


def model_like() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    pruned = torch.randn(6, 5, generator=g)
    pruned[pruned.abs() < 0.5] = 0.0
    return {
        "conv.weight": torch.randn(4, 2, 3, 3, generator=g),
        "fc.weight": torch.randn(3, 7, generator=g, dtype=torch.float64),
        "fc.bias": torch.randn(7, generator=g),
        "half": torch.randn(2, 3, generator=g).half(),
        "pruned": pruned,
        "scalar": torch.tensor(0.25),
        "empty": torch.zeros(0, 3),
        "one_row": torch.randn(1, 9, generator=g),
        "steps": torch.tensor(12),
        "mask": torch.tensor([True, False, True]),
        "ids": torch.arange(5, dtype=torch.int32),
        "bytes": torch.arange(4, dtype=torch.uint8),
    }


@pytest.mark.parametrize("container", list(CONTAINERS))
@pytest.mark.parametrize("encoding", ALL_ENCODINGS)
def test_every_encoding_round_trips_in_both_containers(container: str, encoding: str) -> None:
    """Names, shapes and dtypes survive; integers exactly; floats within the encoding's error (a cast's rounding,
    or the packed bound of fedhet.quant); pruned tensors keep their zeros."""
    w = model_like()
    out = CONTAINERS[container](w, encoding, frozenset({"pruned"}))
    assert list(out) == list(w)
    bits = PACKED_ENCODINGS.get(encoding)
    for name, tensor in w.items():
        assert out[name].dtype == tensor.dtype and out[name].shape == tensor.shape, name
        if not tensor.is_floating_point():
            assert torch.equal(out[name], tensor), name
        elif bits is not None:
            bound = quant.error_bound(tensor.float(), bits) * 1.001 + 1e-3 * (tensor.dtype == torch.float16)
            assert bool(((out[name].float() - tensor.float()).abs() <= bound).all()), name
        else:
            cast = tensor.to(ENCODINGS[encoding]).to(tensor.dtype)
            assert torch.equal(out[name], cast), name
    if bits is None:
        assert torch.equal(out["pruned"] == 0, w["pruned"] == 0)


@pytest.mark.parametrize("container", list(CONTAINERS))
@pytest.mark.parametrize("encoding", list(PACKED_ENCODINGS))
def test_packed_values_on_the_grid_round_trip_exactly(container: str, encoding: str) -> None:
    """Weights already on the b-bit grid (what a quantized client uploads) travel without any loss."""
    w = quant.quantize_weights(model_like(), PACKED_ENCODINGS[encoding])
    grid = {k: v for k, v in w.items() if v.dtype != torch.float16}  # fp16 cannot hold every grid value
    out = CONTAINERS[container](grid, encoding, frozenset())
    for name, tensor in grid.items():
        assert torch.equal(out[name], tensor), name


@pytest.mark.parametrize("container", list(CONTAINERS))
def test_packing_refuses_non_finite_values_naming_the_tensor(container: str) -> None:
    with pytest.raises(ValueError, match="'fc.bias'.*inf or NaN"):
        CONTAINERS[container]({"fc.bias": torch.tensor([1.0, float("nan")])}, "int8", frozenset())


def test_both_containers_carry_the_same_tensor_bytes() -> None:
    """The wire payload is the file format's body: one layout per tensor, whatever the container."""
    w = model_like()
    for encoding in ALL_ENCODINGS:
        data = encode(w, encoding, frozenset({"pruned"}))
        (header,) = struct.unpack_from("<Q", data)
        _, payload = wire.encode(w, encoding, frozenset({"pruned"}))
        assert data[8 + header :] == payload, encoding
