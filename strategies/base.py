"""The event-driven strategy core: a scheduler, a planner and an aggregator behind one event interface.

A :class:`Strategy` knows nothing of gRPC, threads or clocks. Runtimes (the simulator, the gRPC server) tell it
what happened and when (``now``, in seconds on the runtime's clock) and it answers with tasks to hand out.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import torch

from fedhet.quant import FULL_PRECISION
from fedhet.types import ClientInfo, ClientProfile, Result, StackedRow, Task, Weights

__all__ = [
    "Aggregator",
    "Assignment",
    "Bucket",
    "Decision",
    "Plan",
    "Planner",
    "Scheduler",
    "StateError",
    "Strategy",
    "UnknownTaskError",
    "UpdateBuffer",
]


_PENDING_CHUNKS = 2  # chunks per bucket whose rows may wait to be folded together (memory: that many chunks)


class UnknownTaskError(ValueError):
    """A result names a task that is not outstanding: unknown, already applied, lost, or another client's."""


class StateError(ValueError):
    """A state dict does not fit the object it is loaded into."""


@dataclass(frozen=True)
class Assignment:
    """The scheduler's choice for one client: train this much, starting from the current global model."""

    client_id: int
    local_steps: int = 0
    local_epochs: int = 0


@dataclass(frozen=True)
class Plan:
    """What one client receives, as a planner decides it.

    Attributes:
        weights: the tensors sent (the full global model, a re-quantized copy, or a sub-model).
        train: names the client trains and sends back; empty means every tensor of ``weights``.
        sparse: names of ``weights`` that are pruned (mostly zeros); they travel in the codec's sparse encoding.
    """

    weights: Weights
    train: frozenset[str] = frozenset()
    sparse: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        extra = (self.train | self.sparse) - set(self.weights)
        if extra:
            raise ValueError(f"plan names tensors it does not send: {sorted(extra)}")


