"""In-process servers and scripted clients, for tests and benchmarks.

:func:`running_server` runs a built server on the current event loop; :class:`ScriptedClient` speaks the wire
protocol step by step (register, poll, upload exactly the bytes a test wants), so tests can send what a
misbehaving or malicious client would.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from grpc import aio

from fedhet.server.app import ServerApp, build_app
from fedhet.server.config import ServerRunConfig, compose_server
from fedhet.types import Weights
from fedhet.v1 import service_pb2 as spb
from fedhet.v1 import service_pb2_grpc
from fedhet.v1 import tensor_pb2 as tpb
from fedhet.v1.wire import PayloadAssembler, chunks, decode, encode

__all__ = [
    "Process",
    "ReceivedTask",
    "ScriptedClient",
    "free_port",
    "running_server",
    "spawn",
    "test_config",
    "wait_for_file",
]


def test_config(state_dir: str, *overrides: str) -> ServerRunConfig:
    """A small, fast server config on loopback (Synthetic with 4 partitions, logistic regression, FedAvg over
    every client, at least 3 a round, unless ``strategy=`` is overridden) with short timeouts; ``overrides`` are
    Hydra overrides applied last."""
    base = [
        "num_clients=4",
        "server.port=0",
        f"server.state_dir={state_dir}",
        "server.poll_timeout=0.5",
        "server.heartbeat_seconds=0.2",
        "server.client_timeout=2.0",
        "server.shutdown_grace=0.2",
        "server.threads=1",
    ]
    if not any(o.startswith("strategy=") for o in overrides):
        base += ["strategy.scheduler.fraction=1.0", "strategy.scheduler.min_clients=3"]
    return compose_server([*base, *overrides])


test_config.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


@contextlib.asynccontextmanager
async def running_server(cfg: ServerRunConfig) -> AsyncIterator[ServerApp]:
    """Build and start the server of ``cfg`` on this loop; on exit end the run and wait for it to stop."""
    app = build_app(cfg)
    task = asyncio.create_task(app.run())
    try:
        await asyncio.wait_for(app.started.wait(), timeout=30)
        yield app
    finally:
        if app.coordinator.ended is None:
            app.coordinator.request_stop("test over")
        await asyncio.wait_for(task, timeout=30)


@dataclass
class ReceivedTask:
    """A task as a client received it."""

    header: spb.TaskHeader
    weights: dict[str, torch.Tensor]


class ScriptedClient:
    """One client over a grpc.aio channel, driven call by call."""

    def __init__(
        self,
        target: str,
        client_id: int,
        token: str = "",
        credentials: grpc.ChannelCredentials | None = None,
        server_name: str = "",
    ) -> None:
        options: list[tuple[str, int | str]] = [
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
        ]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        self.channel = (
            aio.secure_channel(target, credentials, options=options)
            if credentials is not None
            else aio.insecure_channel(target, options=options)
        )
        self.stub = service_pb2_grpc.FederatedLearningStub(self.channel)  # type: ignore[no-untyped-call]
        self.client_id = client_id
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self.chunk_bytes = 1 << 20

    async def close(self) -> None:
        await self.channel.close(None)

    async def register(self, num_samples: int = 50, seconds_per_sample: float = 0.001) -> spb.RegisterReply:
        reply: spb.RegisterReply = await self.stub.Register(
            spb.RegisterRequest(
                client_id=self.client_id,
                num_samples=num_samples,
                profile=spb.ClientProfile(seconds_per_sample=seconds_per_sample, bandwidth=1e7, bitwidth=32),
            ),
            metadata=self.metadata,
            timeout=10,
        )
        self.chunk_bytes = int(reply.chunk_bytes)
        return reply

    async def poll(self) -> ReceivedTask | spb.TaskMessage:
        """One GetTask: the task (assembled and decoded), or the idle / run_over message."""
        call = self.stub.GetTask(spb.GetTaskRequest(client_id=self.client_id), metadata=self.metadata, timeout=30)
        first: spb.TaskMessage | None = None
        assembler: PayloadAssembler | None = None
        message: spb.TaskMessage
        async for message in call:
            if first is None:
                first = message
                if message.WhichOneof("kind") != "header":
                    return message
                assembler = PayloadAssembler(message.header.manifest, 1 << 34)
            else:
                assert assembler is not None
                assembler.add(message.chunk)
        assert first is not None and assembler is not None, "GetTask answered nothing"
        return ReceivedTask(first.header, decode(first.header.manifest, assembler.finish()))

    async def poll_task(self, attempts: int = 20) -> ReceivedTask:
        """Poll until a task comes (at most ``attempts`` polls)."""
        for _ in range(attempts):
            got = await self.poll()
            if isinstance(got, ReceivedTask):
                return got
            if got.WhichOneof("kind") == "run_over":
                raise AssertionError("the run is over")
        raise AssertionError(f"no task after {attempts} polls")

    def header(self, task: spb.TaskHeader, manifest: tpb.Manifest, num_samples: int = 50) -> spb.ResultHeader:
        return spb.ResultHeader(
            client_id=self.client_id,
            task_id=task.task_id,
            version=task.version,
            num_samples=num_samples,
            local_steps=task.local_steps or 1,
            train_seconds=0.01,
            loss=0.5,
            manifest=manifest,
        )

    async def upload_messages(
        self, messages: Iterator[spb.ResultMessage] | AsyncIterator[spb.ResultMessage]
    ) -> spb.UploadReply:
        reply: spb.UploadReply = await self.stub.UploadResult(messages, metadata=self.metadata, timeout=30)
        return reply

    async def upload(
        self, task: spb.TaskHeader, weights: Weights, num_samples: int = 50, encoding: str = "fp32"
    ) -> spb.UploadReply:
        """Upload ``weights`` as the result of ``task`` in chunks of the server's size."""
        manifest, payload = encode(weights, encoding)
        header = self.header(task, manifest, num_samples)
        messages = [spb.ResultMessage(header=header)] + [
            spb.ResultMessage(chunk=c) for c in chunks(payload, self.chunk_bytes)
        ]
        return await self.upload_messages(iter(messages))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Process:
    """A child process with its log file."""

    popen: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL, if it still runs."""
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=10)


def spawn(module: str, args: list[str], log: Path, cwd: Path) -> Process:
    """``python -m module args...`` with stdout and stderr to ``log``."""
    with log.open("ab") as out:
        popen = subprocess.Popen([sys.executable, "-m", module, *args], stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
    return Process(popen, log)


def wait_for_file(path: Path, timeout: float, process: Process | None = None) -> str:
    """The text of ``path`` once it exists and is not empty; fails after ``timeout`` seconds or if ``process``
    exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size:
            return path.read_text()
        if process is not None and process.popen.poll() is not None:
            raise AssertionError(f"process exited with {process.popen.returncode}:\n{process.text()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"{path} did not appear within {timeout} s")
