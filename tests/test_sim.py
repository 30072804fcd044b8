"""The simulator: event order, the virtual-duration formula, dropouts, determinism, fleets."""

from __future__ import annotations

import itertools
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedhet.codec import encoded_size
from fedhet.config import FleetConfig
from fedhet.metrics import WALL_CLOCK_FIELDS, MetricsWriter
from fedhet.runtime import EvalCadence, Evaluation, StopRules
from fedhet.sim.events import EventKind, EventQueue
from fedhet.sim.fleet import sample_profiles
from fedhet.sim.simulator import SimConfig, Simulator, task_duration
from fedhet.strategies import Strategy, UpdateBuffer
from fedhet.strategies.aggregators import WeightedMean
from fedhet.strategies.fedasync import FedAsyncScheduler
from fedhet.strategies.fedavg import SyncScheduler
from fedhet.strategies.planners import IdentityPlanner
from fedhet.strategies.staleness import StalenessWeighted
from fedhet.types import Result, Task, Weights
from fedhet.updates import NormBound
from tests.helpers import EchoExecutor, client, weights


def test_events_pop_in_time_order_and_ties_in_push_order() -> None:
    queue = EventQueue()
    queue.push(2.0, EventKind.TICK)
    queue.push(1.0, EventKind.AVAILABLE, client_id=7)
    queue.push(1.0, EventKind.ARRIVAL, client_id=3, task_id=1)
    queue.push(0.5, EventKind.TICK)
    popped = [queue.pop() for _ in range(4)]
    assert [(e.time, e.kind) for e in popped] == [
        (0.5, EventKind.TICK),
        (1.0, EventKind.AVAILABLE),
        (1.0, EventKind.ARRIVAL),
        (2.0, EventKind.TICK),
    ]
    assert queue.now == 2.0
    with pytest.raises(ValueError, match="before the current time"):
        queue.push(1.0, EventKind.TICK)


def test_event_queue_state_round_trips_and_refuses_a_repeated_sequence_number() -> None:
    queue = EventQueue()
    queue.push(1.0, EventKind.ARRIVAL, client_id=3, task_id=1)
    queue.push(1.0, EventKind.AVAILABLE, client_id=7)
    queue.push(0.5, EventKind.TICK)
    state = queue.state_dict()
    again = EventQueue()
    again.load_state_dict(state)
    assert [again.pop() for _ in range(3)] == [queue.pop() for _ in range(3)]
    state["events"][1][1] = state["events"][0][1]  # two events with one sequence number could not be ordered
    with pytest.raises(ValueError, match="repeats a sequence number"):
        EventQueue().load_state_dict(state)


def test_task_duration_is_download_compute_upload() -> None:
    c = client(0, num_samples=95, seconds_per_sample=0.02, bandwidth=1000.0)
    task = Task(0, 0, 0, weights(0.0), local_epochs=2)
    # 2 epochs of ceil(95 / 10) = 10 steps: 20 steps * 10 samples * 0.02 s = 4 s, plus 2 * 500 B / 1000 B/s
    assert task_duration(task, c, batch_size=10, payload_bytes=500) == pytest.approx(4.0 + 1.0)
    steps_task = Task(1, 0, 0, weights(0.0), local_steps=7)
    assert task_duration(steps_task, c, batch_size=10, payload_bytes=0) == pytest.approx(7 * 10 * 0.02)


