"""ProWD's progressive dequantizer: a chain of small element-wise MLPs that lift low-bitwidth weights towards full
precision (``shared/algorithms/prowd.md``). :class:`ProWD` (``strategies/prowd.py``) trains and applies it.

A block's MLP sees each weight through three features: its value over its channel's largest magnitude, whether the
tensor is bias-like, and the tensor's depth in the model. The last two are constant over a tensor, so a block's
residual is a function of the first alone, and a tensor on a low-bitwidth grid holds few distinct values of it (its
``2 * qmax + 1`` grid points, each a few ulps apart across channels, whatever the tensor's size). A block therefore
evaluates its MLP once per distinct value and gathers (:class:`Positions`): the same residuals as evaluating it per
weight, at the cost of the distinct values.
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
    """One tensor as a :class:`DequantizerBlock` sees it: its weights per channel (``flat``, channels x n), the
    distinct values of weight / channel's largest magnitude (``values``), the index of each weight's value
    (``index``, like ``flat``), and the channel's quantization step at the block's lower bitwidth (``step``,
    channels x 1). Data, not parameters: nothing here takes a gradient."""

    flat: torch.Tensor
    values: torch.Tensor
    index: torch.Tensor
    step: torch.Tensor
    bias_like: bool


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

    def positions(self, w: torch.Tensor) -> Positions:
        """``w`` as this block sees it (computed once, lifted by :meth:`lift` as often as needed)."""
        w = w.detach()
        channels = quant.num_channels(w.shape)
        flat = w.reshape(channels, w.numel() // channels if channels else 0)
        if flat.numel() == 0:
            empty = flat.reshape(-1)
            return Positions(flat, empty, empty.long(), flat[:, :1], w.dim() <= 1)
        absmax = flat.abs().amax(dim=1, keepdim=True).clamp_min(2.0**-126)
        values, index = torch.unique(flat / absmax, return_inverse=True)
        return Positions(flat, values, index, quant.channel_scales(flat, self.low), w.dim() <= 1)

    def lift(self, where: Positions, depth: float) -> torch.Tensor:
        """The lifted weights, shaped like ``where.flat``."""
        if where.flat.numel() == 0:
            return where.flat
        u = where.values
        features = torch.stack([u, torch.full_like(u, float(where.bias_like)), torch.full_like(u, depth)], dim=-1)
        residual: torch.Tensor = self.out(torch.tanh(self.hidden(features))).squeeze(-1)
        if self.max_correction is not None:
            residual = torch.tanh(residual) * self.max_correction
        return where.flat + residual[where.index] * where.step

    def forward(self, w: torch.Tensor, depth: float) -> torch.Tensor:
        return self.lift(self.positions(w), depth).reshape(w.shape)


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
        """``weights`` at ``bits`` bits through the blocks from level ``bits`` to the end. Integer tensors pass
        unchanged."""
        if bits == FULL:
            return dict(weights)
        depths = self.depths(weights)
        out = dict(weights)
        for block in self.chain[self.block_index(bits) :]:
            for name, depth in depths.items():
                out[name] = block(out[name], depth)
        return out

    def block_positions(self, index: int, weights: Mapping[str, torch.Tensor]) -> dict[str, Positions]:
        """Block ``index``'s view of each floating tensor of ``weights`` (for :meth:`lift_block`)."""
        block = self.chain[index]
        return {name: block.positions(weights[name]) for name in self.depths(weights)}

    def lift_block(
        self, index: int, weights: Mapping[str, torch.Tensor], positions: Mapping[str, Positions]
    ) -> dict[str, torch.Tensor]:
        """``weights`` through block ``index`` alone, from their :meth:`block_positions` (training a block)."""
        block, depths = self.chain[index], self.depths(weights)
        out = dict(weights)
        for name, where in positions.items():
            out[name] = block.lift(where, depths[name]).reshape(weights[name].shape)
        return out


def relative_mse(lifted: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean over floating tensors of ``|lifted - target|^2 / |target|^2``."""
    terms = [
        (lifted[k] - v).pow(2).sum() / v.pow(2).sum().clamp_min(1e-30)
        for k, v in target.items()
        if v.is_floating_point() and v.numel()
    ]
    return torch.stack(terms).mean()
