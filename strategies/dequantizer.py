"""ProWD's progressive dequantizer: a chain of small element-wise MLPs that lift low-bitwidth weights towards full
precision (``shared/algorithms/prowd.md``). :class:`ProWD` (``strategies/prowd.py``) trains and applies it.

A block's MLP sees each weight through three features: its value over its channel's largest magnitude, whether the
tensor is bias-like, and the tensor's depth in the model. The last two are constant over a tensor, so a block's
residual is a function of the first alone, and a tensor on a low-bitwidth grid holds few distinct values of it (its
``2 * qmax + 1`` grid points, each a few ulps apart across channels, whatever the tensor's size). A block therefore
evaluates its MLP once per distinct value and gathers (:class:`Positions`): the same residuals as evaluating it per
weight, at the cost of the distinct values. It lifts a whole model in one pass: its tensors concatenated, their
distinct (value, tensor) found by one sort, the MLP run once (a handful of kernels per block, not a handful per
tensor, which on a GPU is what a block's training step costs).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedhet import quant

__all__ = ["DequantizerBlock", "Positions", "ProgressiveDequantizer", "relative_mse"]

FULL = quant.FULL_PRECISION


@dataclass(frozen=True)
class Positions:
    """A model's floating tensors as a :class:`DequantizerBlock` sees them, concatenated in order so that one pass
    lifts them all: each weight (``flat``), its channel's quantization step at the block's lower bitwidth
    (``step``), and the index (``index``) of its row of ``features``, the distinct (value / channel's largest
    magnitude, bias-like, depth) of the model. Data, not parameters: nothing here takes a gradient."""

    shapes: dict[str, torch.Size]
    flat: torch.Tensor
    step: torch.Tensor
    index: torch.Tensor
    features: torch.Tensor
    dtypes: dict[str, torch.dtype]

    @property
    def values(self) -> torch.Tensor:
        """The distinct values of weight / channel's largest magnitude (one per row of ``features``)."""
        return self.features[:, 0]

    def sizes(self) -> list[int]:
        return [math.prod(shape) for shape in self.shapes.values()]

    def flatten(self, weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``weights``' tensors of these names, concatenated like ``flat`` (fp32)."""
        return torch.cat([weights[name].detach().reshape(-1).float() for name in self.shapes])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """A tensor like ``flat`` as the named tensors (views where the dtypes allow)."""
        chunks = torch.split(flat, self.sizes())
        return {
            name: chunk.reshape(shape).to(self.dtypes[name])
            for (name, shape), chunk in zip(self.shapes.items(), chunks, strict=True)
        }

    def tensor_sums(self, flat: torch.Tensor) -> torch.Tensor:
        """The sum of a tensor like ``flat`` over each named tensor's elements, one value per name."""
        return torch.stack([chunk.sum() for chunk in torch.split(flat, self.sizes())])


class DequantizerBlock(nn.Module):
    """Lifts weights from ``low`` to ``high`` bits: ``w_high = w_low + step * f(features)``, the paper's residual.

    ``step`` is the channel's quantization step at ``low`` bits (:func:`fedhet.quant.channel_scales`), so ``f``
    speaks in steps at any weight scale; ``f`` is a small element-wise MLP on (value / channel max, 1 for a
    bias-like tensor, depth of the tensor in the model in [0, 1]). Its last layer starts at zero: an untrained block
    is the identity. ``max_correction`` (in steps; none by default, as the paper) bounds the residual to
    ``max_correction * tanh(f)`` steps: 0.5 keeps every weight inside the quantization bin it came from.
    The block's gradients reach its own parameters only: the weights it lifts are data.
    """

    def __init__(self, low: int, high: int, hidden: int = 8, max_correction: float | None = None) -> None:
        super().__init__()
        if max_correction is not None and not (math.isfinite(max_correction) and max_correction > 0):
            raise ValueError(f"max_correction must be finite and > 0 (or null for none), got {max_correction}")
        self.low, self.high = quant.check_bits(low), high
        self.max_correction = max_correction
        self.hidden = nn.Linear(3, hidden)
        self.out = nn.Linear(hidden, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def positions(self, weights: Mapping[str, torch.Tensor], depths: Mapping[str, float]) -> Positions:
        """The tensors of ``weights`` named in ``depths`` (each with its depth), as this block sees them; empty
        tensors are left out. Computed once, lifted by :meth:`lift` as often as needed. The distinct values come
        from one sort over the whole model: each ratio's fp32 bits, keyed by its tensor."""
        names = [name for name in depths if weights[name].numel()]
        if not names:
            raise ValueError("the dequantizer has no non-empty floating tensor to lift")
        flats, steps, ratios, keys = [], [], [], []
        for number, name in enumerate(names):
            w = weights[name].detach().float()
            channels = quant.num_channels(w.shape)
            flat = w.reshape(channels, w.numel() // channels)
            absmax = flat.abs().amax(dim=1, keepdim=True).clamp_min(2.0**-126)
            flats.append(flat.reshape(-1))
            steps.append(quant.channel_scales(flat, self.low).expand_as(flat).reshape(-1))
            ratio = (flat / absmax).reshape(-1)
            ratios.append(ratio)
            keys.append(ratio.view(torch.int32).long().bitwise_and(0xFFFFFFFF).bitwise_or(number << 32))
        distinct, index = torch.unique(torch.cat(keys), return_inverse=True)
        values = distinct.bitwise_and(0xFFFFFFFF).to(torch.int32).view(torch.float32)
        tensor = distinct.bitwise_right_shift(32)
        first = flats[0]
        bias_like = torch.tensor([float(weights[n].dim() <= 1) for n in names], device=first.device)
        depth = torch.tensor([float(depths[n]) for n in names], device=first.device)
        return Positions(
            shapes={n: weights[n].shape for n in names},
            flat=torch.cat(flats),
            step=torch.cat(steps),
            index=index,
            features=torch.stack([values, bias_like[tensor], depth[tensor]], dim=-1),
            dtypes={n: weights[n].dtype for n in names},
        )

    def lift_flat(self, where: Positions) -> torch.Tensor:
        """The lifted weights, concatenated like ``where.flat``: the MLP runs once per distinct feature row."""
        residual: torch.Tensor = self.out(torch.tanh(self.hidden(where.features))).squeeze(-1)
        if self.max_correction is not None:
            residual = torch.tanh(residual) * self.max_correction
        return torch.addcmul(where.flat, torch.index_select(residual, 0, where.index), where.step)

    def lift(self, where: Positions) -> dict[str, torch.Tensor]:
        """The lifted tensors, by name."""
        return where.unflatten(self.lift_flat(where))

    def forward(self, w: torch.Tensor, depth: float) -> torch.Tensor:
        """One tensor, lifted (at ``depth`` in its model)."""
        if w.numel() == 0:
            return w
        return self.lift(self.positions({"w": w}, {"w": depth}))["w"]


class ProgressiveDequantizer(nn.Module):
    """A chain of :class:`DequantizerBlock`, one per consecutive pair of ``levels`` (e.g. 6 -> 8 -> 12 -> 16 -> 32).

    Weights at ``b`` bits enter at level ``b`` and pass through every later block; fp32 weights pass unchanged.
    """

    def __init__(self, levels: Sequence[int], hidden: int = 8, max_correction: float | None = None) -> None:
        super().__init__()
        levels = list(levels)
        if levels != sorted(set(levels)) or not levels or levels[-1] != FULL:
            raise ValueError(f"chain must be increasing bitwidths ending at {FULL}, got {levels}")
        for bits in levels[:-1]:
            quant.check_bits(bits)
        self.levels = levels
        self.chain = [DequantizerBlock(lo, hi, hidden, max_correction) for lo, hi in itertools.pairwise(levels)]
        self.blocks = nn.ModuleList(self.chain)

    def block_index(self, low: int) -> int:
        if low not in self.levels[:-1]:
            raise ValueError(f"bitwidth {low} is not a level of the dequantizer chain {self.levels}")
        return self.levels.index(low)

    @staticmethod
    def depths(weights: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Each floating tensor's depth in the model, in [0, 1] (its place among the floating tensors)."""
        floating = [k for k, v in weights.items() if v.is_floating_point()]
        return {name: i / max(1, len(floating) - 1) for i, name in enumerate(floating)}

    def lift(self, weights: Mapping[str, torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
        """``weights`` at ``bits`` bits through the blocks from level ``bits`` to the end. Integer and empty
        tensors pass unchanged."""
        if bits == FULL:
            return dict(weights)
        start = self.block_index(bits)
        out = dict(weights)
        if not any(out[name].numel() for name in self.depths(out)):
            return out
        for index in range(start, len(self.chain)):
            out.update(self.chain[index].lift(self.block_positions(index, out)))
        return out

    def block_positions(self, index: int, weights: Mapping[str, torch.Tensor]) -> Positions:
        """Block ``index``'s view of the floating tensors of ``weights`` (for :meth:`lift_block`)."""
        return self.chain[index].positions(weights, self.depths(weights))

    def lift_block(self, index: int, positions: Positions) -> torch.Tensor:
        """The weights of ``positions`` through block ``index`` alone, concatenated (training a block)."""
        return self.chain[index].lift_flat(positions)


def relative_mse(lifted: torch.Tensor, target: torch.Tensor, where: Positions) -> torch.Tensor:
    """Mean over the tensors of ``where`` of ``|lifted - target|^2 / |target|^2``, both concatenated like
    ``where.flat``."""
    error = where.tensor_sums((lifted - target).pow(2))
    return (error / where.tensor_sums(target.pow(2)).clamp_min(1e-30)).mean()
