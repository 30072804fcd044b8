"""The gRPC face of the runtime: translates ``fedhet.v1`` messages to coordinator calls and errors to statuses.

Status codes: UNAUTHENTICATED (no or wrong token) and INVALID_ARGUMENT for bytes that do not parse, from
:class:`~fedhet.server.gate.Gate`; PERMISSION_DENIED (a message names another client than the token's),
FAILED_PRECONDITION (unregistered client, or a result for a task that is not outstanding), INVALID_ARGUMENT
(validation), RESOURCE_EXHAUSTED (payload over the cap; "server busy" when the fair share of uploads is taken,
see :mod:`fedhet.server.admission`), DEADLINE_EXCEEDED (an upload idle past ``server.read_timeout``),
UNAVAILABLE (the state directory cannot be written; from the gate).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import OrderedDict
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn

import grpc
from grpc import aio

from fedhet.codec import encoding_for_bitwidth
from fedhet.runtime import ResultFailed
from fedhet.server.admission import ReadTimeout, UploadSlots, drain, read_within
from fedhet.server.auth import TokenStore
from fedhet.server.gate import RateLimitedLog
from fedhet.server.privacy import DPStep, check_dp_report
from fedhet.server.runtime import Coordinator
from fedhet.server.session import DuplicateResult, NotOutstanding, RunEnded, TaskRecord, UnknownClient
from fedhet.server.validation import (
    ResultFields,
    SampleCountError,
    check_result_fields,
    check_update_manifest,
)
from fedhet.types import ClientInfo, ClientProfile, Result, Task, Weights
from fedhet.updates import UpdateError, check_update
from fedhet.v1 import service_pb2 as spb
from fedhet.v1 import service_pb2_grpc
from fedhet.v1 import tensor_pb2 as tpb
from fedhet.v1.wire import ChunkError, PayloadAssembler, PayloadTooLarge, chunks, decode, encode

__all__ = ["SERVICE_NAME", "FederatedLearningServicer"]

log = logging.getLogger(__name__)

SERVICE_NAME = spb.DESCRIPTOR.services_by_name["FederatedLearning"].full_name
Context = aio.ServicerContext[Any, Any]


class FederatedLearningServicer(service_pb2_grpc.FederatedLearningServicer):
    """Serves one run's coordinator.

    Args:
        coordinator: the run.
        tokens: token store, or None to trust the client ids in messages (loopback only).
        encoding: how task weights travel to fp32 clients (fp32, fp16, bf16); a client of ``b < 32`` bits receives
            them packed at ``int<b>`` (:func:`fedhet.codec.encoding_for_bitwidth`), as the simulator sizes them.
        chunk_bytes: payload bytes per chunk message.
        max_upload_bytes: largest result payload accepted.
        max_samples: the most training samples a client may register (the run's dataset holds no more).
        slots: the fair share of upload capacity (caps and read timeout).
        noisy: the rate-limited log of client-caused lines.
        poll_timeout: seconds a GetTask call waits for work.
        heartbeat_seconds: heartbeat period clients are told to keep while training.
    """

    def __init__(
        self,
        coordinator: Coordinator,
        tokens: TokenStore | None,
        encoding: str,
        chunk_bytes: int,
        max_upload_bytes: int,
        poll_timeout: float,
        heartbeat_seconds: float,
        max_samples: int,
        slots: UploadSlots,
        noisy: RateLimitedLog,
    ) -> None:
        self.max_samples = max_samples
        self.slots = slots
        self.noisy = noisy
        self.coord = coordinator
        self.tokens = tokens
        self.encoding = encoding
        self.chunk_bytes = chunk_bytes
        self.max_upload_bytes = max_upload_bytes
        self.poll_timeout = poll_timeout
        self.heartbeat_seconds = heartbeat_seconds
        self._encoded: OrderedDict[tuple[int, str, int], tuple[Weights, tpb.Manifest, bytes]] = OrderedDict()
        # received payloads are checked in a pool of one thread per core: more threads than cores only contend
        # for the GIL with the event loop (measured in benchmarks/grpc_ingest.py: 256 uploads, 2 cores, ~20% faster
        # than asyncio's default pool of cores + 4)
        self._ingest = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="fedhet-ingest")

    def close(self) -> None:
        """Stop the ingest threads (uploads still being checked are refused by the stopping server)."""
        self._ingest.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ helpers
    async def _client(self, context: Context, claimed: int) -> int:
        """The caller's client id: ``claimed``, which must match the token's client when tokens are in use."""
        if self.tokens is not None:
            owner = self.tokens.client_for(context.invocation_metadata())
            if owner is None:  # the interceptor already refused; defence in depth
                await _abort(context, grpc.StatusCode.UNAUTHENTICATED, "missing or invalid token")
            if owner != claimed:
                await _abort(
                    context, grpc.StatusCode.PERMISSION_DENIED, f"the token is client {owner}'s, not client {claimed}'s"
                )
        if claimed < 0:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"client_id must be >= 0, got {claimed}")
        return claimed

    async def _known(self, context: Context, client_id: int) -> None:
        try:
            self.coord.touch(client_id)
        except UnknownClient as error:
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(error))

    def _bitwidth(self, client_id: int) -> int:
        """The bitwidth ``client_id`` registered: its tasks travel, and its packed updates must arrive, at it."""
        return self.coord.clients[client_id].info.profile.bitwidth

    def _encode(self, task: Task, encoding: str) -> tuple[tpb.Manifest, bytes]:
        """Encode a task's weights at ``encoding`` once per weights object (every client of a version and bitwidth
        shares the global model's payload); the tensors it names ``sparse`` (pruned) travel sparse, or packed at
        its ``sparse_bits``."""
        weights = task.weights
        key = (id(weights), encoding, task.sparse_bits)
        hit = self._encoded.get(key)
        if hit is not None and hit[0] is weights:
            return hit[1], hit[2]
        manifest, payload = encode(weights, encoding, task.sparse, task.sparse_bits)
        self._encoded[key] = (weights, manifest, payload)  # holding ``weights`` keeps its id from being reused
        while len(self._encoded) > 4:
            self._encoded.popitem(last=False)
        return manifest, payload

    def _received(self, assembler: PayloadAssembler, record: TaskRecord) -> tuple[Weights, bool]:
        """Checksum, decode, check and norm-bound a received payload; the weights to use and whether they were
        clipped. Runs in a worker thread (it reads, but never changes, the run's state): hashing and the tensor
        passes release the GIL, so the event loop keeps serving."""
        weights = decode(assembler.manifest, assembler.finish())
        check_update(weights, record.meta)
        return self.coord.bound_norm(weights, record)

    # ------------------------------------------------------------------ RPCs
    async def Register(self, request: spb.RegisterRequest, context: Context) -> spb.RegisterReply:
        client_id = await self._client(context, request.client_id)
        p = request.profile
        if not 1 <= request.num_samples <= self.max_samples:  # the weight of its updates: never silently capped
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"bad registration: num_samples {request.num_samples} must be in 1..{self.max_samples} "
                "(the training samples of the run's dataset)",
            )
        try:
            info = ClientInfo(
                client_id,
                ClientProfile(p.seconds_per_sample, p.bandwidth, p.bitwidth or 32, int(p.memory_bytes)),
                request.num_samples,
            )
            encoding_for_bitwidth(info.profile.bitwidth)  # a bitwidth without a wire encoding is refused here
        except ValueError as error:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"bad registration: {error}")
        known = client_id in self.coord.clients
        info = self.coord.register(info)
        over = self.coord.ended is not None
        if over and client_id in self.coord.clients:
            self.coord.heartbeat(client_id)  # notes that this client was told
        self.noisy(
            logging.INFO,
            "registered again" if known else "registered",
            "client %d registered%s (%d samples, %.3g s/sample)",
            client_id,
            " again" if known else "",
            info.num_samples,
            info.profile.seconds_per_sample,
        )
        return spb.RegisterReply(
            client_id=client_id,
            run_id=self.coord.run_id,
            version=self.coord.version,
            chunk_bytes=self.chunk_bytes,
            max_upload_bytes=self.max_upload_bytes,
            heartbeat_seconds=self.heartbeat_seconds,
            run_over=over,
        )

    async def GetTask(self, request: spb.GetTaskRequest, context: Context) -> AsyncIterator[spb.TaskMessage]:
        client_id = await self._client(context, request.client_id)
        await self._known(context, client_id)
        outcome = await self.coord.next_task(client_id, self.poll_timeout)
        if isinstance(outcome, RunEnded):
            yield spb.TaskMessage(run_over=spb.RunOver(version=outcome.version, reason=outcome.reason))
            return
        if outcome is None:
            yield spb.TaskMessage(idle=spb.Idle(retry_after_seconds=0.0, version=self.coord.version))
            return
        task = outcome
        encoding = encoding_for_bitwidth(self._bitwidth(client_id), self.encoding)
        manifest, payload = self._encode(task, encoding)
        sent = False
        try:
            yield spb.TaskMessage(
                header=spb.TaskHeader(
                    client_id=task.client_id,
                    task_id=task.task_id,
                    version=task.version,
                    local_steps=task.local_steps,
                    local_epochs=task.local_epochs,
                    manifest=manifest,
                    train=sorted(task.train),
                    train_all=task.train_all,
                    proximal_mu=task.proximal_mu,
                )
            )
            for chunk in chunks(payload, self.chunk_bytes):
                yield spb.TaskMessage(chunk=chunk)
            sent = True
            self.coord.counters.bytes_down += len(payload)
        finally:
            if not sent:
                self.coord.undeliver(task.task_id)

    async def UploadResult(
        self, request_iterator: AsyncIterator[spb.ResultMessage], context: Context
    ) -> spb.UploadReply:
        stream = request_iterator.__aiter__()
        timeout = self.slots.limits.read_timeout
        try:
            first = await read_within(stream, timeout, "header")
        except ReadTimeout as error:
            await _abort(context, grpc.StatusCode.DEADLINE_EXCEEDED, str(error))
        if first is None:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "empty upload: send a header first")
        if first.WhichOneof("kind") != "header":
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "an upload starts with its header")
        header = first.header
        client_id = await self._client(context, header.client_id)
        await self._known(context, client_id)
        coord = self.coord
        if coord.ended is not None:
            coord.heartbeat(client_id)
            return spb.UploadReply(task_id=header.task_id, version=coord.version, run_over=True)
        declared = max(0, int(header.manifest.total_bytes))
        charged = min(declared, self.max_upload_bytes)  # one over the cap is refused as too large, below
        busy = self.slots.refusal(client_id, charged)
        if busy is not None:
            coord.counters.busy += 1
            await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, busy)
        try:
            record = coord.begin_result(client_id, header.task_id, header.version)
        except DuplicateResult:
            return spb.UploadReply(task_id=header.task_id, version=coord.version, duplicate=True)
        except NotOutstanding as error:
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(error))
        self.slots.take(client_id, charged)
        try:
            try:
                personal = header.personal_accuracy if header.HasField("personal_accuracy") else None
                fields = ResultFields(
                    header.num_samples, header.local_steps, header.train_seconds, header.loss, personal
                )
                run_age = coord.now() * 1.1 + 1.0  # the client's clock may run a little faster than the server's
                check_result_fields(fields, coord.clients[client_id].info.num_samples, run_age)
                dp = check_dp_fields(header)
                if declared > self.max_upload_bytes:  # the cheapest check first
                    raise PayloadTooLarge(f"payload of {declared} bytes exceeds the cap of {self.max_upload_bytes}")
                bitwidth = self._bitwidth(client_id)
                check_update_manifest(header.manifest, record.meta, bitwidth)
                assembler = PayloadAssembler(header.manifest, self.max_upload_bytes)
                while (message := await read_within(stream, timeout, "chunk")) is not None:
                    if message.WhichOneof("kind") != "chunk":
                        raise ChunkError("an upload sends one header, then only chunks")
                    assembler.add(message.chunk)
                received = asyncio.get_running_loop().run_in_executor(self._ingest, self._received, assembler, record)
                weights, clipped = await received
                result = Result(
                    task_id=header.task_id,
                    client_id=client_id,
                    version=header.version,
                    weights=weights,
                    num_samples=header.num_samples,
                    local_steps=header.local_steps,
                    train_seconds=header.train_seconds,
                    loss=header.loss,
                    bitwidth=bitwidth,
                )
            except ReadTimeout as error:
                coord.reject()
                self.noisy(logging.WARNING, "slow upload", "client %d, task %d: %s", client_id, header.task_id, error)
                await _abort(context, grpc.StatusCode.DEADLINE_EXCEEDED, str(error))
            except PayloadTooLarge as error:
                coord.reject()
                await drain(stream, self.max_upload_bytes)  # so the client reads the refusal, not a reset stream
                await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, f"{type(error).__name__}: {error}")
            except UpdateError as error:
                coord.reject()
                self.noisy(
                    logging.WARNING,
                    "rejected result",
                    "client %d, task %d: rejected: %s",
                    client_id,
                    header.task_id,
                    error,
                )
                await drain(stream, self.max_upload_bytes)
                await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"{type(error).__name__}: {error}")
            try:
                submitted = await coord.submit(
                    result, record, int(header.manifest.total_bytes), clipped, dp, fields.personal_accuracy
                )
            except DuplicateResult:
                return spb.UploadReply(task_id=header.task_id, version=coord.version, duplicate=True)
            except NotOutstanding as error:
                await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(error))
            except ResultFailed as error:  # the strategy took it back; the run goes on without it
                self.noisy(logging.ERROR, "strategy failed", "client %d: %s", client_id, error)
                await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(error))
        finally:
            self.slots.give_back(client_id, charged)
        over = coord.ended is not None
        return spb.UploadReply(
            task_id=header.task_id, version=submitted.version, run_over=over, dropped=not submitted.applied
        )

    async def Heartbeat(self, request: spb.HeartbeatRequest, context: Context) -> spb.HeartbeatReply:
        client_id = await self._client(context, request.client_id)
        if client_id not in self.coord.clients:
            return spb.HeartbeatReply(version=self.coord.version, run_over=self.coord.ended is not None, known=False)
        over = self.coord.heartbeat(client_id)
        return spb.HeartbeatReply(version=self.coord.version, run_over=over, known=True)

    async def Leave(self, request: spb.LeaveRequest, context: Context) -> spb.LeaveReply:
        client_id = await self._client(context, request.client_id)
        await self._known(context, client_id)
        self.coord.leave(client_id)
        return spb.LeaveReply(version=self.coord.version)


def check_dp_fields(header: spb.ResultHeader) -> DPStep | None:
    """The DP-SGD report of an upload, checked (None when the client trained without DP)."""
    if not header.HasField("dp"):
        return None
    dp = header.dp
    try:
        return check_dp_report(dp.noise_multiplier, dp.sample_rate, dp.steps, header.local_steps)
    except ValueError as error:
        raise SampleCountError(str(error)) from None


async def _abort(context: Context, code: grpc.StatusCode, details: str) -> NoReturn:
    await context.abort(code, details)
    raise AssertionError("unreachable: abort raises")  # pragma: no cover
