"""Soak test of ``fedhet server`` (issue 16): hundreds of asynchronous clients for minutes, random SIGKILLs of the
server and of client processes, a few malicious clients; does the server stay up, flat and exact?

What runs (all on 127.0.0.1):

* the server: a real ``python -m fedhet.server`` process (FedBuff on the 2NN and Fashion-MNIST by default, durable,
  with per-client tokens), restarted with ``--resume`` on the same port after every SIGKILL;
* honest clients: asyncio clients, ``--clients`` of them spread over ``--workers`` processes (at nice 10, so on a
  shared machine the server and the health probe get the CPU first, as with clients on devices). Each speaks the wire
  protocol as ``fedhet client`` does (Register, GetTask, heartbeats while it "trains", UploadResult of the task's
  weights plus small noise, encoded with ``fedhet.v1.wire``), backs off and retries on UNAVAILABLE, re-sends a result
  whose acknowledgement it missed, and appends every reply it gets to ``OUT/replies/client<id>.jsonl``;
* malicious clients: one more process whose clients send garbage bytes, NaN and absurd updates, absurd fields,
  idle upload streams, oversized declarations, other clients' ids and calls without a valid token; each call's
  status goes to ``OUT/malicious.jsonl``;
* chaos: the server and a random honest worker are each SIGKILLed about every ``--kill-every`` seconds (uniformly in
  2/3 to 4/3 of it, none in the last 45 s) and restarted at once.

Measured: versions/s; the server's RSS every 2 s (following restarts); gRPC health-check latency 10 times a second
(a check that spans a kill or a restart counts as downtime, not latency; one that fails while the server is up
counts as a 1 s latency); at the end, after a clean stop, lost and doubled updates from the clients' reply logs
against the server's own final state (its checkpoint and write-ahead log, read with ``fedhet.server``'s readers):

* lost: results a client was told were taken in (applied, or a duplicate of one taken in) that the final state's
  accepted results do not hold, plus accepted results the strategy's counts do not account for;
* doubled: results acknowledged as applied twice, plus strategy counts (applied + dropped + buffered) above the
  number of distinct accepted results.

RSS is reported per minute of run time ("minute 2" = the largest sample in 60..120 s). Goals (the issue's):
RSS after minute 2 within 1.2x its value in minute 2; health p50 < 10 ms and p99 < 100 ms;
0 lost; 0 doubled. A summary and one JSON line close the output; everything else is under ``--out``.

    python benchmarks/soak.py                                   # 300 clients, 10 minutes
    python benchmarks/soak.py --minutes 2 --clients 60 --workers 2 --kill-every 40
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedhet.server.persistence import StateStore
from fedhet.strategies.staleness import StalenessBuffer
from fedhet.updates import UpdateError
from fedhet.v1 import service_pb2 as spb
from fedhet.v1 import service_pb2_grpc
from fedhet.v1.wire import PayloadAssembler, chunks, decode, encode

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.use_local_subchannel_pool", 1),  # every client its own connection, as separate devices would have
    ("grpc.max_receive_message_length", 65 << 20),
    ("grpc.max_send_message_length", 65 << 20),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 0),
    # reconnect within a second of a restarted server (gRPC's default backoff grows to two minutes)
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
RPC_SECONDS = 10.0  # unary calls
POLL_SECONDS = 40.0  # a GetTask long poll (the server answers idle after its poll_timeout, 10 s)
UPLOAD_SECONDS = 60.0
PENDING_SECONDS = 180.0  # a result not acknowledged within this is given up ("abandoned", not counted as sent)
CLIENT_NICE = 10  # client processes yield the CPU to the server and the probe, as clients on other machines would
START_SPREAD = 10.0  # clients start uniformly within this many seconds
MALICIOUS_BASE = 1_000_000  # client ids of the malicious clients start here
HEALTH_PERIOD = 0.1
HEALTH_TIMEOUT = 1.0
RSS_PERIOD = 2.0
PROGRESS_PERIOD = 30.0
QUIET_TAIL = 45.0  # no kills in the last seconds of a run, so it ends settled
SERVER_START_SECONDS = 180.0
STOP_SECONDS = 90.0  # longest the server may take to stop after SIGTERM
WORKER_STOP_SECONDS = 15.0


# ------------------------------------------------------------------ shared plan
@dataclass(frozen=True)
class Plan:
    """What every process of a soak needs to know (``OUT/plan.json``).

    Attributes:
        out: the output folder.
        seed: seeds every random choice (a restarted worker draws from a new stream).
        clients: honest clients, ids ``0 .. clients - 1``.
        workers: processes the honest clients are spread over.
        malicious: malicious clients (one more process), ids from ``MALICIOUS_BASE``.
        compute: seconds a task "trains": each client's mean is drawn in this range, each task within +-50% of it.
        noise: standard deviation of the noise added to each weight of an honest update.
    """

    out: str
    seed: int
    clients: int
    workers: int
    malicious: int
    compute: tuple[float, float]
    noise: float

    @classmethod
    def load(cls, path: Path) -> Plan:
        data = json.loads(path.read_text())
        return cls(**{**data, "compute": tuple(data["compute"])})

    def honest_ids(self, worker: int) -> range:
        return range(worker * self.clients // self.workers, (worker + 1) * self.clients // self.workers)

    def token(self, client_id: int) -> str:
        """Client ``client_id``'s token (derived, so no process needs the tokens file but the server)."""
        return hashlib.sha256(f"soak-{self.seed}-{client_id}".encode()).hexdigest()[:32]

    def metadata(self, client_id: int) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token(client_id)}"),)


def sleep_or_stop(stop: asyncio.Event, seconds: float) -> Awaitable[bool]:
    """Sleep ``seconds``; True when ``stop`` was set meanwhile."""

    async def wait() -> bool:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, seconds))
        return stop.is_set()

    return wait()


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


