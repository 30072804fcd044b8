"""The run core: one driver decides stops and evaluations for every runtime. A strategy's failure on a result
refuses that result (the strategy took the event back) and the run goes on; its failure on a client asking for work
or on a deadline ends the run with one line that says why, in the simulator and on the server, and again
identically when the server's log is replayed after a crash."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from fedhet.runtime import EvalCadence, ResultFailed, RunDriver, StopRules
from fedhet.server.persistence import StateStore
from fedhet.server.runtime import Coordinator
from fedhet.server.session import RuntimeSettings
from fedhet.strategies import Aggregator, IdentityPlanner, Strategy, UnknownTaskError, UpdateBuffer
from fedhet.strategies.aggregators import WeightedMean
from fedhet.strategies.fedavg import SyncScheduler
from fedhet.types import DIVERGED, ClientInfo, ClientProfile, Result, Task, Weights

INITIAL = {"w": torch.zeros(2, 3), "n": torch.tensor(0)}


class FailsAtVersion:
    """A weighted mean that raises when it would make version ``at`` (an aggregator plugin with a bug)."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.inner = WeightedMean()

    def aggregate(self, global_weights: Weights, updates: UpdateBuffer, version: int) -> dict[str, torch.Tensor]:
        if version + 1 == self.at:
            raise ValueError(f"cannot fold {len(updates)} updates\nsecond line of the message")
        return self.inner.aggregate(global_weights, updates, version)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to load: the failing aggregator keeps no state of its own."""


class FailsOnLargeUpdates(WeightedMean):
    """A weighted mean that refuses to fold an update of a value over 100 (an aggregator with a sanity check)."""

    def aggregate(self, global_weights: Weights, updates: UpdateBuffer, version: int) -> dict[str, torch.Tensor]:
        for _, bucket in updates.items():
            if float(bucket.weighted_sum["w"].abs().max()) > 100 * bucket.total_weight:
                raise ValueError(f"an update of tasks {bucket.task_ids} is too large")
        return super().aggregate(global_weights, updates, version)


def strategy(fail_at: int = 0, aggregator: Aggregator | None = None) -> Strategy:
    scheduler = SyncScheduler(fraction=1.0, min_clients=2, round_timeout=600.0, local_steps=1, local_epochs=0)
    return Strategy(scheduler, IdentityPlanner(), aggregator or FailsAtVersion(fail_at))


def info(cid: int) -> ClientInfo:
    return ClientInfo(cid, ClientProfile(0.001, 1e6), 10)


def result(task: Task, value: float) -> Result:
    weights = {"w": torch.full((2, 3), value), "n": torch.tensor(1)}
    return Result(task.task_id, task.client_id, task.version, weights, 10, 1, 0.01, 0.3)


def round_of(driver: RunDriver, now: float, value: float) -> list[Any]:
    """Both clients answer their tasks; the outcomes of the two results."""
    tasks = [t for c in (0, 1) for t in driver.available(info(c), now).tasks]
    tasks += driver.tick(now).tasks  # a FedAvg round starts on a tick, once every client of that time was seen
    assert len(tasks) == 2
    return [driver.result(result(t, value), now + 1) for t in tasks]


def test_the_driver_stops_at_max_versions_and_evaluates_by_the_cadence() -> None:
    s = strategy()
    s.start(INITIAL, 0.0)
    driver = RunDriver(s, StopRules(max_versions=3), EvalCadence(every=2))
    outcomes = [o for v in range(3) for o in round_of(driver, 10.0 * v, 1.0)]
    new = [o for o in outcomes if o.new_version]
    assert [o.evaluate for o in new] == [False, True, True]  # version 2 by the cadence, version 3 as the last
    assert [o.stop for o in new] == [None, None, "max_versions"]
    assert driver.time_up(5.0) is None


def test_the_driver_bounds_evaluations_by_run_time_and_stops_on_time() -> None:
    s = strategy()
    s.start(INITIAL, 0.0)
    driver = RunDriver(s, StopRules(max_versions=10, max_seconds=25.0), EvalCadence(every=1, interval=15.0))
    driver.mark_evaluated(0.0)
    due = []
    for v in range(3):
        outcome = round_of(driver, 10.0 * v, 1.0)[-1]
        due.append(outcome.evaluate)
        if outcome.evaluate:
            driver.mark_evaluated(10.0 * v + 1)
    assert due == [False, False, True]  # versions at 1, 11 and 21 s: only at 21 s is the last evaluation 15 s old
    assert driver.time_up(25.0) is None and driver.time_up(25.5) == "max_seconds"
    assert not driver.evaluation_pending()
    round_of(driver, 30.0, 1.0)
    assert driver.evaluation_pending()  # version 4 at 31 s was not due: the end of the run evaluates it


def start_round(driver: RunDriver, now: float) -> list[Task]:
    """Both clients ask for work and the round starts: its two tasks."""
    tasks = [t for c in (0, 1) for t in driver.available(info(c), now).tasks]
    tasks += driver.tick(now).tasks  # a FedAvg round starts on a tick, once every client of that time was seen
    assert len(tasks) == 2
    return tasks


def test_a_diverged_result_is_refused_before_the_strategy_sees_it() -> None:
    """A result with loss NaN (DIVERGED: its training produced NaN or Inf) is refused as ``fedhet server`` refuses
    it, in every runtime: one line, nothing applied, and its client's next request loses the task."""
    s = strategy()
    s.start(INITIAL, 0.0)
    driver = RunDriver(s, StopRules(max_versions=3), EvalCadence())
    honest, diverged = start_round(driver, 0.0)
    assert driver.result(result(honest, 1.0), 1.0).stop is None
    before = s.state_dict()
    with pytest.raises(ResultFailed) as refused:
        driver.result(replace(result(diverged, 1.0), loss=DIVERGED), 2.0)
    assert str(refused.value) == f"the result of task {diverged.task_id} has loss NaN: its local training diverged"
    assert s.state_dict()["outstanding"] == before["outstanding"] and s.version == 0 and driver.failure is None
    outcome = driver.available(info(diverged.client_id), 3.0)
    assert outcome.new_version and s.version == 1 and s.updates_applied == 1


