"""The event-driven strategy core: a scheduler, a planner and an aggregator behind one event interface.

A :class:`Strategy` knows nothing of gRPC, threads or clocks. Runtimes (the simulator, the gRPC server) tell it
what happened and when (``now``, in seconds on the runtime's clock) and it answers with tasks to hand out.

Every event is all-or-nothing: when the scheduler, the aggregator or the planner raises, the strategy, its
scheduler and its aggregator are put back exactly as they were before the event, and the exception propagates.
The scheduler records its changes in a :class:`~fedhet.strategies.journal.Journal` (its decision carries it as
``undo``), the aggregator only rebinds its attributes (the strategy notes them before it aggregates), and the
strategy records its own changes in a journal of its own. Nothing any of them holds is changed in place during an
event but through a record, so the cost is O(changes), never O(clients) or O(model).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Concatenate, ParamSpec, Protocol, runtime_checkable

import torch

from fedhet.strategies.buffer import UpdateBuffer
from fedhet.strategies.errors import StateError, UnknownTaskError
from fedhet.strategies.journal import Journal
from fedhet.types import ClientInfo, ClientProfile, Result, Task, Weights

__all__ = [
    "Aggregator",
    "Assignment",
    "Decision",
    "Journal",
    "KeepsModels",
    "Plan",
    "Planner",
    "Scheduler",
    "StateError",
    "Strategy",
    "UnknownTaskError",
    "UpdateBuffer",
    "undoable",
]

P = ParamSpec("P")


@dataclass(frozen=True)
class Assignment:
    """The scheduler's choice for one client: train this much, starting from the current global model."""

    client_id: int
    local_steps: int = 0
    local_epochs: int = 0
    proximal_mu: float = 0.0  # FedProx's mu for this task (0: none)


@dataclass(frozen=True)
class Plan:
    """What one client receives, as a planner decides it.

    Attributes:
        weights: the tensors sent (the full global model, a re-quantized copy, or a sub-model).
        train: names the client trains and sends back; empty means every tensor of ``weights``.
        sparse: names of ``weights`` that are pruned (mostly zeros); they travel in the codec's sparse encoding.
        sparse_bits: bits those travel at in a float payload (32: sparse encoding; else packed; see
            :class:`~fedhet.types.Task`).
        train_all: the client trains every received tensor, and sends back only ``train``.
    """

    weights: Weights
    train: frozenset[str] = frozenset()
    sparse: frozenset[str] = frozenset()
    sparse_bits: int = 32
    train_all: bool = False

    def __post_init__(self) -> None:
        if self.train or self.sparse:  # (most plans name none: no set of the weights' names for them)
            extra = (self.train | self.sparse) - set(self.weights)
            if extra:
                raise ValueError(f"plan names tensors it does not send: {sorted(extra)}")


@dataclass
class Decision:
    """What a scheduler wants after an event: fold ``aggregate`` into the global model (when given), then hand
    work to ``assign`` from the (new) global model. ``dropped`` counts results it discarded (too late).

    ``aggregate`` is a buffer the scheduler no longer holds. ``undo`` puts the scheduler back as it was before the
    event, for a later step of the event (aggregation, planning) that fails; None for a scheduler that changed
    nothing."""

    aggregate: UpdateBuffer | None = None
    assign: list[Assignment] = field(default_factory=list)
    dropped: int = 0
    undo: Journal | None = None


def undoable(event: Callable[Concatenate[Journal, P], Decision], *args: P.args, **kwargs: P.kwargs) -> Decision:
    """``event(journal, *args, **kwargs)`` with a fresh journal, in which the event records its changes: put back at
    once when it raises, else handed to the strategy as the decision's ``undo``."""
    journal = Journal()
    decision = journal.run(event, *args, **kwargs)
    decision.undo = journal
    return decision