def run_sim(
    tmp_path: Path, speeds: list[float], availability: float = 1.0, versions: int = 3, timeout: float = 1e9
) -> tuple[Simulator, list[dict[str, float]]]:
    clients = [
        client(i, num_samples=10, seconds_per_sample=s, bandwidth=1e3, availability=availability)
        for i, s in enumerate(speeds)
    ]
    strategy = Strategy(
        SyncScheduler(fraction=1.0, min_clients=1, round_timeout=timeout, local_steps=3, local_epochs=0),
        IdentityPlanner(),
        WeightedMean(),
    )
    with MetricsWriter(tmp_path / "metrics.jsonl") as metrics:
        sim = Simulator(
            strategy,
            clients,
            EchoExecutor(),
            lambda w, bits: Evaluation(float(w["w"][0]), 0.0),
            metrics,
            SimConfig(StopRules(versions), batch_size=5),
            seed=0,
        )
        sim.run(weights(0.0))
    return sim, [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_rounds_advance_by_the_slowest_clients_virtual_duration(tmp_path: Path) -> None:
    _, records = run_sim(tmp_path, speeds=[0.01, 0.04])
    payload = encoded_size(weights(0.0))
    slowest = 3 * 5 * 0.04 + 2 * payload / 1e3
    assert [r["version"] for r in records] == [0, 1, 2, 3]
    assert records[1]["virtual_time"] == pytest.approx(slowest)
    assert records[3]["virtual_time"] == pytest.approx(3 * slowest)
    # equal sample counts: the mean of start+1 and start+2 adds 1.5 each round
    assert [r["accuracy"] for r in records] == pytest.approx([0.0, 1.5, 3.0, 4.5])
    assert records[-1]["bytes_down"] == records[-1]["bytes_up"] == 6 * payload
    assert records[-1]["updates_applied"] == 6


def test_unavailable_clients_drop_out_and_the_run_goes_on(tmp_path: Path) -> None:
    _, records = run_sim(tmp_path, speeds=[0.01] * 6, availability=0.5, versions=5)
    assert records[-1]["version"] == 5
    handed_out = records[-1]["bytes_down"] // encoded_size(weights(0.0))
    assert records[-1]["updates_applied"] < handed_out  # some tasks never came back


def test_round_deadline_bounds_a_straggler(tmp_path: Path) -> None:
    _, records = run_sim(tmp_path, speeds=[0.01, 100.0], versions=2, timeout=5.0)
    assert records[1]["virtual_time"] == pytest.approx(5.0)
    assert records[2]["virtual_time"] < 1500  # the straggler (1500 s per task) never held a round


@pytest.mark.parametrize("speed", ["homogeneous", "normal", "exponential"])
def test_fleet_speed_distributions(speed: str) -> None:
    config = FleetConfig(speed=speed, seconds_per_sample=0.01)
    sps = np.array([p.seconds_per_sample for p in sample_profiles(config, 20_000, seed=1)])
    assert sps.min() >= config.min_ratio * 0.01
    assert sps.mean() == pytest.approx(0.01, rel=0.03)
    expected_std = {"homogeneous": 0.0, "normal": 0.003, "exponential": 0.01}[speed]
    assert sps.std() == pytest.approx(expected_std, rel=0.05, abs=1e-9)
    assert sample_profiles(config, 50, seed=1) == sample_profiles(config, 50, seed=1)


def test_fleet_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="fleet.speed must be one of"):
        sample_profiles(FleetConfig(speed="gamma"), 3, 0)
    with pytest.raises(ValueError, match="fleet.bandwidth must be > 0"):
        sample_profiles(FleetConfig(bandwidth=0.0), 3, 0)


def _strip_wall(path: Path) -> list[dict[str, float]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in WALL_CLOCK_FIELDS} for row in rows]


def test_same_seed_same_metrics_on_real_data(tmp_path: Path) -> None:
    from fedhet.cli import compose
    from fedhet.sim.runner import simulate

    overrides = [
        "model=2nn",
        "num_clients=20",
        "sim.max_versions=3",
        "sim.progress=false",
        "strategy.scheduler.fraction=0.2",
        "strategy.scheduler.local_steps=5",
        "strategy.scheduler.local_epochs=0",
    ]
    torch.manual_seed(123)  # the run must not depend on the global generator
    simulate(compose(overrides), tmp_path / "a")
    torch.manual_seed(456)
    simulate(compose(overrides), tmp_path / "b")
    simulate(compose([*overrides, "seed=1"]), tmp_path / "c")
    a, b, c = (_strip_wall(tmp_path / d / "metrics.jsonl") for d in "abc")
    assert a == b
    assert a != c
    assert a[-1]["version"] == 3 and a[-1]["accuracy"] > a[0]["accuracy"]


def test_eval_interval_limits_evaluations_in_virtual_time(tmp_path: Path) -> None:
    clients = [client(i, num_samples=10, seconds_per_sample=0.01, bandwidth=1e3) for i in range(2)]
    strategy = Strategy(
        SyncScheduler(fraction=1.0, min_clients=1, local_steps=3, local_epochs=0), IdentityPlanner(), WeightedMean()
    )
    with MetricsWriter(tmp_path / "metrics.jsonl") as metrics:
        config = SimConfig(StopRules(10), EvalCadence(interval=2.0), batch_size=5)
        evaluate = lambda w, bits: Evaluation(0.0, 0.0)  # noqa: E731
        Simulator(strategy, clients, EchoExecutor(), evaluate, metrics, config, seed=0).run(weights(0.0))
    times = [r["virtual_time"] for r in (json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines())]
    round_time = 3 * 5 * 0.01 + 2 * encoded_size(weights(0.0)) / 1e3
    assert round_time < 2.0
    assert all(later - earlier >= 2.0 for earlier, later in itertools.pairwise(times[:-1]))
    assert times[-1] == pytest.approx(10 * round_time)  # the last version is always evaluated