class Overflows(WeightedMean):
    """A weighted mean whose arithmetic overflows once its updates are large (as ProWD's dequantizer diverged on a
    fleet of mostly 2-bit clients): finite updates, an Inf model."""

    def aggregate(self, global_weights: Weights, updates: UpdateBuffer, version: int) -> dict[str, torch.Tensor]:
        out = super().aggregate(global_weights, updates, version)
        return {k: v * 1e38 if v.is_floating_point() else v for k, v in out.items()}


def test_a_global_model_that_diverged_stops_the_run_with_one_line_and_sends_no_task() -> None:
    """Finite updates whose aggregate holds Inf: the run stops at that version in every runtime (a client could
    only diverge on that model), with one line, and the event's tasks are not sent."""
    s = strategy(aggregator=Overflows())
    s.start(INITIAL, 0.0)
    driver = RunDriver(s, StopRules(max_versions=3), EvalCadence(every=5))
    first = round_of(driver, 0.0, 1.0)  # 1 x 1e38: still finite
    assert [o.stop for o in first] == [None, None] and s.version == 1
    tasks = start_round(driver, 10.0)
    assert driver.result(result(tasks[0], 100.0), 11.0).stop is None
    outcome = driver.result(result(tasks[1], 100.0), 12.0)  # 100 x 1e38 overflows float32
    reason = "the global model of version 2 holds NaN or Inf: training diverged"
    assert outcome.new_version and outcome.evaluate and outcome.stop == driver.failure == reason
    assert outcome.tasks == [] and s.version == 2 and s.updates_applied == 4


