"""FedP3 (Yi et al., ICLR 2024): each client trains a few shared layers of a pruned model; its head stays at home.

The model is split into **layers** (the tensors of one module: ``fc1.weight`` and ``fc1.bias`` form layer ``fc1``),
in the order of the state dict. The last layer is the **personal head**: it is never sent; each client keeps and
trains its own (see :class:`fedhet.clients.trainer.ClientState`). The other layers are **shared**.

:class:`FedP3Planner` gives client ``i`` ``k`` consecutive shared layers to train, starting at layer ``i mod L``
(``L`` shared layers, wrapping around, so every layer is trained by the same share of the clients; the released code
assigns contiguous blocks of client ids, which is the same split up to a relabelling of clients):

- ``lowerb``: ``k = 1``; ``opu2``: ``k = 2``; ``opu3``: ``k = 3`` (capped at ``L``);
- ``budget``: the largest ``k`` whose footprint (assigned layers dense, the other shared layers pruned, the head)
  fits the client's ``memory_bytes``; when even one layer does not fit at ``keep_ratio``, the other layers are
  pruned harder, just enough to fit. ``memory_bytes = 0`` (no limit) gives every shared layer.

The assigned layers travel dense; the other shared layers are pruned per layer, weights only (biases and other
1-dimensional tensors travel dense): ``magnitude`` keeps the ``keep_ratio`` largest magnitudes of each weight tensor,
``ordered_dropout`` keeps the first ``ceil(keep_ratio * rows)`` output units' weights (uniformly over layers; their
biases travel dense like every bias). Pruned tensors
are listed in the plan's ``sparse`` set and travel in the codec's sparse encoding, or packed at ``frozen_bits``
(8: int8, a quarter of fp32's bytes, with the quantization error of int8 on layers the client only runs forward;
the plan's ``sparse_bits``). Packed, the plan holds them already rounded to that grid (per output channel, as the
codec rounds them; rounding them again is exact), so every runtime, the simulator included, trains on the values
that travel. A client sends back only its
assigned layers; :class:`~fedhet.strategies.aggregators.WeightedMean` then averages every shared tensor over the
clients that sent it (plain mean with ``strategy.scheduler.weighting=uniform``; layer-count weighting, normalised
per layer, with ``weighting=layers``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedhet import quant
from fedhet.strategies.base import Plan
from fedhet.strategies.layers import layer_names, layer_of
from fedhet.types import ClientInfo, Weights

__all__ = ["VARIANTS", "FedP3Planner", "prune"]

#: layer-assignment variants and the number of consecutive shared layers each gives (0: from the memory budget)
VARIANTS: Mapping[str, int] = {"lowerb": 1, "opu2": 2, "opu3": 3, "budget": 0}
PRUNINGS = ("magnitude", "ordered_dropout")
_MIN_KEEP = 0.01  # a budget that needs a harder pruning than this cannot hold the model


def _prunable(tensor: torch.Tensor) -> bool:
    """Weights of linear and convolutional layers are pruned; biases and other vectors travel dense."""
    return tensor.is_floating_point() and tensor.dim() >= 2


def prune(tensor: torch.Tensor, keep_ratio: float, method: str = "magnitude") -> torch.Tensor:
    """A copy of ``tensor`` with all but ``keep_ratio`` of its values set to zero.

    ``magnitude`` keeps the ``ceil(keep_ratio * numel)`` largest absolute values (ties broken by position);
    ``ordered_dropout`` keeps the first ``ceil(keep_ratio * rows)`` rows (output units) whole.
    """
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    if keep_ratio == 1.0:
        return tensor.clone()
    if method == "ordered_dropout":
        out = tensor.clone()
        out[math.ceil(keep_ratio * tensor.shape[0]) :] = 0
        return out
    if method != "magnitude":
        raise ValueError(f"pruning must be one of {', '.join(PRUNINGS)}, got {method!r}")
    flat = tensor.reshape(-1)
    keep = math.ceil(keep_ratio * flat.numel())
    kept = torch.topk(flat.abs(), keep, sorted=False).indices
    out = torch.zeros_like(flat)
    out[kept] = flat[kept]
    return out.reshape(tensor.shape)


@dataclass(frozen=True)
class _Layout:
    """The layers of one model: shared layers in order, each with its tensor names, and the head's names."""

    shared: tuple[str, ...]
    tensors: Mapping[str, tuple[str, ...]]
    head: tuple[str, ...]


