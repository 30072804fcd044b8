"""Staleness functions, the staleness-weighted aggregator, FedAsync and FedBuff: hand-computed arithmetic,
properties over random fleets, state dicts and resume."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedhet.cli import compose
from fedhet.strategies import StateError, Strategy, build_strategy
from fedhet.strategies.buffer import UpdateBuffer
from fedhet.strategies.fedasync import FedAsyncScheduler
from fedhet.strategies.fedbuff import FedBuffScheduler
from fedhet.strategies.planners import IdentityPlanner
from fedhet.strategies.staleness import (
    ClientWeights,
    StalenessBuffer,
    StalenessWeighted,
    StartVersions,
    constant,
    hinge,
    make_staleness_fn,
    polynomial,
)
from fedhet.types import Result
from tests.helpers import client
from tests.test_fedcompass import (
    PROPERTY,
    EventLoop,
    answer,
    assert_each_result_applied_once,
    assert_resumes_identically,
    scalar,
    simulate,
)

# ---------------------------------------------------------------- staleness functions


def test_staleness_functions_by_hand() -> None:
    assert [constant(t) for t in (0, 1, 50)] == [1.0, 1.0, 1.0]
    # (tau + 1)^-a with a = 0.5: 1, 1/sqrt(2), 1/2 (tau = 3), 1/10 (tau = 99)
    assert [polynomial(t, 0.5) for t in (0, 1, 3, 99)] == pytest.approx([1.0, 2**-0.5, 0.5, 0.1])
    # hinge a = 10, b = 4: 1 up to tau = 4, then 1 / (10 (tau - 4) + 1): 1/11 at 5, 1/21 at 6
    assert [hinge(t, 10.0, 4.0) for t in (0, 4, 5, 6)] == pytest.approx([1.0, 1.0, 1 / 11, 1 / 21])


@given(tau=st.integers(0, 10_000), a=st.floats(0.01, 5.0))
def test_polynomial_falls_with_staleness(tau: int, a: float) -> None:
    assert 0.0 < polynomial(tau + 1, a) < polynomial(tau, a) <= 1.0


@given(tau=st.integers(0, 10_000), a=st.floats(0.0, 20.0), b=st.floats(0.0, 20.0))
def test_hinge_never_rises_with_staleness(tau: int, a: float, b: float) -> None:
    assert 0.0 < hinge(tau + 1, a, b) <= hinge(tau, a, b) <= 1.0


def test_bad_staleness_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="staleness must be >= 0"):
        polynomial(-1, 0.5)
    with pytest.raises(ValueError, match="unknown staleness function"):
        make_staleness_fn("exponential")
    with pytest.raises(ValueError, match="a > 0"):
        make_staleness_fn("polynomial", a=-0.5)
    with pytest.raises(ValueError, match="hinge"):
        make_staleness_fn("hinge", a=1.0, b=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        StalenessWeighted(alpha=0.0)
    assert make_staleness_fn("hinge", 10.0, 4.0)(5) == pytest.approx(1 / 11)


# ---------------------------------------------------------------- the aggregator


def _result(task_id: int, version: int, w: list[float], n: int | None = None) -> Result:
    weights = {"w": torch.tensor(w, dtype=torch.float64)}
    if n is not None:
        weights["n"] = torch.tensor(n)
    return Result(task_id, task_id, version, weights, 10, 1, 1.0, 0.0)


def test_model_based_aggregation_by_hand() -> None:
    """alpha 0.8, polynomial a = 0.5, at version 3: updates from version 3 (tau 0, w = 1/4) and version 0
    (tau 3, s = 1/2, w = 1/4): a = 0.2 and 0.1. theta = (1 - 0.3) * [10, 0] + 0.2 * [2, 4] + 0.1 * [6, -8]
    = [7 + 0.4 + 0.6, 0 + 0.8 - 0.8] = [8, 0]. Counters 5 and 8: unweighted mean rounded down, 6."""
    buffer = UpdateBuffer()
    buffer.add(_result(0, 3, [2.0, 4.0], 5), 0.25)
    buffer.add(_result(1, 0, [6.0, -8.0], 8), 0.25)
    out = StalenessWeighted(alpha=0.8).aggregate(
        {"w": torch.tensor([10.0, 0.0], dtype=torch.float64), "n": torch.tensor(100)}, buffer, 3
    )
    torch.testing.assert_close(out["w"], torch.tensor([8.0, 0.0], dtype=torch.float64))
    assert out["n"].item() == 6 and out["n"].dtype == torch.int64


def test_gradient_based_aggregation_uses_each_updates_start_model() -> None:
    """alpha 1, constant s. Version 0 is [0]; one update from it ending at [4] with w = 1 gives version 1:
    0 - 1 * (0 - 4) = [4], while a task from version 0 is still out. At version 1, w = 1/2 each: an update from
    version 0 ending at [2] (g = 0 - 2 = -2) and one from version 1 ending at [6] (g = 4 - 6 = -2):
    theta = 4 - 0.5 * (-2) - 0.5 * (-2) = 6. (Model-based would give 0 * 4 + 0.5 * 2 + 0.5 * 6 = 4.)"""
    aggregator = StalenessWeighted(alpha=1.0, staleness="constant", gradient_based=True)
    first = StalenessBuffer()
    first.add(_result(0, 0, [4.0]), 1.0)
    first.live_versions = frozenset({0})
    version_1 = aggregator.aggregate({"w": torch.tensor([0.0], dtype=torch.float64)}, first, 0)
    torch.testing.assert_close(version_1["w"], torch.tensor([4.0], dtype=torch.float64))
    assert aggregator.kept_versions == [0]
    second = StalenessBuffer()
    second.add(_result(1, 0, [2.0]), 0.5)
    second.add(_result(2, 1, [6.0]), 0.5)
    out = aggregator.aggregate(version_1, second, 1)
    torch.testing.assert_close(out["w"], torch.tensor([6.0], dtype=torch.float64))
    assert aggregator.kept_versions == []  # nothing live any more: nothing kept


def test_gradient_based_aggregation_refuses_a_start_version_it_did_not_keep() -> None:
    aggregator = StalenessWeighted(gradient_based=True)
    buffer = UpdateBuffer()
    buffer.add(_result(0, 0, [1.0]), 1.0)
    with pytest.raises(ValueError, match="version 0"):
        aggregator.aggregate({"w": torch.zeros(1, dtype=torch.float64)}, buffer, 2)


def test_aggregator_state_round_trips_and_validates() -> None:
    aggregator = StalenessWeighted(gradient_based=True)
    buffer = StalenessBuffer()
    buffer.add(_result(0, 0, [1.0]), 0.5)
    buffer.live_versions = frozenset({0})
    aggregator.aggregate({"w": torch.zeros(1, dtype=torch.float64)}, buffer, 0)
    twin = StalenessWeighted(gradient_based=True)
    twin.load_state_dict(aggregator.state_dict())
    assert twin.kept_versions == [0]
    with pytest.raises(StateError):
        twin.load_state_dict({"start_weights": {"0": {"w": [1.0]}}})
    with pytest.raises(StateError):
        twin.load_state_dict({})


def test_buffers_merge_bucket_by_bucket_and_lose_nothing() -> None:
    late, group = UpdateBuffer(), UpdateBuffer()
    late.add(_result(0, 1, [1.0]), 0.5)  # the same client's late update ...
    group.add(_result(1, 1, [3.0]), 0.5)  # ... and its on-time one, both from version 1
    group.add(_result(2, 2, [5.0]), 0.5)
    merged = StalenessBuffer()
    merged.absorb(late)
    merged.absorb(group)
    assert len(merged) == 3 and sorted(merged.task_ids()) == [0, 1, 2] and len(late) == len(group) == 0
    bucket = dict(merged.items())[1]
    assert bucket.count == 2 and bucket.total_weight == 1.0
    torch.testing.assert_close(bucket.weighted_sum["w"], torch.tensor([2.0], dtype=torch.float64))


def test_client_weights() -> None:
    weights = {name: ClientWeights(name) for name in ("uniform", "samples", "none")}
    for w in weights.values():
        for i, n in enumerate([10, 30, 60]):
            w.observe(client(i, num_samples=n))
    assert weights["uniform"].weight(client(2, num_samples=60)) == pytest.approx(1 / 3)
    assert weights["samples"].weight(client(2, num_samples=60)) == pytest.approx(0.6)
    assert weights["none"].weight(client(2, num_samples=60)) == 1.0
    twin = ClientWeights("samples")
    twin.load_state_dict(weights["samples"].state_dict())
    assert twin.num_clients == 3 and twin.weight(client(0, num_samples=10)) == pytest.approx(0.1)
    with pytest.raises(StateError):
        twin.load_state_dict({"samples": {"0": 0}})
    with pytest.raises(ValueError, match="weighting"):
        ClientWeights("equal")
    starts = StartVersions()
    with pytest.raises(StateError):
        starts.load_state_dict({"0": 5}, version=3)


# ---------------------------------------------------------------- FedAsync


def fedasync(alpha: float = 0.6, weighting: str = "none", gradient: bool = False) -> Strategy:
    aggregator = StalenessWeighted(alpha=alpha, gradient_based=gradient)
    return Strategy(FedAsyncScheduler(local_steps=5, weighting=weighting), IdentityPlanner(), aggregator)


@pytest.mark.parametrize(("weighting", "factor"), [("none", 1.0), ("uniform", 0.5)])
def test_fedasync_applies_each_update_on_arrival(weighting: str, factor: float) -> None:
    """alpha 0.6, s(tau) = (tau + 1)^-0.5; w = 1 (the paper) or 1/N with N = 2.
    c0 (from v0, tau 0): a = 0.6 w; theta1 = (1 - a) * 0 + a * 10.
    c1 (from v0, tau 1): a' = 0.6 / sqrt(2) w; theta2 = (1 - a') theta1 + a' * 20."""
    strategy = fedasync(weighting=weighting)
    strategy.start(scalar(0.0), 0.0)
    t0, t1 = (strategy.on_available(client(i), 0.0)[0] for i in range(2))
    assert (t0.local_steps, t0.version) == (5, 0)
    [t0] = answer(strategy, t0, 1.0, 10.0, 0.2)
    a = 0.6 * factor
    assert strategy.global_weights["w"].item() == pytest.approx(a * 10)
    assert (t0.client_id, t0.version) == (0, 1)  # reassigned at once from the new model
    [t1] = answer(strategy, t1, 2.0, 20.0, 0.4)
    a2 = 0.6 * 2**-0.5 * factor
    assert strategy.global_weights["w"].item() == pytest.approx((1 - a2) * a * 10 + a2 * 20)
    assert strategy.version == 2 and t1.version == 2


