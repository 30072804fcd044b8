"""FedCompass: a hand-worked schedule, the reference code's defects, property tests over random fleets, resume.

The harness here (a deterministic fake trainer, an aggregator that re-derives every aggregation update by update,
a scheduler wrapper that checks the deadline guarantees, a small event loop) is shared with
``test_async_schedulers.py``.
"""

from __future__ import annotations

import copy
import inspect
import io
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedhet.cli import compose
from fedhet.metrics import MetricsWriter
from fedhet.runtime import EvalCadence, Evaluation, StopRules
from fedhet.sim.events import EventKind, EventQueue
from fedhet.sim.simulator import SimConfig, Simulator
from fedhet.strategies import StateError, Strategy, build_strategy
from fedhet.strategies.base import Decision, Scheduler
from fedhet.strategies.buffer import UpdateBuffer
from fedhet.strategies.fedcompass import FedCompassScheduler
from fedhet.strategies.planners import IdentityPlanner
from fedhet.strategies.staleness import StalenessWeighted
from fedhet.types import ClientInfo, Result, Task, Weights
from tests.helpers import client

PROPERTY = settings(max_examples=15, deadline=None, derandomize=True)


# ---------------------------------------------------------------- harness


def start_weights() -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([1.0, -2.0, 0.5]), "n": torch.tensor(0, dtype=torch.int64)}


def trained(task: Task, train_seconds: float) -> Result:
    """A deterministic stand-in for local training: ``w`` moves by an amount set by the task id and the counter
    ``n`` counts local steps."""
    delta = torch.tensor([1.0, -1.0, 0.5]) * float(task.task_id % 7 - 3)
    weights = {"w": task.weights["w"] + delta, "n": task.weights["n"] + task.local_steps}
    return Result(task.task_id, task.client_id, task.version, weights, 10, task.local_steps, train_seconds, 0.0)


def polynomial_half(tau: int) -> float:
    """The configured staleness function, written out independently of the code under test."""
    return float((tau + 1) ** -0.5)


class Ledger:
    """Every task handed out and every result produced; also a simulator executor (one task at a time)."""

    batch_size = 1
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.starts: dict[int, Weights] = {}
        self.results: dict[int, Result] = {}

    def run(self, tasks: Sequence[Task]) -> list[Result]:
        return [self.record(task, trained(task, 0.0)) for task in tasks]  # the simulator sets train_seconds

    def record(self, task: Task, result: Result) -> Result:
        self.starts[task.task_id] = task.weights
        self.results[task.task_id] = result
        return result


class CheckedAggregator:
    """Runs the real aggregator, then re-derives its output update by update from the ledger:
    ``a_i = alpha * s(T - v_i) * w_i`` with the configured ``s`` and client weight, model- or gradient-based.
    Records the applied task ids and fails on one applied twice."""

    def __init__(
        self,
        inner: StalenessWeighted,
        ledger: Ledger,
        client_weight: Callable[[Result], float],
        staleness: Callable[[int], float] = polynomial_half,
    ) -> None:
        self.inner = inner
        self.ledger = ledger
        self.client_weight = client_weight
        self.staleness = staleness
        self.applied: list[int] = []
        self.staleness_seen: list[int] = []
        self.most_kept = 0  # most start versions the gradient-based aggregator held at once

    def aggregate(self, global_weights: Weights, updates: UpdateBuffer, version: int) -> dict[str, torch.Tensor]:
        ids = updates.task_ids()
        assert len(set(ids)) == len(ids) and not set(ids) & set(self.applied), f"task applied twice: {ids}"
        self.applied += ids
        out = self.inner.aggregate(global_weights, updates, version)
        theta = global_weights["w"].double()
        expected = theta.clone()
        mixed = 0.0
        for task_id in ids:
            result = self.ledger.results[task_id]
            tau = version - result.version
            self.staleness_seen.append(tau)
            a = self.inner.alpha * self.staleness(tau) * self.client_weight(result)
            if self.inner.gradient_based:
                expected -= a * (self.ledger.starts[task_id]["w"].double() - result.weights["w"].double())
            else:
                expected += a * (result.weights["w"].double() - theta)
                mixed += a
        torch.testing.assert_close(out["w"].double(), expected, rtol=1e-5, atol=1e-5)
        counters = [int(self.ledger.results[t].weights["n"]) for t in ids]
        assert int(out["n"]) == sum(counters) // len(counters)
        self.most_kept = max(self.most_kept, len(self.inner.kept_versions))
        return out

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


