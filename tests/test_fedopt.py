"""FedAdagrad, FedAdam and FedYogi against Algorithm 2 of Reddi et al. (2021), written out in numpy here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedhet.errors import ConfigError
from fedhet.strategies import AGGREGATORS, UpdateBuffer, build_strategy
from fedhet.strategies.errors import StateError
from fedhet.strategies.fedopt import FedAdagrad, FedAdam, FedYogi, ServerOptimizer
from fedhet.types import Result

RULES = {"fedadagrad": FedAdagrad, "fedadam": FedAdam, "fedyogi": FedYogi}


def buffer_of(updates: list[tuple[dict[str, torch.Tensor], int]], version: int = 0) -> UpdateBuffer:
    buffer = UpdateBuffer()
    for task_id, (weights, samples) in enumerate(updates):
        buffer.add(Result(task_id, task_id, version, weights, samples, 1, 0.0, 0.0), float(samples))
    return buffer


def reference_step(
    rule: str,
    x: np.ndarray,
    mean: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    eta: float,
    b1: float,
    b2: float,
    tau: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One server step of the paper's Algorithm 2, in float64."""
    delta = mean - x
    m = b1 * m + (1 - b1) * delta
    if rule == "fedadagrad":
        v = v + delta**2
    elif rule == "fedadam":
        v = b2 * v + (1 - b2) * delta**2
    else:
        v = v - (1 - b2) * delta**2 * np.sign(v - delta**2)
    return x + eta * m / (np.sqrt(v) + tau), m, v


@pytest.mark.parametrize("rule", sorted(RULES))
def test_three_rounds_follow_the_papers_update_rule(rule: str) -> None:
    rng = np.random.default_rng(0)
    eta, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
    aggregator = RULES[rule](eta=eta, beta1=b1, beta2=b2, tau=tau)
    x = rng.normal(size=7)
    m, v = np.zeros(7), np.full(7, tau**2)
    current = {"w": torch.tensor(x, dtype=torch.float32), "steps": torch.tensor(4)}
    for version in range(3):
        clients = [(rng.normal(size=7) * 0.1 + x, samples) for samples in (5, 20, 75)]
        mean = np.sum([c * n for c, n in clients], axis=0) / 100
        updates = [
            ({"w": torch.tensor(c, dtype=torch.float32), "steps": torch.tensor(8 + i)}, n)
            for i, (c, n) in enumerate(clients)
        ]
        current = aggregator.aggregate(current, buffer_of(updates, version), version)
        x, m, v = reference_step(rule, x, mean, m, v, eta, b1, b2, tau)
        np.testing.assert_allclose(current["w"].numpy(), x, rtol=2e-5, atol=1e-6)
        assert current["steps"].item() == 9  # counters: the contributors' mean, rounded down, as FedAvg's
        assert current["w"].dtype == torch.float32


def test_fedadagrad_with_a_huge_tau_and_no_momentum_is_fedavg() -> None:
    tau = 1e6
    aggregator = FedAdagrad(eta=2 * tau, beta1=0.0, tau=tau)
    start = {"w": torch.tensor([1.0, -2.0, 3.0])}
    updates = [({"w": torch.tensor([2.0, 0.0, 3.5])}, 1), ({"w": torch.tensor([0.0, -1.0, 2.5])}, 3)]
    out = aggregator.aggregate(start, buffer_of(updates), 0)
    torch.testing.assert_close(out["w"], torch.tensor([0.5, -0.75, 2.75]), rtol=1e-5, atol=1e-5)


def test_yogi_and_adam_differ_once_the_second_moment_shrinks() -> None:
    """Yogi's additive v changes by at most (1 - beta2) Delta^2 a round; Adam's decays multiplicatively: after a large
    update then small ones, Adam's step grows back sooner (the paper's motivation for Yogi)."""
    adam, yogi = FedAdam(eta=0.1), FedYogi(eta=0.1)
    a = y = {"w": torch.zeros(1)}
    for version, target in enumerate([10.0, 0.01, 0.01, 0.01]):
        a = adam.aggregate(a, buffer_of([({"w": a["w"] + target}, 1)], version), version)
        y = yogi.aggregate(y, buffer_of([({"w": y["w"] + target}, 1)], version), version)
    assert yogi.second["w"].item() > adam.second["w"].item()


def test_a_tensor_no_update_carried_keeps_its_value_and_its_moments() -> None:
    aggregator = FedAdam(eta=0.1)
    start = {"a": torch.ones(2), "b": torch.zeros(3)}
    first = aggregator.aggregate(start, buffer_of([({"a": torch.ones(2) * 2, "b": torch.ones(3)}, 1)]), 0)
    moments = aggregator.first["b"], aggregator.second["b"]
    second = aggregator.aggregate(first, buffer_of([({"a": torch.ones(2) * 3}, 1)], 1), 1)
    assert second["b"] is first["b"]
    assert aggregator.first["b"] is moments[0] and aggregator.second["b"] is moments[1]
    assert not torch.equal(second["a"], first["a"])


def test_state_round_trips_and_bad_state_is_refused() -> None:
    updates = [({"w": torch.tensor([1.0, 2.0])}, 2)]
    one, two = FedYogi(), FedYogi()
    x = one.aggregate({"w": torch.zeros(2)}, buffer_of(updates), 0)
    two.load_state_dict(one.state_dict())
    again = [({"w": torch.tensor([3.0, -1.0])}, 1)]
    torch.testing.assert_close(one.aggregate(x, buffer_of(again, 1), 1), two.aggregate(x, buffer_of(again, 1), 1))
    with pytest.raises(StateError, match="first"):
        two.load_state_dict({"first": {}})
    with pytest.raises(StateError, match="not finite"):
        two.load_state_dict({"first": {"w": torch.zeros(2)}, "second": {"w": torch.tensor([1.0, -1.0])}})
    with pytest.raises(StateError, match="one shape"):
        two.load_state_dict({"first": {"w": torch.zeros(2)}, "second": {"w": torch.zeros(3)}})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [("eta", 0.0, "eta"), ("tau", float("nan"), "tau"), ("beta1", 1.0, "beta1"), ("beta2", -0.1, "beta2")],
)
def test_a_bad_parameter_is_a_config_error_naming_it(key: str, value: float, message: str) -> None:
    spec = {
        "scheduler": {"name": "fedavg"},
        "planner": {"name": "identity"},
        "aggregator": {"name": "fedadam", key: value},
    }
    with pytest.raises(ConfigError, match=f"strategy.aggregator .*{message}"):
        build_strategy(spec, seed=0)


def test_every_rule_is_registered() -> None:
    for name, cls in RULES.items():
        assert AGGREGATORS.get(name) is cls
        assert issubclass(cls, ServerOptimizer)
