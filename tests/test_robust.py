"""Coordinate median, trimmed mean (Yin et al. 2018) and Krum / Multi-Krum (Blanchard et al. 2017) against their
papers' rules written out in numpy, and the buffer that keeps a round's updates apart for them."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from helpers import client

from fedhet.errors import ConfigError
from fedhet.strategies import UpdateBuffer, build_strategy
from fedhet.strategies.errors import StateError
from fedhet.strategies.fedavg import SyncScheduler
from fedhet.strategies.robust import CoordinateMedian, Krum, TrimmedMean
from fedhet.types import Result


def buffer_of(rows: list[np.ndarray], bitwidths: list[int] | None = None) -> UpdateBuffer:
    buffer = UpdateBuffer(keep_updates=True)
    for i, row in enumerate(rows):
        bits = bitwidths[i] if bitwidths else 32
        weights = {"w": torch.tensor(row, dtype=torch.float32), "n": torch.tensor(i * 3)}
        buffer.add(Result(i, i, 0, weights, 10 + 100 * i, 1, 0.0, 0.0, bitwidth=bits), float(10 + 100 * i))
    return buffer


START = {"w": torch.zeros(6), "n": torch.tensor(0)}


@pytest.mark.parametrize("n", [5, 4])
def test_median_is_numpys_per_coordinate_median_unweighted(n: int) -> None:
    rows = list(np.random.default_rng(n).normal(size=(n, 6)))
    out = CoordinateMedian().aggregate(START, buffer_of(rows, [32, 8, 4, 32, 8][:n]), 0)
    np.testing.assert_allclose(out["w"].numpy(), np.median(np.stack(rows), axis=0), rtol=1e-6)
    assert out["n"].item() == int(np.floor(np.median([i * 3 for i in range(n)])))


def test_trimmed_mean_removes_beta_n_from_each_end_of_every_coordinate() -> None:
    rows = list(np.random.default_rng(1).normal(size=(10, 6)))
    rows[3] = rows[3] + 1e6  # one attacker: trimmed away on every coordinate
    out = TrimmedMean(beta=0.2).aggregate(START, buffer_of(rows), 0)
    ordered = np.sort(np.stack(rows), axis=0)
    np.testing.assert_allclose(out["w"].numpy(), ordered[2:8].mean(axis=0), rtol=1e-5)
    assert np.abs(out["w"].numpy()).max() < 10
    with pytest.raises(ValueError, match="beta"):
        TrimmedMean(beta=0.5)


def krum_reference(rows: list[np.ndarray], f: int, m: int) -> np.ndarray:
    n = len(rows)
    scores = []
    for i in range(n):
        distances = sorted(float(np.sum((rows[i] - rows[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(distances[: n - f - 2]))
    chosen = np.argsort(scores, kind="stable")[:m]
    return np.asarray(np.mean([rows[i] for i in chosen], axis=0))


@pytest.mark.parametrize(("f", "m"), [(2, 1), (2, 3), (1, 2)])
def test_krum_and_multi_krum_follow_the_papers_score(f: int, m: int) -> None:
    rng = np.random.default_rng(f * 10 + m)
    rows = list(rng.normal(size=(8, 6)))
    rows[0], rows[5] = rows[0] + 50.0, rows[5] - 80.0  # two attackers
    out = Krum(byzantine=f, keep=m).aggregate(START, buffer_of(rows), 0)
    np.testing.assert_allclose(out["w"].numpy(), krum_reference(rows, f, m), rtol=1e-5)
    assert np.abs(out["w"].numpy()).max() < 10  # never an attacker's update


def test_a_lone_update_is_krums_choice() -> None:
    out = Krum(byzantine=3).aggregate(START, buffer_of([np.arange(6.0)]), 0)
    np.testing.assert_allclose(out["w"].numpy(), np.arange(6.0))


def test_robust_aggregators_refuse_a_buffer_that_folded_the_updates() -> None:
    buffer = UpdateBuffer()
    buffer.add(Result(0, 0, 0, {"w": torch.ones(6), "n": torch.tensor(1)}, 5, 1, 0.0, 0.0), 5.0)
    for aggregator in (CoordinateMedian(), TrimmedMean(), Krum()):
        with pytest.raises(ValueError, match="apart"):
            aggregator.aggregate(START, buffer, 0)


def spec(aggregator: dict[str, object], scheduler: str = "fedavg") -> dict[str, dict[str, object]]:
    params = {"local_steps": 2} if scheduler == "fedbuff" else {}
    return {"scheduler": {"name": scheduler, **params}, "planner": {"name": "identity"}, "aggregator": aggregator}


def test_the_builder_gives_a_robust_aggregator_a_scheduler_that_keeps_updates() -> None:
    strategy = build_strategy(spec({"name": "krum", "byzantine": 1}), seed=0)
    assert isinstance(strategy.scheduler, SyncScheduler) and strategy.scheduler.buffer.keep_updates
    assert not build_strategy(spec({"name": "weighted_mean"}), seed=0).scheduler.buffer.keep_updates
    with pytest.raises(ConfigError, match="strategy.aggregator.name: median .* 'fedbuff'"):
        build_strategy(spec({"name": "median"}, "fedbuff"), seed=0)
    with pytest.raises(ConfigError, match="strategy.aggregator .*keep"):
        build_strategy(spec({"name": "krum", "keep": 0}), seed=0)


def test_a_round_under_the_real_strategy_is_krums_choice() -> None:
    """Through the strategy's events: three clients, one of them sending a far-off model, and Krum picks an honest
    one (FedAvg's mean would be pulled far off)."""
    strategy = build_strategy(spec({"name": "krum", "byzantine": 1}), seed=0)
    strategy.scheduler.min_clients = 3
    strategy.start(START, 0.0)
    for c in range(3):
        strategy.on_available(client(c, num_samples=10), 0.0)
    tasks = strategy.on_tick(0.0)
    assert len(tasks) == 3
    values = {0: 1.0, 1: 1.1, 2: 1000.0}
    for task in tasks:
        weights = {"w": torch.full((6,), values[task.client_id]), "n": torch.tensor(0)}
        strategy.on_result(Result(task.task_id, task.client_id, 0, weights, 10, 1, 0.0, 0.0), 1.0)
    assert strategy.version == 1
    assert float(strategy.global_weights["w"][0]) in (1.0, pytest.approx(1.1))


def test_kept_updates_are_restored_checkpointed_and_required_on_load() -> None:
    buffer = buffer_of([np.ones(6), np.zeros(6)])
    point = buffer.restore_point()
    buffer.add(Result(9, 9, 0, {"w": torch.full((6,), 5.0), "n": torch.tensor(0)}, 5, 1, 0.0, 0.0), 5.0)
    point()
    assert [len(b.updates) for _, b in buffer.items()] == [2]
    state = buffer.state_dict()
    again = UpdateBuffer(keep_updates=True)
    again.load_state_dict(state)
    for (_, one), (_, two) in itertools.zip_longest(buffer.items(), again.items()):
        assert [w for _, w in one.updates] == [w for _, w in two.updates]
        assert all(torch.equal(a["w"], b["w"]) for (a, _), (b, _) in zip(one.updates, two.updates, strict=True))
    folded = UpdateBuffer()
    folded.add(Result(0, 0, 0, {"w": torch.ones(6), "n": torch.tensor(1)}, 5, 1, 0.0, 0.0), 5.0)
    with pytest.raises(StateError, match="apart"):
        UpdateBuffer(keep_updates=True).load_state_dict(folded.state_dict())
