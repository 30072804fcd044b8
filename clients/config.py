"""``fedhet client``'s configuration: its data, model, local training, profile, network and privacy, checked
before anything starts; and the client's local data split (the one the simulator gives the same partition)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from hydra.core.config_store import ConfigStore

from fedhet import quant
from fedhet.clients.trainer import PrivacyConfig, TrainConfig
from fedhet.config import ClientConfig, DatasetConfig, ModelConfig, PrivacySettings, compose_typed, is_loopback
from fedhet.data import check_dataset, client_splits, load_configured
from fedhet.errors import ConfigError
from fedhet.models import check_model

__all__ = [
    "ClientRunConfig",
    "ClientTLSConfig",
    "LocalData",
    "NetworkConfig",
    "ProfileConfig",
    "compose_client",
    "local_partition",
    "privacy_of",
]


@dataclass
class ClientTLSConfig:
    """TLS toward the server (PEM paths). ``ca`` alone: server-authenticated TLS; with ``cert`` and ``key``:
    mutual TLS. ``server_name`` overrides the name checked against the server's certificate."""

    ca: str = ""
    cert: str = ""
    key: str = ""
    server_name: str = ""


@dataclass
class NetworkConfig:
    """How to reach the server.

    Attributes:
        server: ``host:port`` of the server.
        client_id: this client's id (the one its token belongs to).
        token: the client's token, or ``token_file`` holding it.
        insecure: allow a plaintext connection to a non-loopback server.
        encoding: how a 32-bit client's floating-point results travel (fp32, fp16, bf16); a client of ``b < 32``
            bits uploads them packed at ``int<b>``.
        backoff_initial: first reconnect delay, in seconds (doubles up to ``backoff_max``).
        reconnect_timeout: give up after this many seconds without reaching the server.
        rpc_timeout: seconds any one call (a poll, a download, an upload) may take.
        max_download_bytes: largest task payload accepted.
        max_seconds: leave after this many seconds (0 = stay until the run ends).
    """

    server: str = "127.0.0.1:50051"
    client_id: int = 0
    token: str = ""
    token_file: str = ""
    insecure: bool = False
    tls: ClientTLSConfig = field(default_factory=ClientTLSConfig)
    encoding: str = "fp32"
    backoff_initial: float = 0.5
    backoff_max: float = 10.0
    reconnect_timeout: float = 120.0
    rpc_timeout: float = 300.0
    max_download_bytes: int = 8 << 30
    max_seconds: float = 0.0


@dataclass
class ProfileConfig:
    """The profile this client registers with.

    Attributes:
        seconds_per_sample: training seconds per sample; 0 = measure with a short benchmark at start.
        benchmark_steps: minibatch steps the benchmark times.
        bandwidth: link speed in bytes per second.
        bitwidth: bits per weight the device computes at: 32 (fp32), or 2, 4, 6, 8, 12 or 16 to train
            quantization-aware at that many bits and upload packed ``int<b>`` updates.
        memory_bytes: model memory budget in bytes; 0 = detect (GPU memory, or physical RAM).
        slowdown: emulate a device this many times slower (>= 1): the registered seconds per sample is multiplied
            by it and every task is paced (padded with sleep) to take steps x batch x that many seconds.
    """

    seconds_per_sample: float = 0.0
    benchmark_steps: int = 5
    bandwidth: float = 1.0e7
    bitwidth: int = 32
    memory_bytes: int = 0
    slowdown: float = 1.0


