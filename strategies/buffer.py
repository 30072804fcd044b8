"""The update buffer: results folded into running weighted sums on arrival, one bucket per (start version,
bitwidth), so a round of a thousand clients costs what a round of ten does (see docs/DESIGN.md).

A buffer never changes a tensor or a dict it holds in place: folding an update makes new sums (the same arithmetic,
written to a new tensor) and a new dict of them. So a :meth:`UpdateBuffer.restore_point` holds references, not
copies, and an event that fails after folding an update puts the buffer back exactly, at no cost per update.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from fedhet.quant import FULL_PRECISION
from fedhet.strategies.errors import StateError
from fedhet.types import Result, StackedRow

__all__ = ["Bucket", "UpdateBuffer"]

_PENDING_CHUNKS = 2  # chunks per bucket whose rows may wait to be folded together (memory: that many chunks)


@dataclass
class Bucket:
    """Updates that started from one global version at one bitwidth, folded into a weighted sum.

    ``weighted_sum`` holds ``sum_i w_i * theta_i`` for floating-point tensors and the plain sum for integer
    tensors (counters, which are averaged unweighted). ``bitwidth`` is the bits per weight of every update folded
    in (32 = fp32), so bitwidth-aware aggregators never mix groups. ``updates`` holds each update's own tensors and
    weight, in arrival order, when the buffer keeps them apart (robust aggregators need them; else it is empty).

    An update may carry only some tensors (FedP3 clients send back the layers they trained): ``key_weights`` and
    ``key_counts`` hold, per tensor name, the total weight and the number of updates that carried it, so every
    tensor is averaged over its own contributors. For full updates they equal ``total_weight`` and ``count``.
    """

    weighted_sum: dict[str, torch.Tensor]
    total_weight: float = 0.0
    count: int = 0
    task_ids: list[int] = field(default_factory=list)
    bitwidth: int = FULL_PRECISION
    key_weights: dict[str, float] = field(default_factory=dict)
    key_counts: dict[str, int] = field(default_factory=dict)
    updates: list[tuple[Mapping[str, torch.Tensor], float]] = field(default_factory=list)

    def weight_of(self, name: str) -> float:
        """Total weight of the updates that carried tensor ``name`` (0 when none did)."""
        return self.key_weights.get(name, 0.0)

    @property
    def partial(self) -> bool:
        """Whether some update left out a tensor another one carried."""
        return any(n != self.count for n in self.key_counts.values())


class _Chunk:
    """Updates that are rows of one chunk's stacked weights (:class:`~fedhet.types.StackedRow`), waiting to be
    folded together."""

    def __init__(self, stacks: Mapping[str, torch.Tensor]) -> None:
        self.stacks = stacks
        self.size = min(len(t) for t in stacks.values())
        self.rows: list[int] = []
        self.weights: list[float] = []

    def complete(self) -> bool:
        """Whether every row has arrived (the length test first: it is on every result's path)."""
        return len(self.rows) == self.size and len(set(self.rows)) == self.size

    def fold_into(self, bucket: Bucket) -> None:
        """Add the rows' weighted sums to ``bucket``: one matrix-vector product (fp32) per tensor, integer tensors
        summed unweighted."""
        if self.complete():  # every row is an update: the stacks as they are, no copy
            index = None
            weights = torch.zeros(self.size)
            weights[self.rows] = torch.tensor(self.weights)
        else:  # other rows may be updates dropped or not yet arrived
            index = torch.tensor(self.rows)
            weights = torch.tensor(self.weights)
        total, count = sum(self.weights), len(self.rows)
        sums, key_weights, key_counts = dict(bucket.weighted_sum), dict(bucket.key_weights), dict(bucket.key_counts)
        for name, stack in self.stacks.items():
            rows = stack.reshape(len(stack), -1)
            rows = rows if index is None else rows[index.to(stack.device)]
            if stack.is_floating_point():
                dtype = torch.float64 if stack.dtype == torch.float64 else torch.float32
                part = torch.mv(rows.t().to(dtype), weights.to(stack.device, dtype))
            else:
                part = rows.sum(0)
            acc = sums[name]
            sums[name] = acc + part.view(acc.shape).to(acc.device, acc.dtype)
            key_weights[name] = key_weights.get(name, 0.0) + total
            key_counts[name] = key_counts.get(name, 0) + count
        bucket.weighted_sum, bucket.key_weights, bucket.key_counts = sums, key_weights, key_counts


class UpdateBuffer:
    """Results waiting to be aggregated, folded on arrival into one :class:`Bucket` per (start version, bitwidth).

    Memory is (distinct start versions x bitwidths) x (model size), never (results) x (model size), so a round of a
    thousand clients costs what a round of ten does. A fleet of one bitwidth has one bucket per start version.

    Results whose weights are rows of one chunk's stacked tensors (:class:`~fedhet.types.StackedRow`, from the
    vectorized executor) are folded together once every row of the chunk has arrived, or when the sums are read:
    one matrix-vector product per tensor and chunk instead of one cast and one add per tensor and update, on the
    chunk's device. At most :data:`_PENDING_CHUNKS` chunks per bucket wait (memory: that many chunks). Any other
    update (every update a server receives) is folded at once, in float64.

    With ``keep_updates`` the buffer also holds every update's tensors apart (by reference, no copy), for
    aggregators that look at each update (median, trimmed mean, Krum): memory (updates) x (model).
    """

    def __init__(self, keep_updates: bool = False) -> None:
        self.keep_updates = keep_updates
        self._buckets: dict[tuple[int, int], Bucket] = {}
        self._pending: dict[tuple[tuple[int, int], int], _Chunk] = {}  # by (bucket, id of the chunk's stacks)

    def add(self, result: Result, weight: float) -> None:
        """Fold ``result`` in with weight ``weight`` (> 0; samples, or 1 for a uniform mean), into the bucket of its
        start version and bitwidth."""
        if not weight > 0:
            raise ValueError(f"update weight must be > 0, got {weight}")
        key = (result.version, result.bitwidth)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = Bucket({}, bitwidth=key[1])
        weights = result.weights
        if self.keep_updates:
            own = {k: v[weights.row] for k, v in weights.stacks.items()} if isinstance(weights, StackedRow) else weights
            bucket.updates.append((own, weight))  # taken back below if the fold raises
        try:
            self._fold_in(key, bucket, result, weight)
        except BaseException:
            if self.keep_updates:
                bucket.updates.pop()
            raise
        bucket.total_weight += weight
        bucket.count += 1
        bucket.task_ids.append(result.task_id)
        self._buckets[key] = bucket  # a new bucket only once its first update is in: a failed add leaves none

    def _fold_in(self, key: tuple[int, int], bucket: Bucket, result: Result, weight: float) -> None:
        weights = result.weights
        if isinstance(weights, StackedRow):
            self._stage(key, bucket, weights, weight, result.task_id)
        else:
            _check_shapes(bucket, {k: v.shape for k, v in weights.items()}, result.task_id)
            sums, key_weights, key_counts = dict(bucket.weighted_sum), dict(bucket.key_weights), dict(bucket.key_counts)
            for name, value in weights.items():
                acc = sums.get(name)
                if acc is None:
                    acc = torch.zeros_like(value, dtype=_sum_dtype(value))
                if value.is_floating_point():  # one new tensor: the update converted, scaled and summed in place
                    scaled = value.to(acc.device, acc.dtype, copy=True)
                    sums[name] = scaled.mul_(weight).add_(acc)
                else:
                    sums[name] = acc + value.to(acc.device, acc.dtype)
                key_weights[name] = key_weights.get(name, 0.0) + weight
                key_counts[name] = key_counts.get(name, 0) + 1
            bucket.weighted_sum, bucket.key_weights, bucket.key_counts = sums, key_weights, key_counts

    def _stage(self, key: tuple[int, int], bucket: Bucket, row: StackedRow, weight: float, task_id: int) -> None:
        """Hold ``row`` until its chunk is complete (then fold the chunk into ``bucket``, the bucket of ``key``),
        keeping at most :data:`_PENDING_CHUNKS` chunks of bucket ``key`` waiting."""
        where = (key, id(row.stacks))
        chunk = self._pending.get(where)
        if chunk is None:
            _check_shapes(bucket, {k: v.shape[1:] for k, v in row.stacks.items()}, task_id)
            missing = [name for name in row.stacks if name not in bucket.weighted_sum]
            if missing:
                zeros = {n: torch.zeros_like(row.stacks[n][0], dtype=_sum_dtype(row.stacks[n])) for n in missing}
                bucket.weighted_sum = {**bucket.weighted_sum, **zeros}
            self._buckets[key] = bucket  # the chunk folds into it
            waiting = [w for w in self._pending if w[0] == key]
            for oldest in waiting[: max(0, len(waiting) - _PENDING_CHUNKS + 1)]:
                self._fold(oldest)
            chunk = self._pending[where] = _Chunk(row.stacks)
        chunk.rows.append(row.row)
        chunk.weights.append(weight)
        if chunk.complete():
            self._fold(where)

    def _fold(self, where: tuple[tuple[int, int], int]) -> None:
        self._pending[where].fold_into(self._buckets[where[0]])
        del self._pending[where]  # once folded: a fold that raises loses no row

    def _fold_all(self) -> None:
        """Fold every staged row: before anything reads the sums."""
        for where in list(self._pending):
            self._fold(where)

    def __len__(self) -> int:
        return sum(b.count for b in self._buckets.values())

    def items(self) -> Iterator[tuple[int, Bucket]]:
        """(start version, bucket) pairs in increasing (version, bitwidth) order; a version appears once per
        bitwidth among its updates (the bucket's ``bitwidth`` tells them apart)."""
        self._fold_all()
        return iter([(version, bucket) for (version, _), bucket in sorted(self._buckets.items())])

    def task_ids(self) -> list[int]:
        return [t for _, b in self.items() for t in b.task_ids]

    def versions(self) -> set[int]:
        """Start versions of the updates held (whatever their bitwidth)."""
        return {version for version, _ in self._buckets}

    def keys(self) -> set[tuple[int, int]]:
        """(start version, bitwidth) of every bucket held."""
        return set(self._buckets)

    def absorb(self, other: UpdateBuffer) -> None:
        """Move every update of ``other`` into this buffer (bucket by bucket, matched on (start version, bitwidth),
        no update lost) and clear ``other``."""
        self._fold_all()
        other._fold_all()
        for key, bucket in sorted(other._buckets.items()):
            mine = self._buckets.get(key)
            if mine is None:
                self._buckets[key] = Bucket(
                    dict(bucket.weighted_sum),
                    bucket.total_weight,
                    bucket.count,
                    list(bucket.task_ids),
                    key[1],
                    dict(bucket.key_weights),
                    dict(bucket.key_counts),
                    list(bucket.updates),
                )
                continue
            sums, key_weights, key_counts = dict(mine.weighted_sum), dict(mine.key_weights), dict(mine.key_counts)
            for name, value in bucket.weighted_sum.items():
                acc = sums.get(name)
                sums[name] = value if acc is None else acc + value
                key_weights[name] = key_weights.get(name, 0.0) + bucket.key_weights[name]
                key_counts[name] = key_counts.get(name, 0) + bucket.key_counts[name]
            mine.weighted_sum, mine.key_weights, mine.key_counts = sums, key_weights, key_counts
            mine.total_weight += bucket.total_weight
            mine.count += bucket.count
            mine.task_ids.extend(bucket.task_ids)
            mine.updates.extend(bucket.updates)
        other.clear()

    def clear(self) -> None:
        self._buckets = {}
        self._pending = {}

    def restore_point(self) -> Callable[[], None]:
        """A function that puts this buffer back as it is now (for an event that fails after folding into it).

        O(buckets + waiting chunks): the buffer replaces its sums and their dicts rather than changing them, so the
        point holds references; a bucket's task ids, kept updates and a chunk's rows only grow, so their lengths
        suffice.
        """
        buckets, pending = self._buckets.copy(), self._pending.copy()
        fields = [(b, vars(b).copy(), len(b.task_ids), len(b.updates)) for b in buckets.values()]
        rows = [(chunk, len(chunk.rows)) for chunk in pending.values()]
        return partial(self._restore, vars(self).copy(), buckets, pending, fields, rows)

    def _restore(
        self,
        attrs: dict[str, Any],
        buckets: dict[tuple[int, int], Bucket],
        pending: dict[tuple[tuple[int, int], int], _Chunk],
        fields: list[tuple[Bucket, dict[str, Any], int, int]],
        rows: list[tuple[_Chunk, int]],
    ) -> None:
        for bucket, values, count, kept in fields:
            vars(bucket).update(values)
            del bucket.task_ids[count:]
            del bucket.updates[kept:]
        for chunk, length in rows:
            del chunk.rows[length:]
            del chunk.weights[length:]
        vars(self).update(attrs)
        self._buckets, self._pending = buckets, pending

    def state_dict(self) -> dict[str, Any]:
        """One entry per bucket, keyed ``"<start version>:<bitwidth>"``; a bucket of partial updates also lists
        each tensor's weight and count."""
        self._fold_all()
        out: dict[str, Any] = {}
        for (v, bits), b in self._buckets.items():
            row: dict[str, Any] = {"sum": b.weighted_sum, "weight": b.total_weight, "count": b.count}
            row["tasks"] = list(b.task_ids)
            if b.partial:
                row["key_weights"] = dict(b.key_weights)
                row["key_counts"] = dict(b.key_counts)
            if b.updates:
                row["updates"] = [dict(u) for u, _ in b.updates]
                row["update_weights"] = [w for _, w in b.updates]
            out[f"{v}:{bits}"] = row
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load buckets keyed ``"v:b"``; a plain ``"v"`` (checkpoints from before buckets had a bitwidth) is
        bitwidth 32. Refuses a malformed key or entry, a bitwidth outside 1..32 and a bucket given twice."""
        buckets: dict[tuple[int, int], Bucket] = {}
        for name, row in state.items():
            key = _bucket_key(name)
            if key in buckets:
                raise StateError(f"update buffer entry {name!r} repeats the bucket of version {key[0]}, {key[1]} bits")
            required = {"sum", "weight", "count", "tasks"}
            optional = {"key_weights", "key_counts", "updates", "update_weights"}
            if not isinstance(row, Mapping) or not required <= set(row) <= required | optional:
                raise StateError(f"update buffer entry {name!r} is malformed")
            sums = row["sum"]
            if not isinstance(sums, Mapping) or not all(isinstance(t, torch.Tensor) for t in sums.values()):
                raise StateError(f"update buffer entry {name!r}: its sum is not a mapping of tensors")
            try:
                weight, count, tasks = float(row["weight"]), int(row["count"]), [int(t) for t in row["tasks"]]
            except (TypeError, ValueError) as error:
                raise StateError(f"update buffer entry {name!r} is malformed: {error}") from None
            if not (math.isfinite(weight) and weight > 0) or count < 1 or len(tasks) != count:
                raise StateError(
                    f"update buffer entry {name!r} holds {count} updates, {len(tasks)} task ids and weight {weight}"
                )
            key_weights, key_counts = _key_totals(name, row, sums, weight, count)
            kept = _kept_updates(name, row, count) if self.keep_updates else []
            buckets[key] = Bucket(dict(sums), weight, count, tasks, key[1], key_weights, key_counts, kept)
        self._buckets = buckets
        self._pending = {}


def _key_totals(
    name: str, row: Mapping[str, Any], sums: Mapping[str, torch.Tensor], weight: float, count: int
) -> tuple[dict[str, float], dict[str, int]]:
    """Per-tensor weights and counts of a checkpointed bucket: listed for partial updates, else every tensor's are
    the bucket's."""
    if "key_weights" not in row:
        return {k: weight for k in sums}, {k: count for k in sums}
    try:
        key_weights = {str(k): float(w) for k, w in row["key_weights"].items()}
        key_counts = {str(k): int(c) for k, c in row["key_counts"].items()}
    except (TypeError, ValueError, AttributeError, KeyError) as error:
        raise StateError(f"update buffer entry {name!r}: malformed per-tensor totals: {error!r}") from None
    if set(key_weights) != set(sums) or set(key_counts) != set(sums):
        raise StateError(f"update buffer entry {name!r}: per-tensor totals do not name the buffered tensors")
    if any(not (math.isfinite(w) and 0 < w <= weight * (1 + 1e-9)) for w in key_weights.values()) or any(
        not 1 <= c <= count for c in key_counts.values()
    ):
        raise StateError(f"update buffer entry {name!r}: a tensor's weight or count exceeds the bucket's")
    return key_weights, key_counts


def _kept_updates(name: str, row: Mapping[str, Any], count: int) -> list[tuple[Mapping[str, torch.Tensor], float]]:
    """The updates a checkpointed bucket kept apart: one per update it holds, each a mapping of tensors with a
    finite weight > 0."""
    updates, weights = row.get("updates"), row.get("update_weights")
    if not isinstance(updates, list) or not isinstance(weights, list) or not len(updates) == len(weights) == count:
        raise StateError(f"update buffer entry {name!r} does not keep its {count} updates apart, as this one must")
    kept: list[tuple[Mapping[str, torch.Tensor], float]] = []
    for update, weight in zip(updates, weights, strict=True):
        if not isinstance(update, Mapping) or not all(isinstance(t, torch.Tensor) for t in update.values()):
            raise StateError(f"update buffer entry {name!r}: a kept update is not a mapping of tensors")
        if not (isinstance(weight, int | float) and math.isfinite(weight) and weight > 0):
            raise StateError(f"update buffer entry {name!r}: a kept update's weight {weight!r} is not finite and > 0")
        kept.append((dict(update), float(weight)))
    return kept


def _bucket_key(name: object) -> tuple[int, int]:
    """(start version, bitwidth) of a state-dict key ``"v:b"``, or ``"v"`` for bitwidth 32."""
    version, sep, bits = str(name).partition(":")
    try:
        key = (int(version), int(bits) if sep else FULL_PRECISION)
    except ValueError:
        raise StateError(f"update buffer key {name!r} is not '<version>:<bitwidth>'") from None
    if key[0] < 0 or not 1 <= key[1] <= FULL_PRECISION:
        raise StateError(f"update buffer key {name!r}: start version must be >= 0 and bitwidth in 1..32")
    return key


def _sum_dtype(value: torch.Tensor) -> torch.dtype:
    return torch.float64 if value.is_floating_point() else torch.int64


def _check_shapes(bucket: Bucket, shapes: Mapping[str, torch.Size], task_id: int) -> None:
    """Refuse an update whose tensors' shapes differ from the ones ``bucket`` holds (before anything is folded)."""
    for name, shape in shapes.items():
        held = bucket.weighted_sum.get(name)
        if held is not None and held.shape != shape:
            raise ValueError(
                f"task {task_id}: tensor {name!r} has shape {tuple(shape)}, the buffered updates {tuple(held.shape)}"
            )