class Address:
    """The server's address as the orchestrator last published it in ``OUT/addr`` (read at most every 0.5 s)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._target = ""
        self._read_at = -math.inf

    def current(self) -> str:
        now = time.monotonic()
        if now - self._read_at >= 0.5:
            self._read_at = now
            with contextlib.suppress(OSError):
                self._target = self.path.read_text().strip() or self._target
        return self._target


class Link:
    """One client's channel, reopened when the server's published address changes."""

    def __init__(self, address: Address) -> None:
        self.address = address
        self.target = ""
        self.channel: aio.Channel | None = None
        self._stub: Any = None

    async def stub(self) -> Any:
        target = self.address.current()
        if self.channel is None or target != self.target:
            await self.close()
            self.channel = aio.insecure_channel(target, options=CHANNEL_OPTIONS)
            self._stub = service_pb2_grpc.FederatedLearningStub(self.channel)  # type: ignore[no-untyped-call]
            self.target = target
        return self._stub

    async def close(self) -> None:
        if self.channel is not None:
            channel, self.channel = self.channel, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(channel.close(None), 5.0)


@dataclass
class Received:
    """A task as a client received it."""

    header: spb.TaskHeader
    weights: dict[str, torch.Tensor]


class RunOver(Exception):
    """The server says the run is over."""


async def receive_task(stub: Any, client_id: int, metadata: tuple[tuple[str, str], ...]) -> Received | None:
    """One long poll: the task, or None when the server answered idle. Raises RunOver, or aio.AioRpcError."""
    call = stub.GetTask(spb.GetTaskRequest(client_id=client_id), metadata=metadata, timeout=POLL_SECONDS)
    header: spb.TaskHeader | None = None
    assembler: PayloadAssembler | None = None
    async for message in call:
        kind = message.WhichOneof("kind")
        if kind == "run_over":
            raise RunOver(message.run_over.reason)
        if kind == "idle":
            return None
        if kind == "header":
            header = message.header
            assembler = PayloadAssembler(header.manifest, 1 << 30)
        elif assembler is not None:
            assembler.add(message.chunk)
    if header is None or assembler is None:
        return None
    return Received(header, decode(header.manifest, assembler.finish()))


def upload_messages(header: spb.ResultHeader, payload: bytes, chunk_bytes: int = 1 << 20) -> list[spb.ResultMessage]:
    return [spb.ResultMessage(header=header), *(spb.ResultMessage(chunk=c) for c in chunks(payload, chunk_bytes))]


# ------------------------------------------------------------------ honest clients
@dataclass
class Tally:
    """What one worker's honest clients saw (``OUT/stats/<worker>.<generation>.json``, rewritten every 5 s)."""

    fates: Counter[str] = field(default_factory=Counter)  # applied, dropped, duplicate, refused, abandoned
    errors: Counter[str] = field(default_factory=Counter)  # status codes of failed calls (retried)
    refusals: Counter[str] = field(default_factory=Counter)  # status and reason of refused honest results
    version: int = 0  # the newest global version a reply named

    def to_json(self) -> str:
        return json.dumps(
            {"fates": self.fates, "errors": self.errors, "refusals": self.refusals, "version": self.version}
        )


@dataclass
class Pending:
    """A trained result not yet acknowledged."""

    task_id: int
    version: int
    messages: list[spb.ResultMessage]
    give_up_at: float


class HonestClient:
    """Register, poll, "train" (sleep, with heartbeats), upload the task's weights plus noise; again and again."""

    def __init__(self, client_id: int, plan: Plan, address: Address, tally: Tally, rng: random.Random) -> None:
        self.client_id = client_id
        self.plan = plan
        self.link = Link(address)
        self.tally = tally
        self.rng = rng
        self.generator = torch.Generator().manual_seed(rng.getrandbits(62))
        self.metadata = plan.metadata(client_id)
        device = random.Random(f"{plan.seed}-client-{client_id}")  # the same after a restart, as a device's data
        self.samples = device.randint(50, 200)
        self.speed = device.uniform(*plan.compute)  # this client's mean seconds per task
        self.heartbeat_seconds = 5.0
        self.chunk_bytes = 1 << 20
        self.replies = (Path(plan.out) / "replies" / f"client{client_id}.jsonl").open("a", encoding="utf-8")

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await self._loop(stop)
        except RunOver:
            return  # the server said the run is over: this client is done
        finally:
            self.replies.close()
            await self.link.close()

    async def _loop(self, stop: asyncio.Event) -> None:
        if await sleep_or_stop(stop, self.rng.uniform(0.0, START_SPREAD)):
            return
        registered = False
        pending: Pending | None = None
        failures = 0
        while not stop.is_set():
            try:
                if not registered:
                    await self._register()
                    registered = True
                elif pending is not None:
                    await self._upload(pending)
                    pending = None
                else:
                    task = await self._poll()
                    if task is not None:
                        pending = await self._train(task, stop)
                failures = 0
            except aio.AioRpcError as error:
                code, details = error.code(), error.details() or ""
                self.tally.errors[code.name] += 1
                busy = code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith("server busy")
                registered = registered and busy  # anything else may be a restarted server: register again
                failures += 1
                delay = min(5.0, 0.2 * 2 ** min(failures, 5)) * self.rng.uniform(0.5, 1.0)
                await sleep_or_stop(stop, delay)
            if pending is not None and time.monotonic() > pending.give_up_at:
                self._note(pending, "abandoned")
                pending = None

    async def _register(self) -> None:
        stub = await self.link.stub()
        reply = await stub.Register(
            spb.RegisterRequest(
                client_id=self.client_id,
                profile=spb.ClientProfile(seconds_per_sample=self.speed / 1000, bandwidth=1e7, bitwidth=32),
                num_samples=self.samples,
            ),
            metadata=self.metadata,
            timeout=RPC_SECONDS,
        )
        self.heartbeat_seconds = reply.heartbeat_seconds or self.heartbeat_seconds
        self.chunk_bytes = int(reply.chunk_bytes) or self.chunk_bytes
        if reply.run_over:
            raise RunOver("at registration")

    async def _poll(self) -> Received | None:
        try:
            return await receive_task(await self.link.stub(), self.client_id, self.metadata)
        except UpdateError as error:  # a corrupted download: ask again (the server hands out a new task)
            self.tally.errors[f"bad download: {type(error).__name__}"] += 1
            return None

    async def _train(self, task: Received, stop: asyncio.Event) -> Pending | None:
        start = time.monotonic()
        end = start + self.speed * self.rng.uniform(0.5, 1.5)
        beat = spb.HeartbeatRequest(client_id=self.client_id, task_id=task.header.task_id, version=task.header.version)
        while (left := end - time.monotonic()) > 0:
            if await sleep_or_stop(stop, min(left, self.heartbeat_seconds)):
                return None
            if time.monotonic() < end:
                with contextlib.suppress(aio.AioRpcError):  # as fedhet client: the main loop handles reconnection
                    await (await self.link.stub()).Heartbeat(beat, metadata=self.metadata, timeout=RPC_SECONDS)
        weights = {
            k: v + self.plan.noise * torch.randn(v.shape, generator=self.generator) if v.is_floating_point() else v
            for k, v in task.weights.items()
        }
        manifest, payload = encode(weights, "fp32")
        h = task.header
        header = spb.ResultHeader(
            client_id=self.client_id,
            task_id=h.task_id,
            version=h.version,
            num_samples=self.samples,
            local_steps=h.local_steps or 1,
            train_seconds=time.monotonic() - start,
            loss=self.rng.uniform(0.2, 2.3),
            manifest=manifest,
        )
        return Pending(
            h.task_id, h.version, upload_messages(header, payload, self.chunk_bytes), time.monotonic() + PENDING_SECONDS
        )

    async def _upload(self, pending: Pending) -> None:
        stub = await self.link.stub()
        try:
            reply = await stub.UploadResult(iter(pending.messages), metadata=self.metadata, timeout=UPLOAD_SECONDS)
        except aio.AioRpcError as error:
            code, details = error.code(), error.details() or ""
            final = code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION) or (
                code == grpc.StatusCode.RESOURCE_EXHAUSTED and not details.startswith("server busy")
            )
            if not final or "not registered" in details:
                raise
            self.tally.refusals[f"{code.name}: {re.sub(r'[0-9]+', 'N', details)[:100]}"] += 1
            self._note(pending, "refused", code=code.name)
            return
        fate = "duplicate" if reply.duplicate else "dropped" if reply.dropped else "applied"
        self._note(pending, fate, reply_version=reply.version)
        if reply.run_over:
            raise RunOver("at upload")

    def _note(self, pending: Pending, fate: str, **extra: Any) -> None:
        """One line per reply (flushed, so a SIGKILL loses at most a line being written)."""
        self.tally.fates[fate] += 1
        self.tally.version = max(self.tally.version, int(extra.get("reply_version", 0)))
        line = {"client": self.client_id, "task": pending.task_id, "version": pending.version, "fate": fate, **extra}
        self.replies.write(json.dumps(line) + "\n")
        self.replies.flush()


