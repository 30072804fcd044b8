"""Quantization-aware client training: integer kernels against a float reference, path choice, the trainer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedhet import quant
from fedhet.clients.quantized import (
    DEFAULT_INT8_MIN_MACS,
    INT8_NEVER,
    QuantConv2d,
    QuantizedTrainer,
    QuantLinear,
    choose_path,
    default_int8_min_macs,
    int8_gemms_pay,
    layer_paths,
    quantize_model,
    set_bitwidth,
)
from fedhet.clients.trainer import TrainConfig
from fedhet.codec import decode, encode
from fedhet.models import build_model
from fedhet.types import Task


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def reference(layer: nn.Module, bits: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output, input gradient and weight gradient of a float layer with weights rounded to ``bits`` (STE)."""
    w = quant.fake_quantize(layer.weight.detach(), bits).requires_grad_()
    x = x.detach().requires_grad_()
    if isinstance(layer, nn.Conv2d):
        out = F.conv2d(x, w, layer.bias, layer.stride, layer.padding)
    else:
        out = F.linear(x, w, layer.bias)
    out.backward(torch.ones_like(out) + out.detach())
    assert x.grad is not None and w.grad is not None
    return out.detach(), x.grad, w.grad


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Linear(96, 24),
        lambda: nn.Conv2d(8, 16, 3, padding=1),
        lambda: nn.Conv2d(8, 6, (3, 5), stride=2, padding=(1, 2), bias=False),
    ],
)
def test_int8_path_matches_the_float_reference(make: object, bits: int) -> None:
    torch.manual_seed(0)
    layer = make()  # type: ignore[operator]
    q = quantize_model(layer)
    set_bitwidth(q, bits, int8_min_macs=0)
    x = torch.randn(40, 96) if isinstance(layer, nn.Linear) else torch.randn(5, 8, 9, 11)
    xq = x.clone().requires_grad_()
    out = q(xq)
    out.backward(torch.ones_like(out) + out.detach())
    assert layer_paths(q) == {"": "int8"}
    ref_out, ref_dx, ref_dw = reference(layer, bits, x)
    assert out.shape == ref_out.shape
    assert rel(out, ref_out) < 0.02  # 8-bit activations; the weights are rounded identically
    assert xq.grad is not None and q.weight.grad is not None
    assert rel(xq.grad, ref_dx) < 0.03  # int8 output gradient (Linear) or bf16 (Conv2d)
    assert rel(q.weight.grad, ref_dw) < 0.03  # bf16 weight gradient
    assert q.bias is None or q.bias.grad is not None


def test_fake_path_is_exact_straight_through() -> None:
    torch.manual_seed(1)
    layer = nn.Linear(10, 3)
    q = quantize_model(layer)
    set_bitwidth(q, 12)
    x = torch.randn(4, 10)
    out = q(x)
    out.sum().backward()
    torch.testing.assert_close(out, F.linear(x, quant.fake_quantize(layer.weight, 12), layer.bias))
    assert q.weight.grad is not None
    torch.testing.assert_close(q.weight.grad, torch.ones(4, 3).t() @ x)  # the rounding passes the gradient


@pytest.mark.parametrize("in_channels", [1, 3])
def test_fake_convolution_gives_channels_last_activations(in_channels: int) -> None:
    """The fake path's convolution returns channels-last, as the int8 path does (pooling over NCHW is ~7x slower on
    a CPU), also for one input channel, where oneDNN returns NCHW; values and gradients equal the reference's."""
    torch.manual_seed(2)
    layer = nn.Conv2d(in_channels, 8, kernel_size=5, padding=2)
    q = quantize_model(layer)
    set_bitwidth(q, 8, int8_min_macs=INT8_NEVER)
    x = torch.randn(4, in_channels, 12, 12)
    out = q(x)
    assert q.last_path == "fake"
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    reference = F.conv2d(x, quant.fake_quantize(layer.weight, 8), layer.bias, padding=2)
    torch.testing.assert_close(out, reference)
    out.square().sum().backward()
    rounded = quant.fake_quantize(layer.weight, 8).detach().requires_grad_(True)
    F.conv2d(x, rounded, layer.bias, padding=2).square().sum().backward()  # straight through: at the rounded weight
    assert q.weight.grad is not None and rounded.grad is not None
    torch.testing.assert_close(q.weight.grad, rounded.grad)


