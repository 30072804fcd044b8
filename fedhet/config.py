"""Typed configuration: the schema Hydra validates ``configs/`` against, and checks run before any work."""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from fedhet.data.config import DatasetConfig, PartitionConfig
from fedhet.errors import ConfigError
from fedhet.models.config import ModelConfig
from fedhet.quant import BITWIDTHS, FULL_PRECISION
from fedhet.tracking import TrackingConfig

__all__ = [
    "CONFIG_DIR",
    "ClientConfig",
    "DatasetConfig",
    "FleetConfig",
    "ModelConfig",
    "PartitionConfig",
    "PrivacySettings",
    "RunConfig",
    "SimulationConfig",
    "StrategyConfig",
    "compose_config",
    "compose_typed",
    "is_loopback",
    "plain",
    "register_configs",
    "to_typed",
]


@dataclass
class StrategyConfig:
    """A strategy is three roles, each ``{name: <registered name>, <argument>: <value>, ...}``."""

    name: str = "fedavg"
    scheduler: dict[str, Any] = field(default_factory=lambda: {"name": "fedavg"})
    planner: dict[str, Any] = field(default_factory=lambda: {"name": "identity"})
    aggregator: dict[str, Any] = field(default_factory=lambda: {"name": "weighted_mean"})


@dataclass
class ClientConfig:
    """Local training of every client: SGD learning rate, minibatch size (samples), momentum, weight decay, and the
    learning rate's decay per global version (a task from version ``v`` trains at ``lr * lr_decay ** v``; FedP3's
    released code uses 0.997 from lr 0.01; 1 = none). :class:`fedhet.clients.trainer.TrainConfig` checks them."""

    lr: float = 0.05
    batch_size: int = 32
    momentum: float = 0.0
    weight_decay: float = 0.0
    lr_decay: float = 1.0
    low_bit_weights: bool = False  # clients below 32 bits hold their weights at their bitwidth while training
    result_rounding: str = "nearest"  # a quantization-aware client's result to its grid: nearest or stochastic
    cuda_graphs: bool = True  # on a GPU, full minibatch SGD steps replay a captured CUDA graph (clients/graphed.py)


@dataclass
class SimulationConfig:
    """Stopping and evaluation.

    Attributes:
        max_versions: stop when the global model reaches this version.
        max_virtual_seconds: stop when the virtual clock passes this (0 = no limit).
        eval_every: evaluate every this many versions.
        eval_interval: and at most once per this many virtual seconds (0 = no limit).
        encoding: wire encoding that sizes payloads (fp32, fp16, bf16).
        threads: torch CPU threads (0 = the idle cores when the run starts: :mod:`fedhet.threads`).
        device: where clients train and the global model is evaluated: ``cpu``, ``cuda`` or ``cuda:N``.
        progress: show a progress bar.
        executor: how client tasks are computed: ``sequential`` (one after another), ``vectorized`` (many clients
            as batched tensor operations; what it cannot batch runs sequentially) or ``ray`` (on a Ray cluster).
        precision: ``fp32`` or ``bf16`` (bfloat16 products, fp32 weights; ``vectorized`` and ``ray`` executors).
        ray_address: ``ray`` executor: the cluster to join (``auto``, ``ray://host:10001``); empty starts a local
            one on this machine.
        personal_eval: also measure personalised accuracy at every evaluation (``personal_accuracy`` in the
            metrics: the mean over clients of their held-out accuracy with their own head fine-tuned on the global
            shared layers; needs ``dataset.partition.test_fraction > 0``).
        finetune_epochs: head fine-tuning epochs of the personalised evaluation.
        checkpoint_every: write ``checkpoint.safetensors`` into the run directory every this many versions and at
            the end (0: never; tasks in flight are part of it, so a large fleet's checkpoint is large).
        resume: go on from the checkpoint of an earlier run of the same config (its run directory or checkpoint
            file); only the stop rules, evaluation cadence and run settings (threads, progress) may differ.
        norm_bound: largest L2 norm of a client's update (trained minus start weights) the run takes, as
            ``server.norm_bound`` of a deployed server: 0 = the default, 100 x max(norm of the start weights, 1)
            (:class:`fedhet.updates.NormBound`).
        norm_action: ``reject`` (the update is dropped, its client asks for work again) or ``clip`` (scaled onto
            the bound) an update over ``norm_bound``, as ``server.norm_action``.
    """

    max_versions: int = 60
    max_virtual_seconds: float = 0.0
    eval_every: int = 1
    eval_interval: float = 0.0
    encoding: str = "fp32"
    threads: int = 0
    device: str = "cpu"
    progress: bool = True
    executor: str = "sequential"
    precision: str = "fp32"
    ray_address: str = ""
    personal_eval: bool = False
    finetune_epochs: int = 5
    checkpoint_every: int = 0
    resume: str = ""
    norm_bound: float = 0.0
    norm_action: str = "reject"