# ------------------------------------------------------------------ malicious clients
class NoTask(Exception):
    """The server handed the malicious client no task to abuse."""


def _identity(data: bytes) -> bytes:
    return data


class MaliciousClient:
    """Calls the service the wrong way, one attack at a time; every call's status goes to ``OUT/malicious.jsonl``."""

    def __init__(self, client_id: int, plan: Plan, address: Address, rng: random.Random, log: Any) -> None:
        self.client_id = client_id
        self.plan = plan
        self.link = Link(address)
        self.rng = rng
        self.log = log
        self.metadata = plan.metadata(client_id)

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                name = self.rng.choice(sorted(ATTACKS))
                start = time.monotonic()
                try:
                    statuses = await ATTACKS[name](self)
                except aio.AioRpcError as error:  # the attack's preparation failed (e.g. the server is down)
                    statuses = [f"setup {error.code().name}"]
                except (NoTask, RunOver) as error:
                    statuses = [f"setup {type(error).__name__}"]
                seconds = round(time.monotonic() - start, 3)
                for code in statuses:
                    line = {"client": self.client_id, "attack": name, "status": code, "seconds": seconds}
                    self.log.write(json.dumps(line) + "\n")
                self.log.flush()
                await sleep_or_stop(stop, self.rng.uniform(0.5, 3.0))
        finally:
            await self.link.close()

    async def stub(self) -> Any:
        return await self.link.stub()

    def raw(self, method: str, streaming: bool) -> Any:
        """A call of ``method`` that sends bytes as they are (the channel of :meth:`stub`)."""
        assert self.link.channel is not None
        path = f"/fedhet.v1.FederatedLearning/{method}"
        if streaming:
            return self.link.channel.stream_unary(path, request_serializer=_identity, response_deserializer=_identity)
        return self.link.channel.unary_unary(path, request_serializer=_identity, response_deserializer=_identity)

    def registration(self, client_id: int | None = None, samples: int = 100) -> spb.RegisterRequest:
        profile = spb.ClientProfile(seconds_per_sample=0.001, bandwidth=1e7, bitwidth=32)
        cid = self.client_id if client_id is None else client_id
        return spb.RegisterRequest(client_id=cid, profile=profile, num_samples=samples)

    async def own_task(self) -> Received:
        """Register properly and take a task (to abuse)."""
        stub = await self.stub()
        await stub.Register(self.registration(), metadata=self.metadata, timeout=RPC_SECONDS)
        for _ in range(3):
            task = await receive_task(stub, self.client_id, self.metadata)
            if task is not None:
                return task
        raise NoTask

    def header(self, task: Received, manifest: Any, **fields: Any) -> spb.ResultHeader:
        h = task.header
        values: dict[str, Any] = {
            "client_id": self.client_id,
            "task_id": h.task_id,
            "version": h.version,
            "num_samples": 100,
            "local_steps": h.local_steps or 1,
            "train_seconds": 1.0,
            "loss": 1.0,
            "manifest": manifest,
        }
        values.update(fields)
        return spb.ResultHeader(**values)

    async def upload(self, messages: Iterable[spb.ResultMessage] | AsyncIterator[spb.ResultMessage]) -> str:
        return await status((await self.stub()).UploadResult(messages, metadata=self.metadata, timeout=UPLOAD_SECONDS))

    async def upload_weights(self, task: Received, weights: dict[str, torch.Tensor], **fields: Any) -> str:
        manifest, payload = encode(weights, "fp32")
        return await self.upload(iter(upload_messages(self.header(task, manifest, **fields), payload)))


_FAULTS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}  # statuses that mean a server bug: keep the details


async def status(call: Awaitable[Any]) -> str:
    """The status code name a call ended with (and, for a server fault, ``" (details)"``)."""
    try:
        await call
    except aio.AioRpcError as error:
        code = error.code()
        return f"{code.name} ({(error.details() or '')[:100]})" if code in _FAULTS else code.name
    return "OK"


async def no_token(m: MaliciousClient) -> list[str]:
    return [await status((await m.stub()).Register(m.registration(), timeout=RPC_SECONDS))]