@dataclass
class ClientRunConfig:
    """``fedhet client``: its data (``dataset``, ``partition_id`` of ``num_clients`` partitions), the model, local
    training, the profile and the network. ``dataset``, ``num_clients`` and ``seed`` must match the server's so
    the partitions are the ones the run was planned with. ``privacy`` turns on DP-SGD (``planned_tasks`` is needed
    with a target epsilon: a client cannot know the server's run length). ``state_dir`` keeps what the client keeps
    between tasks (FedP3's personal head, the DP accountant) across restarts; empty keeps it in memory only. A
    client that keeps a personal head reports its personalised accuracy with each result, its head fine-tuned for
    ``finetune_epochs`` epochs first (as ``sim.finetune_epochs`` in simulation)."""

    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: ClientConfig = field(default_factory=ClientConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    partition_id: int = 0
    num_clients: int = 30
    seed: int = 0
    device: str = "cpu"
    threads: int = 0
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    state_dir: str = ""
    finetune_epochs: int = 5


def compose_client(overrides: list[str]) -> ClientRunConfig:
    """The typed, validated config of ``fedhet client OVERRIDES``."""
    ConfigStore.instance().store(name="client_schema", node=ClientRunConfig)
    typed = compose_typed("client", ClientRunConfig, overrides)
    _validate(typed)
    return typed


def _validate(cfg: ClientRunConfig) -> None:
    net, prof = cfg.network, cfg.profile
    host, sep, port = net.server.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"network.server must be host:port, got {net.server!r}")
    if net.client_id < 0:
        raise ConfigError(f"network.client_id must be >= 0, got {net.client_id}")
    if not 0 <= cfg.partition_id < cfg.num_clients:
        raise ConfigError(f"partition_id must be in 0..{cfg.num_clients - 1} (num_clients), got {cfg.partition_id}")
    if net.encoding not in ("fp32", "fp16", "bf16"):
        raise ConfigError(f"network.encoding must be fp32, fp16 or bf16, got {net.encoding!r}")
    for key in ("backoff_initial", "backoff_max", "reconnect_timeout", "rpc_timeout"):
        if not getattr(net, key) > 0:
            raise ConfigError(f"network.{key} must be > 0 seconds, got {getattr(net, key)}")
    if net.max_seconds < 0:
        raise ConfigError(f"network.max_seconds must be >= 0 (0 = no limit), got {net.max_seconds}")
    if bool(net.tls.cert) != bool(net.tls.key):
        raise ConfigError("network.tls.cert and network.tls.key must be given together")
    for key in ("ca", "cert", "key"):
        path = getattr(net.tls, key)
        if path and not Path(path).is_file():
            raise ConfigError(f"network.tls.{key}: no such file {path}")
    if net.token_file and not Path(net.token_file).is_file():
        raise ConfigError(f"network.token_file: no such file {net.token_file}")
    if not is_loopback(host) and not net.tls.ca and not net.insecure:
        raise ConfigError(
            f"refusing a plaintext connection to non-loopback server {host}: set network.tls.ca (and cert/key for "
            "mutual TLS), or network.insecure=true to accept the risk"
        )
    if prof.bitwidth != quant.FULL_PRECISION and prof.bitwidth not in quant.BITWIDTHS:
        raise ConfigError(
            f"profile.bitwidth must be 32 or one of {', '.join(map(str, quant.BITWIDTHS))}, got {prof.bitwidth}"
        )
    if cfg.privacy.enabled and prof.bitwidth != quant.FULL_PRECISION:
        raise ConfigError(f"privacy.enabled needs profile.bitwidth=32 (DP-SGD trains in fp32), got {prof.bitwidth}")
    if prof.seconds_per_sample < 0 or prof.benchmark_steps < 1:
        raise ConfigError("profile.seconds_per_sample must be >= 0 (0 = measure) and profile.benchmark_steps >= 1")
    if not prof.slowdown >= 1.0:
        raise ConfigError(f"profile.slowdown must be >= 1, got {prof.slowdown}")
    check_dataset(cfg.dataset)
    check_model(cfg.model)
    if cfg.finetune_epochs < 0:
        raise ConfigError(f"finetune_epochs must be >= 0, got {cfg.finetune_epochs}")
    if cfg.device not in ("cpu", "cuda") and not cfg.device.startswith("cuda:"):
        raise ConfigError(f"device must be cpu, cuda or cuda:N, got {cfg.device!r}")
    try:
        TrainConfig(**asdict(cfg.train))
    except ValueError as error:  # the simulator's key is client.*; this client's is train.*
        raise ConfigError(str(error).replace("client.", "train.", 1)) from None
    privacy_of(cfg)


def privacy_of(cfg: ClientRunConfig) -> PrivacyConfig | None:
    """The client's DP-SGD settings (None without ``privacy.enabled``); a bad value is a ConfigError."""
    p = cfg.privacy
    if not p.enabled:
        return None
    try:
        return PrivacyConfig(
            p.max_grad_norm, p.noise_multiplier, p.target_epsilon, p.delta, p.planned_tasks, p.max_layer_params
        )
    except ValueError as error:
        raise ConfigError(str(error)) from None


@dataclass(frozen=True, eq=False)
class LocalData:
    """This client's samples: its training split ``(x, y)``, its held-out split ``(x_held, y_held)`` (personalised
    accuracy is measured on it; empty without ``dataset.partition.test_fraction``), the input shape and classes."""

    x: torch.Tensor
    y: torch.Tensor
    x_held: torch.Tensor
    y_held: torch.Tensor
    input_shape: tuple[int, ...]
    num_classes: int


def local_partition(cfg: ClientRunConfig) -> LocalData:
    """This client's data: the same partition the simulator would give client ``partition_id`` of ``num_clients``
    with this dataset config and seed."""
    data = load_configured(cfg.dataset, cfg.num_clients, cfg.seed)
    split = client_splits(cfg.dataset, data, cfg.num_clients, cfg.seed)[cfg.partition_id]
    train, held = (torch.from_numpy(indices) for indices in split)
    x, y = data.x_train, data.y_train
    return LocalData(x[train], y[train], x[held], y[held], data.input_shape, data.num_classes)
