"""``fedhet server``: compose the config, build the run, listen, drive it to its end."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fedhet.codec import encoded_size
from fedhet.commandline import compose_command, to_yaml
from fedhet.errors import ConfigError, DataError
from fedhet.metrics import MetricsWriter
from fedhet.runtime import EvalCadence, StopRules, assemble, check_spec, run_spec
from fedhet.runtime.checkpoint import CheckpointError
from fedhet.server.admission import UploadLimits, UploadSlots
from fedhet.server.auth import TokenStore, server_credentials
from fedhet.server.config import ServerRunConfig, compose_server
from fedhet.server.gate import Gate, RateLimitedLog
from fedhet.server.persistence import StateStore
from fedhet.server.runtime import Coordinator
from fedhet.server.servicer import SERVICE_NAME, FederatedLearningServicer
from fedhet.server.session import RunEnded, RuntimeSettings
from fedhet.threads import use_threads
from fedhet.tracking import flat_config, open_sinks
from fedhet.updates import NormBound
from fedhet.v1 import service_pb2_grpc

__all__ = ["USAGE", "ServerApp", "build_app", "main", "serve"]

log = logging.getLogger("fedhet.server")

CONFIG_FILE = "config.yaml"  # the run's composed config, in the state directory

USAGE = """usage: fedhet server [--resume] [KEY=VALUE ...]

Runs the gRPC server of one federated run (config: configs/server.yaml; groups dataset, model, strategy).
  --resume   continue the run in server.state_dir (same as server.resume=true)
