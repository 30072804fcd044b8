"""Weight quantization shared by clients, the codec and the server: pure functions on tensors.

Scheme (the choice ProWD leaves open, fixed here): **symmetric uniform quantization with one scale per output
channel**. For a tensor ``w`` at ``b`` bits, ``qmax = 2**(b-1) - 1``; channel ``c`` (index ``c`` along dim 0 of a
tensor with 2 or more dimensions; a tensor of 0 or 1 dimension is one channel) has scale
``s_c = max(max|w_c| / qmax, 2**-126)`` (never 0 nor subnormal, even for an all-zero channel), integer values
``q = round(w / s_c)`` in ``[-qmax, qmax]`` and dequantized values ``q * s_c``. Weights must be finite.

Round-trip error bound, per element of channel ``c``, in fp32 arithmetic::

    |w - q * s_c| <= s_c / 2 + 2**-22 * max|w_c|      (s_c / 2 = max|w_c| / (2 qmax) unless tiny)

(half a quantization step, plus the fp32 rounding of ``w / s_c`` and of ``q * s_c``; :func:`error_bound`).

**2 bits are ternary** (``qmax = 1``: values ``{-s_c, 0, s_c}``) with the scale and threshold of Ternary Weight
Networks (Li & Liu, 2016), not the max-scaled grid: with ``s_c = max|w_c|`` every weight under half the largest
rounds to zero, which zeroes most of a layer and leaves training at 2 bits unstable. TWN's threshold is
``delta_c = 0.7 * mean|w_c|``: ``q = sign(w)`` where ``|w| > delta_c``, else 0, and ``s_c`` is the mean ``|w|`` of the
elements above it (the least-squares scale for that support). Quantizing ternary values again gives the same values
(the mean of ``|q s_c|`` is at most ``s_c``, so the threshold stays under ``s_c``). Error bound at 2 bits:
``max(delta_c, s_c - delta_c, max|w_c| - s_c)`` plus the same fp32 rounding term.

Bit packing: the integers of a tensor are stored offset by ``qmax`` (``u = q + qmax`` in ``[0, 2 qmax]``, so the
all-ones pattern ``2**b - 1`` never occurs) in a little-endian bit stream, value ``i`` at bits ``[i b, (i + 1) b)``:
``ceil(n b / 8)`` bytes for ``n`` values, the unused high bits of the last byte zero. :func:`unpack` refuses a wrong
length, non-zero padding bits and the all-ones pattern, so every packed byte string has exactly one meaning.

Supported bitwidths: 2, 4, 6, 8, 12 and 16 (``BITWIDTHS``); 32 stands for fp32 (no quantization). ``bf16`` is a
format (:func:`round_trip`), not a bitwidth: ``ClientProfile.bitwidth == 16`` means int16.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedhet.seeding import mix_seed
from fedhet.types import Weights

__all__ = [
    "BITWIDTHS",
    "FORMATS",
    "FULL_PRECISION",
    "ROUNDINGS",
    "TERNARY_THRESHOLD",
    "PackedTensor",
    "QuantError",
    "channel_scales",
    "check_bits",
    "check_rounding",
    "dequantize",
    "error_bound",
    "fake_quantize",
    "fake_quantize_stacked",
    "format_bits",
    "num_channels",
    "pack",
    "pack_tensor",
    "pack_weights",
    "packed_nbytes",
    "qmax",
    "quantize",
    "quantize_stacked",
    "quantize_weights",
    "round_trip",
    "sample_bitwidths",
    "stochastic_round",
    "stochastic_round_weights",
    "unpack",
    "unpack_tensor",
    "unpack_weights",
]

#: integer bitwidths with a packed representation
BITWIDTHS: tuple[int, ...] = (2, 4, 6, 8, 12, 16)
#: the bitwidth that means "not quantized" (fp32)
FULL_PRECISION = 32
#: every format :func:`round_trip` accepts
FORMATS: tuple[str, ...] = (*(f"int{b}" for b in BITWIDTHS), "bf16", "fp32")
#: Ternary Weight Networks' threshold, as a multiple of a channel's mean |w| (2 bits)
TERNARY_THRESHOLD = 0.7
_MIN_SCALE = 2.0**-126  # smallest normal fp32: a scale never underflows to 0 or loses precision as a subnormal


class QuantError(ValueError):
    """A bitwidth, scale or packed byte string that is not valid; the message says what is wrong."""


def check_bits(bits: int) -> int:
    """``bits`` if it is a supported integer bitwidth (2, 4, 6, 8, 12, 16), else :class:`QuantError`."""
    if bits not in BITWIDTHS:
        raise QuantError(f"unsupported bitwidth {bits}; choose one of {', '.join(map(str, BITWIDTHS))}")
    return bits


def qmax(bits: int) -> int:
    """Largest integer magnitude at ``bits`` bits: ``2**(bits-1) - 1`` (127 at 8 bits, 7 at 4 bits)."""
    return (1 << (check_bits(bits) - 1)) - 1


def _int_dtype(bits: int) -> torch.dtype:
    return torch.int8 if bits <= 8 else torch.int16


def num_channels(shape: Sequence[int]) -> int:
    """Scales a tensor of ``shape`` carries: its dim 0 for 2 or more dims (output channels), else one."""
    return int(shape[0]) if len(shape) >= 2 else 1


def _channel_view(w: torch.Tensor) -> torch.Tensor:
    """``w`` as (channels, elements per channel)."""
    channels = num_channels(w.shape)
    return w.reshape(channels, w.numel() // channels if channels else 0)


def _absmax(flat: torch.Tensor) -> torch.Tensor:
    """Per-channel max |w| of a (channels, elements) view; 0 for channels without elements."""
    if flat.shape[1] == 0:
        return torch.zeros(flat.shape[0], device=flat.device)
    return torch.maximum(flat.amax(dim=1), flat.amin(dim=1).neg_())  # two reductions, no |w| temporary


def _scales(absmax: torch.Tensor, bits: int) -> torch.Tensor:
    return (absmax / qmax(bits)).clamp_min_(_MIN_SCALE)


def _ternary(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(support, scales, thresholds)`` of TWN's ternary quantization of a (channels, elements) view: which
    elements are non-zero (``|w| > delta_c``), the mean ``|w|`` over them, and ``delta_c``."""
    magnitude = flat.abs()
    if flat.shape[1] == 0:
        zeros = torch.zeros(flat.shape[0], device=flat.device)
        return magnitude > 0, zeros.clamp_min(_MIN_SCALE), zeros
    threshold = magnitude.mean(dim=1) * TERNARY_THRESHOLD
    support = magnitude > threshold[:, None]
    kept = support.sum(dim=1)
    # summed in float64, where k copies of one fp32 value sum exactly: ternary values quantize to themselves
    scales = ((magnitude * support).sum(dim=1, dtype=torch.float64) / kept.clamp_min(1)).float()
    return support, scales.clamp_min_(_MIN_SCALE), threshold