class WatchedCompass:
    """A FedCompass scheduler that checks its deadline guarantees at every event: a client waiting for its group
    gets its task no later than the group's deadline ``L`` (and is never left waiting past an event later than
    ``L``); with ``on_time``, every group member's update arrives by ``L``. When the runtime's ticks may come late
    (not ``punctual``), a waiting client must still be released by the first event after ``L``."""

    def __init__(self, inner: FedCompassScheduler, on_time: bool = False, punctual: bool = True) -> None:
        self.inner = inner
        self.on_time = on_time
        self.punctual = punctual
        self.waiting: dict[int, float] = {}  # client id -> its group's deadline (s)
        self.group_arrivals = 0
        self.late_arrivals = 0

    def on_available(self, client: ClientInfo, now: float) -> Decision:
        return self._check(self.inner.on_available(client, now), now)

    def on_result(self, result: Result, client: ClientInfo, now: float) -> Decision:
        record = self.inner.clients.get(client.client_id)
        if record is not None and record.group is not None:
            group = self.inner.groups[record.group]
            self.group_arrivals += 1
            late = group.closed or now > group.latest
            self.late_arrivals += late
            assert not (self.on_time and late), f"client {client.client_id} late at {now}"
        decision = self.inner.on_result(result, client, now)
        if all(a.client_id != client.client_id for a in decision.assign):
            gid = self.inner.clients[client.client_id].group
            assert gid is not None, "a client that got no task must wait in a group"
            self.waiting[client.client_id] = self.inner.groups[gid].latest
        return self._check(decision, now)

    def on_tick(self, now: float) -> Decision:
        return self._check(self.inner.on_tick(now), now, tick=True)

    def _check(self, decision: Decision, now: float, tick: bool = False) -> Decision:
        for assignment in decision.assign:
            deadline = self.waiting.pop(assignment.client_id, None)
            if self.punctual:
                assert deadline is None or now <= deadline, f"client {assignment.client_id} waited past {deadline}"
        for cid, deadline in self.waiting.items():
            assert (now < deadline) if tick else (now <= deadline), f"client {cid} still waits at {now} > {deadline}"
        return decision

    def next_deadline(self) -> float | None:
        return self.inner.next_deadline()

    def buffered_task_ids(self) -> list[int]:
        return self.inner.buffered_task_ids()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


def simulate(
    scheduler: Scheduler,
    aggregator: StalenessWeighted,
    speeds: Sequence[float],
    client_weight: Callable[[Result], float],
    bandwidths: Sequence[float] | None = None,
    availability: float = 1.0,
    max_versions: int = 20,
) -> tuple[Strategy, Ledger, CheckedAggregator]:
    """Run the real simulator with clients of ``speeds`` seconds per local step (batch size 1) and the fake trainer."""
    ledger = Ledger()
    checked = CheckedAggregator(aggregator, ledger, client_weight)
    strategy = Strategy(scheduler, IdentityPlanner(), checked)
    clients = [
        client(i, seconds_per_sample=s, bandwidth=(bandwidths or [1e12] * len(speeds))[i], availability=availability)
        for i, s in enumerate(speeds)
    ]
    config = SimConfig(StopRules(max_versions, 5000.0), EvalCadence(10**6), batch_size=1)
    with MetricsWriter(os.devnull) as metrics:
        simulator = Simulator(strategy, clients, ledger, lambda w, bits: Evaluation(0.0, 0.0), metrics, config, seed=0)
        simulator.run(start_weights())
    return strategy, ledger, checked


def assert_each_result_applied_once(strategy: Strategy, ledger: Ledger, checked: CheckedAggregator) -> None:
    """Every delivered result is applied exactly once or still buffered: none lost, none doubled."""
    buffered: list[int] = strategy.scheduler.buffered_task_ids()  # type: ignore[attr-defined]
    assert sorted(checked.applied + buffered) == sorted(ledger.results)
    assert strategy.updates_applied == len(checked.applied)