def test_fedasync_lost_task_is_simply_reassigned() -> None:
    strategy = fedasync()
    strategy.start(scalar(0.0), 0.0)
    strategy.on_available(client(0), 0.0)
    [task] = strategy.on_available(client(0), 3.0)
    assert task.version == 0 and strategy.outstanding == 1 and strategy.next_deadline() is None


# ---------------------------------------------------------------- FedBuff


def fedbuff(buffer_size: int = 2, server_lr: float = 0.5, gradient: bool = True) -> Strategy:
    aggregator = StalenessWeighted(alpha=server_lr, gradient_based=gradient)
    return Strategy(FedBuffScheduler(buffer_size, local_steps=5), IdentityPlanner(), aggregator)


def test_fedbuff_flushes_every_k_updates_with_staleness_in_flushes() -> None:
    """K = 2, server learning rate 0.5, s(tau) = (tau + 1)^-0.5, each update buffered with 1/K.
    Flush 1 (version 0): c0 ends at 1 and c1 at 3, both from [0]: theta1 = 0 + 0.5 * (1/2) * (1 + 3) = 1.
    Flush 2 (version 1): c2 ends at 5 and c0 at 4, both started from version 0 (theta 0): one flush old, so
    s = 1/sqrt(2): theta2 = 1 + 0.5 * (1/2) * (5 + 4) / sqrt(2) = 1 + 1.590990 = 2.590990."""
    strategy = fedbuff()
    strategy.start(scalar(0.0), 0.0)
    t0, t1, t2 = (strategy.on_available(client(i), 0.0)[0] for i in range(3))
    [t0] = answer(strategy, t0, 1.0, 1.0, 0.2)  # buffered; c0 goes on from version 0 at once
    assert strategy.version == 0 and t0.version == 0
    [t1] = answer(strategy, t1, 2.0, 3.0, 0.2)  # second update: flush
    assert strategy.version == 1 and t1.version == 1
    assert strategy.global_weights["w"].item() == pytest.approx(1.0)
    answer(strategy, t2, 3.0, 5.0, 0.2)
    answer(strategy, t0, 4.0, 4.0, 0.2)
    assert strategy.version == 2 and strategy.updates_applied == 4
    assert strategy.global_weights["w"].item() == pytest.approx(1 + 0.25 * 9 * 2**-0.5)


