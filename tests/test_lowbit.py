"""Training with weights held at the client's bitwidth: the layers against a float reference, stochastic rounding,
the trainer's contract (grid, determinism, frozen layers, FedProx, weight decay) and the config's checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedhet import quant
from fedhet.clients.lowbit import BLOCKS, LeanMaxPool2d, LeanReLU, LowBitTrainer, low_bit_model
from fedhet.clients.quantized import QuantizedTrainer
from fedhet.clients.trainer import TrainConfig
from fedhet.errors import ConfigError
from fedhet.models import build_model
from fedhet.sim.runner import validate
from fedhet.types import Task
from tests.test_quantized_training import data
from tests.test_vectorized import assert_same_on_grid, quantized_run

CONFIG = TrainConfig(lr=0.05, batch_size=32, low_bit_weights=True)


def loaded(layer: nn.Module, bits: int, lr: float) -> nn.Module:
    """``layer``'s low-bit copy with its weight loaded at ``bits`` and stepping at ``lr``."""
    trainer = LowBitTrainer(layer, TrainConfig(lr=lr, low_bit_weights=True))
    assert set(trainer.low_bit) == {"weight"}
    values = layer.state_dict()
    trainer.begin(Task(0, 0, 0, values, local_steps=1), values, {"weight", "bias"}, bits, seed=0)
    return trainer.model


@pytest.mark.parametrize(
    "layer",
    [nn.Linear(150, 2 * BLOCKS + 7), nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(4, 6, (3, 5), stride=2, bias=False)],
    ids=["linear-in-blocks", "conv", "conv-strided"],
)
def test_layers_compute_the_float_layer_on_the_rounded_weights(layer: nn.Module) -> None:
    """Forward and input gradient equal the float layer's with the weight rounded to 8 bits; the weight takes the
    SGD step (stochastically rounded) with the weight gradient of the forward's weights."""
    torch.manual_seed(0)
    model = loaded(layer, 8, lr=1e-9)  # a step far below one quantization step: the rounding alone moves weights
    weight = model.weight  # type: ignore[attr-defined]
    w = quant.fake_quantize(layer.weight.detach(), 8).requires_grad_()
    x = torch.randn(20, 150) if isinstance(layer, nn.Linear) else torch.randn(5, layer.in_channels, 9, 11)
    bias = None if layer.bias is None else quant.fake_quantize(layer.bias.detach(), 8)  # the start is on the grid
    ref = F.linear(x, w, bias) if isinstance(layer, nn.Linear) else F.conv2d(x, w, bias, layer.stride, layer.padding)
    xq = x.clone().requires_grad_()
    out = model(xq)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    before = weight.codes.clone()
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    x_ref = x.clone().requires_grad_()
    (F.linear(x_ref, w.detach(), bias) if isinstance(layer, nn.Linear) else F.conv2d(x_ref, w.detach(), bias,
        layer.stride, layer.padding)).backward(g)  # fmt: skip
    assert xq.grad is not None and x_ref.grad is not None
    torch.testing.assert_close(xq.grad, x_ref.grad, rtol=1e-5, atol=1e-5)  # with the weights before their update
    moved = (weight.codes.int() - before.int()).abs()
    assert int(moved.max()) <= 1  # a tiny step moves a weight by at most one integer, and rarely
    assert float(moved.float().mean()) < 0.01
    if model.bias is not None:  # type: ignore[attr-defined]
        assert model.bias.grad is not None  # type: ignore[attr-defined]


def test_stochastic_rounding_is_unbiased() -> None:
    """Many steps of a constant gradient far smaller than a step move the weights by lr * g on average, where
    round-to-nearest would not move them at all."""
    layer = nn.Linear(64, 64, bias=False)
    model = loaded(layer, 8, lr=1.0)
    weight = model.weight  # type: ignore[attr-defined]
    scales = weight.scales[:, None]
    grad = 0.02 * scales.expand(64, 64)  # a fiftieth of a quantization step per update
    weight.codes.clamp_(-50, 50)  # room to move without reaching the range's end
    start = weight.codes.float() * scales
    for _ in range(200):
        weight.update(0, 64, grad.clone())
    drift = (weight.codes.float() * scales - start) / scales  # in quantization steps
    assert float(drift.mean()) == pytest.approx(-200 * 0.02, abs=0.15)  # -4 steps, averaged over 4,096 weights


