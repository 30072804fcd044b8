"""``fedhet client``: one device in a deployed run.

It measures its profile (or takes it from config), registers, long-polls for tasks, trains each on its local
partition (dataset + partition id, configured here; only the sample count goes to the server), streams the result
back in chunks, sends heartbeats while it trains, reconnects with exponential backoff when the server goes away,
and exits 0 when the server says the run is over.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import grpc
import torch

from fedhet import quant
from fedhet.clients.config import (
    ClientRunConfig,
    LocalData,
    NetworkConfig,
    compose_client,
    local_partition,
    privacy_of,
)
from fedhet.clients.personal import FineTune, PersonalProbe
from fedhet.clients.probe import detect_memory_bytes, measure_seconds_per_sample
from fedhet.clients.quantized import QuantizedTrainer
from fedhet.clients.trainer import (
    ClientState,
    ClientStates,
    ClientTrainer,
    LocalTrainer,
    PrivacyConfig,
    TrainConfig,
    check_max_layer_params,
)
from fedhet.codec import CodecError, encoding_for_bitwidth
from fedhet.commandline import compose_command
from fedhet.errors import ConfigError, DataError
from fedhet.models import build_model, dp_incompatible
from fedhet.threads import use_threads
from fedhet.types import ClientProfile, Result, Task
from fedhet.updates import UpdateError, check_finite
from fedhet.v1 import service_pb2 as spb
from fedhet.v1 import service_pb2_grpc
from fedhet.v1 import tensor_pb2 as tpb
from fedhet.v1.wire import PayloadAssembler, PayloadError, chunks, decode, encode

__all__ = ["NetworkClient", "build_client", "client_main"]

log = logging.getLogger("fedhet.client")

_MAX_MESSAGE = (64 << 20) + (1 << 20)  # the largest chunk a server may use, plus its header


class GiveUp(Exception):
    """The server stayed unreachable past the reconnect timeout."""


class Permanent(Exception):
    """An error no retry mends (a TLS certificate the client does not trust, a server model that is not the
    client's): the client stops at once with a non-zero status."""


_TLS_FAILURES = ("certificate", "ssl", "handshake", "tls")  # in an UNAVAILABLE status's details


class Backoff:
    """Exponential backoff with jitter, giving up ``timeout`` seconds after the first failure since a success."""

    def __init__(self, initial: float, maximum: float, timeout: float) -> None:
        self.initial, self.maximum, self.timeout = initial, maximum, timeout
        self._failures = 0
        self._since: float | None = None

    def reset(self) -> None:
        self._failures = 0
        self._since = None

    def wait(self, reason: str) -> None:
        now = time.monotonic()
        if self._since is None:
            self._since = now
        if now - self._since > self.timeout:
            raise GiveUp(f"server unreachable for {now - self._since:.0f} s ({reason})")
        delay = min(self.maximum, self.initial * 2**self._failures) * random.uniform(0.5, 1.0)
        self._failures += 1
        log.info("%s; retrying in %.2f s", reason, delay)
        time.sleep(delay)


class NetworkClient:
    """The client loop. ``run()`` returns the exit status: 0 when the run ended (or ``max_seconds`` passed),
    1 when the server stayed unreachable, 2 when the server refused this client's credentials.

    Tasks train at the profile's bitwidth with ``trainer`` (a :class:`~fedhet.clients.trainer.ClientTrainer`; a
    plain trainer trains at 32 bits only) and results travel at :func:`~fedhet.codec.encoding_for_bitwidth`:
    packed ``int<b>`` below 32 bits, ``net.encoding`` at 32. Raises ValueError for a bitwidth the trainer cannot
    train at."""

    def __init__(
        self,
        net: NetworkConfig,
        trainer: ClientTrainer | LocalTrainer,
        x: torch.Tensor,
        y: torch.Tensor,
        profile: ClientProfile,
        seed: int = 0,
        slowdown: float = 1.0,
        initial: dict[str, torch.Tensor] | None = None,
        state_dir: str = "",
        personal: PersonalProbe | None = None,
    ) -> None:
        self.net = net
        self.trainer = trainer if isinstance(trainer, ClientTrainer) else ClientTrainer(trainer)
        self.trainer.check([profile.bitwidth])
        self.encoding = encoding_for_bitwidth(profile.bitwidth, net.encoding)
        # what the client keeps between tasks: its own tensors start from the initial model (the server's version 0);
        # without one (a trainer that holds no model, such as Flower's NumPyClient adapter) it keeps no tensors
        self.states = ClientStates(initial if initial is not None else {})
        self.shapes = {k: tuple(v.shape) for k, v in (initial or {}).items()}  # the local model's, to check tasks
        self.state_file = Path(state_dir) / f"client{net.client_id}.state" if state_dir else None
        if self.state_file is not None and self.state_file.exists():
            self.states.states[net.client_id] = ClientState.from_bytes(self.state_file.read_bytes())
            log.info("client %d: state restored from %s", net.client_id, self.state_file)
        self._dp_reports: dict[int, spb.DPReport] = {}
        self.personal = personal
        self._personal: dict[int, float] = {}  # task id -> personalised accuracy measured when it arrived
        self.x, self.y = x, y
        self.profile = profile
        self.seed = seed
        self.slowdown = slowdown
        token = net.token or (Path(net.token_file).read_text().strip() if net.token_file else "")
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self.channel = _channel(net)
        self.stub = service_pb2_grpc.FederatedLearningStub(self.channel)  # type: ignore[no-untyped-call]
        self.chunk_bytes = 1 << 20
        self.heartbeat_seconds = 5.0
        self.over = threading.Event()
        self.tasks_done = 0

    @property
    def client_id(self) -> int:
        return self.net.client_id

    def run(self) -> int:
        backoff = Backoff(self.net.backoff_initial, self.net.backoff_max, self.net.reconnect_timeout)
        stop_at = time.monotonic() + self.net.max_seconds if self.net.max_seconds else float("inf")
        registered = False
        pending: Result | None = None  # trained, not yet acknowledged
        try:
            while time.monotonic() < stop_at and not self.over.is_set():
                try:
                    if not registered:
                        self._register()
                        registered = True
                        if self.over.is_set():
                            break
                    if pending is not None:
                        pending = self._upload(pending)
                        backoff.reset()
                        continue
                    task = self._poll()
                    backoff.reset()
                    if task is not None:
                        pending = self._train(task)
                except grpc.RpcError as error:
                    code, details = error.code(), error.details() or ""
                    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                        log.error("server refused client %d: %s %s", self.client_id, code.name, details)
                        return 2
                    if code == grpc.StatusCode.UNAVAILABLE and any(w in details.lower() for w in _TLS_FAILURES):
                        raise Permanent(f"TLS with {self.net.server} failed (check network.tls.*): {details}") from None
                    if code == grpc.StatusCode.FAILED_PRECONDITION and "not registered" in details:
                        registered = False
                        continue
                    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith("server busy"):
                        backoff.wait(f"server busy: {details}")
                        continue
                    registered = False  # the server may have restarted: register again
                    backoff.wait(f"{code.name}: {details}")
            self._leave()
            return 0
        except GiveUp as error:
            log.error("client %d: %s", self.client_id, error)
            return 1
        except Permanent as error:
            log.error("client %d stops: %s", self.client_id, error)
            return 2
        finally:
            self.channel.close()

    def _register(self) -> None:
        p = self.profile
        reply = self.stub.Register(
            spb.RegisterRequest(
                client_id=self.client_id,
                profile=spb.ClientProfile(
                    seconds_per_sample=p.seconds_per_sample,
                    bandwidth=p.bandwidth,
                    bitwidth=p.bitwidth,
                    memory_bytes=p.memory_bytes,
                ),
                num_samples=len(self.x),
            ),
            metadata=self.metadata,
            timeout=self.net.rpc_timeout,
        )
        self.chunk_bytes = int(reply.chunk_bytes) or self.chunk_bytes
        self.heartbeat_seconds = reply.heartbeat_seconds or self.heartbeat_seconds
        if reply.run_over:
            self.over.set()
        log.info("client %d registered with run %s at version %d", self.client_id, reply.run_id, reply.version)

    def _poll(self) -> Task | None:
        """One long poll: a task, or None (idle, or the run is over: ``self.over`` is set)."""
        stream = self.stub.GetTask(
            spb.GetTaskRequest(client_id=self.client_id), metadata=self.metadata, timeout=self.net.rpc_timeout
        )
        messages: Iterator[spb.TaskMessage] = iter(stream)
        first = next(messages, None)
        if first is None:
            return None
        kind = first.WhichOneof("kind")
        if kind == "run_over":
            log.info("run over at version %d (%s)", first.run_over.version, first.run_over.reason)
            self.over.set()
            return None
        if kind != "header":
            return None
        header = first.header
        assembler = PayloadAssembler(header.manifest, self.net.max_download_bytes)
        try:
            for message in messages:
                if message.WhichOneof("kind") != "chunk":
                    raise PayloadError("task stream carries a non-chunk message after its header")
                assembler.add(message.chunk)
            weights = decode(header.manifest, assembler.finish())
            check_finite(weights)
        except UpdateError as error:
            log.warning("task %d: bad download (%s); asking again", header.task_id, error)
            stream.cancel()
            return None
        sparse = frozenset(s.name for s in header.manifest.tensors if s.encoding == tpb.ENCODING_SPARSE)
        try:
            task = Task(
                header.task_id,
                self.client_id,
                header.version,
                weights,
                header.local_steps,
                header.local_epochs,
                frozenset(header.train),
                sparse,
                header.proximal_mu,
                train_all=header.train_all,
            )
        except ValueError as error:
            log.warning("task %d: bad task (%s); asking again", header.task_id, error)
            return None
        prox = f", FedProx mu {task.proximal_mu:g}" if task.proximal_mu else ""
        prox += ", trains every received layer" if task.train_all else ""
        log.info("task %d received (version %d%s)", header.task_id, header.version, prox)
        return task

    def _train(self, task: Task) -> Result | None:
        """Train ``task`` while a thread sends heartbeats; None when the run ended meanwhile or the task is bad."""
        stop = threading.Event()

        def beat() -> None:
            request = spb.HeartbeatRequest(client_id=self.client_id, task_id=task.task_id, version=task.version)
            while not stop.wait(self.heartbeat_seconds):
                try:
                    reply = self.stub.Heartbeat(request, metadata=self.metadata, timeout=10.0)
                except grpc.RpcError:
                    continue  # the main loop handles reconnection once training is done
                if reply.run_over:
                    self.over.set()

        self._check_fits(task)
        thread = threading.Thread(target=beat, name=f"heartbeat-{self.client_id}", daemon=True)
        thread.start()
        try:
            state = self.states.get(self.client_id, task)
            if self.personal is not None and state.tensors:  # a personal head (FedP3): measure the task's model
                accuracy = self._personal[task.task_id] = self.personal(task.weights, state.tensors, task.task_id)
                log.info(
                    "task %d: personal accuracy %.4f (version %d with this client's head)",
                    task.task_id,
                    accuracy,
                    task.version,
                )
            result: Result = self.trainer.train(task, self.x, self.y, self.seed, self.profile.bitwidth, state)
            self._keep(state)
            if self.trainer.privacy is not None:
                rate = PrivacyConfig.sample_rate(self.trainer.config.batch_size, len(self.x))
                self._dp_reports[task.task_id] = spb.DPReport(
                    noise_multiplier=state.noise_multiplier, sample_rate=rate, steps=result.local_steps
                )
            seconds = result.train_seconds
            if self.slowdown > 1.0:  # pace the task to the profile's speed, emulating a slower device
                samples = result.local_steps * min(self.trainer.config.batch_size, len(self.x))
                seconds = max(seconds, samples * self.profile.seconds_per_sample)
                self.over.wait(seconds - result.train_seconds)
        except (RuntimeError, ValueError) as error:  # e.g. weights that do not fit the local model
            log.warning("task %d: cannot train: %s", task.task_id, error)
            return None
        finally:
            stop.set()
            thread.join(timeout=15.0)
        if self.over.is_set():
            return None
        if math.isnan(result.loss):  # DIVERGED: the server would refuse it (and NaN weights cannot be packed)
            log.warning("task %d: local training diverged (NaN or Inf); no update sent, asking again", task.task_id)
            return None
        self.tasks_done += 1
        return replace(result, train_seconds=seconds)

    def _check_fits(self, task: Task) -> None:
        """Raise :class:`Permanent` when ``task``'s weights are not the local model's tensors (the server runs
        another model: every task would fail the same way)."""
        if not self.shapes:  # a trainer that holds no model of its own (a wrapped NumPyClient)
            return
        for name, tensor in task.weights.items():
            if name not in self.shapes:
                raise Permanent(
                    f"task {task.task_id}: the server's model has a tensor {name!r} this client's model lacks: "
                    "start both with the same model.* settings"
                )
            if tuple(tensor.shape) != self.shapes[name]:
                raise Permanent(
                    f"task {task.task_id}: the server's model has {name!r} of shape {tuple(tensor.shape)}, this "
                    f"client's {self.shapes[name]}: start both with the same model.* and dataset.* settings"
                )

    def _keep(self, state: ClientState) -> None:
        """Write the client's state to its file (atomically) when it has one."""
        if self.state_file is None:
            return
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        partial = self.state_file.with_suffix(".partial")
        partial.write_bytes(state.to_bytes())
        partial.replace(self.state_file)

    def _upload(self, result: Result) -> Result | None:
        """Stream ``result``; None once the server answered for it (accepted, duplicate or refused for good), or
        when it cannot be encoded (inf or NaN weights to pack)."""
        try:
            manifest, payload = encode(result.weights, self.encoding)
        except UpdateError as error:
            log.warning("task %d: result dropped: %s", result.task_id, error)
            self._forget(result.task_id)
            return None
        header = spb.ResultHeader(
            client_id=self.client_id,
            task_id=result.task_id,
            version=result.version,
            num_samples=result.num_samples,
            local_steps=result.local_steps,
            train_seconds=result.train_seconds,
            loss=result.loss,
            manifest=manifest,
            dp=self._dp_reports.get(result.task_id),
            personal_accuracy=self._personal.get(result.task_id),
        )

        def messages() -> Iterator[spb.ResultMessage]:
            yield spb.ResultMessage(header=header)
            for chunk in chunks(payload, self.chunk_bytes):
                yield spb.ResultMessage(chunk=chunk)

        try:
            reply = self.stub.UploadResult(messages(), metadata=self.metadata, timeout=self.net.rpc_timeout)
        except grpc.RpcError as error:
            if error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION) or (
                error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                and not (error.details() or "").startswith("server busy")
            ):
                log.warning("task %d: result refused: %s %s", result.task_id, error.code().name, error.details())
                self._forget(result.task_id)
                return None
            raise
        if reply.run_over:
            self.over.set()
        fate = "a duplicate" if reply.duplicate else "dropped by the server (too late)" if reply.dropped else "applied"
        log.info(
            "task %d uploaded at %s, %d bytes, %s; global version %d",
            result.task_id,
            self.encoding,
            len(payload),
            fate,
            reply.version,
        )
        self._forget(result.task_id)
        return None

    def _forget(self, task_id: int) -> None:
        """Drop what was measured for a task whose result the server answered (or that was dropped)."""
        self._dp_reports.pop(task_id, None)
        self._personal.pop(task_id, None)

    def _leave(self) -> None:
        with contextlib.suppress(grpc.RpcError):  # the server may already be gone: leaving is a courtesy
            self.stub.Leave(spb.LeaveRequest(client_id=self.client_id), metadata=self.metadata, timeout=5.0)