def test_fedbuff_weights_by_samples_as_appfl() -> None:
    """K = 2, server learning rate 0.5, weighting=samples: clients of 10, 30 and 20 samples (N = 3, 60 in all)
    weigh (n_i / 60) * 3 / 2: c0 0.25, c1 0.75. Flush 1: c0 ends at 1 and c1 at 3, both from [0], tau 0:
    theta1 = 0 + 0.5 * (0.25 * 1 + 0.75 * 3) = 1.25 (with 1/K it would be 1)."""
    aggregator = StalenessWeighted(alpha=0.5, gradient_based=True)
    strategy = Strategy(FedBuffScheduler(2, local_steps=5, weighting="samples"), IdentityPlanner(), aggregator)
    strategy.start(scalar(0.0), 0.0)
    t0, t1, _ = (strategy.on_available(client(i, num_samples=n), 0.0)[0] for i, n in enumerate((10, 30, 20)))
    answer(strategy, t0, 1.0, 1.0, 0.2)
    answer(strategy, t1, 2.0, 3.0, 0.2)
    assert strategy.version == 1 and strategy.global_weights["w"].item() == pytest.approx(1.25)
    state = strategy.scheduler.state_dict()
    twin = FedBuffScheduler(2, local_steps=5, weighting="samples")
    twin.load_state_dict(copy.deepcopy(state))
    assert twin.state_dict() == state
    old = {key: value for key, value in state.items() if key != "weights"}  # a checkpoint from before weighting
    FedBuffScheduler(2, local_steps=5).load_state_dict(copy.deepcopy(old))
    with pytest.raises(ValueError, match="weighting"):
        FedBuffScheduler(weighting="uniform")


