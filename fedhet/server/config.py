"""Typed configuration of ``fedhet server``: the schema ``configs/server.yaml`` is validated against, and the
checks that run before a port is bound."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore

from fedhet.config import CONFIG_DIR, DatasetConfig, ModelConfig, StrategyConfig, compose_typed, is_loopback, plain
from fedhet.errors import ConfigError
from fedhet.tracking import TrackingConfig, check_tracking
from fedhet.updates import NormBound

__all__ = [
    "CONFIG_DIR",
    "ServerRunConfig",
    "ServerSettings",
    "TLSConfig",
    "compose_server",
    "is_loopback",
    "plain",
    "register_server_configs",
    "validate_server",
]


@dataclass
class TLSConfig:
    """Transport security (PEM file paths). Empty ``cert`` and ``key`` means no TLS.

    Attributes:
        cert: the server's certificate chain.
        key: the server's private key.
        client_ca: CA bundle that signs client certificates; when set, clients must present one (mutual TLS).
    """

    cert: str = ""
    key: str = ""
    client_ca: str = ""


@dataclass
class ServerSettings:
    """How the server listens, stops, persists and what it accepts.

    Attributes:
        address: interface to listen on; anything but loopback needs TLS and tokens unless ``insecure``.
        port: TCP port (0 = any free port, written to ``port_file``).
        port_file: when set, the bound port is written there once the server listens.
        insecure: allow a non-loopback address without TLS or tokens (never in production).
        tls: certificate, key and client CA paths.
        tokens_file: lines ``<client_id> <token>``; every call must carry its client's token.
        state_dir: checkpoints, the write-ahead log and ``metrics.jsonl`` live here.
        durable: write-ahead log every event and checkpoint after every aggregation (false: metrics only).
        resume: continue the run found in ``state_dir`` (refused without it when the directory holds a run).
        max_versions: stop when the global model reaches this version.
        max_seconds: stop after this many seconds of run time (0 = no limit).
        eval_every: evaluate the global model on the test set every this many versions.
        encoding: how floating-point weights travel to clients (fp32, fp16, bf16).
        chunk_bytes: bytes per payload chunk (and the basis of the gRPC message size limit).
        max_upload_bytes: largest result payload accepted, in bytes (0 = twice the fp32 model, plus 1 MiB).
        max_concurrent_uploads: uploads in progress at once; more get RESOURCE_EXHAUSTED (retry later).
        uploads_per_client: uploads one client may have in progress at once (its fair share).
        max_inflight_bytes: payload bytes the uploads in progress may declare in all (0 = 1 GiB, or the largest
            upload if that is more).
        read_timeout: seconds an upload may go without sending its next message (header or chunk); a slower one
            is cut off with DEADLINE_EXCEEDED, so an idle stream cannot hold its slot.
        dp_delta: delta of the epsilon the server computes for each DP client from the steps it reported.
        poll_timeout: seconds a task poll waits before answering ``idle``.
        heartbeat_seconds: how often clients send a heartbeat while training, in seconds.
        client_timeout: seconds of silence after which a client is marked gone.
        norm_bound: largest L2 norm of an update (trained minus start weights); 0 = the default, 100 x max(norm of
            the start weights, 1) (``fedhet.updates.DEFAULT_RELATIVE_BOUND``: 20x an honest worst case).
        norm_action: ``reject`` or ``clip`` an update over ``norm_bound``.
        shutdown_grace: seconds the server keeps answering after the run ends, so clients learn it is over.
        threads: torch CPU threads (0 = the idle cores when the run starts: :mod:`fedhet.threads`).
    """

    address: str = "127.0.0.1"
    port: int = 50051
    port_file: str = ""
    insecure: bool = False
    tls: TLSConfig = field(default_factory=TLSConfig)
    tokens_file: str = ""
    state_dir: str = "server_state"
    durable: bool = True
    resume: bool = False
    max_versions: int = 20
    max_seconds: float = 0.0
    eval_every: int = 1
    encoding: str = "fp32"
    chunk_bytes: int = 1 << 20
    max_upload_bytes: int = 0
    max_concurrent_uploads: int = 32
    uploads_per_client: int = 2
    max_inflight_bytes: int = 0
    read_timeout: float = 15.0
    dp_delta: float = 1e-5
    poll_timeout: float = 10.0
    heartbeat_seconds: float = 5.0
    client_timeout: float = 30.0
    norm_bound: float = 0.0
    norm_action: str = "reject"
    shutdown_grace: float = 10.0
    threads: int = 0


@dataclass
class ServerRunConfig:
    """``fedhet server``: the data the test set comes from, the model, the strategy and the server settings.

    ``num_clients`` is the number of data partitions (Synthetic generates one per client); ``seed`` seeds the
    initial model and the strategy."""

    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    server: ServerSettings = field(default_factory=ServerSettings)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    num_clients: int = 30
    seed: int = 0


def register_server_configs() -> None:
    """Register the schema with Hydra's ConfigStore (idempotent)."""
    ConfigStore.instance().store(name="server_schema", node=ServerRunConfig)