def _channel(net: NetworkConfig) -> grpc.Channel:
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", _MAX_MESSAGE),
        ("grpc.max_send_message_length", _MAX_MESSAGE),
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.enable_retries", 0),
    ]
    tls = net.tls
    if tls.ca or tls.cert:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=Path(tls.ca).read_bytes() if tls.ca else None,
            private_key=Path(tls.key).read_bytes() if tls.key else None,
            certificate_chain=Path(tls.cert).read_bytes() if tls.cert else None,
        )
        if tls.server_name:
            options.append(("grpc.ssl_target_name_override", tls.server_name))
        return grpc.secure_channel(net.server, credentials, options=options)
    return grpc.insecure_channel(net.server, options=options)


def personal_probe(cfg: ClientRunConfig, data: LocalData) -> PersonalProbe | None:
    """How this client measures its personalised accuracy when it keeps a personal head (FedP3); None without
    held-out samples or a Linear head to fine-tune."""
    model = build_model(cfg.model, data.input_shape, data.num_classes, cfg.seed, cfg.model.dp_compatible)
    tune = FineTune(cfg.finetune_epochs, cfg.train.lr, cfg.train.batch_size)
    try:
        return PersonalProbe(model, (data.x, data.y), (data.x_held, data.y_held), tune, cfg.seed)
    except ValueError as error:
        log.info("client %d: no personalised accuracy: %s", cfg.network.client_id, error)
        return None