Examples: fedhet server strategy=fedavg server.max_versions=50
          fedhet server server.address=0.0.0.0 server.tls.cert=srv.pem server.tls.key=srv.key \\
                 server.tokens_file=tokens.txt"""

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_MESSAGE_SLACK = 256 << 10  # bytes a message may carry beyond its chunk (header, manifest)


class ServerApp:
    """A built run: the coordinator, the gRPC server bound to its port, and the health service."""

    def __init__(
        self,
        cfg: ServerRunConfig,
        coordinator: Coordinator,
        servicer: FederatedLearningServicer,
        server: aio.Server,
        port: int,
        health_servicer: Any,
    ) -> None:
        self.cfg = cfg
        self.servicer = servicer
        self.coordinator = coordinator
        self.server = server
        self.port = port
        self.health = health_servicer
        self.started = asyncio.Event()

    async def run(self, handle_signals: bool = False) -> RunEnded:
        """Serve until the run ends and clients were told (or the grace passed)."""
        await self.server.start()
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        if self.cfg.server.port_file:
            Path(self.cfg.server.port_file).write_text(str(self.port))
        self.started.set()
        log.info(
            "listening on %s:%d (run %s, version %d); waiting for clients: fedhet client network.server=%s:%d ...",
            self.cfg.server.address,
            self.port,
            self.coordinator.run_id,
            self.coordinator.version,
            self.cfg.server.address,
            self.port,
        )
        if handle_signals:  # SIGTERM / SIGINT end the run cleanly: final checkpoint, clients told
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.coordinator.request_stop, f"signal {sig.name}")
        watch = asyncio.create_task(self._watch_storage())
        try:
            ended = await self.coordinator.run()
        finally:
            watch.cancel()
            for service in ("", SERVICE_NAME):
                await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
            await self.server.stop(grace=1.0)
            self.servicer.close()
            if self.coordinator.metrics is not None:
                self.coordinator.metrics.close()
        return ended

    async def _watch_storage(self, period: float = 0.25) -> None:
        """Report NOT_SERVING while the state directory cannot be written (checkpoints, the log, result files),
        SERVING again once it can."""
        store = self.coordinator.store
        if store is None:
            return
        serving = True
        while True:
            await asyncio.sleep(period)
            failure = store.failure
            if (failure is None) != serving:
                serving = failure is None
                status = _SERVING if serving else _NOT_SERVING
                for service in ("", SERVICE_NAME):
                    await self.health.set(service, status)
                if serving:
                    log.info("the state directory can be written again: serving")
                else:
                    log.error("NOT_SERVING: the state directory cannot be written (%s)", failure)


def build_app(cfg: ServerRunConfig) -> ServerApp:
    """Everything that can fail before a port is bound, then the bound server (not started).

    Must be called with a running event loop (grpc.aio binds to it). Raises ConfigError, DataError or
    CheckpointError with a one-line message.
    """
    s = cfg.server
    tokens = TokenStore.from_file(s.tokens_file) if s.tokens_file else None
    credentials = server_credentials(s.tls.cert, s.tls.key, s.tls.client_ca) if s.tls.cert else None
    use_threads(s.threads, "server.threads")
    spec = run_spec(cfg)
    check_spec(spec)  # a bad name, key or value fails before any data is read
    if Path(s.state_dir).exists() and not Path(s.state_dir).is_dir():
        raise ConfigError(f"server.state_dir {s.state_dir} is a file, not a directory")
    store = StateStore(s.state_dir) if s.durable else None
    if store is not None and store.holds_run() and not s.resume:
        raise ConfigError(
            f"server.state_dir {s.state_dir} holds a run: pass --resume (server.resume=true) to "
            "continue it, or choose another server.state_dir"
        )
    if store is not None and s.resume:
        store.check_resumable()  # never start over silently under a new run id

    parts = assemble(spec)
    initial = parts.initial
    max_upload = s.max_upload_bytes or 2 * encoded_size(initial, "fp32") + (1 << 20)
    settings = RuntimeSettings(
        stop=StopRules(s.max_versions, s.max_seconds),
        cadence=EvalCadence(s.eval_every),
        client_timeout=s.client_timeout,
        norm=NormBound(s.norm_bound, s.norm_action),
        shutdown_grace=s.shutdown_grace,
        dp_delta=s.dp_delta,
    )
    state_dir = Path(s.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / CONFIG_FILE).write_text(to_yaml(cfg))  # what ran, for fedhet report and for people
    sinks = open_sinks(cfg.tracking, state_dir, state_dir.name, flat_config(cfg))
    metrics = MetricsWriter(state_dir / "metrics.jsonl", sinks)
    coordinator = Coordinator(parts.strategy, initial, settings, store, metrics, parts.evaluator)
    if store is not None:
        if s.resume:
            coordinator.resume()
        coordinator.open()

    limit = s.chunk_bytes + _MESSAGE_SLACK
    options = [
        ("grpc.so_reuseport", 0),  # a second server on the same port fails to bind instead of splitting the clients
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    noisy = RateLimitedLog(log)
    server = aio.server(options=options, interceptors=[Gate(tokens, SERVICE_NAME, noisy, max_upload)])
    if s.max_inflight_bytes and s.max_inflight_bytes < max_upload:
        raise ConfigError(
            f"server.max_inflight_bytes ({s.max_inflight_bytes}) is below the largest upload ({max_upload} bytes): "
            "no upload could start"
        )
    limits = UploadLimits(
        s.max_concurrent_uploads, s.uploads_per_client, s.max_inflight_bytes or max(1 << 30, max_upload), s.read_timeout
    )
    servicer = FederatedLearningServicer(
        coordinator,
        tokens,
        s.encoding,
        s.chunk_bytes,
        max_upload,
        s.poll_timeout,
        s.heartbeat_seconds,
        len(parts.data.y_train),
        UploadSlots(limits),
        noisy,
    )
    service_pb2_grpc.add_FederatedLearningServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]  # the stubs predate grpc.aio
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    # server reflection: grpcurl, grpc_health_probe and other standard tools list and call the services unaided
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection((SERVICE_NAME, health_name, reflection.SERVICE_NAME), server)
    target = f"{s.address}:{s.port}" if ":" not in s.address else f"[{s.address.strip('[]')}]:{s.port}"
    try:
        port = server.add_secure_port(target, credentials) if credentials else server.add_insecure_port(target)
    except RuntimeError as error:
        raise ConfigError(f"cannot listen on {target}: {error}") from None
    if port == 0:
        raise ConfigError(f"cannot listen on {target} (address in use or not available)")

    def on_end(ended: RunEnded) -> None:
        log.info("run over: %s", ended.reason)

    coordinator.on_end = on_end
    return ServerApp(cfg, coordinator, servicer, server, port, health_servicer)


async def serve(cfg: ServerRunConfig) -> RunEnded:
    """Build and run the server of ``cfg`` until the run ends."""
    app = build_app(cfg)
    return await app.run(handle_signals=True)


def _error(message: str) -> int:
    print(f"fedhet server: error: {message}", file=sys.stderr)
    return 2


def main(args: list[str]) -> int:
    """``fedhet server [--resume] [--cfg job | --info | --help] [KEY=VALUE ...]``; returns the exit status."""

    def compose(overrides: list[str]) -> ServerRunConfig:
        return compose_server([*overrides, "server.resume=true"] if "--resume" in args else overrides)

    cfg = compose_command("server", USAGE, args, compose, extra_switches=["--resume"])
    if isinstance(cfg, int):
        return cfg
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        ended = asyncio.run(serve(cfg))
    except (ConfigError, DataError, CheckpointError) as error:
        return _error(str(error))
    except OSError as error:  # the state directory cannot be written at start (full disk, permissions)
        return _error(f"server.state_dir {cfg.server.state_dir}: {error.strerror or error}")
    except grpc.RpcError as error:  # pragma: no cover - a failure inside grpc itself
        return _error(f"gRPC failure: {error}")
    log.info("stopped: %s at version %d", ended.reason, ended.version)
    return 0