async def wrong_token(m: MaliciousClient) -> list[str]:
    forged = (("authorization", f"Bearer {m.rng.getrandbits(128):032x}"),)
    request = spb.HeartbeatRequest(client_id=m.client_id, task_id=-1)
    return [await status((await m.stub()).Heartbeat(request, metadata=forged, timeout=RPC_SECONDS))]


async def other_client(m: MaliciousClient) -> list[str]:
    """A valid token naming another (honest) client's id."""
    request = m.registration(client_id=m.rng.randrange(m.plan.clients))
    return [await status((await m.stub()).Register(request, metadata=m.metadata, timeout=RPC_SECONDS))]


async def garbage_register(m: MaliciousClient) -> list[str]:
    await m.stub()
    junk = m.rng.randbytes(m.rng.randint(1, 512))
    return [await status(m.raw("Register", False)(junk, metadata=m.metadata, timeout=RPC_SECONDS))]


async def garbage_upload(m: MaliciousClient) -> list[str]:
    await m.stub()
    junk = [m.rng.randbytes(m.rng.randint(1, 4096)) for _ in range(3)]
    return [await status(m.raw("UploadResult", True)(iter(junk), metadata=m.metadata, timeout=UPLOAD_SECONDS))]


async def absurd_register(m: MaliciousClient) -> list[str]:
    request = m.registration(samples=2**62)
    request.profile.seconds_per_sample = -1.0
    return [await status((await m.stub()).Register(request, metadata=m.metadata, timeout=RPC_SECONDS))]


async def absurd_fields(m: MaliciousClient) -> list[str]:
    task = await m.own_task()
    return [await m.upload_weights(task, task.weights, train_seconds=1e308, num_samples=2**62)]


async def nan_update(m: MaliciousClient) -> list[str]:
    task = await m.own_task()
    weights = dict(task.weights)
    name = m.rng.choice(sorted(weights))
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] = math.nan
    return [await m.upload_weights(task, weights)]


async def huge_update(m: MaliciousClient) -> list[str]:
    """Finite but absurd weights (float32's largest values): over the default norm bound."""
    task = await m.own_task()
    return [await m.upload_weights(task, {k: torch.full_like(v, 3e38) for k, v in task.weights.items()})]


async def wrong_shape(m: MaliciousClient) -> list[str]:
    task = await m.own_task()
    return [await m.upload_weights(task, {k: v.reshape(-1) for k, v in task.weights.items()})]


async def foreign_task(m: MaliciousClient) -> list[str]:
    """A result for a task that is not this client's (a guessed id of another client's task)."""
    task = await m.own_task()
    header = m.header(task, encode(task.weights, "fp32")[0], task_id=m.rng.randrange(10_000) + task.header.task_id + 1)
    return [await m.upload(iter([spb.ResultMessage(header=header)]))]


async def oversize(m: MaliciousClient) -> list[str]:
    """A header declaring a terabyte."""
    task = await m.own_task()
    manifest = encode(task.weights, "fp32")[0]
    manifest.total_bytes = 1 << 40
    return [await m.upload(iter([spb.ResultMessage(header=m.header(task, manifest))]))]


async def _silent(first: list[spb.ResultMessage], seconds: float) -> AsyncIterator[spb.ResultMessage]:
    for message in first:
        yield message
    await asyncio.sleep(seconds)


async def idle_stream(m: MaliciousClient) -> list[str]:
    """An upload that never sends its header."""
    return [await m.upload(_silent([], 40.0))]


async def idle_flood(m: MaliciousClient) -> list[str]:
    """Four uploads of one task, each sending its header and then nothing: past this client's share (2) they are
    refused as busy, the rest cut off by the server's read timeout."""
    task = await m.own_task()
    header = spb.ResultMessage(header=m.header(task, encode(task.weights, "fp32")[0]))
    return list(await asyncio.gather(*(m.upload(_silent([header], 40.0)) for _ in range(4))))


ATTACKS: dict[str, Callable[[MaliciousClient], Awaitable[list[str]]]] = {
    f.__name__: f
    for f in (
        no_token,
        wrong_token,
        other_client,
        garbage_register,
        garbage_upload,
        absurd_register,
        absurd_fields,
        nan_update,
        huge_update,
        wrong_shape,
        foreign_task,
        oversize,
        idle_stream,
        idle_flood,
    )
}
EXPECTED: dict[str, set[str]] = {
    "no_token": {"UNAUTHENTICATED"},
    "wrong_token": {"UNAUTHENTICATED"},
    "other_client": {"PERMISSION_DENIED"},
    "garbage_register": {"INVALID_ARGUMENT", "PERMISSION_DENIED"},  # random bytes may parse, naming another id
    "garbage_upload": {"INVALID_ARGUMENT"},
    "absurd_register": {"INVALID_ARGUMENT"},
    "absurd_fields": {"INVALID_ARGUMENT"},
    "nan_update": {"INVALID_ARGUMENT"},
    "huge_update": {"INVALID_ARGUMENT"},
    "wrong_shape": {"INVALID_ARGUMENT"},
    "foreign_task": {"FAILED_PRECONDITION"},
    "oversize": {"RESOURCE_EXHAUSTED"},
    "idle_stream": {"DEADLINE_EXCEEDED"},
    "idle_flood": {"DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"},
}


# ------------------------------------------------------------------ worker process
async def run_worker(plan: Plan, role: str, generation: int) -> None:
    """One worker process: the honest clients of worker ``role`` ("honest:<i>") or the malicious ones. It stops on
    SIGTERM or SIGINT, and when the orchestrator that started it is gone."""
    torch.set_num_threads(1)
    os.nice(CLIENT_NICE)
    out = Path(plan.out)
    rng = random.Random(f"{plan.seed}-{role}-{generation}")
    address = Address(out / "addr")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    parent = os.getppid()
    tally = Tally()
    with contextlib.ExitStack() as files:
        if role == "malicious":
            log = files.enter_context((out / "malicious.jsonl").open("a", encoding="utf-8"))
            ids = range(MALICIOUS_BASE, MALICIOUS_BASE + plan.malicious)
            runs = [MaliciousClient(i, plan, address, random.Random(rng.random()), log).run(stop) for i in ids]
        else:
            ids = plan.honest_ids(int(role.split(":")[1]))
            runs = [HonestClient(i, plan, address, tally, random.Random(rng.random())).run(stop) for i in ids]
        tasks = [asyncio.create_task(r) for r in runs]
        stats = out / "stats" / f"{role.replace(':', '')}.{generation}.json"
        while not await sleep_or_stop(stop, 2.0):
            write_atomic(stats, tally.to_json())
            if os.getppid() != parent:
                stop.set()
        _, late = await asyncio.wait(tasks, timeout=5.0)
        for task in late:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        write_atomic(stats, tally.to_json())