def test_a_result_the_strategy_fails_on_is_refused_with_one_line_and_the_run_goes_on() -> None:
    s = strategy(aggregator=FailsOnLargeUpdates())
    s.start(INITIAL, 0.0)
    driver = RunDriver(s, StopRules(max_versions=3), EvalCadence())
    honest, poisoned = start_round(driver, 0.0)
    assert driver.result(result(honest, 1.0), 1.0).stop is None
    before = s.state_dict()
    with pytest.raises(ResultFailed) as refused:  # the last result closes the round: the aggregation fails
        driver.result(result(poisoned, 1e6), 2.0)
    reason = str(refused.value)
    assert reason == f"strategy failed on the result of task {poisoned.task_id}: ValueError: an update of tasks " + (
        f"[{honest.task_id}, {poisoned.task_id}] is too large"
    )
    assert driver.failure is None and s.version == 0 and s.outstanding == 1
    after = s.state_dict()
    assert torch.equal(
        after["scheduler"]["buffer"]["0:32"]["sum"]["w"], before["scheduler"]["buffer"]["0:32"]["sum"]["w"]
    )
    assert after["outstanding"] == before["outstanding"] and after["next_task_id"] == before["next_task_id"]
    with pytest.raises(ResultFailed):  # the same result fails the same way
        driver.result(result(poisoned, 1e6), 2.5)
    # its client asks for work again: its task is lost, the round closes with the honest update alone
    outcome = driver.available(info(poisoned.client_id), 3.0)
    assert outcome.new_version and outcome.stop is None and s.version == 1 and s.updates_applied == 1
    assert torch.equal(s.global_weights["w"], torch.ones(2, 3))
    for v in (1, 2):  # and the run goes on to its end
        outcomes = [driver.result(result(t, 1.0), 10.0 * v + 1) for t in driver.tick(10.0 * v).tasks]
        assert outcomes[-1].new_version
    assert s.version == 3 and outcomes[-1].stop == "max_versions"
    with pytest.raises(UnknownTaskError):  # a result of no outstanding task is still refused as such
        driver.result(result(Task(99, 0, 0, INITIAL, local_steps=1), 1.0), 40.0)


def test_a_failing_strategy_stops_the_run_on_a_deadline_or_a_request_for_work_with_one_line() -> None:
    s = strategy(fail_at=1)
    s.start(INITIAL, 0.0)
    driver = RunDriver(s, StopRules(max_versions=5), EvalCadence())
    first, _ = start_round(driver, 0.0)
    assert driver.result(result(first, 1.0), 1.0).stop is None
    outcome = driver.tick(601.0)  # the round's deadline: it closes with one update, and the aggregation fails
    assert outcome.stop is not None and outcome.stop == driver.failure
    assert outcome.stop == "strategy failed on a deadline: ValueError: cannot fold 1 updates"
    assert s.version == 0 and not outcome.tasks

    s = strategy(fail_at=1)
    s.start(INITIAL, 0.0)
    driver = RunDriver(s, StopRules(max_versions=5), EvalCadence())
    first, second = start_round(driver, 0.0)
    assert driver.result(result(first, 1.0), 1.0).stop is None
    outcome = driver.available(info(second.client_id), 2.0)  # it lost its task: the round closes without it
    assert (
        outcome.stop
        == driver.failure
        == (f"strategy failed on client {second.client_id} asking for work: ValueError: cannot fold 1 updates")
    )


async def fail_on_the_server(root: Path) -> str:
    """One of two clients answers a round whose aggregation fails at the round's deadline; returns the reason the
    run ended with. No run loop is started, so nothing after the initial checkpoint is written but the log: a crash
    right after the failure."""
    coord = Coordinator(strategy(fail_at=1), INITIAL, RuntimeSettings(stop=StopRules(5)), StateStore(root))
    coord.open()
    for c in (0, 1):
        coord.register(info(c))
    polls = [asyncio.create_task(coord.next_task(c, 2.0)) for c in (0, 1)]
    await asyncio.sleep(0.05)  # both clients asked for work
    coord._tick(coord.now())  # the deadline the run loop would act on: the round starts
    tasks = await asyncio.gather(*polls)
    assert isinstance(tasks[0], Task)
    submitted = await coord.submit(result(tasks[0], 1.0), coord.records[tasks[0].task_id], 24, False)
    assert submitted.version == 0 and coord.ended is None
    coord._tick(coord.now() + 601.0)  # the round's deadline: it closes with one update, and the aggregation fails
    assert coord.ended is not None
    assert coord.counters.accepted == 1  # the update was accepted (and logged); the run then stopped
    over = await coord.next_task(0, 0.1)
    assert over == coord.ended  # clients are told the run is over, not left polling a wedged server
    return coord.ended.reason