class EventLoop:
    """A small runtime for tests: client ``c`` trains ``Q * speeds[c]`` seconds (times ``1 + jitter * u``) and its
    result arrives ``comm[c]`` seconds later; ticks arrive ``tick_delay`` seconds after the deadline asked for; a
    task is lost with probability ``loss`` (its client asks for work again when it would have answered)."""

    def __init__(
        self,
        strategy: Strategy,
        speeds: Sequence[float],
        comm: Sequence[float] | None = None,
        tick_delay: float = 0.0,
        jitter: float = 0.0,
        loss: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.strategy = strategy
        self.speeds = list(speeds)
        self.comm = list(comm or [0.0] * len(speeds))
        self.tick_delay = tick_delay
        self.jitter = jitter
        self.loss = loss
        self.seed = seed
        self.clients = [client(i) for i in range(len(speeds))]
        self.queue = EventQueue()
        self.ledger = Ledger()
        self.tasks: dict[int, tuple[Task, float]] = {}  # task id -> (task, its training seconds)
        self.ticks: set[float] = set()
        self.log: list[tuple[float, int, int, int, int]] = []  # (time, task id, client, version, local steps)

    def start(self) -> EventLoop:
        self.strategy.start(start_weights(), 0.0)
        for c in self.clients:
            self.queue.push(0.0, EventKind.AVAILABLE, client_id=c.client_id)
        return self

    def run(self, events: int) -> EventLoop:
        for _ in range(events):
            self.step()
        return self

    def step(self) -> None:
        event = self.queue.pop()
        now = event.time
        if event.kind is EventKind.AVAILABLE:
            tasks = self.strategy.on_available(self.clients[event.client_id], now)
        elif event.kind is EventKind.ARRIVAL:
            task, seconds = self.tasks.pop(event.task_id)
            tasks = self.strategy.on_result(self.ledger.record(task, trained(task, seconds)), now)
        else:
            self.ticks.discard(event.time)
            tasks = self.strategy.on_tick(now)
        for task in tasks:
            self.log.append((now, task.task_id, task.client_id, task.version, task.local_steps))
            rng = np.random.default_rng([self.seed, task.task_id])
            seconds = task.local_steps * self.speeds[task.client_id] * (1.0 + self.jitter * rng.random())
            done = now + seconds + self.comm[task.client_id]
            if rng.random() < self.loss:
                self.queue.push(done, EventKind.AVAILABLE, client_id=task.client_id)
            else:
                self.tasks[task.task_id] = (task, seconds)
                self.queue.push(done, EventKind.ARRIVAL, client_id=task.client_id, task_id=task.task_id)
        deadline = self.strategy.next_deadline()
        if deadline is not None and deadline not in self.ticks:
            self.ticks.add(deadline)
            self.queue.push(max(deadline + self.tick_delay, now), EventKind.TICK)


def assert_resumes_identically(make: Callable[[], Strategy], loop: EventLoop, before: int, after: int) -> None:
    """Checkpoint ``loop``'s strategy after ``before`` events (through bytes, loaded with ``weights_only``), resume
    a fresh strategy from it, and check both hand out the same tasks and reach the same model ``after`` events on."""
    loop.start().run(before)
    blob = io.BytesIO()
    torch.save(loop.strategy.state_dict(), blob)
    twin = copy.deepcopy(loop)
    handed_out = len(loop.log)
    loop.run(after)
    assert len(loop.log) > handed_out
    blob.seek(0)
    state = torch.load(blob, weights_only=True)
    twin.strategy = make()
    twin.strategy.load_state_dict(state)  # the aggregator's kept start weights travel with it
    twin.run(after)
    assert twin.log == loop.log
    assert twin.strategy.version == loop.strategy.version
    for name, value in loop.strategy.global_weights.items():
        assert torch.equal(twin.strategy.global_weights[name], value)


def compass(aggregator: StalenessWeighted | None = None, **params: Any) -> Strategy:
    return Strategy(FedCompassScheduler(**params), IdentityPlanner(), aggregator or StalenessWeighted())


def scalar(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([value], dtype=torch.float64)}


def answer(strategy: Strategy, task: Task, now: float, value: float, seconds_per_step: float) -> list[Task]:
    """Deliver ``task``'s result at ``now``: model ``w = value``, trained ``local_steps * seconds_per_step`` s."""
    seconds = task.local_steps * seconds_per_step
    result = Result(task.task_id, task.client_id, task.version, scalar(value), 10, task.local_steps, seconds, 0.0)
    return strategy.on_result(result, now)


def plan(tasks: list[Task]) -> list[tuple[int, int, int]]:
    """(client, local steps Q, start version) of each task, in the order handed out."""
    return [(t.client_id, t.local_steps, t.version) for t in tasks]


class Taus:
    """Records the staleness of every update aggregated, then aggregates with ``inner``."""

    def __init__(self, inner: StalenessWeighted) -> None:
        self.inner = inner
        self.seen: list[list[int]] = []

    def aggregate(self, global_weights: Weights, updates: UpdateBuffer, version: int) -> dict[str, torch.Tensor]:
        self.seen.append(sorted(version - v for v, b in updates.items() for _ in range(b.count)))
        return self.inner.aggregate(global_weights, updates, version)


# ---------------------------------------------------------------- the hand-worked example


def test_hand_worked_schedule_of_three_clients() -> None:
    """q_min 25, q_max 100, lambda 1.2, alpha 0.9, s(tau) = (tau+1)^-0.5, w = 1/3. Clients train at 1.0, 1.5 and
    2.5 s/step with no network delay, so every estimate is exact and each arrival is at start + Q * speed."""
    taus = Taus(StalenessWeighted(alpha=0.9))
    strategy = Strategy(FedCompassScheduler(25, 100, 0.9, 1.2), IdentityPlanner(), taus)
    strategy.start(scalar(0.0), 0.0)
    sched = strategy.scheduler
    assert isinstance(sched, FedCompassScheduler)
    speed = {0: 1.0, 1: 1.5, 2: 2.5}
    task: dict[int, Task] = {}
    for c in range(3):
        [task[c]] = strategy.on_available(client(c), 0.0)
    # t = 0: nobody's speed is known: Q = q_max, no group
    assert plan(list(task.values())) == [(0, 100, 0), (1, 100, 0), (2, 100, 0)]
    assert sched.groups == {} and strategy.next_deadline() is None

    # t = 100: c0's first result (100 s / 100 steps = 1.0 s/step), aggregated alone: a = 0.9 * 1 * 1/3 = 0.3,
    # w = 0.7 * 0 + 0.3 * 10 = 3. No open group: Q = 100, group 0 with E = 100 + 100 = 200, L = 100 + 120 = 220.
    [task[0]] = answer(strategy, task[0], 100.0, 10.0, speed[0])
    assert plan([task[0]]) == [(0, 100, 1)]
    assert strategy.global_weights["w"].item() == pytest.approx(3.0)
    assert sched.clients[0].speed == 1.0
    assert (sched.groups[0].expected, sched.groups[0].latest) == (200.0, pytest.approx(220.0))

    # t = 150: c1's first result (1.5 s/step), started at version 0, now version 1: tau = 1,
    # a = 0.3 / sqrt(2) = 0.212132, w = 3 + 0.212132 * (20 - 3) = 6.606245.
    # It joins group 0: q = floor((200 - 150) / 1.5) = floor(33.3) = 33, in [25, 100]; E and L stay.
    [task[1]] = answer(strategy, task[1], 150.0, 20.0, speed[1])
    assert plan([task[1]]) == [(1, 33, 2)]
    assert strategy.global_weights["w"].item() == pytest.approx(6.606245, abs=1e-6)
    assert sched.groups[0].training == {0, 1} and sched.groups[0].expected == 200.0

    # t = 199.5: c1 arrives (150 + 33 * 1.5), on time: it waits for c0; the group's deadline is 220.
    assert answer(strategy, task[1], 199.5, 30.0, speed[1]) == []
    assert strategy.version == 2 and sched.groups[0].arrived == [1] and strategy.next_deadline() == pytest.approx(220)

    # t = 200: c0 arrives; group 0 is complete and aggregates: c0 started at version 1 (tau = 1, a = 0.212132),
    # c1 at version 2 (tau = 0, a = 0.3): w = (1 - 0.512132) * 6.606245 + 0.212132 * 40 + 0.3 * 30 = 20.708256.
    # Reassigned fastest first: c0 opens group 1 (Q = 100, E = 300, L = 320); c1 joins it with
    # q = floor((300 - 200) / 1.5) = 66.
    tasks = answer(strategy, task[0], 200.0, 40.0, speed[0])
    assert plan(tasks) == [(0, 100, 3), (1, 66, 3)]
    task[0], task[1] = tasks
    assert strategy.global_weights["w"].item() == pytest.approx(20.708256, abs=1e-6)
    assert 0 not in sched.groups and sched.groups[1].training == {0, 1}
    assert (sched.groups[1].expected, sched.groups[1].latest) == (300.0, pytest.approx(320.0))

    # t = 250: c2's first result (2.5 s/step), tau = 3 - 0 = 3: a = 0.3 * 4^-0.5 = 0.15,
    # w = 0.85 * 20.708256 + 0.15 * 50 = 25.102018. Joining group 1 would give q = floor(50 / 2.5) = 20 < 25, so
    # it creates a group lined up with group 1's fastest member (1.0 s/step) after group 1's deadline:
    # q = floor((320 + 1.0 * 100 - 250) / 2.5) = 68; group 2: E = 250 + 170 = 420, L = 250 + 1.2 * 170 = 454.
    [task[2]] = answer(strategy, task[2], 250.0, 50.0, speed[2])
    assert plan([task[2]]) == [(2, 68, 4)]
    assert strategy.global_weights["w"].item() == pytest.approx(25.102018, abs=1e-6)
    assert (sched.groups[2].expected, sched.groups[2].latest) == (420.0, pytest.approx(454.0))

    # t = 299: c1 (200 + 66 * 1.5) waits; t = 300: c0 completes group 1 (both started at version 3, tau = 1).
    # c0: group 2 gives q = floor((420 - 300) / 1) = 120 > 100; creating, group 2's fastest member is c2
    # (2.5 s/step): q = floor((454 + 250 - 300) / 1) = 404 > q_max, so Q = q_max = 100: group 3, E = 400, L = 420.
    # c1: group 2 gives floor(120 / 1.5) = 80, group 3 floor(100 / 1.5) = 66: it joins group 2, the largest q.
    assert answer(strategy, task[1], 299.0, 0.0, speed[1]) == []
    tasks = answer(strategy, task[0], 300.0, 0.0, speed[0])
    assert plan(tasks) == [(0, 100, 5), (1, 80, 5)]
    task[0], task[1] = tasks
    assert sched.groups[2].training == {1, 2} and sched.groups[3].training == {0}

    # t = 400: c0 alone completes group 3 (tau = 0). Group 2 gives q = floor(20 / 1) = 20 < 25; creating, group
    # 2's fastest member is now c1 (1.5 s/step): q = floor((454 + 150 - 400) / 1) = 204 > 100: Q = 100, group 4,
    # E = 500, L = 520.
    [task[0]] = answer(strategy, task[0], 400.0, 0.0, speed[0])
    assert plan([task[0]]) == [(0, 100, 6)]
    assert (sched.groups[4].expected, sched.groups[4].latest) == (500.0, pytest.approx(520.0))

    # t = 420: c2 (250 + 68 * 2.5) and c1 (300 + 80 * 1.5) complete group 2 at version 6: c2 started at 4
    # (tau = 2), c1 at 5 (tau = 1). Fastest first: c1 joins group 4 with floor(80 / 1.5) = 53, c2 with
    # floor(80 / 2.5) = 32.
    assert answer(strategy, task[2], 420.0, 0.0, speed[2]) == []
    tasks = answer(strategy, task[1], 420.0, 0.0, speed[1])
    assert plan(tasks) == [(1, 53, 7), (2, 32, 7)]
    assert sched.groups[4].training == {0, 1, 2} and set(sched.groups) == {4}
    # staleness of every aggregation, in order: solo c0, solo c1, group 0, solo c2, group 1, group 3, group 2
    assert taus.seen == [[0], [1], [0, 1], [3], [1, 1], [0], [1, 2]]
    assert strategy.updates_applied == 10


def test_speed_is_a_moving_average_with_the_newest_sample_weighted_m() -> None:
    strategy = compass(q_min=1, q_max=10, speed_momentum=0.9)
    strategy.start(scalar(0.0), 0.0)
    [task] = strategy.on_available(client(0), 0.0)
    [task] = answer(strategy, task, 10.0, 0.0, 1.0)  # first sample: 1.0 s/step
    answer(strategy, task, 30.0, 0.0, 2.0)  # second sample 2.0: 0.1 * 1.0 + 0.9 * 2.0 = 1.9
    assert strategy.scheduler.clients[0].speed == pytest.approx(1.9)  # type: ignore[attr-defined]


def test_of_groups_offering_as_many_steps_a_client_joins_the_later_as_appfl() -> None:
    """Two open groups both expected at t = 20: a client of 1 s/step at t = 10 could do 10 steps in either; it
    joins group 1, the one formed last (APPFL's reference keeps the last group at least as good)."""
    from fedhet.strategies.fedcompass import CompassClient, CompassGroup

    sched = FedCompassScheduler(q_min=1, q_max=10)
    sched.groups = {0: CompassGroup(20.0, 24.0), 1: CompassGroup(20.0, 24.0)}
    assert sched._join(CompassClient(speed=1.0), 10.0) == (1, 10)
    sched.groups[1] = CompassGroup(19.0, 24.0)  # one step fewer in group 1: group 0 offers more
    assert sched._join(CompassClient(speed=1.0), 10.0) == (0, 10)


def test_bounds_in_epochs_scale_with_each_clients_data() -> None:
    """unit=epochs, q in [0.5, 2] epochs, batch 32: a client of 100 samples (4 steps an epoch) gets 8 steps on its
    first task and bounds [2, 8]; one of 6 samples (1 step an epoch) gets 2, bounds [1, 2]; in steps, both get
    q_max. Local work then means the same, two passes over a client's data, at any client count."""
    sched = FedCompassScheduler(q_min=0.5, q_max=2, unit="epochs", batch_size=32)
    [big] = sched.on_available(client(0, num_samples=100), 0.0).assign
    [small] = sched.on_available(client(1, num_samples=6), 0.0).assign
    assert (big.local_steps, small.local_steps) == (8, 2)
    assert sched._bounds(sched.clients[0]) == (2, 8) and sched._bounds(sched.clients[1]) == (1, 2)
    state = sched.state_dict()
    twin = FedCompassScheduler(q_min=0.5, q_max=2, unit="epochs", batch_size=32)
    twin.load_state_dict(copy.deepcopy(state))
    assert twin.state_dict() == state
    steps = FedCompassScheduler(q_min=20, q_max=100)
    assert steps.on_available(client(0, num_samples=6), 0.0).assign[0].local_steps == 100
    for bad in ({"q_min": 0.5, "q_max": 2}, {"unit": "rounds"}, {"unit": "epochs", "batch_size": 0}):
        with pytest.raises(ValueError):
            FedCompassScheduler(**bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the reference code's defects


def test_late_arrival_before_the_deadline_tick_does_not_strand_the_waiting_members() -> None:
    """Reference: the deadline timer ran without the lock, and a late arrival could delete a group whose arrived
    members then waited forever. Here the runtime's tick is late and the late update is seen first."""
    strategy = compass(q_min=1, q_max=10, latest_time_factor=1.5)
    strategy.start(scalar(0.0), 0.0)
    sched = strategy.scheduler
    assert isinstance(sched, FedCompassScheduler)
    a, b = (strategy.on_available(client(i), 0.0)[0] for i in range(2))
    [a] = answer(strategy, a, 10.0, 1.0, 1.0)  # solo; A opens group 0 with Q = 10: E = 20, L = 25
    # solo; B's 2 s of transfers become its overhead: it joins with Q = floor((20 - 12 - 2) / 1) = 6
    [b] = answer(strategy, b, 12.0, 2.0, 1.0)
    assert b.local_steps == 6 and sched.groups[0].training == {0, 1}
    assert answer(strategy, a, 20.0, 3.0, 1.0) == []  # A on time: waits for B
    assert strategy.next_deadline() == 25.0
    # no tick at 25: B's update, 5 s late, is the next event
    tasks = answer(strategy, b, 30.0, 4.0, 1.0)
    assert sorted(t.client_id for t in tasks) == [0, 1]  # A is released, B reassigned
    assert strategy.updates_applied == 4 and strategy.version == 3
    assert strategy.on_tick(30.0) == []  # the late tick finds nothing left to do
    assert sched.buffered_task_ids() == []


def test_group_is_released_at_its_deadline_and_a_straggler_is_reassigned_at_once() -> None:
    strategy = compass(q_min=1, q_max=10, latest_time_factor=1.5)
    strategy.start(scalar(0.0), 0.0)
    a, b = (strategy.on_available(client(i), 0.0)[0] for i in range(2))
    [a] = answer(strategy, a, 10.0, 1.0, 1.0)
    [b] = answer(strategy, b, 12.0, 2.0, 1.0)
    assert answer(strategy, a, 20.0, 3.0, 1.0) == []
    [a] = strategy.on_tick(25.0)  # at L: A's update is aggregated and A reassigned; B will be late
    assert a.client_id == 0 and strategy.version == 3
    [b] = answer(strategy, b, 30.0, 4.0, 1.0)  # late: buffered, B gets the current model at once
    assert b.client_id == 1 and b.version == 3 and strategy.version == 3
    assert strategy.scheduler.buffered_task_ids() == [3]  # type: ignore[attr-defined]


def test_late_update_and_group_update_of_the_same_client_are_both_applied() -> None:
    """Reference: the late buffer and the group buffer were merged as dicts keyed by client, so a client with an
    update in each lost one. alpha = 0.5, two clients (w = 1/2): a fresh update has a = 0.25."""
    strategy = compass(StalenessWeighted(alpha=0.5), q_min=1, q_max=10, latest_time_factor=1.5)
    strategy.start(scalar(0.0), 0.0)
    a, b = (strategy.on_available(client(i), 0.0)[0] for i in range(2))
    [a] = answer(strategy, a, 10.0, 2.0, 1.0)  # v1: w = 0.25 * 2 = 0.5; A: group 0, E = 20, L = 25
    # v2: tau 1, a = 0.25/sqrt(2): w = 1.118718; B (2 s overhead) joins, Q = floor((20 - 12 - 2) / 1) = 6
    [b] = answer(strategy, b, 12.0, 4.0, 1.0)
    assert answer(strategy, b, 20.0, 6.0, 1.0) == []  # B waits
    # v3: w = 0.75 * 1.118718 + 0.25 * 6 = 2.339039; B: group 1, E = 25 + 2 + 10 = 37, L = 25 + 2 + 15 = 42
    [b] = strategy.on_tick(25.0)
    # A late (from version 1; it trained slowly, 2 s/step: speed 0.1 * 1 + 0.9 * 2 = 1.9): late buffer;
    # it joins group 1 with Q = floor((37 - 30) / 1.9) = 3
    [a] = answer(strategy, a, 30.0, 8.0, 2.0)
    assert a.local_steps == 3 and strategy.version == 3
    assert answer(strategy, b, 37.0, 12.0, 1.0) == []
    assert answer(strategy, a, 37.0, 10.0, 1.9) != []  # group 1 complete: late buffer + group buffer, v4
    # A's late update (tau = 3 - 1 = 2, a = 0.25/sqrt(3) = 0.144338) and A's and B's group updates (a = 0.25 each):
    # w = (1 - 0.644338) * 2.339039 + 0.144338 * 8 + 0.25 * 10 + 0.25 * 12 = 7.486609
    # (dropping A's late update, as the reference did, would give 0.5 * 2.339039 + 5.5 = 6.669519)
    assert strategy.version == 4 and strategy.updates_applied == 6
    assert strategy.global_weights["w"].item() == pytest.approx(7.486609, abs=1e-6)


@pytest.mark.parametrize(("weighting", "expected"), [("uniform", 0.9 / 3), ("samples", 0.9 * 60 / 100)])
def test_update_weights_count_every_client(weighting: str, expected: float) -> None:
    """Reference: a missing client count made every w_i 1, N times too large. Three clients (10, 30 and 60
    samples); the first update (client 2's) enters with a = alpha * s(0) * w_2."""
    strategy = compass(weighting=weighting)
    strategy.start(scalar(0.0), 0.0)
    tasks = [strategy.on_available(client(i, num_samples=n), 0.0)[0] for i, n in enumerate([10, 30, 60])]
    answer(strategy, tasks[2], 50.0, 1.0, 0.5)
    assert strategy.global_weights["w"].item() == pytest.approx(expected)  # (1 - a) * 0 + a * 1


def test_first_speed_estimate_is_training_time_not_waiting_time() -> None:
    """Reference: the first estimate was (now - run start) / q_max, so a client that joined late (or waited for a
    slow link) looked slow. B joins at t = 50, trains 10 steps in 10 s and its update lands at 65."""
    strategy = compass(q_min=1, q_max=10)
    strategy.start(scalar(0.0), 0.0)
    strategy.on_available(client(0), 0.0)
    [b] = strategy.on_available(client(1), 50.0)
    answer(strategy, b, 65.0, 0.0, 1.0)
    assert strategy.scheduler.clients[1].speed == 1.0  # type: ignore[attr-defined]  # not 6.5 nor 1.5


def test_without_a_reported_training_time_the_estimate_starts_at_the_clients_own_task() -> None:
    strategy = compass(q_min=1, q_max=10)
    strategy.start(scalar(0.0), 0.0)
    strategy.on_available(client(0), 0.0)
    [b] = strategy.on_available(client(1), 50.0)
    strategy.on_result(Result(b.task_id, 1, b.version, scalar(0.0), 10, 10, 0.0, 0.0), 65.0)
    assert strategy.scheduler.clients[1].speed == 1.5  # type: ignore[attr-defined]  # (65 - 50) / 10


# ---------------------------------------------------------------- lost tasks, validation


def test_lost_task_releases_its_group_and_the_client_is_reassigned() -> None:
    strategy = compass(q_min=1, q_max=10, latest_time_factor=1.5)
    strategy.start(scalar(0.0), 0.0)
    a, b = (strategy.on_available(client(i), 0.0)[0] for i in range(2))
    [a] = answer(strategy, a, 10.0, 1.0, 1.0)
    [b] = answer(strategy, b, 12.0, 2.0, 1.0)
    assert answer(strategy, a, 20.0, 3.0, 1.0) == []
    tasks = strategy.on_available(client(1), 21.0)  # B lost its task: group 0 stops waiting for it
    assert sorted(t.client_id for t in tasks) == [0, 1] and strategy.version == 3
    assert strategy.next_deadline() is not None and strategy.scheduler.buffered_task_ids() == []  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"q_min": 0},
        {"q_min": 50, "q_max": 40},
        {"speed_momentum": 0.0},
        {"latest_time_factor": 0.9},
        {"weighting": "none"},
    ],
)
def test_bad_parameters_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        FedCompassScheduler(**kwargs)