# ------------------------------------------------------------------ orchestrator
class SoakError(Exception):
    """The soak cannot go on (the server does not start)."""


@dataclass(frozen=True)
class HealthSample:
    """One health check: when it started (run seconds), how long it took, whether the server answered SERVING, and
    whether it counts as latency (False: it spanned a kill or a restart, so it is downtime)."""

    at: float
    seconds: float
    ok: bool
    counted: bool


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def stop_process(process: subprocess.Popen[bytes], seconds: float) -> int | None:
    """SIGTERM, then SIGKILL after ``seconds``; returns the exit code of the SIGTERM (None when it had to be killed)."""
    if process.poll() is not None:
        return process.returncode
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        return process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait()
        return None


class Soak:
    """Runs the server, the workers and the chaos, and measures."""

    def __init__(self, args: argparse.Namespace, plan: Plan) -> None:
        self.args = args
        self.plan = plan
        self.out = Path(plan.out)
        self.rng = random.Random(args.seed)
        self.state_dir = self.out / "state"
        self.server: subprocess.Popen[bytes] | None = None
        self.server_generation = 0
        self.port = 0
        self.server_lock = asyncio.Lock()
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.worker_generation: Counter[str] = Counter()
        self.t0 = time.monotonic()
        self.up = False  # the server answered a health check since it was last (re)started
        self.epoch = 0  # bumped at every kill: a health check spanning one is downtime
        self.down_since: float | None = None
        self.downtime = 0.0
        self.outages: list[float] = []
        self.health: list[HealthSample] = []
        self.rss: list[tuple[float, int, int]] = []  # (run seconds, kB, server generation)
        self.events: list[str] = []
        self.kills: Counter[str] = Counter()
        self.crashes: list[str] = []
        self.stopping = False

    def now(self) -> float:
        return time.monotonic() - self.t0

    def event(self, text: str) -> None:
        line = f"[{self.now():6.1f} s] {text}"
        self.events.append(line)
        with (self.out / "events.log").open("a") as f:
            f.write(line + "\n")

    # ------------------------------------------------------------------ processes
    def server_args(self, resume: bool) -> list[str]:
        a = self.args
        return [
            "-m",
            "fedhet.server",
            *(["--resume"] if resume else []),
            "dataset=fashion_mnist",
            f"model={a.model}",
            f"strategy={a.strategy}",
            f"num_clients={a.clients}",
            f"seed={a.seed}",
            "server.address=127.0.0.1",
            f"server.port={self.port}",
            f"server.port_file={self.out / 'port'}",
            f"server.state_dir={self.state_dir}",
            "server.durable=true",
            f"server.tokens_file={self.out / 'tokens.txt'}",
            "server.max_versions=1000000000",
            f"server.max_seconds={a.minutes * 60 + 900:g}",  # a server orphaned by a killed soak stops by itself
            f"server.eval_every={a.eval_every}",
            "server.threads=1",
            "server.shutdown_grace=2",
        ]

    async def start_server(self, resume: bool) -> None:
        """Start the server (resuming the state directory) and wait until it listens; publish its address."""
        for attempt in range(2):
            self.server_generation += 1
            port_file = self.out / "port"
            port_file.unlink(missing_ok=True)
            with (self.out / "server.log").open("ab") as log:
                log.write(f"=== soak: server start {self.server_generation} (resume={resume}) ===\n".encode())
                log.flush()
                self.server = subprocess.Popen(
                    [sys.executable, *self.server_args(resume)], stdout=log, stderr=subprocess.STDOUT
                )
            deadline = time.monotonic() + SERVER_START_SECONDS
            while time.monotonic() < deadline:
                text = port_file.read_text().strip() if port_file.exists() else ""
                if text:
                    self.port = int(text)
                    write_atomic(self.out / "addr", f"127.0.0.1:{self.port}")
                    return
                if self.server.poll() is not None:
                    break
                await asyncio.sleep(0.05)
            else:
                raise SoakError(f"the server did not listen within {SERVER_START_SECONDS:g} s (see server.log)")
            tail = self.log_tail()
            if attempt == 0 and self.port and "cannot listen" in tail:  # our port was taken meanwhile: any port
                self.event(f"port {self.port} unavailable on restart; trying any port")
                self.port = 0
                continue
            raise SoakError(f"the server exited with {self.server.returncode} at start: {tail}")

    def log_tail(self, lines: int = 3) -> str:
        text = (self.out / "server.log").read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:])

    async def kill_server(self, reason: str) -> None:
        async with self.server_lock:
            if self.server is None or self.stopping:
                return
            self.epoch += 1
            self.up = False
            self.down_since = time.monotonic()
            with contextlib.suppress(ProcessLookupError):
                self.server.kill()
            self.server.wait()
            self.kills["server"] += 1
            self.event(f"SIGKILL server ({reason}); restarting with --resume")
            await self.start_server(resume=True)

    def start_worker(self, role: str) -> None:
        self.worker_generation[role] += 1
        generation = self.worker_generation[role]
        with (self.out / "logs" / f"{role.replace(':', '')}.log").open("ab") as log:
            command = [
                sys.executable,
                __file__,
                "--worker",
                role,
                "--generation",
                str(generation),
                "--out",
                str(self.out),
            ]
            self.workers[role] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def kill_worker(self, role: str) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.workers[role].kill()
        self.workers[role].wait()
        self.kills["worker"] += 1
        self.event(f"SIGKILL worker {role}; restarting it")
        self.start_worker(role)

    # ------------------------------------------------------------------ background tasks
    async def probe_health(self) -> None:
        """gRPC health checks every HEALTH_PERIOD seconds."""
        address = Address(self.out / "addr")
        target, channel, stub = "", None, None
        request = health_pb2.HealthCheckRequest(service="")
        try:
            while not self.stopping:
                start = time.monotonic()
                if address.current() != target or channel is None:
                    if channel is not None:
                        await channel.close(None)
                    target = address.current()
                    channel = aio.insecure_channel(target, options=CHANNEL_OPTIONS)
                    stub = health_pb2_grpc.HealthStub(channel)
                epoch, up = self.epoch, self.up
                ok = False
                with contextlib.suppress(aio.AioRpcError):
                    reply = await stub.Check(request, timeout=HEALTH_TIMEOUT)  # type: ignore[union-attr]
                    ok = reply.status == health_pb2.HealthCheckResponse.SERVING
                seconds = time.monotonic() - start
                if ok and not self.up and epoch == self.epoch:
                    self.up = True
                    if self.down_since is not None:
                        outage = time.monotonic() - self.down_since
                        self.downtime += outage
                        self.outages.append(outage)
                        self.event(f"server serving again after {outage:.1f} s down")
                        self.down_since = None
                counted = up and epoch == self.epoch
                self.health.append(HealthSample(start - self.t0, seconds, ok, counted))
                await asyncio.sleep(max(0.0, HEALTH_PERIOD - seconds))
        finally:
            if channel is not None:
                await channel.close(None)

    async def sample_rss(self) -> None:
        while not self.stopping:
            server = self.server
            kb = rss_kb(server.pid) if server is not None and server.poll() is None else None
            if kb is not None:
                self.rss.append((self.now(), kb, self.server_generation))
            await asyncio.sleep(RSS_PERIOD)

    async def supervise(self) -> None:
        """Restart a server or worker that died without being killed (a crash: counted and reported)."""
        while not self.stopping:
            await asyncio.sleep(0.5)
            async with self.server_lock:
                if self.server is not None and self.server.poll() is not None and not self.stopping:
                    code = self.server.returncode
                    self.crashes.append(f"server exited with {code} at {self.now():.0f} s: {self.log_tail()}")
                    self.event(f"server CRASHED (exit {code}); restarting with --resume")
                    self.epoch += 1
                    self.up = False
                    self.down_since = time.monotonic()
                    await self.start_server(resume=True)
            for role, process in list(self.workers.items()):
                if process.poll() is not None and not self.stopping:
                    self.crashes.append(f"worker {role} exited with {process.returncode} at {self.now():.0f} s")
                    self.event(f"worker {role} exited with {process.returncode}; restarting it")
                    self.start_worker(role)

    async def chaos(self, end: float) -> None:
        k = self.args.kill_every

        def gap() -> float:
            return self.rng.uniform(2 * k / 3, 4 * k / 3)

        next_server, next_worker = self.now() + gap(), self.now() + gap()
        while not self.stopping:
            await asyncio.sleep(0.5)
            if self.now() >= end - QUIET_TAIL:
                return
            if self.now() >= next_server:
                await self.kill_server("chaos")
                next_server = self.now() + gap()
            if self.now() >= next_worker:
                self.kill_worker(self.rng.choice(sorted(r for r in self.workers if r.startswith("honest"))))
                next_worker = self.now() + gap()

    def tallies(self) -> Tally:
        total = Tally()
        for path in (self.out / "stats").glob("*.json"):
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(path.read_text())
                total.fates.update(data["fates"])
                total.errors.update(data["errors"])
                total.refusals.update(data["refusals"])
                total.version = max(total.version, int(data["version"]))
        return total

    async def progress(self) -> None:
        last_version, last_at = 0, self.now()
        while not self.stopping:
            await asyncio.sleep(PROGRESS_PERIOD)
            tally = self.tallies()
            now = self.now()
            recent = [s.seconds for s in self.health if s.counted and s.at >= now - PROGRESS_PERIOD]
            rss = self.rss[-1][1] / 1024 if self.rss else math.nan
            rate = (tally.version - last_version) / max(now - last_at, 1e-9)
            last_version, last_at = tally.version, now
            f = tally.fates
            print(
                f"[{now:5.0f} s] version {tally.version} ({rate:.2f}/s), replies: applied {f['applied']} "
                f"dropped {f['dropped']} duplicate {f['duplicate']} refused {f['refused']}; server RSS {rss:.0f} MB; "
                f"health p50 {percentile(recent, 50) * 1e3:.1f} ms p99 {percentile(recent, 99) * 1e3:.1f} ms; "
                f"kills {self.kills['server']} server, {self.kills['worker']} worker; crashes {len(self.crashes)}",
                flush=True,
            )

    # ------------------------------------------------------------------ the run
    async def run(self) -> dict[str, Any]:
        a = self.args
        (self.out / "tokens.txt").write_text(
            "".join(
                f"{c} {self.plan.token(c)}\n"
                for c in [*range(a.clients), *range(MALICIOUS_BASE, MALICIOUS_BASE + a.malicious)]
            )
        )
        await self.start_server(resume=False)
        print(f"server listening on 127.0.0.1:{self.port}; output in {self.out}", flush=True)
        self.t0 = time.monotonic()
        roles = [f"honest:{i}" for i in range(a.workers)] + (["malicious"] if a.malicious else [])
        for role in roles:
            self.start_worker(role)
        end = a.minutes * 60.0
        background = [
            asyncio.create_task(c)
            for c in (self.probe_health(), self.sample_rss(), self.supervise(), self.progress(), self.chaos(end))
        ]
        try:
            while self.now() < end:
                await asyncio.sleep(min(1.0, end - self.now()))
                for task in background:
                    if task.done() and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
        finally:
            self.stopping = True
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
        seconds = self.now()
        await asyncio.gather(*(asyncio.to_thread(stop_process, p, WORKER_STOP_SECONDS) for p in self.workers.values()))
        async with self.server_lock:
            code = None if self.server is None else await asyncio.to_thread(stop_process, self.server, STOP_SECONDS)
        self.event(f"stopped: workers, then the server (exit {code})")
        return self.report(seconds, code)

    def kill_all(self) -> None:
        """Last resort (an exception or Ctrl-C): no process of ours outlives the soak."""
        for process in [*self.workers.values(), *([self.server] if self.server is not None else [])]:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                process.wait()

    # ------------------------------------------------------------------ the verdict
    def report(self, seconds: float, server_exit: int | None) -> dict[str, Any]:
        books = audit(self.out, self.state_dir)
        tally = self.tallies()
        counted = [s.seconds for s in self.health if s.counted]
        failed_up = sum(1 for s in self.health if s.counted and not s.ok)
        latencies = [s.seconds if s.ok else max(s.seconds, HEALTH_TIMEOUT) for s in self.health if s.counted]
        p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
        minutes = rss_by_minute(self.rss)
        warm = minutes.get(2)
        later = [kb for m, kb in minutes.items() if m > 2]
        rss_ratio = max(later) / warm if warm and later else math.nan
        final_ratio = minutes[max(minutes)] / warm if warm and minutes else math.nan
        malicious = malicious_table(self.out / "malicious.jsonl")
        errors, tracebacks = server_log_findings(self.out / "server.log")
        versions = books["version"]
        goals = {
            "rss_within_1.2x_of_minute_2": None if math.isnan(rss_ratio) else rss_ratio <= 1.2,
            "health_p50_below_10ms": p50 < 0.010,
            "health_p99_below_100ms": p99 < 0.100,
            "no_lost_updates": books["lost"] == 0,
            "no_doubled_updates": books["doubled"] == 0,
        }
        summary: dict[str, Any] = {
            "minutes": round(seconds / 60, 2),
            "clients": self.args.clients,
            "workers": self.args.workers,
            "malicious_clients": self.args.malicious,
            "strategy": self.args.strategy,
            "model": self.args.model,
            "versions": versions,
            "versions_per_s": round(versions / seconds, 3) if versions is not None else None,
            "replies": dict(tally.fates),
            "acknowledged_per_s": round((tally.fates["applied"] + tally.fates["dropped"]) / seconds, 2),
            "honest_errors": dict(tally.errors),
            "honest_refusals": dict(tally.refusals),
            "rss_mb_by_minute": {m: round(kb / 1024, 1) for m, kb in minutes.items()},
            "rss_ratio_max_after_minute_2": rounded(rss_ratio, 3),
            "rss_ratio_final_to_minute_2": rounded(final_ratio, 3),
            "health_p50_ms": rounded(p50 * 1e3, 2),
            "health_p99_ms": rounded(p99 * 1e3, 2),
            "health_max_ms": rounded(max(counted, default=math.nan) * 1e3, 1),
            "health_checks": len(counted),
            "health_failed_while_up": failed_up,
            "downtime_s": round(self.downtime, 1),
            "outages_s": [round(o, 1) for o in self.outages],
            "kills": dict(self.kills),
            "crashes": self.crashes,
            "server_exit_on_sigterm": server_exit,
            "malicious": malicious,
            "server_log_errors": errors,
            "server_log_tracebacks": tracebacks,
            **{k: books[k] for k in ("lost", "doubled", "lost_detail", "doubled_detail", "ledger")},
            "goals": goals,
        }
        write_atomic(self.out / "summary.json", json.dumps(summary, indent=1, default=str))
        with (self.out / "rss.csv").open("w") as f:
            f.write("seconds,rss_kb,server_generation\n" + "".join(f"{t:.1f},{kb},{g}\n" for t, kb, g in self.rss))
        with (self.out / "health.csv").open("w") as f:
            f.write("at,seconds,ok,counted\n")
            f.writelines(f"{s.at:.2f},{s.seconds:.5f},{int(s.ok)},{int(s.counted)}\n" for s in self.health)
        print_summary(summary)
        return summary