@dataclass
class PrivacySettings:
    """DP-SGD on every client (:class:`fedhet.clients.trainer.PrivacyConfig`), off unless ``enabled``.

    Attributes:
        enabled: train with DP-SGD (Opacus); each client's epsilon is logged in the metrics.
        max_grad_norm: per-sample clipping norm C.
        noise_multiplier: sigma (noise std = sigma * C); 0 = derive it from ``target_epsilon``.
        target_epsilon: epsilon each client may reach after ``planned_tasks`` tasks.
        delta: delta of every client's guarantee.
        planned_tasks: tasks per client the target epsilon covers; 0 = ``sim.max_versions``, which bounds a client's
            tasks under the fedavg, fedasync and fedcompass schedulers (one task per global version at most); fedbuff
            hands a fast client several tasks per version, so it needs an explicit value.
        max_layer_params: a layer (one module's parameters) larger than this does not train under DP-SGD and keeps
            the value it came with, so the noise's dimension stays small (DP-FedP3: the convolutions and the head
            train, the 1024-wide layers do not); 0 = every layer a task trains does.
    """

    enabled: bool = False
    max_grad_norm: float = 1.0
    noise_multiplier: float = 0.0
    target_epsilon: float = 0.0
    delta: float = 1e-5
    planned_tasks: int = 0
    max_layer_params: int = 0


SPEED_DISTRIBUTIONS = ("homogeneous", "normal", "exponential")
_SUPPORTED_BITWIDTHS = (*BITWIDTHS, FULL_PRECISION)