def compose_server(overrides: list[str]) -> ServerRunConfig:
    """The typed, validated config of ``fedhet server OVERRIDES``."""
    register_server_configs()
    typed = compose_typed("server", ServerRunConfig, overrides)
    validate_server(typed)
    return typed


def _positive(key: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"server.{key} must be > 0, got {value}")


def validate_server(cfg: ServerRunConfig) -> None:
    """Every check that needs no data and no port; raises :class:`ConfigError` naming the key."""
    check_tracking(cfg.tracking)
    s = cfg.server
    if not 0 <= s.port <= 65535:
        raise ConfigError(f"server.port must be in 0..65535, got {s.port}")
    if s.max_versions < 1:
        raise ConfigError(f"server.max_versions must be >= 1, got {s.max_versions}")
    if not (math.isfinite(s.max_seconds) and s.max_seconds >= 0):
        raise ConfigError(f"server.max_seconds must be >= 0 (0 = no limit), got {s.max_seconds}")
    if s.eval_every < 1:
        raise ConfigError(f"server.eval_every must be >= 1, got {s.eval_every}")
    if s.encoding not in ("fp32", "fp16", "bf16"):
        raise ConfigError(f"server.encoding must be fp32, fp16 or bf16, got {s.encoding!r}")
    if s.chunk_bytes < 1024 or s.chunk_bytes > 64 << 20:
        raise ConfigError(f"server.chunk_bytes must be in 1024..{64 << 20}, got {s.chunk_bytes}")
    if s.max_upload_bytes < 0:
        raise ConfigError(f"server.max_upload_bytes must be >= 0 (0 = automatic), got {s.max_upload_bytes}")
    if not 0.0 < s.dp_delta < 1.0:
        raise ConfigError(f"server.dp_delta must be in (0, 1), got {s.dp_delta}")
    if s.max_concurrent_uploads < 1:
        raise ConfigError(f"server.max_concurrent_uploads must be >= 1, got {s.max_concurrent_uploads}")
    if s.uploads_per_client < 1:
        raise ConfigError(f"server.uploads_per_client must be >= 1, got {s.uploads_per_client}")
    if s.max_inflight_bytes < 0:
        raise ConfigError(f"server.max_inflight_bytes must be >= 0 (0 = 1 GiB), got {s.max_inflight_bytes}")
    for key in ("poll_timeout", "heartbeat_seconds", "client_timeout", "shutdown_grace", "read_timeout"):
        _positive(key, float(getattr(s, key)))
    if s.client_timeout <= max(s.poll_timeout, s.heartbeat_seconds):
        raise ConfigError(
            f"server.client_timeout ({s.client_timeout} s) must exceed server.poll_timeout ({s.poll_timeout} s) "
            f"and server.heartbeat_seconds ({s.heartbeat_seconds} s), or live clients would be marked gone"
        )
    try:
        NormBound(s.norm_bound, s.norm_action)
    except ValueError as error:
        raise ConfigError(f"server.{error}") from None
    if bool(s.tls.cert) != bool(s.tls.key):
        raise ConfigError("server.tls.cert and server.tls.key must be given together")
    if s.tls.client_ca and not s.tls.cert:
        raise ConfigError("server.tls.client_ca (mutual TLS) needs server.tls.cert and server.tls.key")
    for key in ("cert", "key", "client_ca"):
        path = getattr(s.tls, key)
        if path and not Path(path).is_file():
            raise ConfigError(f"server.tls.{key}: no such file {path}")
    if s.tokens_file and not Path(s.tokens_file).is_file():
        raise ConfigError(f"server.tokens_file: no such file {s.tokens_file}")
    if not is_loopback(s.address) and not s.insecure and not (s.tls.cert and s.tokens_file):
        raise ConfigError(
            f"refusing to listen on non-loopback address {s.address} without TLS and client tokens: set "
            "server.tls.cert, server.tls.key and server.tokens_file, or server.insecure=true to accept the risk"
        )
    if not s.state_dir:
        raise ConfigError("server.state_dir must name a directory (metrics, checkpoints and the log go there)")
    if cfg.num_clients < 1:
        raise ConfigError(f"num_clients must be >= 1, got {cfg.num_clients}")