class FailsOnTask(StalenessWeighted):
    """The staleness-weighted mix, failing on any update of task ``task_id`` (an aggregator with a bug)."""

    def __init__(self, task_id: int) -> None:
        super().__init__(alpha=0.5)
        self.task_id = task_id

    def aggregate(self, global_weights: Weights, updates: UpdateBuffer, version: int) -> dict[str, torch.Tensor]:
        if self.task_id in updates.task_ids():
            raise ValueError(f"cannot mix task {self.task_id}")
        return super().aggregate(global_weights, updates, version)


def test_a_result_the_strategy_fails_on_is_a_dropped_update_and_the_simulation_finishes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clients = [client(i, num_samples=10, seconds_per_sample=0.01 * (i + 1), bandwidth=1e3) for i in range(3)]
    strategy = Strategy(FedAsyncScheduler(local_steps=3), IdentityPlanner(), FailsOnTask(task_id=4))
    with MetricsWriter(tmp_path / "metrics.jsonl") as metrics:
        evaluate = lambda w, bits: Evaluation(float(w["w"][0]), 0.0)  # noqa: E731
        sim = Simulator(strategy, clients, EchoExecutor(), evaluate, metrics, SimConfig(StopRules(8)), seed=0)
        with caplog.at_level(logging.WARNING, logger="fedhet.sim.simulator"):
            summary = sim.run(weights(0.0))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert summary.failure is None and summary.reason == "max_versions" and strategy.version == 8
    assert records[-1]["updates_applied"] == 8 and records[-1]["updates_dropped"] == 1  # task 4's update
    dropped = [r.getMessage() for r in caplog.records]  # logged once, with its reason
    assert len(dropped) == 1
    assert re.fullmatch(
        r"client \d: update dropped: strategy failed on the result of task 4: ValueError: cannot mix task 4", dropped[0]
    )
    assert strategy.state_dict()["outstanding"].keys().isdisjoint({"4"})  # its client asked again: the task is gone
    assert sim.state_dict()["refused"] == 1  # a resumed run goes on counting it


@pytest.mark.parametrize(("action", "first"), [("reject", (1 + 2) / 2), ("clip", (1 + 2 + 2.5) / 3)])
def test_an_update_over_the_norm_bound_is_refused_or_clipped_as_a_server_does(
    tmp_path: Path, action: str, first: float
) -> None:
    """The echo executor's client c moves the model by c + 1: over a bound of 2.5 only client 2, the slowest. Under
    ``reject`` its update is dropped (its client asks for work again, so the round closes without it), under
    ``clip`` it arrives scaled onto the bound, as ``fedhet server`` treats it (``server.norm_bound``)."""
    clients = [client(i, num_samples=10, seconds_per_sample=0.01 * (i + 1), bandwidth=1e3) for i in range(3)]
    strategy = Strategy(
        SyncScheduler(fraction=1.0, min_clients=1, local_steps=3, local_epochs=0), IdentityPlanner(), WeightedMean()
    )
    evaluate = lambda w, bits: Evaluation(float(w["w"][0]), 0.0)  # noqa: E731
    config = SimConfig(StopRules(2), norm=NormBound(2.5, action))
    with MetricsWriter(tmp_path / "metrics.jsonl") as metrics:
        sim = Simulator(strategy, clients, EchoExecutor(), evaluate, metrics, config, seed=0)
        summary = sim.run(weights(0.0))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    seen = [r["accuracy"] for r in records]
    assert summary.reason == "max_versions" and seen[1] == pytest.approx(first)
    assert seen[2] == pytest.approx(2 * first)  # each version moves by as much: the same updates, refused or clipped
    if action == "reject":
        assert (records[-1]["updates_applied"], records[-1]["updates_dropped"], summary.clipped) == (4, 2, 0)
    else:
        assert (records[-1]["updates_applied"], records[-1]["updates_dropped"], summary.clipped) == (6, 0, 2)
    assert sim.state_dict()["clipped"] == [summary.clipped, []]  # a resumed run goes on counting