class FedP3Planner:
    """FedP3's server -> client plan: assigned shared layers dense, the other shared layers pruned, no head.

    Args:
        variant: ``lowerb``, ``opu2``, ``opu3`` or ``budget`` (see the module docstring).
        keep_ratio: share of each pruned weight tensor kept, in (0, 1] (the released code's default: 0.9).
        pruning: ``magnitude`` (unstructured, per layer) or ``ordered_dropout``.
        head_layers: how many trailing layers are personal (1: the classifier).
        frozen_bits: bits the pruned (frozen) shared layers travel at: 32 sparse floats, 8 int8 (any packed
            bitwidth of :mod:`fedhet.quant`); below 32 the plan holds them rounded to that many bits.
        train_all: the client trains every layer it receives, as the released code does, and sends back only its
            assigned ones; false (the paper's description) freezes the unassigned layers.
    """

    def __init__(
        self,
        variant: str = "opu2",
        keep_ratio: float = 0.9,
        pruning: str = "magnitude",
        head_layers: int = 1,
        frozen_bits: int = 32,
        train_all: bool = False,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        if pruning not in PRUNINGS:
            raise ValueError(f"pruning must be one of {', '.join(PRUNINGS)}, got {pruning!r}")
        if head_layers < 1:
            raise ValueError(f"head_layers must be >= 1, got {head_layers}")
        if frozen_bits != quant.FULL_PRECISION and frozen_bits not in quant.BITWIDTHS:
            choices = ", ".join(map(str, quant.BITWIDTHS))
            raise ValueError(f"frozen_bits must be 32 or one of {choices}, got {frozen_bits}")
        self.frozen_bits = frozen_bits
        self.train_all = train_all
        self.variant = variant
        self.keep_ratio = keep_ratio
        self.pruning = pruning
        self.head_layers = head_layers
        # keep ratio -> pruned shared weights of the global weights ``_source`` at version ``_version`` (the weights
        # object too, not only the number: an event that failed and was taken back may have planned a version that
        # is made again, from other weights)
        self._source: Weights | None = None
        self._version = -1
        self._pruned: dict[float, dict[str, torch.Tensor]] = {}

    def layout(self, weights: Weights) -> _Layout:
        """Shared layers and head of a model given by its state dict."""
        layers = layer_names(weights)
        if len(layers) <= self.head_layers:
            raise ValueError(
                f"FedP3 needs at least one shared layer besides the {self.head_layers} personal one(s); "
                f"the model has {len(layers)} layer(s)"
            )
        tensors = {layer: tuple(n for n in weights if layer_of(n) == layer) for layer in layers}
        shared = tuple(layers[: -self.head_layers])
        head = tuple(n for layer in layers[-self.head_layers :] for n in tensors[layer])
        return _Layout(shared, tensors, head)

    def assigned_layers(self, client: ClientInfo, weights: Weights) -> tuple[tuple[str, ...], float]:
        """The shared layers ``client`` trains, and the keep ratio of the others."""
        layout = self.layout(weights)
        count = len(layout.shared)
        first = client.client_id % count
        order = [layout.shared[(first + j) % count] for j in range(count)]
        k = VARIANTS[self.variant]
        if k:
            return tuple(order[: min(k, count)]), self.keep_ratio
        budget = client.profile.memory_bytes
        if budget == 0:
            return tuple(order), self.keep_ratio
        for k in range(count, 0, -1):
            if _footprint(weights, layout, order[:k], self.keep_ratio) <= budget:
                return tuple(order[:k]), self.keep_ratio
        # on a grid of 1%, so clients of similar budgets share one pruned copy per version
        keep = math.floor(100 * _keep_to_fit(weights, layout, order[:1], budget)) / 100
        if keep < _MIN_KEEP:
            need = _footprint(weights, layout, order[:1], _MIN_KEEP)
            raise ValueError(
                f"client {client.client_id}: a memory budget of {budget} bytes cannot hold one shared layer "
                f"with the others pruned to {_MIN_KEEP:.0%} ({need} bytes needed)"
            )
        return tuple(order[:1]), keep

    def plan(self, client: ClientInfo, weights: Weights, version: int) -> Plan:
        layout = self.layout(weights)
        assigned, keep = self.assigned_layers(client, weights)
        if weights is not self._source or version != self._version:
            self._source, self._version, self._pruned = weights, version, {}
        pruned = self._pruned.get(keep)
        if pruned is None:  # every client of a version and keep ratio shares one pruned (and rounded) copy
            pruned = {
                n: quant.fake_quantize(prune(weights[n], keep, self.pruning), self.frozen_bits)
                for layer in layout.shared
                for n in layout.tensors[layer]
                if _prunable(weights[n])
            }
            self._pruned[keep] = pruned
        train = frozenset(n for layer in assigned for n in layout.tensors[layer])
        sent = {n: weights[n] if n in train else pruned.get(n, weights[n]) for n in _shared_names(layout)}
        sparse = frozenset(n for n in sent if n not in train and n in pruned)
        return Plan(sent, train=train, sparse=sparse, sparse_bits=self.frozen_bits, train_all=self.train_all)


def _shared_names(layout: _Layout) -> list[str]:
    return [n for layer in layout.shared for n in layout.tensors[layer]]


def _footprint(weights: Weights, layout: _Layout, assigned: Sequence[str], keep: float) -> int:
    """Bytes a client holds: assigned layers and head dense (fp32), other shared layers pruned (mask + values)."""
    total = sum(weights[n].numel() * 4 for n in layout.head)
    for layer in layout.shared:
        for n in layout.tensors[layer]:
            numel = weights[n].numel()
            if layer in assigned or not _prunable(weights[n]):
                total += numel * 4
            else:
                total += (numel + 7) // 8 + math.ceil(keep * numel) * 4
    return total


def _keep_to_fit(weights: Weights, layout: _Layout, assigned: Sequence[str], budget: int) -> float:
    """The keep ratio of the unassigned shared layers that makes the footprint fit ``budget`` (may be <= 0)."""
    dense = _footprint(weights, layout, assigned, 0.0)  # everything but the kept values of pruned tensors
    prunable = sum(
        weights[n].numel()
        for layer in layout.shared
        if layer not in assigned
        for n in layout.tensors[layer]
        if _prunable(weights[n])
    )
    return min(1.0, (budget - dense) / (4 * prunable)) if prunable else 1.0
