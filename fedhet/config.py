"""Typed configuration: the schema Hydra validates ``configs/`` against, and checks run before any work."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from fedhet.data.config import DatasetConfig, PartitionConfig
from fedhet.sim.fleet import FleetConfig

__all__ = [
    "CONFIG_DIR",
    "ClientConfig",
    "DatasetConfig",
    "ModelConfig",
    "PartitionConfig",
    "PrivacySettings",
    "RunConfig",
    "SimulationConfig",
    "StrategyConfig",
    "compose_typed",
    "is_loopback",
    "register_configs",
    "to_typed",
]


@dataclass
class ModelConfig:
    """Attributes: name: registered model (``cnn``, ``2nn``, ``logreg``)."""

    name: str = "cnn"


@dataclass
class StrategyConfig:
    """A strategy is three roles, each ``{name: <registered name>, <argument>: <value>, ...}``."""

    name: str = "fedavg"
    scheduler: dict[str, Any] = field(default_factory=lambda: {"name": "fedavg"})
    planner: dict[str, Any] = field(default_factory=lambda: {"name": "identity"})
    aggregator: dict[str, Any] = field(default_factory=lambda: {"name": "weighted_mean"})


@dataclass
class ClientConfig:
    """Local training of every client: SGD learning rate, minibatch size (samples), momentum, weight decay."""

    lr: float = 0.05
    batch_size: int = 32
    momentum: float = 0.0
    weight_decay: float = 0.0


@dataclass
class SimulationConfig:
    """Stopping and evaluation.

    Attributes:
        max_versions: stop when the global model reaches this version.
        max_virtual_seconds: stop when the virtual clock passes this (0 = no limit).
        eval_every: evaluate every this many versions.
        eval_interval: and at most once per this many virtual seconds (0 = no limit).
        encoding: wire encoding that sizes payloads (fp32, fp16, bf16).
        threads: torch CPU threads (0 = torch's default).
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
    """

    enabled: bool = False
    max_grad_norm: float = 1.0
    noise_multiplier: float = 0.0
    target_epsilon: float = 0.0
    delta: float = 1e-5
    planned_tasks: int = 0


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


def compose_typed(config_name: str, schema: type[_Schema], overrides: list[str]) -> _Schema:
    """Compose ``configs/<config_name>.yaml`` with ``overrides`` and return it as an instance of ``schema``
    (a dataclass whose schema the caller has stored in Hydra's ConfigStore); Hydra's own keys are dropped."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides)
    return to_typed(cfg, schema)


def to_typed(cfg: Any, schema: type[_Schema]) -> _Schema:
    """A composed config as an instance of ``schema``, Hydra's own keys dropped."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    plain.pop("hydra", None)
    typed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), plain))
    assert isinstance(typed, schema)
    return typed
