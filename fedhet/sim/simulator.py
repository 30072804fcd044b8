"""The simulator: drives a strategy with events popped from a virtual clock.

A task handed to client c at time t arrives at ``t + download + compute + upload`` where
``compute = steps * batch_size * seconds_per_sample`` and ``download``/``upload`` are the encoded payload bytes
divided by the client's bandwidth. Payloads travel in the client's encoding: ``int<b>`` for a client of ``b`` bits,
the run's float encoding for an fp32 client (:func:`fedhet.codec.encoding_for_bitwidth`), so a 4-bit client moves
about an eighth of an fp32 client's bytes. Results are computed lazily, when their arrival is the next event, in
batches of the executor's ``batch_size``: the tasks in flight that arrive soonest (ties by task id), handed to the
executor in that order. So a batch's results are delivered one after another, whatever the clients' speeds: the
vectorized executor's chunks are folded whole by the update buffer and freed, and results are held about a batch at
a time.

A result the strategy fails on (:class:`~fedhet.runtime.ResultFailed`: the strategy took the event back) is a
dropped update: logged once with its reason, counted in the metrics' ``updates_dropped``, and its client asks for
work again at once (which loses its task), as a client whose update a server refused does. The run goes on.

Every result passes the run's norm bound (:class:`~fedhet.updates.NormBound`, ``sim.norm_bound``) as a deployed
server's does: one over it is dropped the same way (``norm_action=reject``) or arrives clipped onto the bound
(``clip``, counted in the summary's ``clipped``). The check runs when the result is computed (a deterministic
function of the result and its task), so its outcome is part of a checkpoint's computed results.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from fedhet.codec import encoded_size, encoding_for_bitwidth
from fedhet.metrics import MetricsRecord, MetricsWriter
from fedhet.runtime import EvalCadence, Evaluate, Outcome, Recorder, ResultFailed, RunDriver, StopRules
from fedhet.runtime.checkpoint import result_from_state, result_state, task_from_state, task_state
from fedhet.sim.events import EventKind, EventQueue
from fedhet.sim.executor import Executor
from fedhet.strategies.base import Strategy
from fedhet.types import ClientInfo, Result, Task, Weights
from fedhet.updates import NormBound, NormBoundExceeded

__all__ = ["RunSummary", "SimConfig", "Simulator", "task_duration"]

log = logging.getLogger(__name__)

ExtraMetrics = Callable[[Weights], Mapping[str, Any]]
Progress = Callable[[MetricsRecord], None]


@dataclass(frozen=True)
class SimConfig:
    """When a simulation stops and how often it evaluates.

    Attributes:
        stop: the run core's stop rules (``max_seconds`` on the virtual clock).
        cadence: when the global model is evaluated (``interval`` in virtual seconds).
        batch_size: local minibatch size, needed for the compute time of a task (samples).
        encoding: wire encoding used to size fp32 clients' payloads (fp32, fp16, bf16); a client of ``b < 32`` bits
            sends and receives ``int<b>``.
        checkpoint_every: hand the simulator's state to ``checkpoint`` every this many versions and at the end
            (0: never).
        norm: the largest update the run takes and what it does with a larger one, as a deployed server does.
    """

    stop: StopRules = field(default_factory=lambda: StopRules(max_versions=50))
    cadence: EvalCadence = field(default_factory=EvalCadence)
    batch_size: int = 32
    encoding: str = "fp32"
    checkpoint_every: int = 0
    norm: NormBound = field(default_factory=NormBound)


@dataclass(frozen=True)
class RunSummary:
    """How a simulation ended."""

    final: MetricsRecord
    events: int
    reason: str
    failure: str | None = None  # why the strategy failed, when the run stopped on its failure
    clipped: int = 0  # results clipped onto the norm bound (``norm_action=clip``)


def task_duration(task: Task, client: ClientInfo, batch_size: int, payload_bytes: int, upload_bytes: int = -1) -> float:
    """Virtual seconds from handing ``task`` out to its result arriving: download, compute, upload.

    ``compute = steps * batch_size * seconds_per_sample``; each transfer is its bytes / bandwidth. The upload is
    ``upload_bytes``, or as large as the download when not given (-1): a client sends back what it received unless
    it trains only part of it (FedP3).
    """
    steps = task.steps_for(client.num_samples, batch_size)
    compute = steps * batch_size * client.profile.seconds_per_sample
    upload = payload_bytes if upload_bytes < 0 else upload_bytes
    return compute + (payload_bytes + upload) / client.profile.bandwidth


def _with_train_seconds(result: Result, seconds: float) -> Result:
    """``dataclasses.replace(result, train_seconds=seconds)`` without its walk over the fields (a fifth of the time;
    a simulation makes one per task): the frozen result's attributes copied, then the one field set on the copy,
    which nothing else holds yet."""
    out = object.__new__(type(result))
    vars(out).update(vars(result))
    object.__setattr__(out, "train_seconds", seconds)
    return out


class Simulator:
    """Runs one strategy over simulated clients on a virtual clock."""

    def __init__(
        self,
        strategy: Strategy,
        clients: Sequence[ClientInfo],
        executor: Executor,
        evaluate: Evaluate,
        metrics: MetricsWriter,
        config: SimConfig,
        seed: int,
        progress: Progress | None = None,
        extra_metrics: ExtraMetrics | None = None,
        checkpoint: Callable[[Mapping[str, Any]], None] | None = None,
    ) -> None:
        self.strategy = strategy
        self.checkpoint = checkpoint
        self.extra_metrics = extra_metrics
        self.clients = {c.client_id: c for c in clients}
        self.config = config
        # each client's wire encoding, both ways: a bitwidth without one fails here, not mid-run
        self._encodings = {c.client_id: encoding_for_bitwidth(c.profile.bitwidth, config.encoding) for c in clients}
        self.executor = executor
        self.recorder = Recorder(evaluate, metrics, progress)
        self.driver = RunDriver(strategy, config.stop, config.cadence, config.norm)
        self._bitwidths = sorted({c.profile.bitwidth for c in clients})
        self.seed = seed
        self.queue = EventQueue()
        self.bytes_up = 0
        self.bytes_down = 0
        self._in_flight: dict[int, Task] = {}
        self._upload: dict[int, int] = {}  # encoded bytes of each in-flight task's result
        self._computed: dict[int, Result] = {}
        self._over_bound: dict[int, tuple[int, str]] = {}  # computed results the norm bound refuses: (client, why)
        self._clipped_tasks: set[int] = set()  # computed results clipped onto the norm bound, not yet arrived
        self._clipped = 0  # results clipped onto the norm bound that arrived
        # (arrival time, task id) of the tasks in flight, a heap: the next batch to compute is its front (entries of
        # tasks computed out of that order are dropped when they reach the front)
        self._soonest: list[tuple[float, int]] = []
        self._ticks: set[float] = set()
        self._wall_start = 0.0
        self._events = 0  # events handled so far
        self._refused = 0  # results the strategy failed on (dropped updates the strategy does not count)
        self._sizes: dict[tuple[object, ...], int] = {}  # dense payload sizes by (encoding, names, shapes, dtypes)
        self._latest_size: dict[str, tuple[Weights, int]] = {}  # by encoding: the latest weights sized, and its size

    def run(self, initial_weights: Weights, resume: Mapping[str, Any] | None = None) -> RunSummary:
        """Run from ``initial_weights`` (or from ``resume``, a :meth:`state_dict` of an earlier run of the same
        config) until the config's limits; the global model lives on the executor's device."""
        self._wall_start = time.perf_counter()
        device = self.executor.device
        self.strategy.start({k: v.to(device) for k, v in initial_weights.items()}, 0.0)
        if resume is None:
            for client_id in self.clients:
                self.queue.push(0.0, EventKind.AVAILABLE, client_id=client_id)
            last = self._record()
        else:
            self.load_state_dict(resume)
            last = self._record()  # where the resumed run stands: its metrics go on from this line
        reason = "no more events (every client idle and the strategy asked for nothing)"
        driver = self.driver
        while len(self.queue):
            event = self.queue.pop()
            over = driver.time_up(event.time)
            if over is not None:
                reason = over
                self.queue.now = driver.rules.max_seconds
                break
            self._events += 1
            if event.kind is EventKind.AVAILABLE:
                outcome = driver.available(self.clients[event.client_id], event.time)
            elif event.kind is EventKind.ARRIVAL:
                outcome = self._arrival(event.task_id, event.time)
            else:
                self._ticks.discard(event.time)
                outcome = driver.tick(event.time)
            self._dispatch(outcome.tasks, event.time)
            self._schedule_tick()
            if outcome.evaluate:
                last = self._record()
            if outcome.stop is not None:
                reason = outcome.stop
                break
            every = self.config.checkpoint_every
            if outcome.new_version and every and self.strategy.version % every == 0 and self.checkpoint is not None:
                self.checkpoint(self.state_dict())
        if last.version != self.strategy.version or last.virtual_time != self.queue.now:
            last = self._record()
        if self.config.checkpoint_every and self.checkpoint is not None:
            self.checkpoint(self.state_dict())
        log.info("simulation stopped: %s", reason)
        return RunSummary(final=last, events=self._events, reason=reason, failure=driver.failure, clipped=self._clipped)

    def _arrival(self, task_id: int, now: float) -> Outcome:
        """Hand the result of ``task_id`` to the driver at ``now``. One over the norm bound (when rejecting) or one
        the strategy fails on is dropped: its client asks for work again at ``now``. (A method of its own, so that
        the result, which may hold a whole chunk's stacked weights, is not kept alive by the run loop.)"""
        if task_id not in self._computed and task_id not in self._over_bound:
            self._compute(task_id)
        self.bytes_up += self._upload.pop(task_id)  # what the client sends back: its trained tensors, dense
        refused = self._over_bound.pop(task_id, None)
        if refused is not None:
            return self._drop(*refused, now)
        result = self._result(task_id)
        if task_id in self._clipped_tasks:  # counted when it arrives, as a server counts what it receives
            self._clipped_tasks.discard(task_id)
            self._clipped += 1
        try:
            return self.driver.result(result, now)
        except ResultFailed as error:
            return self._drop(result.client_id, str(error), now)

    def _drop(self, client_id: int, why: str, now: float) -> Outcome:
        """A refused update: counted, logged, and its client asks for work again at ``now``."""
        self._refused += 1
        log.warning("client %d: update dropped: %s", client_id, why)
        self.queue.push(now, EventKind.AVAILABLE, client_id=client_id)
        return Outcome()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything a later run of the same config needs to go on from here: the run core's state (strategy,
        last evaluation), the event queue, the tasks in flight (results computed but not yet delivered with their
        weights: the clients' kept state already holds their training) and the counters."""
        return {
            "driver": self.driver.state_dict(),
            "queue": self.queue.state_dict(),
            "in_flight": [task_state(t) for t in self._in_flight.values()],
            "computed": [result_state(r) for r in self._computed.values()],
            "over_bound": [[t, c, why] for t, (c, why) in self._over_bound.items()],
            "clipped": [self._clipped, sorted(self._clipped_tasks)],
            "upload": [[t, n] for t, n in self._upload.items()],
            "bytes": [self.bytes_up, self.bytes_down],
            "ticks": sorted(self._ticks),
            "events": self._events,
            "refused": self._refused,
            "wall_time": time.perf_counter() - self._wall_start,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Go on from :meth:`state_dict` (after ``strategy.start``); raises ValueError for a state that does not
        fit this simulation."""
        try:
            self.driver.load_state_dict(state["driver"])
            self.queue.load_state_dict(state["queue"])
            self._in_flight = {t.task_id: t for t in map(task_from_state, state["in_flight"])}
            self._computed = {r.task_id: r for r in map(result_from_state, state["computed"])}
            # states saved before the simulator applied the norm bound lack these (their computed results, at most
            # a batch, were taken unchecked)
            self._over_bound = {int(t): (int(c), str(why)) for t, c, why in state.get("over_bound", [])}
            clipped, clipped_tasks = state.get("clipped", [0, []])
            self._clipped, self._clipped_tasks = int(clipped), {int(t) for t in clipped_tasks}
            self._upload = {int(t): int(n) for t, n in state["upload"]}
            self.bytes_up, self.bytes_down = (int(b) for b in state["bytes"])
            self._ticks = {float(t) for t in state["ticks"]}
            self._events = int(state["events"])
            self._refused = int(state.get("refused", 0))  # states saved before results could be refused lack it
            self._wall_start -= float(state["wall_time"])
        except (KeyError, TypeError) as error:
            raise ValueError(f"simulation state does not fit: {error}") from None
        unknown = {t.client_id for t in self._in_flight.values()} - set(self.clients)
        if unknown or set(self._upload) != set(self._in_flight) | set(self._computed) | set(self._over_bound):
            raise ValueError("simulation state names tasks or clients this simulation does not have")
        arrivals = self.queue.pending(EventKind.ARRIVAL)
        self._soonest = [(e.time, e.task_id) for e in arrivals if e.task_id in self._in_flight]
        heapq.heapify(self._soonest)
        device = self.executor.device
        if device.type != "cpu":  # the global model lives where the results are computed
            self.strategy.global_weights = {k: v.to(device) for k, v in self.strategy.global_weights.items()}

    def _dispatch(self, tasks: list[Task], now: float) -> None:
        for task in tasks:
            client = self.clients[task.client_id]
            encoding = self._encodings[task.client_id]
            size = (
                encoded_size(task.weights, encoding, task.sparse, task.sparse_bits)
                if task.sparse
                else self._size(task.weights, encoding)
            )
            self.bytes_down += size
            upload = size
            if task.train or task.sparse:  # the client sends back only what it trained, dense
                upload = self._size({k: v for k, v in task.weights.items() if k in task.trained}, encoding)
            duration = task_duration(task, client, self.config.batch_size, size, upload)
            if self._comes_back(task, client):
                self._in_flight[task.task_id] = task
                self._upload[task.task_id] = upload
                arrival = now + duration
                self.queue.push(arrival, EventKind.ARRIVAL, client_id=client.client_id, task_id=task.task_id)
                heapq.heappush(self._soonest, (arrival, task.task_id))
            else:  # the client drops out; it asks for work again when it would have finished
                self.queue.push(now + duration, EventKind.AVAILABLE, client_id=client.client_id)

    def _comes_back(self, task: Task, client: ClientInfo) -> bool:
        if client.profile.availability >= 1.0:
            return True
        draw = np.random.default_rng([self.seed, task.task_id, 0xA7A1]).random()
        return bool(draw < client.profile.availability)

    def _compute(self, task_id: int) -> None:
        """Compute ``task_id`` with the tasks in flight that arrive next, and check each result against the norm
        bound: kept (clipped when over it and clipping), or noted as refused."""
        # this task arrives now, so no task in flight arrives sooner: the batch is it and the next to arrive
        batch = [self._in_flight.pop(task_id)]
        batch += self._pop_soonest(self.executor.batch_size - 1)
        starts = {task.task_id: task.weights for task in batch}
        for result in self.executor.run(batch):
            if math.isnan(result.loss):  # diverged: the driver refuses it, saying so
                self._computed[result.task_id] = result
                continue
            try:
                checked = self.driver.norm.check(result.weights, starts[result.task_id])
            except NormBoundExceeded as error:
                self._over_bound[result.task_id] = (result.client_id, str(error))
                continue
            if checked.clipped:
                self._clipped_tasks.add(result.task_id)
                log.info("client %d: update norm %.6g clipped onto the bound", result.client_id, checked.norm)
                result = replace(result, weights=checked.weights)
            self._computed[result.task_id] = result

    def _result(self, task_id: int) -> Result:
        result = self._computed.pop(task_id)
        # the client reports its training time on the virtual clock, as a real client reports its own
        client = self.clients[result.client_id]
        compute = result.local_steps * self.config.batch_size * client.profile.seconds_per_sample
        return _with_train_seconds(result, compute)

    def _pop_soonest(self, count: int) -> list[Task]:
        """Take up to ``count`` tasks out of flight, soonest arrival first (ties by task id): O(count log n)."""
        heap, in_flight = self._soonest, self._in_flight
        tasks: list[Task] = []
        while heap and (len(tasks) < count or heap[0][1] not in in_flight):  # past ``count``, only drop stale ones
            task = in_flight.pop(heapq.heappop(heap)[1], None)
            if task is not None:
                tasks.append(task)
        return tasks

    def _size(self, weights: Weights, encoding: str) -> int:
        """``encoded_size`` of dense ``weights``, which depends only on their names, shapes and dtypes: computed once
        per layout (a round of a thousand results would otherwise build a thousand headers), and looked up once per
        weights mapping (the tasks of a round share one)."""
        latest = self._latest_size.get(encoding)
        if latest is not None and latest[0] is weights:
            return latest[1]
        key = (encoding, *((k, v.shape, v.dtype) for k, v in weights.items()))
        size = self._sizes.get(key)
        if size is None:
            size = self._sizes[key] = encoded_size(weights, encoding)
        self._latest_size[encoding] = (weights, size)
        return size

    def _schedule_tick(self) -> None:
        deadline = self.strategy.next_deadline()
        if deadline is not None and deadline not in self._ticks:
            self._ticks.add(deadline)
            self.queue.push(max(deadline, self.queue.now), EventKind.TICK)

    def _record(self) -> MetricsRecord:
        self.driver.mark_evaluated(self.queue.now)
        weights = self.strategy.global_weights
        point = self.driver.point(
            self.queue.now, time.perf_counter() - self._wall_start, self.bytes_up, self.bytes_down
        )
        point = replace(point, updates_dropped=point.updates_dropped + self._refused)
        extra = self.extra_metrics
        return self.recorder.record(point, weights, self._bitwidths, None if extra is None else lambda: extra(weights))