def test_a_strategy_failure_ends_the_server_run_and_replays_to_the_same_end(tmp_path: Path) -> None:
    reason = asyncio.run(fail_on_the_server(tmp_path / "state"))
    assert reason == "strategy failed on a deadline: ValueError: cannot fold 1 updates"

    resumed = Coordinator(
        strategy(fail_at=1), INITIAL, RuntimeSettings(stop=StopRules(5)), StateStore(tmp_path / "state")
    )
    assert resumed.resume() > 0  # the failing deadline replays without a CheckpointError
    assert resumed.ended is not None and resumed.ended.reason == reason and resumed.version == 0


async def refuse_on_the_server(root: Path) -> Coordinator:
    """Two clients answer a round; the second result makes the aggregation fail."""
    coord = Coordinator(strategy(aggregator=FailsOnLargeUpdates()), INITIAL, RuntimeSettings(), StateStore(root))
    coord.open()
    for c in (0, 1):
        coord.register(info(c))
    polls = [asyncio.create_task(coord.next_task(c, 2.0)) for c in (0, 1)]
    await asyncio.sleep(0.05)
    coord._tick(coord.now())
    honest, poisoned = await asyncio.gather(*polls)
    assert isinstance(honest, Task) and isinstance(poisoned, Task)
    await coord.submit(result(honest, 1.0), coord.records[honest.task_id], 24, False)
    with pytest.raises(ResultFailed, match="strategy failed on the result of task"):  # the client is told why
        await coord.submit(result(poisoned, 1e6), coord.records[poisoned.task_id], 24, False)
    assert coord.version == 0 and coord.ended is None and coord.counters.rejected == 1
    task = await coord.next_task(poisoned.client_id, 0.1)  # it asks again: its task is lost, the round closes
    assert coord.version == 1 and coord.ended is None
    assert isinstance(task, Task) or task is None
    return coord


def test_a_strategy_failure_on_a_result_refuses_it_on_the_server_and_replays_the_same(tmp_path: Path) -> None:
    coord = asyncio.run(refuse_on_the_server(tmp_path / "state"))
    resumed = Coordinator(
        strategy(aggregator=FailsOnLargeUpdates()), INITIAL, RuntimeSettings(), StateStore(tmp_path / "state")
    )
    assert resumed.resume() > 0  # the refused result replays as a refusal again, without a CheckpointError
    assert resumed.ended is None and resumed.version == coord.version == 1


async def diverge_on_the_server(root: Path) -> Coordinator:
    """Two rounds on ``fedhet server``'s coordinator: the second one's aggregate overflows to Inf."""
    coord = Coordinator(strategy(aggregator=Overflows()), INITIAL, RuntimeSettings(), StateStore(root))
    coord.open()
    for c in (0, 1):
        coord.register(info(c))
    for value in (1.0, 100.0):
        polls = [asyncio.create_task(coord.next_task(c, 2.0)) for c in (0, 1)]
        await asyncio.sleep(0.05)
        coord._tick(coord.now())
        tasks = await asyncio.gather(*polls)
        for task in tasks:
            assert isinstance(task, Task)
            await coord.submit(result(task, value), coord.records[task.task_id], 24, False)
    return coord


def test_a_diverged_global_model_ends_the_server_run_as_in_simulation_and_replays_to_the_same_end(
    tmp_path: Path,
) -> None:
    coord = asyncio.run(diverge_on_the_server(tmp_path / "state"))
    reason = "the global model of version 2 holds NaN or Inf: training diverged"
    assert coord.ended is not None and coord.ended.reason == reason and coord.version == 2
    assert not coord.records  # no task of the diverged model went out
    resumed = Coordinator(strategy(aggregator=Overflows()), INITIAL, RuntimeSettings(), StateStore(tmp_path / "state"))
    assert resumed.resume() > 0
    assert resumed.ended is not None and resumed.ended.reason == reason and resumed.version == 2