def quantize(w: torch.Tensor, bits: int, check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scales)``: integers of ``w``'s shape (int8 for bits <= 8, else int16) and fp32 scales, one per channel.

    Works on any device; the integer path of quantized training calls it once per step for each weight. Raises
    :class:`QuantError` for a tensor holding inf or NaN, unless ``check_finite`` is false: the check reads a value
    back to the host, which a training step on a GPU must not do (a CUDA graph cannot capture it; eagerly it stalls
    the launch queue once per layer). Training forwards skip it: a NaN weight makes the loss NaN, and the task's
    result is checked when it is rounded for upload.
    """
    q, scales = _quantize_channels(_channel_view(w.detach().float()), bits, check_finite)
    return q.reshape(w.shape), scales


def _quantize_channels(flat: torch.Tensor, bits: int, check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize` of a (channels, elements) view: the integers in that view's shape, and the scales."""
    absmax = _absmax(flat)
    if check_finite and not bool(torch.isfinite(absmax).all()):
        raise QuantError("cannot quantize a tensor holding inf or NaN")
    if bits == 2:
        support, scales, _ = _ternary(flat)
        return (flat.sign() * support).to(_int_dtype(bits)), scales
    scales = _scales(absmax, bits)
    # multiplying by 1 / s (a few ulps from w / s, within the bound) is cheaper than dividing; the clamp keeps
    # values in range whatever the fp32 rounding did
    top = qmax(bits)
    return (flat * scales.reciprocal()[:, None]).round_().clamp_(-top, top).to(_int_dtype(bits)), scales


def channel_scales(w: torch.Tensor, bits: int) -> torch.Tensor:
    """The per-channel scales :func:`quantize` gives ``w`` at ``bits`` bits (the value of one integer step), as a
    (channels, 1) tensor on ``w``'s device, without the integers."""
    flat = _channel_view(w.detach().float())
    scales = _ternary(flat)[1] if check_bits(bits) == 2 else _scales(_absmax(flat), bits)
    return scales[:, None]


