"""The run's assembly: a config's data, model, strategy (with everything it needs) and evaluator, built once.

``fedhet simulate``, ``fedhet server`` and the Flower ServerApp all start a run here, so a run deployed is the
run simulated: the same data split, the same initial model, the same strategy with the same server buffer, the
same evaluation. What a runtime adds is its clock and its transport.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from fedhet.config import ModelConfig, StrategyConfig, plain
from fedhet.data import ClientSplit, Dataset, DatasetConfig, check_dataset, client_splits, load_configured
from fedhet.errors import ConfigError
from fedhet.models import build_model, check_model, dp_incompatible
from fedhet.runtime.evaluation import Evaluator
from fedhet.strategies import ServerTrained, Strategy, build_strategy

__all__ = ["RunParts", "RunSpec", "assemble", "check_spec", "run_spec"]

log = logging.getLogger(__name__)

_BUFFER_SEED = 0x5E7  # the server buffer's draw, apart from every other seeded choice


@dataclass(frozen=True)
class RunSpec:
    """What every runtime's config says of a run.

    Attributes:
        dataset: data and its partition.
        model: the model (a registered name or an import path, with its keyword arguments).
        strategy: ``{scheduler: {name, ...}, planner: {...}, aggregator: {...}}``.
        num_clients: clients the data is split for.
        seed: fixes the split, the initial model, the strategy's draws and the server buffer.
        dp_compatible: every instance of the model has its DP-incompatible layers replaced (see
            :func:`fedhet.models.build_model`).
    """

    dataset: DatasetConfig
    model: ModelConfig
    strategy: Mapping[str, Any]
    num_clients: int
    seed: int
    dp_compatible: bool = False


class RunConfigLike(Protocol):
    """The keys every runtime's config shares (``RunConfig``, ``ServerRunConfig``)."""

    dataset: DatasetConfig
    model: ModelConfig
    strategy: StrategyConfig
    num_clients: int
    seed: int


def run_spec(cfg: RunConfigLike, private: bool = False) -> RunSpec:
    """The :class:`RunSpec` of a composed config; ``private``: the clients train with DP-SGD (the model is made
    DP-compatible whatever ``model.dp_compatible`` says)."""
    dp = cfg.model.dp_compatible or private
    return RunSpec(cfg.dataset, cfg.model, plain(cfg.strategy), cfg.num_clients, cfg.seed, dp)


@dataclass
class RunParts:
    """A run ready to drive: its data and clients' splits, the version-0 model, the strategy and the evaluator."""

    spec: RunSpec
    data: Dataset
    splits: list[ClientSplit]
    initial: dict[str, torch.Tensor]
    strategy: Strategy
    evaluator: Evaluator
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def new_model(self) -> nn.Module:
        """A fresh instance of the run's model (initialised as version 0), on the CPU."""
        spec = self.spec
        return build_model(spec.model, self.data.input_shape, self.data.num_classes, spec.seed, spec.dp_compatible)


def check_spec(spec: RunSpec) -> Strategy:
    """Every check of ``spec`` that needs no data; returns the strategy it builds. Raises :class:`ConfigError`
    naming the key."""
    if spec.num_clients < 1:
        raise ConfigError(f"num_clients must be >= 1, got {spec.num_clients}")
    check_dataset(spec.dataset)
    check_model(spec.model)
    strategy = build_strategy(spec.strategy, spec.seed)
    aggregator = strategy.aggregator
    needs_buffer = isinstance(aggregator, ServerTrained) and aggregator.server_samples > 0
    if needs_buffer and spec.dataset.partition.test_fraction <= 0:
        raise ConfigError(
            "strategy.aggregator: its server buffer is drawn from the clients' held-out samples: set "
            "dataset.partition.test_fraction > 0 (or turn the server-side training off)"
        )
    return strategy


def assemble(spec: RunSpec, device: str | torch.device = "cpu") -> RunParts:
    """Build the run ``spec`` describes; the evaluator runs on ``device``. Raises ConfigError or DataError."""
    strategy = check_spec(spec)
    data = load_configured(spec.dataset, spec.num_clients, spec.seed)
    replaced = spec.dp_compatible and dp_incompatible(
        build_model(spec.model, data.input_shape, data.num_classes, spec.seed)
    )  # only a DP-compatible run builds the unreplaced model, to say what it replaced
    if replaced:
        log.warning(
            "model %s: %s replaced by GroupNorm (Opacus's ModuleValidator) for DP-SGD", spec.model.label, replaced
        )
    splits = client_splits(spec.dataset, data, spec.num_clients, spec.seed)
    model = build_model(spec.model, data.input_shape, data.num_classes, spec.seed, spec.dp_compatible)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    target = torch.device(device)
    eval_model = build_model(spec.model, data.input_shape, data.num_classes, spec.seed, spec.dp_compatible).to(target)
    parts = RunParts(spec, data, splits, initial, strategy, Evaluator(eval_model, data.x_test, data.y_test), target)
    _give_server_buffer(parts)
    return parts


def _give_server_buffer(parts: RunParts) -> None:
    """A role that trains on the server gets its buffer: held-out samples of the clients' own splits, which no
    client trains on, drawn by the run's seed (the same in every runtime)."""
    aggregator = parts.strategy.aggregator
    if not isinstance(aggregator, ServerTrained) or aggregator.server_samples == 0:
        return
    held = np.concatenate([h for _, h in parts.splits])
    draw = np.random.default_rng([parts.spec.seed, _BUFFER_SEED]).permutation(held)
    pick = np.sort(draw[: aggregator.server_samples])
    if len(pick) == 0:
        raise ConfigError("strategy.aggregator: the server buffer is empty: the clients hold no held-out samples")
    aggregator.attach(parts.new_model(), parts.data.x_train[torch.from_numpy(pick)])