def test_fedbuff_state_dict_validates() -> None:
    strategy = fedbuff(buffer_size=3)
    strategy.start(scalar(0.0), 0.0)
    tasks = [strategy.on_available(client(i), 0.0)[0] for i in range(3)]
    answer(strategy, tasks[0], 1.0, 1.0, 0.2)
    state = strategy.scheduler.state_dict()
    twin = FedBuffScheduler(buffer_size=3)
    twin.load_state_dict(copy.deepcopy(state))
    assert twin.buffered_task_ids() == [0] and twin.state_dict()["starts"] == state["starts"]
    with pytest.raises(StateError, match="flush is due"):
        FedBuffScheduler(buffer_size=1).load_state_dict(copy.deepcopy(state))
    with pytest.raises(StateError, match="keys"):
        twin.load_state_dict({"version": 0})
    with pytest.raises(StateError, match="version"):
        twin.load_state_dict({**state, "version": -1})
    with pytest.raises(ValueError):
        FedBuffScheduler(buffer_size=0)


def test_fedasync_state_dict_validates() -> None:
    scheduler = FedAsyncScheduler()
    scheduler.on_available(client(0), 0.0)
    state = scheduler.state_dict()
    with pytest.raises(StateError, match="keys"):
        scheduler.load_state_dict({**state, "extra": 1})
    with pytest.raises(StateError):
        scheduler.load_state_dict({**state, "starts": {"0": 3}})
    scheduler.load_state_dict(state)
    with pytest.raises(ValueError):
        FedAsyncScheduler(local_steps=0)


