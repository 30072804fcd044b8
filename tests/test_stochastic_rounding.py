"""Stochastic rounding of the model a low-bit client receives (``strategy.planner.rounding=stochastic``): on the
client's grid, exact through the codec, unbiased, drawn the same way on every runtime, and only below 32 bits; and
of a quantization-aware client's result (``client.result_rounding=stochastic``)."""

from __future__ import annotations

import pytest
import torch

from fedhet import quant
from fedhet.clients.quantized import INT8_NEVER
from fedhet.clients.trainer import TrainConfig
from fedhet.codec import decode, encode, encoding_for_bitwidth
from fedhet.errors import ConfigError
from fedhet.models import build_model
from fedhet.strategies import build_strategy
from fedhet.strategies.planners import IdentityPlanner
from fedhet.types import ClientInfo, ClientProfile
from tests.test_vectorized import assert_same_on_grid, quantized_run


def at_bits(client_id: int, bits: int) -> ClientInfo:
    return ClientInfo(client_id, ClientProfile(0.01, 1e6, bitwidth=bits), 10)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_rounded_tasks_are_on_the_grid_and_travel_exactly(bits: int) -> None:
    weights = build_model("cnn", (1, 28, 28), 10, seed=0).state_dict()
    plan = IdentityPlanner("stochastic", seed=3).plan(at_bits(7, bits), weights, version=2)
    for name, value in plan.weights.items():
        assert torch.equal(quant.fake_quantize(value, bits), value), name  # the codec's rounding keeps it
        assert not torch.equal(value, quant.fake_quantize(weights[name], bits)) or value.numel() < 50
    decoded = decode(encode(plan.weights, encoding_for_bitwidth(bits)))
    assert all(torch.equal(decoded[k], v) for k, v in plan.weights.items())


def test_rounding_is_unbiased_and_drawn_from_seed_version_and_client() -> None:
    generator = torch.Generator().manual_seed(0)
    weights = {"w": torch.randn(16, 64, generator=generator), "steps": torch.tensor(5)}
    planner = IdentityPlanner("stochastic", seed=1)
    draws = torch.stack([planner.plan(at_bits(c, 4), weights, version=0).weights["w"] for c in range(400)])
    step = quant.channel_scales(weights["w"], 4)
    bias = (draws.mean(0) - weights["w"]) / step  # in quantization steps
    assert float(bias.abs().mean()) < 0.03  # nearest rounding is off by 0.25 steps on average
    assert float((quant.fake_quantize(weights["w"], 4) - weights["w"]).div(step).abs().mean()) > 0.2
    again = planner.plan(at_bits(3, 4), weights, version=0).weights
    assert torch.equal(again["w"], draws[3]) and torch.equal(again["steps"], weights["steps"])
    assert not torch.equal(planner.plan(at_bits(3, 4), weights, version=1).weights["w"], draws[3])
    assert not torch.equal(IdentityPlanner("stochastic", seed=2).plan(at_bits(3, 4), weights, 0).weights["w"], draws[3])


def test_fp32_clients_and_nearest_rounding_share_the_global_model() -> None:
    weights = {"w": torch.randn(4, 8)}
    assert IdentityPlanner("stochastic").plan(at_bits(0, 32), weights, 0).weights is weights
    assert IdentityPlanner().plan(at_bits(0, 4), weights, 0).weights is weights


def test_an_unknown_rounding_is_refused_by_name() -> None:
    spec = {
        "scheduler": {"name": "fedavg"},
        "planner": {"name": "identity", "rounding": "up"},
        "aggregator": {"name": "weighted_mean"},
    }
    with pytest.raises(ConfigError, match="strategy.planner .identity.: rounding must be one of nearest, stochastic"):
        build_strategy(spec, seed=0)


def test_stochastic_results_are_on_the_grid_unbiased_and_equal_on_both_executors() -> None:
    """``client.result_rounding=stochastic``: a quantization-aware client's result, rounded client by client from
    its task's seed, is the same on the vectorized executor as on the sequential quantized trainer, on the grid,
    and differs from rounding to nearest."""
    bits = dict(enumerate([4, 2, 8, 32, 4]))
    nearest, _, _ = quantized_run("2nn", bits, int8_min_macs=INT8_NEVER)
    expected, actual, executor = quantized_run("2nn", bits, int8_min_macs=INT8_NEVER, result_rounding="stochastic")
    assert (executor.vectorized_tasks, executor.fallback_tasks) == (len(bits), 0)
    assert_same_on_grid(expected, actual, "2nn")
    for stochastic, near in zip(expected, nearest, strict=True):
        if stochastic.bitwidth == quant.FULL_PRECISION:
            continue
        for key, value in stochastic.weights.items():
            assert torch.equal(quant.fake_quantize(value, stochastic.bitwidth), value), key
        moved = sum(int((stochastic.weights[k] != near.weights[k]).sum()) for k in near.weights)
        assert moved > 0, f"task {stochastic.task_id}: stochastic rounding gave the nearest values"


def test_stochastic_weights_do_not_depend_on_order_or_company() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 32, generator=g), torch.randn(4, 16, generator=g)
    both = quant.stochastic_round_weights({"a": a, "b": b}, 4, seed=9)
    assert torch.equal(quant.stochastic_round_weights({"b": b}, 4, seed=9)["b"], both["b"])
    assert torch.equal(quant.stochastic_round_weights({"b": b, "a": a}, 4, seed=9)["a"], both["a"])
    assert not torch.equal(quant.stochastic_round_weights({"a": a}, 4, seed=10)["a"], both["a"])


def test_bad_result_rounding_is_refused_naming_the_key() -> None:
    with pytest.raises(ValueError, match="client.result_rounding"):
        TrainConfig(result_rounding="up")