class Scheduler(Protocol):
    """Decides who trains, how much, and when to aggregate. Uses only the ``now`` it is given.

    An event either returns a decision whose ``undo`` takes it back, or raises having changed nothing
    (:func:`undoable` gives both).
    """

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
    """Combines buffered updates with the global model into the next global model.

    ``aggregate`` changes the aggregator only by rebinding its own attributes (it replaces the tensors, modules and
    containers it keeps, never changes them in place), so the strategy puts a failed event's aggregator back from
    the bindings it noted before aggregating (an aggregator that wraps another must not leave the inner one
    changed: the strategy sees only the wrapper's bindings).
    """

    def aggregate(self, global_weights: Weights, updates: UpdateBuffer, version: int) -> dict[str, torch.Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@runtime_checkable
class KeepsModels(Protocol):
    """An aggregator whose global weights carry more models than the one evaluated (grouped averaging keeps one
    per bitwidth group): after a resume it rebuilds that view from its loaded state."""

    def global_view(self, weights: Weights) -> dict[str, torch.Tensor]: ...


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
        self.folded: tuple[int, ...] = ()  # task ids of the updates the latest aggregation folded in

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
        return Journal().run(self._available, client, now)

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
        client = self.clients[result.client_id]
        # the bitwidth an update is grouped by is the registered profile's, never what the client claims
        if result.bitwidth != client.profile.bitwidth:
            result = replace(result, bitwidth=client.profile.bitwidth)
        return Journal().run(self._result, result, client, now)

    def on_tick(self, now: float) -> list[Task]:
        """A deadline the strategy asked for (``next_deadline``) has passed."""
        return Journal().run(self._tick, now)

    def next_deadline(self) -> float | None:
        """The time (seconds) at which the runtime must call ``on_tick``; None when nothing is due."""
        return self.scheduler.next_deadline()

    @property
    def outstanding(self) -> int:
        """Tasks handed out and not yet answered or lost."""
        return len(self._outstanding)

    # ------------------------------------------------------------------ events, recorded in a journal
    def _available(self, journal: Journal, client: ClientInfo, now: float) -> list[Task]:
        journal.keep(self)
        journal.keep_item(self.clients, client.client_id)
        self.clients[client.client_id] = client
        for task_id in [t for t, (c, _) in self._outstanding.items() if c == client.client_id]:
            journal.keep_item(self._outstanding, task_id)
            del self._outstanding[task_id]
        return self._apply(journal, self.scheduler.on_available(client, now))

    def _result(self, journal: Journal, result: Result, client: ClientInfo, now: float) -> list[Task]:
        journal.keep(self)
        journal.keep_item(self._outstanding, result.task_id)
        del self._outstanding[result.task_id]
        return self._apply(journal, self.scheduler.on_result(result, client, now))

    def _tick(self, journal: Journal, now: float) -> list[Task]:
        journal.keep(self)
        return self._apply(journal, self.scheduler.on_tick(now))

    def _apply(self, journal: Journal, decision: Decision) -> list[Task]:
        if decision.undo is not None:
            journal.record(decision.undo.rollback)
        self.updates_dropped += decision.dropped
        if decision.aggregate is not None and len(decision.aggregate):
            journal.keep(self.aggregator)
            self.global_weights = self.aggregator.aggregate(self.global_weights, decision.aggregate, self.version)
            self.folded = tuple(decision.aggregate.task_ids())
            self.updates_applied += len(self.folded)
            self.version += 1
        if not decision.assign:
            return []
        first = self._next_task_id  # the tasks get the next ids: a failure forgets them all
        journal.record(_forget, self._outstanding, range(first, first + len(decision.assign)))
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
            proximal_mu=assignment.proximal_mu,
            sparse_bits=plan.sparse_bits,
            train_all=plan.train_all,
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
        if isinstance(self.aggregator, KeepsModels):  # the global weights carry its models again
            self.global_weights = self.aggregator.global_view(self.global_weights)


def _forget(outstanding: dict[int, tuple[int, int]], task_ids: range) -> None:
    for task_id in task_ids:
        outstanding.pop(task_id, None)