def test_state_dict_validates() -> None:
    loop = EventLoop(compass(q_min=2, q_max=10), [1.0, 1.5, 3.0], [0.5, 0.0, 2.0]).start().run(25)
    state = loop.strategy.scheduler.state_dict()
    fresh = FedCompassScheduler(q_min=2, q_max=10)
    fresh.load_state_dict(copy.deepcopy(state))
    assert fresh.state_dict().keys() == state.keys()
    with pytest.raises(StateError, match="keys"):
        fresh.load_state_dict({k: v for k, v in state.items() if k != "late"})
    gid, group = next(iter(state["groups"].items()))
    broken = copy.deepcopy(state)
    broken["groups"][gid]["training"] = [*group["training"], 99]
    with pytest.raises(StateError, match="client 99"):
        fresh.load_state_dict(broken)
    broken = copy.deepcopy(state)
    broken["clients"]["0"]["speed"] = -1.0
    with pytest.raises(StateError, match="speed"):
        fresh.load_state_dict(broken)
    broken = copy.deepcopy(state)
    broken["clients"]["0"]["version"] = state["version"] + 1
    with pytest.raises(StateError):
        fresh.load_state_dict(broken)
    fresh.load_state_dict(state)  # a refused state left nothing half-loaded
    assert fresh.state_dict()["groups"].keys() == state["groups"].keys()