def test_trainer_learns_on_the_grid_and_is_deterministic() -> None:
    model = build_model("2nn", (1, 28, 28), 10, seed=0)
    x, y = data()
    for bits in (8, 4, 2):
        trainer = QuantizedTrainer(model, CONFIG)
        weights, losses = model.state_dict(), []
        for t in range(3):
            result = trainer.train(Task(t, 0, t, weights, local_steps=3), x, y, seed=0, bitwidth=bits)
            weights, losses = result.weights, [*losses, result.loss]
            assert all(torch.equal(quant.fake_quantize(v, bits), v) for v in weights.values())
        assert losses[-1] < losses[0], (bits, losses)
        again = QuantizedTrainer(model, CONFIG).train(Task(0, 0, 0, model.state_dict(), local_steps=3), x, y, 0, bits)
        first = QuantizedTrainer(model, CONFIG).train(Task(0, 0, 0, model.state_dict(), local_steps=3), x, y, 0, bits)
        assert all(torch.equal(again.weights[k], first.weights[k]) for k in first.weights)
    assert all(p.numel() == 0 for p in trainer.model.parameters())  # no fp32 copy kept between tasks


def test_frozen_layers_proximal_pull_and_weight_decay() -> None:
    model = build_model("2nn", (1, 28, 28), 10, seed=0)
    x, y = data()
    start = quant.quantize_weights(model.state_dict(), 8)
    trainer = LowBitTrainer(model, TrainConfig(lr=0.1, batch_size=32, low_bit_weights=True))
    partial = Task(0, 0, 0, start, local_steps=4, train=frozenset({"5.weight", "5.bias"}))
    result = trainer.train(partial, x, y, seed=0, bitwidth=8)
    assert set(result.weights) == {"5.weight", "5.bias"}
    assert not torch.equal(result.weights["5.weight"], start["5.weight"])
    free = trainer.train(Task(1, 0, 0, start, local_steps=8), x, y, seed=0, bitwidth=8)
    pulled = trainer.train(Task(1, 0, 0, start, local_steps=8, proximal_mu=5.0), x, y, seed=0, bitwidth=8)

    def distance(weights: dict[str, torch.Tensor]) -> float:
        return sum(float((weights[k] - start[k]).norm()) for k in weights)

    assert distance(pulled.weights) < 0.5 * distance(free.weights)
    decayed = LowBitTrainer(model, TrainConfig(lr=0.1, batch_size=32, weight_decay=5.0, low_bit_weights=True))
    shrunk = decayed.train(Task(1, 0, 0, start, local_steps=8), x, y, seed=0, bitwidth=8)
    assert float(shrunk.weights["1.weight"].norm()) < float(free.weights["1.weight"].norm())


def test_momentum_is_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="low_bit_weights=true keeps no fp32 state per weight.*momentum 0.9"):
        TrainConfig(momentum=0.9, low_bit_weights=True)
    with pytest.raises(ConfigError, match="low_bit_weights"):
        validate_overrides(["client.low_bit_weights=true", "client.momentum=0.5"])


def validate_overrides(overrides: list[str]) -> None:
    from fedhet.cli import compose

    validate(compose(overrides))


def test_the_vectorized_executor_leaves_low_bit_weights_to_the_sequential_trainer() -> None:
    bits = {0: 32, 1: 8, 2: 4}
    expected, actual, executor = quantized_run("2nn", bits, low_bit_weights=True)
    assert (executor.vectorized_tasks, executor.fallback_tasks) == (1, 2)
    assert_same_on_grid(expected, actual, "2nn")


@pytest.mark.parametrize(
    ("shape", "kernel"),
    [((4, 3, 28, 28), (2, 2)), ((2, 5, 7, 9), (2, 2)), ((2, 2, 9, 9), (3, 3)), ((2, 2, 8, 8), (2, 4))],
)
def test_lean_relu_and_pooling_equal_torch_in_values_and_gradients(
    shape: tuple[int, ...], kernel: tuple[int, int]
) -> None:
    """Ties (torch takes the first maximum of a window), windows of zeros after ReLU, rows past the last window, and
    the pooling-before-ReLU order the low-bit model uses."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    x[0, 0, 0, :2] = 5.0
    x[0, 0, 2:4, 2:4] = -1.0
    inputs = [x.clone().requires_grad_() for _ in range(3)]
    outs = [
        F.max_pool2d(F.relu(inputs[0]), kernel, kernel),
        LeanMaxPool2d(kernel)(LeanReLU()(inputs[1])),
        LeanReLU()(LeanMaxPool2d(kernel)(inputs[2])),
    ]
    grad = torch.randn_like(outs[0])
    for out, xin in zip(outs, inputs, strict=True):
        out.backward(grad)
        assert torch.equal(out, outs[0])
        assert xin.grad is not None and inputs[0].grad is not None
        assert torch.equal(xin.grad, inputs[0].grad)


def test_low_bit_model_pools_before_relu_and_keeps_overlapping_pools() -> None:
    model = low_bit_model(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.ReLU(), nn.MaxPool2d(3, 1)))
    assert [type(m).__name__ for m in model] == ["LowBitConv2d", "LeanMaxPool2d", "LeanReLU", "LeanReLU", "MaxPool2d"]