def test_path_choice() -> None:
    conv1, conv2 = nn.Conv2d(1, 32, 5, padding=2), nn.Conv2d(32, 64, 5, padding=2)
    fc1, fc2 = nn.Linear(3136, 512), nn.Linear(512, 10)
    macs = DEFAULT_INT8_MIN_MACS  # the rule where integer GEMMs pay
    assert choose_path(conv1, 8, 20_000_000, macs) == "fake"  # reduction of 25: memory-bound, no int8 gain
    assert choose_path(conv2, 8, 321_000_000, macs) == "int8"
    assert choose_path(fc1, 4, 51_000_000, macs) == "int8"
    assert choose_path(fc2, 8, 164_000, macs) == "fake"  # too small for a dozen quantization kernels to pay
    assert choose_path(fc1, 12, 51_000_000, macs) == "fake"  # 12-bit integers do not fit an int8 GEMM
    assert choose_path(fc1, 32, 51_000_000, macs) == "fp32"
    assert choose_path(nn.Conv2d(32, 64, 3, groups=2), 8, 10**9, macs) == "fake"
    assert choose_path(conv2, 8, 321_000_000, INT8_NEVER) == "fake"
    with pytest.raises(quant.QuantError):
        choose_path(fc1, 5, 1)


def test_int8_path_only_where_integer_gemms_pay() -> None:
    cpu = torch.device("cpu")
    fast = bool(torch.cpu._is_vnni_supported() or torch.cpu._is_amx_tile_supported())
    assert int8_gemms_pay(cpu) == fast
    assert not int8_gemms_pay(torch.device("cuda"))  # launch-bound at these shapes; _int_mm below fp32 there
    assert default_int8_min_macs(cpu) == (DEFAULT_INT8_MIN_MACS if fast else INT8_NEVER)
    # the default follows the hardware; a trainer and its layers take it unless told otherwise
    fc1 = nn.Linear(3136, 512)
    assert choose_path(fc1, 8, 51_000_000) == ("int8" if fast else "fake")
    trainer = QuantizedTrainer(build_model("2nn", (1, 28, 28), 10, seed=0), TrainConfig(lr=0.1, batch_size=32))
    assert trainer.int8_min_macs == default_int8_min_macs(cpu)
    assert QuantizedTrainer(trainer.model, TrainConfig(), int8_min_macs=0).int8_min_macs == 0


def test_quantize_model_keeps_keys_and_leaves_the_original() -> None:
    model = build_model("cnn", (1, 28, 28), 10, seed=0)
    q = quantize_model(model)
    assert list(q.state_dict()) == list(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(q.state_dict()[k], v)
    assert sum(isinstance(m, QuantConv2d | QuantLinear) for m in q.modules()) == 4
    assert not any(isinstance(m, QuantConv2d | QuantLinear) for m in model.modules())
    q.load_state_dict(model.state_dict())


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 1, 28, 28, generator=g)
    y = (x.flatten(1)[:, :10].argmax(1)).long()
    return x, y


@pytest.mark.parametrize("bits", [4, 8, 12, 32])
def test_trainer_round_trips_at_its_bitwidth(bits: int) -> None:
    model = build_model("2nn", (1, 28, 28), 10, seed=0)
    trainer = QuantizedTrainer(model, TrainConfig(lr=0.1, batch_size=32))
    x, y = data()
    task = Task(task_id=3, client_id=1, version=0, weights=model.state_dict(), local_steps=6)
    result = trainer.train(task, x, y, seed=0, bitwidth=bits)
    again = trainer.train(task, x, y, seed=0, bitwidth=bits)
    assert result.local_steps == 6 and result.loss == again.loss
    for k, v in result.weights.items():
        assert torch.equal(v, again.weights[k])
        assert torch.equal(quant.fake_quantize(v, bits), v)  # on the b-bit grid
    if bits != 32:
        decoded = decode(encode(result.weights, f"int{bits}"))  # the upload is exact
        assert all(torch.equal(decoded[k], v) for k, v in result.weights.items())
    # between tasks: no fp32 master copy, only the packed weights
    assert all(p.numel() == 0 for p in trainer.model.parameters())
    fp32 = sum(v.numel() * 4 for v in result.weights.values())
    assert trainer.stored_bytes <= fp32 * (bits / 32 + 0.02)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in task.weights.items())  # task untouched


def test_quantized_training_learns() -> None:
    model = build_model("cnn", (1, 28, 28), 10, seed=0)
    trainer = QuantizedTrainer(model, TrainConfig(lr=0.05, batch_size=32))
    x, y = data()
    weights = model.state_dict()
    losses = []
    for t in range(3):
        task = Task(task_id=t, client_id=0, version=t, weights=weights, local_steps=3)
        result = trainer.train(task, x, y, seed=0, bitwidth=4)
        weights, losses = result.weights, [*losses, result.loss]
    assert losses[-1] < losses[0]
    big = "int8" if int8_gemms_pay(torch.device("cpu")) else "fake"  # the hardware's default
    assert layer_paths(trainer.model) == {"0": "fake", "3": big, "7": big, "9": "fake"}