def test_resumed_from_its_state_dict_it_makes_the_same_decisions() -> None:
    def make() -> Strategy:
        return compass(StalenessWeighted(gradient_based=True), q_min=3, q_max=12)

    loop = EventLoop(make(), [1.0, 1.3, 2.2, 4.0, 0.7], [0.1, 0.0, 1.5, 0.3, 0.0], jitter=0.3, loss=0.1, seed=3)
    assert_resumes_identically(make, loop, before=40, after=80)


def test_shipped_config_names_every_parameter() -> None:
    spec = compose(["strategy=fedcompass"]).strategy
    strategy = build_strategy({"scheduler": spec.scheduler, "planner": spec.planner, "aggregator": spec.aggregator}, 0)
    assert isinstance(strategy.scheduler, FedCompassScheduler) and isinstance(strategy.aggregator, StalenessWeighted)
    for params, cls in ((spec.scheduler, FedCompassScheduler), (spec.aggregator, StalenessWeighted)):
        assert set(params) - {"name"} == set(inspect.signature(cls).parameters)


# ---------------------------------------------------------------- properties over random fleets

speeds_st = st.lists(st.floats(0.2, 3.0), min_size=2, max_size=7)


@PROPERTY
@given(
    speeds=speeds_st,
    bounds=st.tuples(st.integers(1, 5), st.integers(6, 20)),
    slack=st.floats(1.05, 1.6),
    gradient=st.booleans(),
    lossy=st.booleans(),
)
def test_noiseless_fleet_every_update_once_on_time_and_weighted_as_configured(
    speeds: list[float], bounds: tuple[int, int], slack: float, gradient: bool, lossy: bool
) -> None:
    """The real simulator, exact speeds and no network time: every member arrives by its group's deadline, every
    waiting client is released by it, every result is applied exactly once with a_i = 0.9 * s(tau_i) / N."""
    watched = WatchedCompass(FedCompassScheduler(*bounds, latest_time_factor=slack), on_time=True)
    strategy, ledger, checked = simulate(
        watched,
        StalenessWeighted(gradient_based=gradient),
        speeds,
        lambda r: 1 / len(speeds),
        availability=0.8 if lossy else 1.0,
    )
    assert strategy.version == 20
    assert watched.group_arrivals > 0
    assert_each_result_applied_once(strategy, ledger, checked)
    assert checked.most_kept <= len(speeds)  # start weights kept: at most one version per client in flight