SPEEDS = [0.05, 0.01, 0.09, 0.03, 0.07, 0.02, 0.10, 0.04, 0.08, 0.06]  # seconds a sample: unrelated to client ids


class BatchesExecutor(EchoExecutor):
    """The echo executor, taking ``batch_size`` tasks at a time and recording each batch's client ids."""

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.batches: list[list[int]] = []

    def run(self, tasks: Sequence[Task]) -> list[Result]:
        self.batches.append([t.client_id for t in tasks])
        return super().run(tasks)


def test_clipped_updates_are_counted_when_they_arrive(tmp_path: Path) -> None:
    """A batch's results are computed (and checked against the bound) together, but a clipped update counts once it
    arrives, as a server counts what it receives: the run stops after one version, before the others arrive."""
    clients = [client(i, num_samples=10, seconds_per_sample=0.01 * (i + 1), bandwidth=1e3) for i in range(8)]
    strategy = Strategy(FedAsyncScheduler(local_steps=3), IdentityPlanner(), StalenessWeighted())
    evaluate = lambda w, bits: Evaluation(float(w["w"][0]), 0.0)  # noqa: E731
    config = SimConfig(StopRules(1), norm=NormBound(0.5, "clip"))
    with MetricsWriter(tmp_path / "metrics.jsonl") as metrics:
        sim = Simulator(strategy, clients, BatchesExecutor(8), evaluate, metrics, config, seed=0)
        summary = sim.run(weights(0.0))
    assert strategy.updates_applied == summary.clipped == 1  # every update is over 0.5; one arrived
    assert sim.state_dict()["clipped"] == [1, [t for t in range(1, 8)]]  # the batch-mates, clipped, still to arrive


def test_a_batch_holds_the_tasks_that_arrive_soonest_in_arrival_order(tmp_path: Path) -> None:
    """Clients of unequal speeds, in an order unrelated to their ids: each batch is the next results to arrive, so
    the vectorized executor's chunks are delivered (and folded by the update buffer) whole."""
    clients = [client(i, seconds_per_sample=s) for i, s in enumerate(SPEEDS)]
    strategy = Strategy(
        SyncScheduler(fraction=1.0, min_clients=1, local_steps=3, local_epochs=0), IdentityPlanner(), WeightedMean()
    )
    executor = BatchesExecutor(4)
    with MetricsWriter(tmp_path / "metrics.jsonl") as metrics:
        evaluate = lambda w, bits: Evaluation(0.0, 0.0)  # noqa: E731
        Simulator(strategy, clients, executor, evaluate, metrics, SimConfig(StopRules(2)), seed=0).run(weights(0.0))
    by_arrival = sorted(range(len(SPEEDS)), key=SPEEDS.__getitem__)
    round_batches = [by_arrival[:4], by_arrival[4:8], by_arrival[8:]]
    assert executor.batches == round_batches * 2


def test_a_resumed_simulation_computes_the_same_batches(tmp_path: Path) -> None:
    """The tasks in flight at a checkpoint, some computed and some not, are batched after a resume as they are
    without one (FedAsync: tasks are in flight across every version)."""
    states: list[tuple[int, dict[str, Any]]] = []  # (batches computed so far, simulator state)

    def run(executor: BatchesExecutor, resume: dict[str, Any] | None) -> None:
        with MetricsWriter(tmp_path / "metrics.jsonl") as metrics:
            sim = Simulator(
                Strategy(FedAsyncScheduler(local_steps=3), IdentityPlanner(), StalenessWeighted(alpha=0.5)),
                [client(i, seconds_per_sample=s) for i, s in enumerate(SPEEDS)],
                executor,
                lambda w, bits: Evaluation(0.0, 0.0),
                metrics,
                SimConfig(StopRules(20), checkpoint_every=5),
                seed=0,
                checkpoint=lambda state: states.append((len(executor.batches), dict(state))),
            )
            sim.run(weights(0.0), resume)

    whole = BatchesExecutor(3)
    run(whole, None)
    done, state = states[0]
    assert len(state["in_flight"]) > 3 and state["computed"]
    resumed = BatchesExecutor(3)
    run(resumed, state)
    assert resumed.batches == whole.batches[done:]
