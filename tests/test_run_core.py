"""The run core: one driver decides stops and evaluations for every runtime, and a strategy's failure ends a run
with one line that says why, in the simulator and on the server, and again identically when the server's log is
replayed after a crash."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from fedhet.runtime import EvalCadence, RunDriver, StopRules
from fedhet.server.persistence import StateStore
from fedhet.server.runtime import Coordinator
from fedhet.server.session import RuntimeSettings
from fedhet.strategies import IdentityPlanner, Strategy, UnknownTaskError, UpdateBuffer
from fedhet.strategies.aggregators import WeightedMean
from fedhet.strategies.fedavg import SyncScheduler
from fedhet.types import ClientInfo, ClientProfile, Result, Task, Weights

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


def strategy(fail_at: int = 0) -> Strategy:
    scheduler = SyncScheduler(fraction=1.0, min_clients=2, round_timeout=600.0, local_steps=1, local_epochs=0)
    return Strategy(scheduler, IdentityPlanner(), FailsAtVersion(fail_at))


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


def test_a_failing_strategy_stops_the_run_with_one_line_and_unknown_tasks_are_still_refused() -> None:
    s = strategy(fail_at=1)
    s.start(INITIAL, 0.0)
    driver = RunDriver(s, StopRules(max_versions=5), EvalCadence())
    first, second = round_of(driver, 0.0, 1.0)
    assert first.stop is None
    assert second.stop is not None and second.stop == driver.failure
    assert second.stop.startswith("strategy failed on the result of task ")
    assert second.stop.endswith("ValueError: cannot fold 2 updates") and "\n" not in second.stop
    with pytest.raises(UnknownTaskError):  # a refusal is not a failure
        driver.result(result(Task(99, 0, 0, INITIAL, local_steps=1), 1.0), 2.0)


async def fail_on_the_server(root: Path) -> str:
    """Two clients answer a round whose aggregation fails; returns the reason the run ended with. No run loop is
    started, so nothing after the initial checkpoint is written but the log: a crash right after the failure."""
    coord = Coordinator(strategy(fail_at=1), INITIAL, RuntimeSettings(stop=StopRules(5)), StateStore(root))
    coord.open()
    for c in (0, 1):
        coord.register(info(c))
    polls = [asyncio.create_task(coord.next_task(c, 2.0)) for c in (0, 1)]
    await asyncio.sleep(0.05)  # both clients asked for work
    coord._tick(coord.now())  # the deadline the run loop would act on: the round starts
    tasks = await asyncio.gather(*polls)
    versions = []
    for task in tasks:
        assert isinstance(task, Task)
        versions.append((await coord.submit(result(task, 1.0), coord.records[task.task_id], 24, False)).version)
    assert coord.ended is not None and versions == [0, 0]
    assert coord.counters.accepted == 2  # the update was accepted (and logged); the run then stopped
    over = await coord.next_task(0, 0.1)
    assert over == coord.ended  # clients are told the run is over, not left polling a wedged server
    return coord.ended.reason


def test_a_strategy_failure_ends_the_server_run_and_replays_to_the_same_end(tmp_path: Path) -> None:
    reason = asyncio.run(fail_on_the_server(tmp_path / "state"))
    assert reason.startswith("strategy failed on the result of task ") and "cannot fold 2 updates" in reason

    resumed = Coordinator(
        strategy(fail_at=1), INITIAL, RuntimeSettings(stop=StopRules(5)), StateStore(tmp_path / "state")
    )
    assert resumed.resume() > 0  # the failing result replays without a CheckpointError
    assert resumed.ended is not None and resumed.ended.reason == reason and resumed.version == 0