@dataclass
class FleetConfig:
    """How client profiles are drawn.

    Attributes:
        speed: ``homogeneous`` (all equal), ``normal`` (sigma = ``sigma_ratio`` * mean, truncated below at
            ``min_ratio`` * mean) or ``exponential`` (rate 1 / mean, truncated the same way).
        seconds_per_sample: mean local training seconds per sample (mu).
        sigma_ratio: sigma / mu of the normal distribution (0.3 in FedCompass).
        min_ratio: no client is faster than ``min_ratio`` * mu; keeps times positive.
        bandwidth: median link speed in bytes per second.
        bandwidth_sigma: sigma of log-bandwidth (0 = every client has ``bandwidth``).
        bitwidth: bits per weight every client computes at (2, 4, 6, 8, 12, 16, or 32 = fp32), unless
            ``bitwidths`` is given.
        bitwidths: a bitwidth mix, one entry per group (e.g. ``[8, 32]``); empty = every client at ``bitwidth``.
        bitwidth_fractions: the share of clients at each entry of ``bitwidths`` (summing to 1); the counts are exact
            (``round(fraction * num_clients)``, largest remainders settle the rounding) and who gets which bitwidth
            is drawn from the run seed.
        memory_bytes: model memory budget of every client in bytes (0 = unlimited).
        availability: probability that a task handed to a client comes back.
    """

    speed: str = "normal"
    seconds_per_sample: float = 0.005
    sigma_ratio: float = 0.3
    min_ratio: float = 0.05
    bandwidth: float = 2.0e6
    bandwidth_sigma: float = 0.0
    bitwidth: int = 32
    bitwidths: list[int] = field(default_factory=list)
    bitwidth_fractions: list[float] = field(default_factory=list)
    memory_bytes: int = 0
    availability: float = 1.0

    def validate(self) -> None:
        if self.speed not in SPEED_DISTRIBUTIONS:
            raise ConfigError(f"fleet.speed must be one of {', '.join(SPEED_DISTRIBUTIONS)}, got {self.speed!r}")
        for key in ("seconds_per_sample", "bandwidth", "min_ratio"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"fleet.{key} must be > 0, got {getattr(self, key)}")
        for key in ("sigma_ratio", "bandwidth_sigma"):
            if getattr(self, key) < 0:
                raise ConfigError(f"fleet.{key} must be >= 0, got {getattr(self, key)}")
        if not 0.0 < self.availability <= 1.0:
            raise ConfigError(f"fleet.availability must be in (0, 1], got {self.availability}")
        supported = ", ".join(map(str, _SUPPORTED_BITWIDTHS))
        if self.bitwidth not in _SUPPORTED_BITWIDTHS:
            raise ConfigError(f"fleet.bitwidth must be one of {supported}, got {self.bitwidth}")
        if len(self.bitwidths) != len(self.bitwidth_fractions):
            raise ConfigError(
                f"fleet.bitwidth_fractions must give one fraction per entry of fleet.bitwidths: "
                f"{len(self.bitwidth_fractions)} fractions for {len(self.bitwidths)} bitwidths"
            )
        bad = [b for b in self.bitwidths if b not in _SUPPORTED_BITWIDTHS]
        if bad:
            raise ConfigError(f"fleet.bitwidths must hold only {supported}, got {list(self.bitwidths)}")
        if len(set(self.bitwidths)) != len(self.bitwidths):
            raise ConfigError(f"fleet.bitwidths lists a bitwidth twice: {list(self.bitwidths)}")
        fractions = list(self.bitwidth_fractions)
        if fractions and (
            not all(math.isfinite(f) and f >= 0 for f in fractions)
            or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6)
        ):
            raise ConfigError(f"fleet.bitwidth_fractions must be >= 0 and sum to 1 (within 1e-6), got {fractions}")
        if self.memory_bytes < 0:
            raise ConfigError(f"fleet.memory_bytes must be >= 0 (0 = unlimited), got {self.memory_bytes}")


@dataclass
class RunConfig:
    """The whole run. ``strategy``, ``dataset``, ``model``, ``fleet``, ``num_clients`` and ``seed`` are the public
    keys of ``fedhet simulate key=value``."""

    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    sim: SimulationConfig = field(default_factory=SimulationConfig)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    num_clients: int = 100
    seed: int = 0


def is_loopback(address: str) -> bool:
    """True for ``localhost`` and loopback IP literals (127.0.0.0/8, ::1): where the server and its clients may
    talk without TLS."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (idempotent)."""
    ConfigStore.instance().store(name="schema", node=RunConfig)


CONFIG_DIR = Path(str(resources.files("fedhet.configs")))
_Schema = TypeVar("_Schema")


def compose_config(config_name: str, overrides: list[str]) -> Any:
    """``configs/<config_name>.yaml`` composed with ``overrides`` by Hydra (a DictConfig; its schema, if any, must
    be stored in Hydra's ConfigStore)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def compose_typed(config_name: str, schema: type[_Schema], overrides: list[str]) -> _Schema:
    """Compose ``configs/<config_name>.yaml`` with ``overrides`` and return it as an instance of ``schema``
    (a dataclass whose schema the caller has stored in Hydra's ConfigStore); Hydra's own keys are dropped."""
    return to_typed(compose_config(config_name, overrides), schema)


def to_typed(cfg: Any, schema: type[_Schema]) -> _Schema:
    """A composed config as an instance of ``schema``, Hydra's own keys dropped."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    plain.pop("hydra", None)
    typed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), plain))
    assert isinstance(typed, schema)
    return typed


def plain(node: Any) -> dict[str, Any]:
    """A dataclass config node as plain dicts (what ``build_strategy`` takes)."""
    container = OmegaConf.to_container(OmegaConf.structured(node), resolve=True)
    assert isinstance(container, dict)
    return {str(k): v for k, v in container.items()}