def _training_mode(config: TrainConfig) -> str:
    if config.low_bit_weights:
        return ", weights held at that bitwidth while training (stochastic rounding)"
    return ", quantization-aware training on an fp32 master copy"


def build_client(cfg: ClientRunConfig) -> NetworkClient:
    """Load the local partition, build the model and trainer, measure the profile, open the channel."""
    use_threads(cfg.threads, "threads")
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device is {cfg.device} but torch sees no CUDA device; use device=cpu")
    data = local_partition(cfg)
    x, y = data.x, data.y
    model = build_model(cfg.model, data.input_shape, data.num_classes, cfg.seed, cfg.model.dp_compatible)
    incompatible = dp_incompatible(model)
    if cfg.privacy.enabled and incompatible:
        raise ConfigError(
            f"privacy.enabled: model {cfg.model.label} has layers DP-SGD cannot train ({incompatible}); set "
            "model.dp_compatible=true on this client and on the server (Opacus replaces them by GroupNorm)"
        )
    try:
        check_max_layer_params(model, cfg.privacy.max_layer_params if cfg.privacy.enabled else 0)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}  # version 0: own tensors start here
    prof = cfg.profile
    config = TrainConfig(**asdict(cfg.train))
    local = LocalTrainer(model, config, device, privacy_of(cfg))
    quantized = QuantizedTrainer(model, config, device) if prof.bitwidth != quant.FULL_PRECISION else None
    trainer = ClientTrainer(local, quantized)
    seconds = prof.seconds_per_sample or measure_seconds_per_sample(local, x, y, prof.benchmark_steps)
    profile = ClientProfile(
        seconds_per_sample=seconds * prof.slowdown,
        bandwidth=prof.bandwidth,
        bitwidth=prof.bitwidth,
        memory_bytes=prof.memory_bytes or detect_memory_bytes(device),
    )
    log.info(
        "client %d: partition %d (%d samples), %.3g s/sample, %d bits (uploads at %s)%s",
        cfg.network.client_id,
        cfg.partition_id,
        len(x),
        profile.seconds_per_sample,
        profile.bitwidth,
        encoding_for_bitwidth(profile.bitwidth, cfg.network.encoding),
        _training_mode(config) if quantized is not None else "",
    )
    try:
        return NetworkClient(
            cfg.network,
            trainer,
            x,
            y,
            profile,
            cfg.seed,
            prof.slowdown,
            initial,
            cfg.state_dir,
            personal_probe(cfg, data),
        )
    except (CodecError, OSError) as error:
        raise ConfigError(f"state_dir: cannot restore the client's state: {error}") from None


USAGE = """usage: fedhet client [KEY=VALUE ...]

Runs one client of a deployed run (config: configs/client.yaml; groups dataset, model).
Examples: fedhet client network.server=127.0.0.1:50051 network.client_id=3 partition_id=3
          fedhet client network.server=fl.example.org:443 network.tls.ca=ca.pem network.token_file=token.txt"""


def _error(message: str) -> int:
    print(f"fedhet client: error: {message}", file=sys.stderr)
    return 2


def client_main(args: list[str]) -> int:
    """``fedhet client [--cfg job | --info | --help] [KEY=VALUE ...]``; returns the exit status."""
    cfg = compose_command("client", USAGE, args, compose_client)
    if isinstance(cfg, int):
        return cfg
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        client = build_client(cfg)
    except (ConfigError, DataError) as error:
        return _error(str(error))
    return client.run()


if __name__ == "__main__":
    sys.exit(client_main(sys.argv[1:]))
