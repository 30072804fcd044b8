"""ProWD (Yoon et al., ICML 2022): bitwidth-heterogeneous FL with progressive weight dequantization, and its
baselines. Spec and the choices made where the paper is silent: ``shared/algorithms/prowd.md``.

Roles:

- :class:`BitwidthPlanner` (``bitwidth``): each client receives the global weights re-quantized to its own bitwidth
  (:mod:`fedhet.quant`: symmetric, one scale per output channel). Shared by ProWD and both baselines.
- :class:`ProWD` (``prowd``): each low-bitwidth upload is lifted to full precision by the **progressive
  dequantizer** (a chain of :class:`DequantizerBlock`), giving an update ``u_i`` against the global model;
  **selective aggregation** keeps, for uploads below ``high_bitwidth``, only the elements of ``u_i`` that agree with
  the high-bitwidth uploads' mean update of the same round (:func:`selective_mask`); each element of the new global
  model is ``theta`` plus the weighted mean of ``u_i`` over the uploads that keep it. The dequantizer is trained at
  every aggregation on pairs built from each high-bitwidth upload, with a reconstruction and a distillation loss on
  a server buffer (:meth:`ProWD.attach`). With ``dequantizer`` and ``selective`` both off it is exactly the naive
  mean.
- :class:`GroupedMean` (``grouped_mean``): FedGroupedAvg, one model per bitwidth group averaged only within its
  group; the global (evaluated) model is the highest group's. The naive baseline is ``weighted_mean``.

Per upload or per group. As in the paper, ProWD dequantizes, masks and learns from **each upload**
(``per_upload``, the default): it asks the scheduler to keep the round's updates apart (``needs_updates``; memory
(uploads in the round) x model, like the robust aggregators). With ``per_upload: false`` it works on each bitwidth
group's mean instead (:func:`group_updates`: the buffer's running sums per (start version, bitwidth), memory
(versions x bitwidths) x model), for schedulers that fold updates on arrival (FedCompass): a group's mean is
re-quantized to its grid before it is lifted, and the group is masked and learnt from as one upload.

Choices where the paper is silent, named in config: ``chain`` (bitwidth levels of the dequantizer), ``hidden``
(block width), ``max_correction`` (none: a block's residual is unbounded, as the paper's), ``high_bitwidth`` (which
uploads are the reference), ``dequantizer_steps``/``lr``, ``recon_weight``, ``distill_weight``, ``temperature``,
``mask_steps``/``mask_lr``/``mask_init``/``mask_threshold``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fedhet import quant
from fedhet.strategies.base import Plan
from fedhet.strategies.buffer import UpdateBuffer
from fedhet.strategies.dequantizer import DequantizerBlock, ProgressiveDequantizer, relative_mse
from fedhet.strategies.errors import StateError
from fedhet.types import ClientInfo, Weights

__all__ = [
    "BitwidthPlanner",
    "DequantizerBlock",
    "GroupUpdate",
    "GroupedMean",
    "GroupedModels",
    "ProWD",
    "ProgressiveDequantizer",
    "each_update",
    "group_updates",
    "selective_mask",
]

FULL = quant.FULL_PRECISION
SERVER_BUFFER = 512  # inputs of the server-side distillation buffer


def _check_bitwidth(bits: int, who: str) -> int:
    if bits != FULL and bits not in quant.BITWIDTHS:
        raise ValueError(f"{who}: bitwidth {bits} is not one of {', '.join(map(str, (*quant.BITWIDTHS, FULL)))}")
    return bits


# ---------------------------------------------------------------------------------------------- grouping


@dataclass(frozen=True)
class GroupUpdate:
    """Updates of one bitwidth, averaged (one upload, or a bitwidth group's mean).

    Attributes:
        bitwidth: bits per weight of the group's clients (32 = fp32).
        mean: weighted mean of their weights (floating tensors) and plain sum of integer tensors.
        weight: the sum of their update weights.
        count: how many updates.
    """

    bitwidth: int
    mean: dict[str, torch.Tensor]
    weight: float
    count: int


def group_updates(updates: UpdateBuffer) -> list[GroupUpdate]:
    """One :class:`GroupUpdate` per bitwidth present in ``updates``, in increasing bitwidth order."""
    sums: dict[int, tuple[dict[str, torch.Tensor], float, int]] = {}
    for _, bucket in updates.items():
        bits = bucket.bitwidth
        acc, weight, count = sums.get(bits, ({}, 0.0, 0))
        for name, value in bucket.weighted_sum.items():
            acc[name] = value.clone() if name not in acc else acc[name] + value
        sums[bits] = (acc, weight + bucket.total_weight, count + bucket.count)
    groups = []
    for bits in sorted(sums):
        acc, weight, count = sums[bits]
        mean = {k: v / weight if v.is_floating_point() else v for k, v in acc.items()}
        groups.append(GroupUpdate(bits, mean, weight, count))
    return groups


def each_update(updates: UpdateBuffer) -> list[GroupUpdate]:
    """One :class:`GroupUpdate` per upload in ``updates`` (which must keep them apart), in increasing bitwidth
    order and, within a bitwidth, in arrival order."""
    if not updates.keep_updates:
        raise ValueError("ProWD per upload needs every update apart, but the scheduler's buffer folds them together")
    members = [
        (bucket.bitwidth, GroupUpdate(bucket.bitwidth, dict(own), weight, 1))
        for _, bucket in updates.items()
        for own, weight in bucket.updates
    ]
    return [m for _, m in sorted(members, key=lambda pair: pair[0])]


def _in_model_dtypes(group: GroupUpdate, global_weights: Weights) -> GroupUpdate:
    """``group`` with its floating means cast to the global model's dtypes (the buffer sums in float64)."""
    _check_bitwidth(group.bitwidth, "an update")
    if set(group.mean) != set(global_weights):
        raise ValueError(f"{group.bitwidth}-bit updates carry tensors {sorted(group.mean)}, not the model's")
    mean = {k: v.to(global_weights[k].dtype) if v.is_floating_point() else v for k, v in group.mean.items()}
    return GroupUpdate(group.bitwidth, mean, group.weight, group.count)


def _integer_mean(groups: Sequence[GroupUpdate], name: str, like: torch.Tensor) -> torch.Tensor:
    total = torch.stack([g.mean[name] for g in groups]).sum(0)
    return torch.div(total, sum(g.count for g in groups), rounding_mode="floor").to(like.dtype)


# ---------------------------------------------------------------------------------------------- planner


class GroupedModels(dict[str, torch.Tensor]):
    """Global weights (the highest group's model) that also carry one model per bitwidth group (GroupedMean)."""

    def __init__(self, top: Mapping[str, torch.Tensor], by_bitwidth: Mapping[int, Mapping[str, torch.Tensor]]):
        super().__init__(top)
        self.by_bitwidth = {b: dict(m) for b, m in by_bitwidth.items()}


class BitwidthPlanner:
    """Each client receives the global weights re-quantized to its bitwidth (its group's model under
    :class:`GroupedMean`). Quantized copies are made once per (version, bitwidth) and shared by the clients of that
    bitwidth: memory is (bitwidths in use) x model. They belong to the weights object they were made from too, not
    only to the version number: an event that failed and was taken back may have planned a version that is made
    again, from other weights."""

    def __init__(self) -> None:
        self._source: Weights | None = None
        self._version = -1
        self._cache: dict[int, Plan] = {}

    def plan(self, client: ClientInfo, weights: Weights, version: int) -> Plan:
        bits = _check_bitwidth(client.profile.bitwidth, f"client {client.client_id}")
        if weights is not self._source or version != self._version:
            self._source, self._version, self._cache = weights, version, {}
        planned = self._cache.get(bits)
        if planned is None:
            source: Weights = weights
            if isinstance(weights, GroupedModels):
                source = weights.by_bitwidth.get(bits, weights)
            planned = Plan(quant.quantize_weights(source, bits))
            self._cache[bits] = planned
        return planned


# ---------------------------------------------------------------------------------------------- selection


def selective_mask(
    update: torch.Tensor,
    reference: torch.Tensor,
    steps: int = 10,
    lr: float = 0.5,
    init: float = 2.0,
    threshold: float = 0.5,
    sizes: Sequence[int] | None = None,
) -> torch.Tensor:
    """Binary mask of the elements of ``update`` to keep: scores ``s`` (all ``init``) are trained for ``steps``
    Adam steps to maximise ``cos(sigmoid(s) * update, reference)``, then ``sigmoid(s) > threshold``.

    ``update`` is one update shaped like ``reference`` or a stack of them (uploads x ``reference.shape``), and
    ``sizes`` splits the flattened ``reference`` into consecutive segments (a model's tensors; default: one). Each
    (upload, segment) is its own problem, as if masked alone: the loss is the sum of their cosines and Adam works
    element by element, so one optimisation serves them all. A segment whose update or reference is zero is kept
    whole."""
    r = reference.detach().reshape(-1).float()
    if r.numel() == 0:
        return torch.ones_like(update, dtype=torch.bool)
    rows = update.detach().reshape(-1, r.numel()).float()
    segments = list(sizes) if sizes is not None else [r.numel()]
    if sum(segments) != r.numel():
        raise ValueError(f"segment sizes {segments} do not add up to the reference's {r.numel()} elements")

    def segment_sums(x: torch.Tensor) -> torch.Tensor:  # (..., elements) -> (..., segments)
        return torch.stack([chunk.sum(-1) for chunk in torch.split(x, segments, dim=-1)], dim=-1)

    eps = 1e-8  # F.cosine_similarity's
    r_norm = segment_sums(r * r).sqrt()
    whole = (segment_sums(rows * rows) == 0) | (r_norm == 0)
    scores = torch.full_like(rows, init, requires_grad=True)
    optimizer = torch.optim.Adam([scores], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        masked = torch.sigmoid(scores) * rows
        norms = segment_sums(masked * masked).sqrt().clamp_min(eps) * r_norm.clamp_min(eps)
        cosine = segment_sums(masked * r) / norms
        (-cosine.sum()).backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    repeats = torch.tensor(segments, device=r.device)
    keep = (torch.sigmoid(scores.detach()) > threshold) | whole.repeat_interleave(repeats, dim=-1)
    return keep.reshape(update.shape)


# ---------------------------------------------------------------------------------------------- ProWD


class ProWD:
    """ProWD aggregation (see the module docstring).

    Args:
        dequantizer: lift low-bitwidth uploads through the progressive dequantizer (ablation: off).
        selective: mask low-bitwidth uploads by agreement with the high uploads' mean update (ablation: off).
        per_upload: dequantize, mask and learn from each upload, as the paper (the scheduler keeps the round's
            updates apart); false: from each bitwidth group's mean (for schedulers that fold updates on arrival).
        chain: bitwidth levels of the dequantizer, increasing, ending at 32 (every client bitwidth must be one).
        hidden: width of each block's hidden layer.
        max_correction: bound on a block's residual, in quantization steps (None: unbounded, as the paper).
        high_bitwidth: uploads at or above this bitwidth are the reference (mask all ones, dequantizer targets).
        dequantizer_steps: Adam steps per block at every aggregation, cycling over the round's high uploads.
        lr: the dequantizer's Adam learning rate.
        recon_weight: weight of the reconstruction loss (relative MSE between lifted and target weights).
        distill_weight: weight of the distillation loss (KL between the model's outputs on the server buffer with
            target and with lifted weights); > 0 needs :meth:`attach`.
        temperature: distillation temperature.
        distill_batch: server-buffer samples per distillation step.
        mask_steps, mask_lr, mask_init, mask_threshold: :func:`selective_mask`.
        seed: seeds the distillation minibatches.
    """

    def __init__(
        self,
        dequantizer: bool = True,
        selective: bool = True,
        per_upload: bool = True,
        chain: Sequence[int] = (2, 4, 6, 8, 12, 16, 32),
        hidden: int = 8,
        max_correction: float | None = None,
        high_bitwidth: int = 16,
        dequantizer_steps: int = 20,
        lr: float = 1e-2,
        recon_weight: float = 1.0,
        distill_weight: float = 1.0,
        temperature: float = 2.0,
        distill_batch: int = 64,
        mask_steps: int = 10,
        mask_lr: float = 0.5,
        mask_init: float = 2.0,
        mask_threshold: float = 0.5,
        seed: int = 0,
    ) -> None:
        for key, value in (("hidden", hidden), ("distill_batch", distill_batch)):
            if value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        for key, value in (("dequantizer_steps", dequantizer_steps), ("mask_steps", mask_steps)):
            if value < 0:
                raise ValueError(f"{key} must be >= 0, got {value}")
        for key, fvalue in (("recon_weight", recon_weight), ("distill_weight", distill_weight)):
            if not (math.isfinite(fvalue) and fvalue >= 0):
                raise ValueError(f"{key} must be finite and >= 0, got {fvalue}")
        for key, fvalue in (("lr", lr), ("temperature", temperature), ("mask_lr", mask_lr)):
            if not (math.isfinite(fvalue) and fvalue > 0):
                raise ValueError(f"{key} must be finite and > 0, got {fvalue}")
        if not 0.0 < mask_threshold < 1.0:
            raise ValueError(f"mask_threshold must be in (0, 1), got {mask_threshold}")
        _check_bitwidth(high_bitwidth, "high_bitwidth")
        self.use_dequantizer = dequantizer
        self.selective = selective
        self.per_upload = per_upload
        self.dequantizer = ProgressiveDequantizer(list(chain), hidden, max_correction)
        self.high_bitwidth = high_bitwidth
        self.dequantizer_steps = dequantizer_steps
        self.lr = lr
        self.recon_weight = recon_weight
        self.distill_weight = distill_weight
        self.temperature = temperature
        self.distill_batch = distill_batch
        self.mask_steps = mask_steps
        self.mask_lr = mask_lr
        self.mask_init = mask_init
        self.mask_threshold = mask_threshold
        self.seed = seed
        self.model: nn.Module | None = None
        self.server_inputs: torch.Tensor | None = None
        self.reference: dict[str, torch.Tensor] = {}  # the latest high-bitwidth mean update
        self.lowest_seen = FULL  # lowest client bitwidth aggregated so far: blocks below it are never used
        self.last_masks: dict[int, float] = {}  # bitwidth -> fraction of elements kept at the latest aggregation

    @property
    def needs_updates(self) -> bool:
        """Whether the scheduler must keep the round's updates apart (the strategy builder reads it)."""
        return self.per_upload

    @property
    def server_samples(self) -> int:
        """Inputs of the server buffer distillation trains on (0 without distillation)."""
        return SERVER_BUFFER if self.distill_weight > 0 else 0

    def attach(self, model: nn.Module, server_inputs: torch.Tensor) -> None:
        """Give the server what distillation needs: a model of the run's architecture (its weights are ignored;
        the dequantizer's candidates are plugged in) and the server buffer's inputs (held-out samples no client
        holds; labels are not needed)."""
        if len(server_inputs) == 0:
            raise ValueError("the ProWD server buffer is empty; give it at least one sample")
        self.model = model
        self.server_inputs = server_inputs

    # ------------------------------------------------------------------------------------ aggregation

    def aggregate(self, global_weights: Weights, updates: UpdateBuffer, version: int) -> dict[str, torch.Tensor]:
        """The next global model. Nothing of this aggregator changes until it returns (the dequantizer trains as a
        copy that replaces it at the end), so one that raises is left as it was."""
        self._place(next(iter(global_weights.values())).device)
        members = each_update(updates) if self.per_upload else group_updates(updates)
        groups = [_in_model_dtypes(m, global_weights) for m in members]
        if not groups:
            return dict(global_weights)
        high = [g for g in groups if g.bitwidth >= self.high_bitwidth]
        lows = [g.bitwidth for g in groups if g.bitwidth < FULL]
        lowest = min([self.lowest_seen, *lows])
        dequantizer = self.dequantizer
        if self.use_dequantizer:  # trained whenever high uploads arrive, so it is ready when low ones do
            dequantizer = copy.deepcopy(dequantizer).to(next(iter(global_weights.values())).device)
            self._train_dequantizer(dequantizer, high, lowest, version)
        floating = [k for k, v in global_weights.items() if v.is_floating_point()]
        deltas = []
        for group in groups:
            lifted = self._lift(dequantizer, group)
            deltas.append({k: lifted[k].double() - global_weights[k].double() for k in floating})
        # the reference is this round's mean high-bitwidth update: one from an earlier round was taken from another
        # global model, so without high uploads this round nothing is masked
        reference: dict[str, torch.Tensor] = {}
        if high:
            high_weight = sum(g.weight for g in high)
            mean_update = {k: torch.zeros_like(deltas[0][k]) for k in floating}
            for group, delta in zip(groups, deltas, strict=True):
                if group.bitwidth >= self.high_bitwidth:
                    for k in floating:
                        mean_update[k].add_(delta[k], alpha=group.weight / high_weight)
            reference = {k: v.float() for k, v in mean_update.items()}
        masks = self._masks(groups, deltas, reference, floating)
        out: dict[str, torch.Tensor] = {}
        kept: dict[int, float] = {}
        for name, current in global_weights.items():
            if not current.is_floating_point():
                out[name] = _integer_mean(groups, name, current)
                continue
            # each element is the weighted mean of the updates that keep it (a masked-out element does not count)
            change = torch.zeros_like(current, dtype=torch.float64)
            kept_weight = torch.zeros_like(change)
            for number, (group, delta) in enumerate(zip(groups, deltas, strict=True)):
                if number in masks:
                    mask = masks[number][name].double()
                    kept[group.bitwidth] = kept.get(group.bitwidth, 0.0) + float(mask.sum())
                    change.add_(delta[name] * mask, alpha=group.weight)
                    kept_weight.add_(mask, alpha=group.weight)
                else:
                    change.add_(delta[name], alpha=group.weight)
                    kept_weight.add_(group.weight)
            mean = torch.where(kept_weight > 0, change / kept_weight.clamp_min(1e-300), torch.zeros_like(change))
            out[name] = (current.double() + mean).to(current.dtype)
        numel = sum(global_weights[k].numel() for k in floating)
        uploads = {b: sum(1 for g in groups if g.bitwidth == b) for b in kept}
        self.dequantizer, self.reference, self.lowest_seen = dequantizer, reference, lowest
        self.last_masks = {b: total / (numel * uploads[b]) for b, total in kept.items()}
        return out

    def _masks(
        self,
        groups: Sequence[GroupUpdate],
        deltas: Sequence[Mapping[str, torch.Tensor]],
        reference: Mapping[str, torch.Tensor],
        floating: Sequence[str],
    ) -> dict[int, dict[str, torch.Tensor]]:
        """The selective-aggregation masks of the low uploads (by their number in ``groups``), each a mask per
        floating tensor, all found in one optimisation (:func:`selective_mask`); none without a reference."""
        low = [i for i, g in enumerate(groups) if g.bitwidth < self.high_bitwidth]
        if not self.selective or not reference or not low:
            return {}
        sizes = [reference[k].numel() for k in floating]
        stacked = torch.stack([torch.cat([deltas[i][k].reshape(-1).float() for k in floating]) for i in low])
        flat_reference = torch.cat([reference[k].reshape(-1) for k in floating])
        keep = selective_mask(
            stacked, flat_reference, self.mask_steps, self.mask_lr, self.mask_init, self.mask_threshold, sizes
        )
        return {
            i: {k: m.reshape(reference[k].shape) for k, m in zip(floating, row.split(sizes), strict=True)}
            for i, row in zip(low, keep, strict=True)
        }

    def _lift(self, dequantizer: ProgressiveDequantizer, group: GroupUpdate) -> dict[str, torch.Tensor]:
        """Low-bitwidth weights at full precision: on the group's grid (an upload already is; a group's mean is
        re-quantized to it), then through ``dequantizer``."""
        if not self.use_dequantizer or group.bitwidth == FULL:
            return group.mean
        with torch.no_grad():
            return dequantizer.lift(quant.quantize_weights(group.mean, group.bitwidth), group.bitwidth)

    def _place(self, device: torch.device) -> None:
        """Keep the server buffer where the weights are (a simulation on a GPU keeps it there); the dequantizer
        goes there as it is copied for training."""
        if self.model is not None and self.server_inputs is not None:
            self.model.to(device)
            self.server_inputs = self.server_inputs.to(device)

    # ------------------------------------------------------------------------------------ training

    def _train_dequantizer(
        self, dequantizer: ProgressiveDequantizer, high: Sequence[GroupUpdate], lowest: int, version: int
    ) -> None:
        """Train every block of ``dequantizer`` that some client's weights pass through (from ``lowest``, the lowest
        bitwidth seen) and that has a target: one pair from each high upload (bitwidth >= the block's higher one),
        the steps cycling over them."""
        if self.dequantizer_steps == 0 or not high or lowest == FULL:
            return
        if self.distill_weight > 0 and (self.model is None or self.server_inputs is None):
            raise ValueError(
                "ProWD's distillation loss needs the server buffer: the runtime must call "
                "aggregator.attach(model, server_inputs) (or set distill_weight: 0)"
            )
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + version)
        first = dequantizer.block_index(lowest)
        for index, block in enumerate(dequantizer.chain):
            if index < first:
                continue
            sources = [g for g in high if g.bitwidth >= block.high]
            if not sources:
                continue  # nothing holds weights at this block's higher bitwidth yet: it stays as trained so far
            optimizer = torch.optim.Adam(block.parameters(), lr=self.lr)
            # each upload's pair, rounded and positioned once for the block's steps (memory: a few models per upload)
            pairs = []
            for g in sources:
                low, target = quant.quantize_weights(g.mean, block.low), quant.quantize_weights(g.mean, block.high)
                where = dequantizer.block_positions(index, low)
                pairs.append((where, where.flatten(target), low, target))
            for step in range(self.dequantizer_steps):
                where, target_flat, low, target = pairs[step % len(pairs)]
                lifted = dequantizer.lift_block(index, where)
                loss = self.recon_weight * relative_mse(lifted, target_flat, where)
                if self.distill_weight > 0:
                    student = {**low, **where.unflatten(lifted)}
                    loss = loss + self.distill_weight * self._distill(student, target, generator)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()

    def _distill(
        self, lifted: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor:
        assert self.model is not None and self.server_inputs is not None
        n = len(self.server_inputs)
        idx = torch.randperm(n, generator=generator)[: min(n, self.distill_batch)]
        x = self.server_inputs[idx]
        t = self.temperature
        with torch.no_grad():
            teacher = functional_call(self.model, dict(target), (x,))
        student = functional_call(self.model, dict(lifted), (x,))
        return F.kl_div(
            F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1), reduction="batchmean", log_target=True
        ) * (t * t)

    # ------------------------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {
            "dequantizer": self.dequantizer.state_dict(),
            "reference": dict(self.reference),
            "lowest_seen": self.lowest_seen,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        keys = {"dequantizer", "reference", "lowest_seen"}
        if set(state) != keys:
            raise StateError(f"prowd state keys {sorted(state)} differ from {sorted(keys)}")
        lowest = int(state["lowest_seen"])
        if lowest != FULL and lowest not in self.dequantizer.levels:
            raise StateError(f"prowd state: lowest bitwidth {lowest} is not a level of the chain")
        try:
            self.dequantizer.load_state_dict(state["dequantizer"])
        except (RuntimeError, KeyError) as error:
            raise StateError(f"prowd dequantizer state does not fit the configured chain: {error}") from None
        reference = state["reference"]
        if not isinstance(reference, Mapping) or not all(isinstance(v, torch.Tensor) for v in reference.values()):
            raise StateError("prowd reference update must map names to tensors")
        self.reference = dict(reference)
        self.lowest_seen = lowest


# ---------------------------------------------------------------------------------------------- grouped


class GroupedMean:
    """FedGroupedAvg: each bitwidth group keeps its own model, the sample-weighted mean of its own clients' updates
    (groups never mix); the global model the runtime evaluates is the highest bitwidth group's. Pair it with the
    ``bitwidth`` planner, which hands each client its group's model. Memory: (bitwidth groups) x model."""

    def __init__(self) -> None:
        self.models: dict[int, dict[str, torch.Tensor]] = {}

    def aggregate(self, global_weights: Weights, updates: UpdateBuffer, version: int) -> dict[str, torch.Tensor]:
        models = dict(self.models)  # replaced whole at the end: a failed aggregation leaves the groups as they were
        for group in group_updates(updates):
            group = _in_model_dtypes(group, global_weights)
            models[group.bitwidth] = {
                k: v if v.is_floating_point() else _integer_mean([group], k, global_weights[k])
                for k, v in group.mean.items()
            }
        self.models = models
        return self.global_view(global_weights)

    def global_view(self, weights: Weights) -> dict[str, torch.Tensor]:
        """The global weights: the highest group's model, carrying every group's (``weights`` before any group)."""
        if not self.models:
            return dict(weights)
        return GroupedModels(self.models[max(self.models)], self.models)

    def state_dict(self) -> dict[str, Any]:
        return {"models": {str(b): dict(m) for b, m in self.models.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if set(state) != {"models"} or not isinstance(state["models"], Mapping):
            raise StateError(f"grouped mean state keys {sorted(state)} differ from ['models']")
        models = {}
        for bits, model in state["models"].items():
            if not isinstance(model, Mapping) or not all(isinstance(t, torch.Tensor) for t in model.values()):
                raise StateError(f"grouped mean: the model of group {bits!r} is not a mapping of tensors")
            try:
                models[_check_bitwidth(int(bits), "grouped mean state")] = dict(model)
            except ValueError as error:
                raise StateError(str(error)) from None
        self.models = models
