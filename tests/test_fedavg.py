"""Synchronous FedAvg in the strategy core: sampling, arithmetic, deadlines, lost clients, replay, resume."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from fedhet.strategies import Strategy, UnknownTaskError, build_strategy
from fedhet.strategies.aggregators import WeightedMean
from fedhet.strategies.buffer import UpdateBuffer
from fedhet.strategies.fedavg import SyncScheduler
from fedhet.strategies.planners import IdentityPlanner
from fedhet.types import Result, StackedRow
from tests.helpers import client, result_for, weights


def fedavg(**kwargs: float) -> Strategy:
    params = {"fraction": 1.0, "min_clients": 1, "round_timeout": 100.0, **kwargs}
    strategy = Strategy(SyncScheduler(**params), IdentityPlanner(), WeightedMean())  # type: ignore[arg-type]
    strategy.start(weights(0.0, 0.0), now=0.0)
    return strategy


def register(strategy: Strategy, n: int, samples: list[int] | None = None) -> list:
    tasks = []
    for i in range(n):
        tasks += strategy.on_available(client(i, num_samples=(samples or [10] * n)[i]), 0.0)
    assert tasks == []  # a round starts on the tick, after every registration at this time
    assert strategy.next_deadline() == 0.0
    return strategy.on_tick(0.0)


def test_sample_weighted_mean_matches_hand_computation() -> None:
    strategy = fedavg()
    tasks = register(strategy, 3, samples=[10, 30, 60])
    assert [t.client_id for t in tasks] == [0, 1, 2]
    assert all(t.version == 0 and t.local_epochs == 1 for t in tasks)
    # clients return w = 1, 2, 4 with 10, 30, 60 samples: (10*1 + 30*2 + 60*4) / 100 = 3.1
    # integer counters 3, 4, 8: unweighted mean, rounded down = 5
    for task, value, n, count in zip(tasks, [1.0, 2.0, 4.0], [10, 30, 60], [3, 4, 8], strict=True):
        strategy.on_result(result_for(task, value, n, count), 1.0)
    assert strategy.version == 1
    torch.testing.assert_close(strategy.global_weights["w"], torch.tensor([3.1, 3.1]))
    assert strategy.global_weights["count"].item() == 5
    assert strategy.updates_applied == 3


def test_round_waits_for_every_sampled_client() -> None:
    strategy = fedavg()
    tasks = register(strategy, 2)
    strategy.on_result(result_for(tasks[0], 1.0, 10), 1.0)
    assert strategy.version == 0
    strategy.on_result(result_for(tasks[1], 3.0, 10), 2.0)
    assert strategy.version == 1
    next_round = strategy.on_tick(2.0)
    assert {t.client_id for t in next_round} == {0, 1} and all(t.version == 1 for t in next_round)


def test_fraction_and_min_clients_set_the_round_size() -> None:
    scheduler = SyncScheduler(fraction=0.1, min_clients=2)
    strategy = Strategy(scheduler, IdentityPlanner(), WeightedMean())
    strategy.start(weights(0.0), 0.0)
    tasks = register(strategy, 100)
    assert len(tasks) == 10 and len({t.client_id for t in tasks}) == 10
    strategy2 = Strategy(SyncScheduler(fraction=0.1, min_clients=5), IdentityPlanner(), WeightedMean())
    strategy2.start(weights(0.0), 0.0)
    assert len(register(strategy2, 20)) == 5  # ceil(0.1 * 20) = 2 < min_clients


def test_round_does_not_start_with_too_few_idle_clients() -> None:
    strategy = fedavg(min_clients=3)
    strategy.on_available(client(0), 0.0)
    strategy.on_available(client(1), 0.0)
    assert strategy.on_tick(0.0) == []
    strategy.on_available(client(2), 5.0)
    assert len(strategy.on_tick(5.0)) == 3


def test_sampling_is_seeded() -> None:
    def chosen(seed: int) -> list[int]:
        strategy = fedavg(fraction=0.2, seed=seed)
        return [t.client_id for t in register(strategy, 50)]

    assert chosen(1) == chosen(1)
    assert chosen(1) != chosen(2)


def test_deadline_closes_a_round_and_drops_the_straggler() -> None:
    strategy = fedavg(round_timeout=10.0)
    tasks = register(strategy, 3)
    strategy.on_result(result_for(tasks[0], 2.0, 10), 3.0)
    strategy.on_result(result_for(tasks[1], 4.0, 10), 4.0)
    assert strategy.next_deadline() == 10.0
    new_tasks = strategy.on_tick(10.0)
    assert strategy.version == 1
    torch.testing.assert_close(strategy.global_weights["w"], torch.tensor([3.0, 3.0]))
    assert {t.client_id for t in new_tasks} == {0, 1}  # the straggler is still busy
    strategy.on_result(result_for(tasks[2], 100.0, 10), 12.0)  # late: dropped, never averaged
    assert strategy.updates_dropped == 1
    torch.testing.assert_close(strategy.global_weights["w"], torch.tensor([3.0, 3.0]))


def test_deadline_with_no_arrivals_keeps_the_model() -> None:
    strategy = fedavg(round_timeout=5.0)
    register(strategy, 2)
    strategy.on_tick(5.0)
    assert strategy.version == 0
    torch.testing.assert_close(strategy.global_weights["w"], torch.tensor([0.0, 0.0]))


def test_a_lost_client_does_not_stall_the_round() -> None:
    strategy = fedavg(round_timeout=1000.0)
    tasks = register(strategy, 2)
    strategy.on_result(result_for(tasks[0], 2.0, 10), 1.0)
    strategy.on_available(client(1), 2.0)  # client 1 crashed and came back without a result
    assert strategy.version == 1
    with pytest.raises(UnknownTaskError):  # its old task is gone
        strategy.on_result(result_for(tasks[1], 9.0, 10), 3.0)


def test_replayed_and_misattributed_results_are_refused() -> None:
    strategy = fedavg()
    tasks = register(strategy, 2)
    result = result_for(tasks[0], 1.0, 10)
    strategy.on_result(result, 1.0)
    with pytest.raises(UnknownTaskError):
        strategy.on_result(result, 1.5)  # replay
    forged = result_for(tasks[1], 1.0, 10)
    with pytest.raises(UnknownTaskError):
        strategy.on_result(type(forged)(**{**forged.__dict__, "client_id": 0}), 1.5)
    with pytest.raises(UnknownTaskError):
        strategy.on_result(type(forged)(**{**forged.__dict__, "task_id": 999}), 1.5)
    assert strategy.updates_applied == 0 and strategy.version == 0


def test_resume_from_state_dict_continues_identically() -> None:
    def drive(strategy: Strategy, tasks: list, t0: float) -> list[tuple[int, int]]:
        log = []
        for step in range(6):
            now = t0 + step
            new = []
            for task in tasks:
                new += strategy.on_result(result_for(task, float(task.client_id + step), 10), now)
            new += strategy.on_tick(now)
            log += [(t.client_id, t.version) for t in new]
            tasks = new
        return log

    original = fedavg(fraction=0.5, seed=3)
    tasks = register(original, 6)
    snapshot = original.state_dict()
    resumed = Strategy(
        SyncScheduler(fraction=0.5, min_clients=1, round_timeout=100.0, seed=3),
        IdentityPlanner(),
        WeightedMean(),
    )
    resumed.start(weights(0.0, 0.0), 0.0)
    resumed.load_state_dict(snapshot)
    assert drive(original, tasks, 1.0) == drive(resumed, tasks, 1.0)
    torch.testing.assert_close(original.global_weights, resumed.global_weights)


def test_load_state_dict_validates() -> None:
    strategy = fedavg()
    state = strategy.state_dict()
    with pytest.raises(ValueError, match="keys"):
        strategy.load_state_dict({k: v for k, v in state.items() if k != "version"})
    bad = {**state, "global_weights": {"w": torch.zeros(3), "count": torch.tensor(0)}}
    with pytest.raises(ValueError, match="shapes"):
        strategy.load_state_dict(bad)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("fraction", 0.0, "strategy.scheduler \\(fedavg\\): strategy.fraction must be in"),
        ("min_clients", 0, "min_clients must be >= 1"),
        ("round_timeout", -1.0, "round_timeout must be > 0"),
        ("local_steps", 5, "exactly one of"),
        ("bogus", 1, "strategy.scheduler.bogus is not a parameter"),
    ],
)
def test_bad_scheduler_parameters_name_the_key(key: str, value: float, message: str) -> None:
    spec = {
        "scheduler": {"name": "fedavg", key: value},
        "planner": {"name": "identity"},
        "aggregator": {"name": "weighted_mean"},
    }
    with pytest.raises(ValueError, match=message):
        build_strategy(spec, seed=0)


def test_unknown_component_names_the_choices() -> None:
    spec = {
        "scheduler": {"name": "nope"},
        "planner": {"name": "identity"},
        "aggregator": {"name": "weighted_mean"},
    }
    with pytest.raises(ValueError, match="unknown scheduler 'nope'; choose one of: .*fedavg"):
        build_strategy(spec, seed=0)


def test_round_size_uses_known_clients() -> None:
    scheduler = SyncScheduler(fraction=0.3, min_clients=1)
    for i in range(7):
        scheduler.on_available(client(i), 0.0)
    assert scheduler.round_size == math.ceil(0.3 * 7)


def _stacked_results(stacks: dict[str, torch.Tensor], rows: list[int], version: int = 0) -> list[Result]:
    """Results whose weights are rows of ``stacks``, as the vectorized executor returns a chunk."""
    return [Result(r, r, version, StackedRow(stacks, r), 10, 1, 0.0, 0.0) for r in rows]


def test_rows_of_a_stacked_chunk_fold_together_into_the_per_result_sum() -> None:
    g = torch.Generator().manual_seed(0)
    stacks = {"w": torch.randn(6, 3, 4, generator=g), "b": torch.randn(6, 4, generator=g), "n": torch.arange(6)}
    order, weights_of = [4, 0, 5, 2, 1, 3], [3.0, 1.0, 2.0, 5.0, 4.0, 6.0]
    chunked, plain = UpdateBuffer(), UpdateBuffer()
    for result, weight in zip(_stacked_results(stacks, order), weights_of, strict=True):
        chunked.add(result, weight)
        plain.add(replace(result, weights=dict(result.weights)), weight)  # the same update as tensors of its own
    assert not chunked._pending  # the chunk was folded when its last row arrived
    ((_, got),), ((_, want),) = chunked.items(), plain.items()
    for name in stacks:
        torch.testing.assert_close(got.weighted_sum[name], want.weighted_sum[name], rtol=1e-6, atol=1e-6)
    assert got.weighted_sum["n"].dtype == torch.int64 and int(got.weighted_sum["n"]) == 15  # counters: plain sum
    assert (got.count, got.total_weight, got.task_ids) == (want.count, want.total_weight, want.task_ids)
    assert (got.key_weights, got.key_counts) == (want.key_weights, want.key_counts)


def test_a_partly_delivered_chunk_folds_only_its_delivered_rows() -> None:
    stack = torch.randn(5, 7, generator=torch.Generator().manual_seed(1))
    stack[1] = float("nan")  # a row never delivered (a dropped straggler): it must not leak into the sum
    stack[3] = float("inf")
    buffer = UpdateBuffer()
    for result in _stacked_results({"w": stack}, [4, 0, 2]):
        buffer.add(result, 2.0)
    assert buffer._pending  # waits for rows that may still come
    state = buffer.state_dict()  # reading the sums folds what is there
    torch.testing.assert_close(state["0:32"]["sum"]["w"], 2 * (stack[4] + stack[0] + stack[2]).double())
    assert state["0:32"]["weight"] == 6.0 and state["0:32"]["count"] == 3
    assert not buffer._pending


def test_at_most_two_chunks_per_bucket_wait() -> None:
    buffer = UpdateBuffer()
    for i in range(5):
        (result,) = _stacked_results({"w": torch.full((4, 3), float(i))}, [i % 4])
        buffer.add(result, 1.0)
        assert len(buffer._pending) <= 2  # older chunks are folded, so they can be freed
    ((_, bucket),) = buffer.items()
    torch.testing.assert_close(bucket.weighted_sum["w"], torch.full((3,), 10.0, dtype=torch.float64))


def test_a_chunk_of_another_shape_is_refused_before_anything_is_folded() -> None:
    buffer = UpdateBuffer()
    buffer.add(Result(0, 0, 0, {"w": torch.ones(3)}, 10, 1, 0.0, 0.0), 1.0)
    (bad,) = _stacked_results({"w": torch.ones(2, 4)}, [1])
    with pytest.raises(ValueError, match=r"tensor 'w' has shape \(4,\), the buffered updates \(3,\)"):
        buffer.add(bad, 1.0)
    ((_, bucket),) = buffer.items()
    assert bucket.count == 1 and not buffer._pending


def test_start_keeps_the_initial_weights_on_their_device() -> None:
    # a simulation on a GPU keeps its global model there; "meta" stands in for the GPU on a CPU-only machine
    strategy = fedavg()
    strategy.start({"w": torch.empty(3, device="meta")}, now=0.0)
    assert strategy.global_weights["w"].device.type == "meta"