def rounded(value: float, digits: int) -> float | None:
    """``value`` rounded; None for NaN (nothing measured), so the summary is strict JSON."""
    return None if math.isnan(value) else round(value, digits)


def rss_by_minute(samples: list[tuple[float, int, int]]) -> dict[int, int]:
    """The largest RSS (kB) sampled in each minute of the run (minute 1 = the first 60 s)."""
    out: dict[int, int] = {}
    for t, kb, _ in samples:
        minute = int(t // 60) + 1
        out[minute] = max(out.get(minute, 0), kb)
    return out


def read_replies(folder: Path) -> list[dict[str, Any]]:
    lines = []
    for path in sorted(folder.glob("client*.jsonl")):
        for text in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):  # a line cut by a SIGKILL
                lines.append(json.loads(text))
    return lines


def audit(out: Path, state_dir: Path) -> dict[str, Any]:
    """Lost and doubled updates: the clients' reply logs against the server's final state, read with its own readers
    (the checkpoint, then any result the write-ahead log holds after it)."""
    replies = read_replies(out / "replies")
    store = StateStore(state_dir)
    state = store.load_checkpoint()
    if state is None:
        return {"lost": None, "doubled": None, "version": None, "ledger": {}, "lost_detail": [], "doubled_detail": []}
    accepted: dict[int, int] = {int(t): int(c) for t, c in state["accepted"]}
    after = [e.body for e in store.events_after(int(state["seq"])) if e.body.get("kind") == "result"]
    for body in after:
        accepted[int(body["task_id"])] = int(body["client_id"])
    strategy = state["driver"]["strategy"]
    scheduler = strategy["scheduler"]
    buffered: list[int] = []
    if "buffer" in scheduler:
        buffer = StalenessBuffer()
        buffer.load_state_dict(scheduler["buffer"])
        buffered = buffer.task_ids()
    applied, dropped = int(strategy["updates_applied"]), int(strategy["updates_dropped"])
    told = [r for r in replies if r["fate"] in ("applied", "dropped", "duplicate")]
    lost_acks = sorted({(r["client"], r["task"], r["fate"]) for r in told if accepted.get(r["task"]) != r["client"]})
    firsts = Counter((r["client"], r["task"]) for r in replies if r["fate"] in ("applied", "dropped"))
    doubled_acks = sorted(k for k, n in firsts.items() if n > 1)
    # the strategy's counts cover the accepted results the checkpoint captured (not those logged after it)
    gap = applied + dropped + len(buffered) - (len(accepted) - len(after))
    ledger = {
        "accepted_results": len(accepted),
        "accepted_after_final_checkpoint": len(after),
        "strategy_applied": applied,
        "strategy_dropped": dropped,
        "strategy_buffered": len(buffered),
        "counters": state["counters"],
        "acknowledged": dict(Counter(r["fate"] for r in replies)),
        "accepted_never_acknowledged": len(set(accepted.items()) - {(r["task"], r["client"]) for r in told}),
    }
    return {
        "lost": len(lost_acks) + max(0, -gap),
        "doubled": len(doubled_acks) + max(0, gap),
        "lost_detail": [f"client {c} task {t} ({f})" for c, t, f in lost_acks[:20]]
        + ([f"{-gap} accepted results missing from the strategy's counts"] if gap < 0 else []),
        "doubled_detail": [f"client {c} task {t} acknowledged twice" for c, t in doubled_acks[:20]]
        + ([f"strategy counts {gap} more results than were accepted"] if gap > 0 else []),
        "version": int(strategy["version"]),
        "ledger": ledger,
    }