# ---------------------------------------------------------------- properties, resume, configs

speeds_st = st.lists(st.floats(0.2, 3.0), min_size=2, max_size=7)


@PROPERTY
@given(speeds=speeds_st, weighting=st.sampled_from(["none", "uniform"]), gradient=st.booleans(), lossy=st.booleans())
def test_fedasync_every_update_applied_once_with_the_configured_weight(
    speeds: list[float], weighting: str, gradient: bool, lossy: bool
) -> None:
    factor = 1.0 if weighting == "none" else 1 / len(speeds)
    strategy, ledger, checked = simulate(
        FedAsyncScheduler(local_steps=5, weighting=weighting),
        StalenessWeighted(alpha=0.6, gradient_based=gradient),
        speeds,
        lambda r: factor,
        availability=0.8 if lossy else 1.0,
        max_versions=25,
    )
    assert strategy.version == 25 == len(checked.applied)
    assert_each_result_applied_once(strategy, ledger, checked)
    assert checked.most_kept <= len(speeds)


@PROPERTY
@given(speeds=speeds_st, buffer_size=st.integers(1, 5), gradient=st.booleans(), lossy=st.booleans())
def test_fedbuff_every_update_applied_once_with_the_configured_weight(
    speeds: list[float], buffer_size: int, gradient: bool, lossy: bool
) -> None:
    strategy, ledger, checked = simulate(
        FedBuffScheduler(buffer_size, local_steps=5),
        StalenessWeighted(alpha=1.0, gradient_based=gradient),
        speeds,
        lambda r: 1 / buffer_size,
        availability=0.8 if lossy else 1.0,
    )
    assert strategy.version == 20 and len(checked.applied) == 20 * buffer_size
    assert_each_result_applied_once(strategy, ledger, checked)
    assert len(strategy.scheduler.buffered_task_ids()) < buffer_size  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", ["fedasync", "fedbuff"])
def test_resumed_from_its_state_dict_it_makes_the_same_decisions(kind: str) -> None:
    def make() -> Strategy:
        if kind == "fedasync":
            return fedasync(weighting="uniform", gradient=True)
        return fedbuff(buffer_size=3)

    loop = EventLoop(make(), [1.0, 1.3, 2.2, 4.0], [0.1, 0.0, 1.5, 0.3], jitter=0.3, loss=0.1, seed=5)
    assert_resumes_identically(make, loop, before=30, after=60)


@pytest.mark.parametrize(("option", "cls"), [("fedasync", FedAsyncScheduler), ("fedbuff", FedBuffScheduler)])
def test_shipped_configs_name_every_parameter(option: str, cls: type) -> None:
    spec = compose([f"strategy={option}"]).strategy
    strategy = build_strategy({"scheduler": spec.scheduler, "planner": spec.planner, "aggregator": spec.aggregator}, 0)
    assert isinstance(strategy.scheduler, cls) and isinstance(strategy.aggregator, StalenessWeighted)
    for params, component in ((spec.scheduler, cls), (spec.aggregator, StalenessWeighted)):
        assert set(params) - {"name"} == set(inspect.signature(component).parameters)