@dataclass
class Bucket:
    """Updates that started from one global version at one bitwidth, folded into a weighted sum.

    ``weighted_sum`` holds ``sum_i w_i * theta_i`` for floating-point tensors and the plain sum for integer
    tensors (counters, which are averaged unweighted). ``bitwidth`` is the bits per weight of every update folded
    in (32 = fp32), so bitwidth-aware aggregators never mix groups.

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
        for name, stack in self.stacks.items():
            rows = stack.reshape(len(stack), -1)
            rows = rows if index is None else rows[index.to(stack.device)]
            if stack.is_floating_point():
                dtype = torch.float64 if stack.dtype == torch.float64 else torch.float32
                part = torch.mv(rows.t().to(dtype), weights.to(stack.device, dtype))
            else:
                part = rows.sum(0)
            acc = bucket.weighted_sum[name]
            acc.add_(part.view(acc.shape).to(acc.device, acc.dtype))
            bucket.key_weights[name] = bucket.key_weights.get(name, 0.0) + total
            bucket.key_counts[name] = bucket.key_counts.get(name, 0) + count


class UpdateBuffer:
    """Results waiting to be aggregated, folded on arrival into one :class:`Bucket` per (start version, bitwidth).

    Memory is (distinct start versions x bitwidths) x (model size), never (results) x (model size), so a round of a
    thousand clients costs what a round of ten does. A fleet of one bitwidth has one bucket per start version.

    Results whose weights are rows of one chunk's stacked tensors (:class:`~fedhet.types.StackedRow`, from the
    vectorized executor) are folded together once every row of the chunk has arrived, or when the sums are read:
    one matrix-vector product per tensor and chunk instead of one cast and one add per tensor and update, on the
    chunk's device. At most :data:`_PENDING_CHUNKS` chunks per bucket wait (memory: that many chunks). Any other
    update (every update a server receives) is folded at once, in float64.
    """

    def __init__(self) -> None:
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
            self._buckets[key] = bucket
        weights = result.weights
        if isinstance(weights, StackedRow):
            self._stage(key, weights, weight, result.task_id)
        else:
            _check_shapes(bucket, {k: v.shape for k, v in weights.items()}, result.task_id)
            for name, value in weights.items():
                acc = _sum_of(bucket, name, value)
                if value.is_floating_point():
                    acc.add_(value.to(acc.device, acc.dtype), alpha=weight)
                else:
                    acc.add_(value.to(acc.device, acc.dtype))
                bucket.key_weights[name] = bucket.key_weights.get(name, 0.0) + weight
                bucket.key_counts[name] = bucket.key_counts.get(name, 0) + 1
        bucket.total_weight += weight
        bucket.count += 1
        bucket.task_ids.append(result.task_id)

    def _stage(self, key: tuple[int, int], row: StackedRow, weight: float, task_id: int) -> None:
        """Hold ``row`` until its chunk is complete (then fold the chunk), keeping at most :data:`_PENDING_CHUNKS`
        chunks of bucket ``key`` waiting."""
        where = (key, id(row.stacks))
        chunk = self._pending.get(where)
        if chunk is None:
            bucket = self._buckets[key]
            _check_shapes(bucket, {k: v.shape[1:] for k, v in row.stacks.items()}, task_id)
            for name, stack in row.stacks.items():
                _sum_of(bucket, name, stack[0])
            waiting = [w for w in self._pending if w[0] == key]
            for oldest in waiting[: max(0, len(waiting) - _PENDING_CHUNKS + 1)]:
                self._fold(oldest)
            chunk = self._pending[where] = _Chunk(row.stacks)
        chunk.rows.append(row.row)
        chunk.weights.append(weight)
        if chunk.complete():
            self._fold(where)

    def _fold(self, where: tuple[tuple[int, int], int]) -> None:
        self._pending.pop(where).fold_into(self._buckets[where[0]])

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
                )
                continue
            for name, value in bucket.weighted_sum.items():
                acc = mine.weighted_sum.get(name)
                if acc is None:
                    mine.weighted_sum[name] = value
                else:
                    acc.add_(value)
                mine.key_weights[name] = mine.key_weights.get(name, 0.0) + bucket.key_weights[name]
                mine.key_counts[name] = mine.key_counts.get(name, 0) + bucket.key_counts[name]
            mine.total_weight += bucket.total_weight
            mine.count += bucket.count
            mine.task_ids.extend(bucket.task_ids)
        other.clear()

    def clear(self) -> None:
        self._buckets.clear()
        self._pending.clear()

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
            if not isinstance(row, Mapping) or not required <= set(row) <= required | {"key_weights", "key_counts"}:
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
            buckets[key] = Bucket(dict(sums), weight, count, tasks, key[1], key_weights, key_counts)
        self._buckets = buckets
        self._pending.clear()


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


def _sum_of(bucket: Bucket, name: str, like: torch.Tensor) -> torch.Tensor:
    """``bucket``'s sum of tensor ``name``, created (zeros, float64 or int64, on ``like``'s device) when missing."""
    acc = bucket.weighted_sum.get(name)
    if acc is None:
        acc = bucket.weighted_sum[name] = torch.zeros_like(like, dtype=_sum_dtype(like))
    return acc


@dataclass
class Decision:
    """What a scheduler wants after an event: fold ``aggregate`` into the global model (when given), then hand
    work to ``assign`` from the (new) global model. ``dropped`` counts results it discarded (too late)."""

    aggregate: UpdateBuffer | None = None
    assign: list[Assignment] = field(default_factory=list)
    dropped: int = 0


class Scheduler(Protocol):
    """Decides who trains, how much, and when to aggregate. Uses only the ``now`` it is given."""

    def on_available(self, client: ClientInfo, now: float) -> Decision: ...
    def on_result(self, result: Result, client: ClientInfo, now: float) -> Decision: ...
    def on_tick(self, now: float) -> Decision: ...
    def next_deadline(self) -> float | None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class Planner(Protocol):
    """Decides what a client receives: the full model, a bitwidth, a sub-model."""

    def plan(self, client: ClientInfo, weights: Weights, version: int) -> Plan: ...


class Aggregator(Protocol):
    """Combines buffered updates with the global model into the next global model."""

    def aggregate(self, global_weights: Weights, updates: UpdateBuffer, version: int) -> dict[str, torch.Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@runtime_checkable
class ServerTrained(Protocol):
    """A role that trains on the server and needs a small buffer of unlabelled inputs there (ProWD's distillation).
    The run core gives it one in every runtime, before the first event."""

    @property
    def server_samples(self) -> int:
        """Inputs the buffer should hold (0: this configuration needs none)."""
        ...

    def attach(self, model: torch.nn.Module, server_inputs: torch.Tensor) -> None: ...


class Strategy:
    """One server algorithm: the event interface of DESIGN.md over a scheduler, planner and aggregator.

    The global model and its version, the registered clients and the outstanding tasks live here; every result is
    checked against the outstanding tasks, so a replayed, unknown or misattributed result is refused before any
    arithmetic and no update is ever applied twice.
    """

    def __init__(self, scheduler: Scheduler, planner: Planner, aggregator: Aggregator) -> None:
        self.scheduler = scheduler
        self.planner = planner
        self.aggregator = aggregator
        self.global_weights: dict[str, torch.Tensor] = {}
        self.version = 0
        self.updates_applied = 0
        self.updates_dropped = 0
        self.clients: dict[int, ClientInfo] = {}
        self._outstanding: dict[int, tuple[int, int]] = {}  # task id -> (client id, start version)
        self._next_task_id = 0

    def start(self, initial_weights: Weights, now: float) -> None:
        """Set the initial global model (version 0) at time ``now`` (seconds): a copy, kept on the device the
        weights are on (a simulation on a GPU keeps its global model there, next to the results)."""
        self.global_weights = {k: v.detach().clone() for k, v in initial_weights.items()}
        self.version = 0

    def on_available(self, client: ClientInfo, now: float) -> list[Task]:
        """``client`` is idle and asks for work. A task it still held is lost (it crashed or gave up)."""
        known = self.clients.get(client.client_id)
        if known is not None and known != client:
            raise ValueError(f"client {client.client_id} registered again with a different profile or sample count")
        self.clients[client.client_id] = client
        for task_id in [t for t, (c, _) in self._outstanding.items() if c == client.client_id]:
            del self._outstanding[task_id]
        return self._apply(self.scheduler.on_available(client, now))

    def on_result(self, result: Result, now: float) -> list[Task]:
        """An update arrived at ``now``. Raises :class:`UnknownTaskError` for a task not outstanding. The result's
        ``bitwidth`` is set from the registered client's profile before the scheduler sees it."""
        owner = self._outstanding.get(result.task_id)
        if owner is None:
            raise UnknownTaskError(f"task {result.task_id} is not outstanding (unknown, lost or already applied)")
        if owner != (result.client_id, result.version):
            raise UnknownTaskError(
                f"task {result.task_id} belongs to client {owner[0]} at version {owner[1]}, "
                f"not client {result.client_id} at version {result.version}"
            )
        del self._outstanding[result.task_id]
        client = self.clients[result.client_id]
        # the bitwidth an update is grouped by is the registered profile's, never what the client claims
        if result.bitwidth != client.profile.bitwidth:
            result = replace(result, bitwidth=client.profile.bitwidth)
        return self._apply(self.scheduler.on_result(result, client, now))

    def on_tick(self, now: float) -> list[Task]:
        """A deadline the strategy asked for (``next_deadline``) has passed."""
        return self._apply(self.scheduler.on_tick(now))

    def next_deadline(self) -> float | None:
        """The time (seconds) at which the runtime must call ``on_tick``; None when nothing is due."""
        return self.scheduler.next_deadline()

    @property
    def outstanding(self) -> int:
        """Tasks handed out and not yet answered or lost."""
        return len(self._outstanding)

    def _apply(self, decision: Decision) -> list[Task]:
        self.updates_dropped += decision.dropped
        if decision.aggregate is not None and len(decision.aggregate):
            self.global_weights = self.aggregator.aggregate(self.global_weights, decision.aggregate, self.version)
            self.updates_applied += len(decision.aggregate)
            self.version += 1
            decision.aggregate.clear()
        return [self._task(a) for a in decision.assign]

    def _task(self, assignment: Assignment) -> Task:
        client = self.clients[assignment.client_id]
        plan = self.planner.plan(client, self.global_weights, self.version)
        task = Task(
            task_id=self._next_task_id,
            client_id=client.client_id,
            version=self.version,
            weights=plan.weights,
            local_steps=assignment.local_steps,
            local_epochs=assignment.local_epochs,
            train=plan.train,
            sparse=plan.sparse,
        )
        self._next_task_id += 1
        self._outstanding[task.task_id] = (client.client_id, self.version)
        return task

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: global model, version, clients, outstanding tasks, scheduler state."""
        return {
            "version": self.version,
            "global_weights": dict(self.global_weights),
            "updates_applied": self.updates_applied,
            "updates_dropped": self.updates_dropped,
            "next_task_id": self._next_task_id,
            "outstanding": {str(t): list(v) for t, v in self._outstanding.items()},
            "clients": {
                str(c.client_id): [
                    c.num_samples,
                    c.profile.seconds_per_sample,
                    c.profile.bandwidth,
                    c.profile.bitwidth,
                    c.profile.memory_bytes,
                    c.profile.availability,
                ]
                for c in self.clients.values()
            },
            "scheduler": self.scheduler.state_dict(),
            "aggregator": self.aggregator.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        expected = {
            "version",
            "global_weights",
            "updates_applied",
            "updates_dropped",
            "next_task_id",
            "outstanding",
            "clients",
            "scheduler",
            "aggregator",
        }
        if set(state) != expected:
            raise StateError(f"strategy state keys {sorted(state)} differ from {sorted(expected)}")
        weights = state["global_weights"]
        if self.global_weights and (
            set(weights) != set(self.global_weights)
            or any(weights[k].shape != v.shape for k, v in self.global_weights.items())
        ):
            raise StateError("checkpointed global weights do not match the model's names and shapes")
        self.version = int(state["version"])
        self.global_weights = {k: v.clone() for k, v in weights.items()}
        self.updates_applied = int(state["updates_applied"])
        self.updates_dropped = int(state["updates_dropped"])
        self._next_task_id = int(state["next_task_id"])
        self._outstanding = {int(t): (int(c), int(v)) for t, (c, v) in state["outstanding"].items()}
        self.clients = {
            int(cid): ClientInfo(int(cid), ClientProfile(float(sps), float(bw), int(bits), int(mem), float(av)), int(n))
            for cid, (n, sps, bw, bits, mem, av) in state["clients"].items()
        }
        self.scheduler.load_state_dict(state["scheduler"])
        self.aggregator.load_state_dict(state["aggregator"])