def malicious_table(path: Path) -> dict[str, dict[str, int]]:
    """Status counts per attack; unexpected statuses are listed under ``"UNEXPECTED"`` too."""
    table: dict[str, Counter[str]] = {}
    if not path.exists():
        return {}
    for text in path.read_text(encoding="utf-8").splitlines():
        try:
            line = json.loads(text)
        except ValueError:
            continue
        attack, full = line["attack"], line["status"]
        code = full.split(" (")[0]
        table.setdefault(attack, Counter())[code] += 1
        if code not in EXPECTED[attack] and code != "UNAVAILABLE" and not code.startswith("setup"):
            table.setdefault("UNEXPECTED", Counter())[f"{attack} {full}"] += 1
    return {k: dict(v) for k, v in sorted(table.items())}


def server_log_findings(path: Path, keep: int = 8) -> tuple[dict[str, int], int]:
    """The server log's ERROR lines (grouped, numbers masked) and its traceback count."""
    errors: Counter[str] = Counter()
    tracebacks = 0
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("Traceback"):
            tracebacks += 1
        elif " ERROR: " in line or " CRITICAL: " in line:
            errors[re.sub(r"[0-9]+(\.[0-9]+)?", "N", line.split(": ", 1)[-1])[:160]] += 1
    return dict(errors.most_common(keep)), tracebacks


