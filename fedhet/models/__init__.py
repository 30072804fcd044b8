"""The model zoo: FedAvg's CNN and 2NN, and logistic regression for Synthetic(alpha, beta); and any
``torch.nn.Module`` of the user's, by import path (``model._target_``) or by an installed package's entry point
(the ``fedhet.models`` group)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fedhet.errors import ConfigError
from fedhet.models.config import ModelConfig
from fedhet.registry import Registry
from fedhet.targets import call_target, locate

__all__ = ["MODELS", "ModelBuilder", "ModelConfig", "build_model", "check_model", "dp_incompatible", "evaluate"]

ModelBuilder = Callable[..., nn.Module]  # takes input_shape and num_classes where it names them, and kwargs
MODELS: Registry[ModelBuilder] = Registry("model", group="fedhet.models")


@MODELS.register("cnn")
def fedavg_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """McMahan et al. (2017) CNN: two 5x5 convolutions (32, 64 channels) each with 2x2 max pooling,
    a 512-unit fully connected layer and a linear classifier (1,663,370 parameters on 28x28 inputs)."""
    if len(input_shape) != 3:
        raise ValueError(f"the cnn model needs (channels, height, width) inputs, got shape {input_shape}")
    channels, height, width = input_shape
    flat = 64 * (height // 4) * (width // 4)
    return nn.Sequential(
        nn.Conv2d(channels, 32, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, 512),
        nn.ReLU(),
        nn.Linear(512, num_classes),
    )


@MODELS.register("fedp3_cnn")
def fedp3_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The Fashion-MNIST CNN of FedP3's released code: 5x5 convolutions of 4 and 12 channels (no padding) each with
    2x2 max pooling, then 192 -> 1024 -> 1024 -> classes. Four shared layers and a personal head for FedP3
    (1,258,798 parameters on 28x28 inputs)."""
    if len(input_shape) != 3:
        raise ValueError(f"the fedp3_cnn model needs (channels, height, width) inputs, got shape {input_shape}")
    channels, height, width = input_shape
    flat = 12 * (((height - 4) // 2 - 4) // 2) * (((width - 4) // 2 - 4) // 2)
    return nn.Sequential(
        nn.Conv2d(channels, 4, kernel_size=5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 12, kernel_size=5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, 1024),
        nn.ReLU(),
        nn.Linear(1024, 1024),
        nn.ReLU(),
        nn.Linear(1024, num_classes),
    )


@MODELS.register("2nn")
def fedavg_2nn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """McMahan et al. (2017) multilayer perceptron: two hidden layers of 200 ReLU units (784-200-200-10)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), 200),
        nn.ReLU(),
        nn.Linear(200, 200),
        nn.ReLU(),
        nn.Linear(200, num_classes),
    )


@MODELS.register("logreg")
def logistic_regression(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Multinomial logistic regression, the model FedProx uses on Synthetic(alpha, beta)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


def check_model(model: str | ModelConfig) -> ModelBuilder:
    """The class or function that builds ``model``; a :class:`ConfigError` naming the key when the name is not
    registered or the import path cannot be imported."""
    spec = model if isinstance(model, ModelConfig) else ModelConfig(name=model)
    if spec._target_:
        return locate("model._target_", spec._target_)
    if spec.name not in MODELS:
        raise ConfigError(f"model.name: unknown model {spec.name!r}; choose one of: {', '.join(MODELS.names())}")
    try:
        return MODELS.get(spec.name)
    except ImportError as error:
        raise ConfigError(f"model.name: {error}") from None


def build_model(
    model: str | ModelConfig, input_shape: tuple[int, ...], num_classes: int, seed: int, dp_compatible: bool = False
) -> nn.Module:
    """Build ``model`` (a registered name, or a config naming one or an import path) with weights initialised
    deterministically from ``seed``; ``dp_compatible`` replaces the layers DP-SGD cannot train per sample (see
    :func:`dp_incompatible`), the same way in every instance."""
    spec = model if isinstance(model, ModelConfig) else ModelConfig(name=model)
    builder = check_model(spec)
    offered: dict[str, Any] = {"input_shape": input_shape, "num_classes": num_classes}
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        built = call_target("model", builder, spec.kwargs, offered)
    finally:
        torch.random.set_rng_state(generator_state)
    if not isinstance(built, nn.Module):
        raise ConfigError(f"model {spec.label!r} built a {type(built).__name__}, not a torch.nn.Module")
    module: nn.Module = built
    if dp_compatible and dp_incompatible(module):
        from opacus.validators import ModuleValidator

        module = ModuleValidator.fix(module)
    return module


def dp_incompatible(model: nn.Module) -> str:
    """The layers of ``model`` DP-SGD cannot train per sample (batch statistics mix the samples: BatchNorm), as
    ``"BatchNorm2d at 'features.1', ..."``; empty when there are none."""
    found = [
        f"{type(m).__name__} at {n!r}"
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    return ", ".join(found)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2000) -> tuple[float, float]:
    """(accuracy in [0, 1], mean cross-entropy loss) of ``model`` on ``(x, y)``."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    loss_sum = 0.0
    for i in range(0, len(x), batch_size):
        logits = model(x[i : i + batch_size].to(device))
        target = y[i : i + batch_size].to(device)
        loss_sum += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(1) == target).sum())
    return correct / len(x), loss_sum / len(x)