@PROPERTY
@given(
    speeds=speeds_st,
    bandwidths=st.lists(st.floats(30.0, 1e4), min_size=7, max_size=7),
    gradient=st.booleans(),
)
def test_network_delays_make_late_arrivals_yet_nothing_is_lost_or_stranded(
    speeds: list[float], bandwidths: list[float], gradient: bool
) -> None:
    watched = WatchedCompass(FedCompassScheduler(2, 12, latest_time_factor=1.2))
    strategy, ledger, checked = simulate(
        watched, StalenessWeighted(gradient_based=gradient), speeds, lambda r: 1 / len(speeds), bandwidths=bandwidths
    )
    assert strategy.version == 20
    assert_each_result_applied_once(strategy, ledger, checked)


@PROPERTY
@given(
    speeds=speeds_st,
    comm=st.lists(st.floats(0.0, 5.0), min_size=7, max_size=7),
    tick_delay=st.floats(0.0, 30.0),
    jitter=st.floats(0.0, 0.8),
    loss=st.sampled_from([0.0, 0.2]),
    seed=st.integers(0, 2**16),
)
def test_late_ticks_and_noisy_clients_never_strand_a_waiting_client(
    speeds: list[float], comm: list[float], tick_delay: float, jitter: float, loss: float, seed: int
) -> None:
    """Deadline ticks delivered late (the reference's race): a waiting client is still released at the first event
    after its group's deadline, and every result is applied exactly once."""
    watched = WatchedCompass(FedCompassScheduler(2, 12, latest_time_factor=1.2), punctual=tick_delay == 0)
    ledger = Ledger()
    checked = CheckedAggregator(StalenessWeighted(), ledger, lambda r: 1 / len(speeds))
    loop = EventLoop(Strategy(watched, IdentityPlanner(), checked), speeds, comm, tick_delay, jitter, loss, seed)
    loop.ledger = ledger
    loop.start().run(150)
    assert_each_result_applied_once(loop.strategy, ledger, checked)