def dequantize(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 values ``q * s_c`` of integers ``q`` with per-channel ``scales``."""
    flat = _channel_view(q).float()
    return (flat * scales.float()[:, None]).reshape(q.shape)


def fake_quantize(w: torch.Tensor, bits: int, check_finite: bool = True) -> torch.Tensor:
    """``w`` rounded to ``bits`` bits and back, in ``w``'s dtype; ``bits == 32`` returns ``w`` itself
    (``check_finite`` as for :func:`quantize`)."""
    if bits == FULL_PRECISION:
        return w
    q, scales = quantize(w, bits, check_finite)
    return dequantize(q, scales).to(w.dtype)


def stochastic_round(w: torch.Tensor, bits: int, generator: torch.Generator) -> torch.Tensor:
    """``w`` on :func:`fake_quantize`'s ``bits``-bit grid (its per-channel scales), each value rounded up or down at
    random with the probabilities that make the result unbiased (``E = w`` inside the range): stochastic rounding.
    A channel's largest magnitude stays on its end of the range, so the scales are kept and :func:`fake_quantize`
    (the codec's packing) maps the result to itself. At 2 bits values above TWN's scale clamp to it (biased).
    ``generator`` lives on ``w``'s device."""
    if bits == FULL_PRECISION:
        return w
    flat = _channel_view(w.detach().float())
    absmax = _absmax(flat)
    if not bool(torch.isfinite(absmax).all()):
        raise QuantError("cannot quantize a tensor holding inf or NaN")
    scales = _ternary(flat)[1] if check_bits(bits) == 2 else _scales(absmax, bits)
    top = qmax(bits)
    steps = flat * scales.reciprocal()[:, None]
    noise = torch.rand(steps.shape, generator=generator, device=steps.device)
    q = torch.where(flat.abs() == absmax[:, None], steps.round(), steps + noise).floor_().clamp_(-top, top)
    return (q * scales[:, None]).reshape(w.shape).to(w.dtype)


def quantize_stacked(w: torch.Tensor, bits: int, check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize` of each ``w[i]`` of a stack of tensors (one per client) in one pass over the stack: the
    integers in ``w``'s shape and the scales ``(len(w), channels)``, each ``w[i]``'s exactly as :func:`quantize`
    gives them alone (``check_finite`` as there)."""
    check_bits(bits)
    rows = w.shape[0] * num_channels(w.shape[1:])
    flat = w.detach().float().reshape(rows, w.numel() // rows if rows else 0)
    q, scales = _quantize_channels(flat, bits, check_finite)
    return q.reshape(w.shape), scales.reshape(w.shape[0], -1)


def fake_quantize_stacked(w: torch.Tensor, bits: int, check_finite: bool = True) -> torch.Tensor:
    """Each ``w[i]`` of a stack of tensors (one per client) rounded to ``bits`` bits and back, exactly as
    :func:`fake_quantize` rounds it alone (its own per-channel scales), in one pass over the stack
    (``check_finite`` as for :func:`quantize`)."""
    if bits == FULL_PRECISION:
        return w
    q, scales = quantize_stacked(w, bits, check_finite)
    rows = scales.numel()
    flat = q.reshape(rows, q.numel() // rows if rows else 0)
    return (flat.float() * scales.reshape(-1)[:, None]).reshape(w.shape).to(w.dtype)


def error_bound(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Largest ``|w - fake_quantize(w, bits)|`` allowed per element, as a tensor of ``w``'s shape (see module)."""
    flat = _channel_view(w.detach().float())
    absmax = _absmax(flat)
    if check_bits(bits) == 2:
        _, scales, threshold = _ternary(flat)
        worst = torch.maximum(torch.maximum(threshold, scales - threshold), absmax - scales)
    else:
        worst = _scales(absmax, bits) / 2
    bound = worst + absmax * 2.0**-22
    return bound[:, None].expand_as(flat).reshape(w.shape)


def format_bits(fmt: str) -> int:
    """Bits per value of format ``fmt`` (``int2`` ... ``int16``, ``bf16``, ``fp32``)."""
    if fmt == "fp32":
        return FULL_PRECISION
    if fmt == "bf16":
        return 16
    if fmt.startswith("int") and fmt[3:].isdigit() and int(fmt[3:]) in BITWIDTHS:
        return int(fmt[3:])
    raise QuantError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def round_trip(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """``w`` stored in format ``fmt`` and read back, in ``w``'s dtype."""
    if fmt == "bf16":
        return w.to(torch.bfloat16).to(w.dtype)
    bits = format_bits(fmt)
    return fake_quantize(w, bits)


ROUNDINGS = ("nearest", "stochastic")  # how weights go onto a grid: to the nearest value, or stochastic_round


def check_rounding(rounding: str, key: str) -> str:
    """``rounding`` if it names one of :data:`ROUNDINGS`; else a ValueError naming ``key`` (the config key)."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"{key} must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
    return rounding


def stochastic_round_weights(weights: Weights, bits: int, seed: int) -> dict[str, torch.Tensor]:
    """Every floating-point tensor of ``weights`` rounded stochastically to ``bits`` bits
    (:func:`stochastic_round`: unbiased, on :func:`fake_quantize`'s grid); integer tensors unchanged; ``bits == 32``
    returns the tensors as they are. Each tensor's random draw comes from ``seed`` and its name, so its values do not
    depend on the mapping's order or on which other tensors it holds (a simulator's stacked results and a deployed
    client's dictionary round alike); a generator on the tensor's device draws it."""
    if bits == FULL_PRECISION:
        return dict(weights)
    check_bits(bits)

    def rounded(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_floating_point():
            return tensor
        draw = mix_seed(seed, zlib.crc32(name.encode()))
        return stochastic_round(tensor, bits, torch.Generator(tensor.device).manual_seed(draw))

    return {name: rounded(name, tensor) for name, tensor in weights.items()}


def quantize_weights(weights: Weights, bits: int) -> dict[str, torch.Tensor]:
    """Every floating-point tensor of ``weights`` rounded to ``bits`` bits (values stay fp32, on the grid);
    integer tensors (counters) unchanged. ``bits == 32`` returns the tensors as they are."""
    if bits != FULL_PRECISION:
        check_bits(bits)
    return {k: fake_quantize(v, bits) if v.is_floating_point() else v for k, v in weights.items()}


# ---------------------------------------------------------------------------------------------- bit packing


def _layout(bits: int) -> tuple[int, int]:
    """(values, bytes) of the smallest whole-byte group: 6 bits -> 4 values in 3 bytes."""
    group_bits = bits * 8 // math.gcd(bits, 8)
    return group_bits // bits, group_bits // 8


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes :func:`pack` produces for ``numel`` values at ``bits`` bits: ``ceil(numel * bits / 8)``."""
    return (numel * check_bits(bits) + 7) // 8


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers ``q`` in ``[-qmax, qmax]`` as a flat uint8 tensor of ``ceil(q.numel() * bits / 8)`` bytes."""
    top = qmax(bits)
    n = q.numel()
    values, group_bytes = _layout(bits)
    u = q.detach().reshape(-1).to("cpu", torch.int32) + top
    if n and (int(u.min()) < 0 or int(u.max()) > 2 * top):
        raise QuantError(f"values outside [-{top}, {top}] cannot be packed at {bits} bits")
    if values == 1 and group_bytes == 1:
        return u.to(torch.uint8)
    groups = -(-n // values)
    u = torch.nn.functional.pad(u, (0, groups * values - n)).view(groups, values)
    shifts = torch.arange(values, dtype=torch.int32) * bits
    words = (u << shifts).sum(dim=1, dtype=torch.int32)  # a group spans at most 24 bits
    byte_shifts = torch.arange(group_bytes, dtype=torch.int32) * 8
    out = ((words[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return out[: packed_nbytes(n, bits)]


def unpack(data: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``numel`` integers (int8 for bits <= 8, else int16) from packed ``data``.

    Raises :class:`QuantError` for a byte count other than ``ceil(numel * bits / 8)``, non-zero padding bits, or a
    value outside ``[-qmax, qmax]``.
    """
    top = qmax(bits)
    expected = packed_nbytes(numel, bits)
    if data.dtype != torch.uint8 or data.dim() != 1 or data.numel() != expected:
        raise QuantError(
            f"packed data holds {data.numel()} bytes ({data.dtype}); {numel} values at {bits} bits need {expected}"
        )
    values, group_bytes = _layout(bits)
    groups = -(-numel // values)
    raw = torch.nn.functional.pad(data.to(torch.int32), (0, groups * group_bytes - expected))
    byte_shifts = torch.arange(group_bytes, dtype=torch.int32) * 8
    words = (raw.view(groups, group_bytes) << byte_shifts).sum(dim=1, dtype=torch.int32)
    shifts = torch.arange(values, dtype=torch.int32) * bits
    u = ((words[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)
    if bool((u[numel:] != 0).any()):
        raise QuantError(f"non-zero padding bits after the last of {numel} values")
    u = u[:numel]
    if numel and int(u.max()) > 2 * top:
        raise QuantError(f"packed value {int(u.max())} is outside 0..{2 * top} at {bits} bits")
    return (u - top).to(_int_dtype(bits))


@dataclass(frozen=True)
class PackedTensor:
    """One tensor stored at ``bits`` bits: packed integers and fp32 per-channel scales.

    Attributes:
        bits: bits per value (2, 4, 6, 8, 12 or 16).
        shape: the tensor's shape.
        scales: fp32 scales, one per channel (:func:`num_channels`).
        data: the packed values (uint8, ``ceil(numel * bits / 8)`` bytes).
    """

    bits: int
    shape: tuple[int, ...]
    scales: torch.Tensor
    data: torch.Tensor

    @property
    def nbytes(self) -> int:
        """Bytes held: packed values plus scales."""
        return self.data.numel() + 4 * self.scales.numel()


def _check_scales(scales: torch.Tensor, channels: int) -> None:
    if scales.dtype != torch.float32 or scales.shape != (channels,):
        raise QuantError(f"expected {channels} fp32 scales, got {tuple(scales.shape)} {scales.dtype}")
    if channels and not bool((torch.isfinite(scales) & (scales > 0)).all()):
        raise QuantError("scales must be finite and > 0 (a zero, negative, infinite or NaN scale was found)")


def pack_tensor(w: torch.Tensor, bits: int) -> PackedTensor:
    """``w`` quantized to ``bits`` bits and packed."""
    q, scales = quantize(w, bits)
    return PackedTensor(bits, tuple(w.shape), scales.cpu(), pack(q, bits))


def unpack_tensor(packed: PackedTensor) -> torch.Tensor:
    """The fp32 values of ``packed``; validates its scales and bytes."""
    _check_scales(packed.scales, num_channels(packed.shape))
    q = unpack(packed.data, packed.bits, math.prod(packed.shape)).reshape(packed.shape)
    return dequantize(q, packed.scales)


def pack_weights(weights: Weights, bits: int) -> dict[str, PackedTensor | torch.Tensor]:
    """Floating-point tensors packed at ``bits`` bits; integer tensors kept as they are (counters are exact)."""
    return {k: pack_tensor(v, bits) if v.is_floating_point() else v.detach().clone() for k, v in weights.items()}


def unpack_weights(packed: dict[str, PackedTensor | torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_weights` (packed tensors come back as fp32)."""
    return {k: unpack_tensor(v) if isinstance(v, PackedTensor) else v.clone() for k, v in packed.items()}


# ---------------------------------------------------------------------------------------------- fleets


def sample_bitwidths(num_clients: int, bitwidths: Sequence[int], fractions: Sequence[float], seed: int) -> list[int]:
    """One bitwidth per client: exactly ``round(fraction * num_clients)`` clients per bitwidth (largest remainders
    settle the rounding), in an order shuffled by ``seed``. 32 means fp32.

    Raises ValueError for mismatched lengths, an unsupported bitwidth, or fractions that are negative or do not sum
    to 1.
    """
    if len(bitwidths) != len(fractions) or not bitwidths:
        raise ValueError(f"bitwidths {list(bitwidths)} and fractions {list(fractions)} must be non-empty and match")
    for bits in bitwidths:
        if bits != FULL_PRECISION and bits not in BITWIDTHS:
            raise ValueError(f"bitwidth {bits} is not one of {', '.join(map(str, (*BITWIDTHS, FULL_PRECISION)))}")
    if any(not f >= 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"bitwidth fractions must be >= 0 and sum to 1, got {list(fractions)}")
    exact = np.asarray(fractions, dtype=np.float64) * num_clients
    counts = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - counts), kind="stable")[: num_clients - int(counts.sum())]:
        counts[i] += 1
    out = np.repeat(np.asarray(bitwidths, dtype=np.int64), counts)
    np.random.default_rng([seed, 0xB17]).shuffle(out)
    return [int(b) for b in out]