def print_summary(s: dict[str, Any]) -> None:
    def mark(goal: bool | None) -> str:
        return "n/a (run shorter than 3 minutes)" if goal is None else "met" if goal else "NOT MET"

    g = s["goals"]
    print()
    print(
        f"soak: {s['clients']} clients in {s['workers']} workers + {s['malicious_clients']} malicious, "
        f"{s['minutes']} min, {s['strategy']} on {s['model']}"
    )
    print(
        f"versions: {s['versions']} ({s['versions_per_s']}/s); acknowledged results {s['acknowledged_per_s']}/s; "
        f"replies {s['replies']}"
    )
    print(
        f"kills: {s['kills']}; downtime {s['downtime_s']} s over outages {s['outages_s']}; crashes {len(s['crashes'])}"
    )
    for crash in s["crashes"]:
        print(f"  {crash}")
    print(
        "server RSS by minute (MB, largest sample): "
        + ", ".join(f"{m}: {mb}" for m, mb in s["rss_mb_by_minute"].items())
    )
    print(
        f"  RSS after minute 2 / minute 2: max {s['rss_ratio_max_after_minute_2']}, final "
        f"{s['rss_ratio_final_to_minute_2']} -> {mark(g['rss_within_1.2x_of_minute_2'])}"
    )
    print(
        f"health: p50 {s['health_p50_ms']} ms -> {mark(g['health_p50_below_10ms'])}; p99 {s['health_p99_ms']} ms -> "
        f"{mark(g['health_p99_below_100ms'])}; max {s['health_max_ms']} ms; {s['health_checks']} checks, "
        f"{s['health_failed_while_up']} failed while up"
    )
    print(f"lost: {s['lost']} -> {mark(g['no_lost_updates'])}  {s['lost_detail'][:5]}")
    print(f"doubled: {s['doubled']} -> {mark(g['no_doubled_updates'])}  {s['doubled_detail'][:5]}")
    print(f"server's books: {s['ledger']}")
    print(f"honest call errors (retried): {s['honest_errors']}; honest results refused: {s['honest_refusals']}")
    print("malicious calls by status:")
    for attack, codes in s["malicious"].items():
        print(f"  {attack:16s} {codes}")
    print(f"server log: {s['server_log_tracebacks']} tracebacks; ERROR lines: {s['server_log_errors']}")
    print(f"server exit on SIGTERM: {s['server_exit_on_sigterm']}")
    print(json.dumps(s, default=str, separators=(",", ":")))


# ------------------------------------------------------------------ entry point
def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the run (default 10)")
    parser.add_argument("--clients", type=int, default=300, help="honest asynchronous clients (default 300)")
    parser.add_argument("--workers", type=int, default=6, help="processes the honest clients run in (default 6)")
    parser.add_argument("--malicious", type=int, default=5, help="malicious clients, in one more process (default 5)")
    parser.add_argument(
        "--kill-every", type=float, default=90.0, help="mean seconds between SIGKILLs of the server, and of a worker"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="", help="folder for logs, state and summary (default: a new temp folder)")
    parser.add_argument("--strategy", default="fedbuff", choices=["fedbuff", "fedasync"])
    parser.add_argument("--model", default="2nn", help="a model of configs/model (default 2nn, 199,210 parameters)")
    parser.add_argument(
        "--compute",
        type=float,
        nargs=2,
        default=[10.0, 30.0],
        metavar=("MIN", "MAX"),
        help="range of each client's mean seconds per task (default 10 30)",
    )
    parser.add_argument("--eval-every", type=int, default=50, help="versions between evaluations (default 50)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--generation", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.clients < 1 or args.workers < 1 or args.malicious < 0 or args.minutes <= 0 or args.kill_every <= 0:
        parser.error("--clients and --workers must be >= 1, --malicious >= 0, --minutes and --kill-every > 0")
    if not 0 < args.compute[0] <= args.compute[1]:
        parser.error("--compute MIN MAX needs 0 < MIN <= MAX")
    return args


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.worker:
        asyncio.run(run_worker(Plan.load(Path(args.out) / "plan.json"), args.worker, args.generation))
        return 0
    out = Path(args.out or tempfile.mkdtemp(prefix="fedhet_soak_"))
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise SystemExit(f"--out {out} is not empty: give a new folder")
    for sub in ("replies", "stats", "logs"):
        (out / sub).mkdir()
    workers = min(args.workers, args.clients)
    args.workers = workers
    plan = Plan(str(out.resolve()), args.seed, args.clients, workers, args.malicious, tuple(args.compute), 1e-3)
    (out / "plan.json").write_text(json.dumps(asdict(plan)))
    soak = Soak(args, plan)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        summary = asyncio.run(soak.run())
    except KeyboardInterrupt:
        print("interrupted: stopping every process", file=sys.stderr)
        return 130
    except SoakError as error:
        print(f"soak: error: {error}", file=sys.stderr)
        return 2
    finally:
        soak.kill_all()
    return 0 if all(v is not False for v in summary["goals"].values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