def test_transfer_time_counts_in_arrival_times_not_in_speed() -> None:
    """Speed is training time per step; the rest of a round trip (transfers, queueing) is tracked as overhead and
    added to a group's expected and latest arrival, so a client whose transfers take a sizeable part of a task is
    not counted late every time."""
    strategy = compass(q_min=1, q_max=10, latest_time_factor=1.2)
    strategy.start(scalar(0.0), 0.0)
    sched = strategy.scheduler
    assert isinstance(sched, FedCompassScheduler)
    a, b = (strategy.on_available(client(i), 0.0)[0] for i in range(2))
    answer(strategy, a, 10.0, 1.0, 0.6)  # trained 6 s of the 10 s round trip: speed 0.6 s/step, overhead 4 s
    assert sched.clients[0].speed == pytest.approx(0.6) and sched.clients[0].overhead == pytest.approx(4.0)
    group = sched.groups[sched.clients[0].group]  # type: ignore[index]
    # E = 10 + 4 + 10 * 0.6 = 20 and L = 10 + 4 + 1.2 * 6 = 21.2 (without the overhead: 16 and 17.2, and an
    # arrival at 20 would be late)
    assert (group.expected, group.latest) == (pytest.approx(20.0), pytest.approx(21.2))
    [b2] = answer(strategy, b, 11.0, 1.0, 0.6)  # 5 s of overhead: joins with Q = floor((20 - 11 - 5) / 0.6) = 6
    assert b2.local_steps == 6
