"""What a hostile client can no longer do to a real server on loopback (issue 16): make it parse bytes before
authenticating, fill its log with tracebacks, or hold the upload capacity the other clients need.

Every RPC of the service is read from the proto descriptor, so a new RPC is covered automatically.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc import aio

from fedhet.server.testing import ReceivedTask, ScriptedClient, running_server, test_config
from fedhet.v1 import service_pb2 as spb
from fedhet.v1.wire import chunks, encode

SERVICE = spb.DESCRIPTOR.services_by_name["FederatedLearning"]
TOKENS = {0: "token-of-client-zero-0123456789", 1: "token-of-client-one-0123456789"}
GARBAGE = b"\xff\xff\xff\x01 not a protobuf message"


def identity(data: bytes) -> bytes:
    return data


async def send_raw(channel: aio.Channel, method: str, data: bytes, metadata: tuple[tuple[str, str], ...]) -> None:
    """Call ``method`` with ``data`` as its (only) request message, bytes as they are."""
    descriptor = SERVICE.methods_by_name[method]
    path = f"/{SERVICE.full_name}/{method}"
    kwargs = {"request_serializer": identity, "response_deserializer": identity}
    if descriptor.client_streaming:
        await channel.stream_unary(path, **kwargs)(iter([data]), metadata=metadata, timeout=10)
    elif descriptor.server_streaming:
        [r async for r in channel.unary_stream(path, **kwargs)(data, metadata=metadata, timeout=10)]
    else:
        await channel.unary_unary(path, **kwargs)(data, metadata=metadata, timeout=10)


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]


async def garbage_scenario(tmp_path: Path, method: str) -> None:
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("".join(f"{c} {t}\n" for c, t in TOKENS.items()))
    cfg = test_config(str(tmp_path / "state"), f"server.tokens_file={tokens}")
    async with running_server(cfg) as app:
        async with aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            with pytest.raises(aio.AioRpcError) as anonymous:
                await send_raw(channel, method, GARBAGE, ())
            assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED  # refused before any parsing
            with pytest.raises(aio.AioRpcError) as signed:
                await send_raw(channel, method, GARBAGE, (("authorization", f"Bearer {TOKENS[0]}"),))
            assert signed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"malformed {method} request" in (signed.value.details() or "")
        assert app.coordinator.clients == {} and app.coordinator.version == 0


@pytest.mark.parametrize("method", [m.name for m in SERVICE.methods])
def test_garbage_is_refused_unparsed_without_a_token_and_as_invalid_with_one(
    tmp_path: Path, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    asyncio.run(garbage_scenario(tmp_path, method))
    assert tracebacks(caplog) == []


async def flood_scenario(tmp_path: Path, calls: int) -> None:
    async with (
        running_server(test_config(str(tmp_path / "state"))) as app,
        aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        for _ in range(calls):
            with pytest.raises(aio.AioRpcError) as refused:
                await send_raw(channel, "Heartbeat", GARBAGE, ())
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_flood_of_garbage_writes_a_few_log_lines(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    asyncio.run(flood_scenario(tmp_path, 200))
    lines = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert 1 <= len(lines) <= 5, len(lines)
    assert tracebacks(caplog) == []


def stalled(client: ScriptedClient, task: ReceivedTask, release: asyncio.Event) -> AsyncIterator[spb.ResultMessage]:
    """An upload of ``task``'s weights that sends its header, then nothing until ``release`` is set."""
    manifest, payload = encode(task.weights)

    async def stream() -> AsyncIterator[spb.ResultMessage]:
        yield spb.ResultMessage(header=client.header(task.header, manifest))
        await release.wait()
        for chunk in chunks(payload, 1024):
            yield spb.ResultMessage(chunk=chunk)

    return stream()


async def idle_streams_scenario(tmp_path: Path) -> None:
    cfg = test_config(
        str(tmp_path / "state"),
        "server.max_concurrent_uploads=4",
        "server.read_timeout=1.0",
        "server.client_timeout=30",
    )
    async with running_server(cfg) as app:
        attacker, *honest = [ScriptedClient(f"127.0.0.1:{app.port}", i) for i in range(3)]
        for c in (attacker, *honest):
            await c.register()
        tasks = await asyncio.gather(*(c.poll_task() for c in (attacker, *honest)))
        never = asyncio.Event()
        idle = [asyncio.create_task(attacker.upload_messages(stalled(attacker, tasks[0], never))) for _ in range(8)]
        await asyncio.sleep(0.3)
        started = time.monotonic()
        replies = await asyncio.gather(*(c.upload(t.header, t.weights) for c, t in zip(honest, tasks[1:], strict=True)))
        assert [r.dropped for r in replies] == [False, False]  # taken in while the attacker's streams idle
        assert time.monotonic() - started < 0.9  # not after the idle streams timed out
        codes = []
        for call in idle:
            with pytest.raises(aio.AioRpcError) as cut:
                await call
            codes.append(cut.value.code())
        # its fair share (2 uploads) timed out without a chunk; the other 6 were refused at once
        assert sorted(c.name for c in codes) == ["DEADLINE_EXCEEDED"] * 2 + ["RESOURCE_EXHAUSTED"] * 6
        assert time.monotonic() - started < 5.0
        reply = await attacker.upload(tasks[0].header, tasks[0].weights)  # its slots are free again
        assert not reply.dropped and app.coordinator.version == 1
        for c in (attacker, *honest):
            await c.close()


def test_idle_upload_streams_of_one_client_neither_block_the_others_nor_hold_their_slots(tmp_path: Path) -> None:
    asyncio.run(idle_streams_scenario(tmp_path))


async def inflight_bytes_scenario(tmp_path: Path) -> None:
    cfg = test_config(
        str(tmp_path / "state"),
        "server.max_upload_bytes=4000",
        "server.max_inflight_bytes=4500",  # room for one upload of the logistic regression's 2.4 kB at a time
        "server.client_timeout=30",
    )
    async with running_server(cfg) as app:
        clients = [ScriptedClient(f"127.0.0.1:{app.port}", i) for i in range(3)]
        for c in clients:
            await c.register()
        tasks = await asyncio.gather(*(c.poll_task() for c in clients))
        release = asyncio.Event()
        first = asyncio.create_task(clients[0].upload_messages(stalled(clients[0], tasks[0], release)))
        first_size = encode(tasks[0].weights)[0].total_bytes
        assert 2 * first_size > 4500  # the cap leaves no room for a second upload
        await asyncio.sleep(0.3)
        with pytest.raises(aio.AioRpcError) as busy:
            await clients[1].upload(tasks[1].header, tasks[1].weights)
        assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "bytes of uploads in progress" in (busy.value.details() or "")
        release.set()
        await first
        for c, t in zip(clients[1:], tasks[1:], strict=True):  # retried, they are taken
            await c.upload(t.header, t.weights)
        assert app.coordinator.version == 1
        for c in clients:
            await c.close()


def test_uploads_past_the_inflight_byte_cap_are_told_to_retry(tmp_path: Path) -> None:
    asyncio.run(inflight_bytes_scenario(tmp_path))


async def strategy_failure_scenario(tmp_path: Path) -> None:
    cfg = test_config(str(tmp_path / "state"), "strategy=fedasync", "server.client_timeout=30")
    async with running_server(cfg) as app:
        strategy = app.coordinator.strategy
        real = type(strategy.aggregator)
        armed = [True]

        class FailsOnce(real):  # type: ignore[valid-type,misc]  # the real aggregator, made to fail on one call
            def aggregate(self, *args: object) -> object:
                if armed[0]:
                    armed[0] = False
                    raise OverflowError("made to fail")
                return real.aggregate(self, *args)

        strategy.aggregator.__class__ = FailsOnce
        a, b = [ScriptedClient(f"127.0.0.1:{app.port}", i) for i in range(2)]
        for c in (a, b):
            await c.register()
        task = await a.poll_task()
        before = {k: v.clone() for k, v in strategy.global_weights.items()}
        with pytest.raises(aio.AioRpcError) as refused:
            await a.upload(task.header, {k: v + 0.01 for k, v in task.weights.items()})
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "strategy failed on the result of task" in (refused.value.details() or "")
        assert "OverflowError: made to fail" in (refused.value.details() or "")
        assert strategy.version == 0 and all(torch.equal(before[k], v) for k, v in strategy.global_weights.items())
        assert app.coordinator.ended is None and app.coordinator.counters.rejected == 1
        for c in (a, b):  # the run goes on: the next results are applied
            task = await c.poll_task()
            reply = await c.upload(task.header, {k: v + 0.01 for k, v in task.weights.items()})
            assert not reply.dropped
        assert strategy.version == 2
        for c in (a, b):
            await c.close()


def test_a_result_the_strategy_fails_on_is_refused_and_the_run_goes_on(tmp_path: Path) -> None:
    asyncio.run(strategy_failure_scenario(tmp_path))


async def gone_scenario(tmp_path: Path) -> None:
    cfg = test_config(str(tmp_path / "state"), "strategy=fedasync", "server.read_timeout=0.5")
    async with running_server(cfg) as app:
        client = ScriptedClient(f"127.0.0.1:{app.port}", 0)
        await client.register()
        task = await client.poll_task()
        call = asyncio.create_task(client.upload_messages(stalled(client, task, asyncio.Event())))
        await asyncio.sleep(0.2)
        call.cancel()  # the client goes away mid-upload; the server's refusal finds nobody to answer
        await asyncio.sleep(1.0)
        reply = await client.upload(task.header, task.weights)  # and the task is still its own to answer
        assert not reply.dropped and app.coordinator.version == 1
        await client.close()


def test_a_client_gone_mid_upload_leaves_no_traceback(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    asyncio.run(gone_scenario(tmp_path))
    assert tracebacks(caplog) == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def garbage_stream_scenario(tmp_path: Path, uploads: int) -> list[grpc.StatusCode]:
    codes = []
    async with (
        running_server(test_config(str(tmp_path / "state"))) as app,
        aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        path = f"/{SERVICE.full_name}/UploadResult"
        upload = channel.stream_unary(path, request_serializer=identity, response_deserializer=identity)
        for _ in range(uploads):  # a garbage first message, then a client still writing 1 MiB of garbage
            with pytest.raises(aio.AioRpcError) as refused:
                await upload(iter([GARBAGE] + [GARBAGE * 2048] * 16), timeout=10)
            codes.append(refused.value.code())
    return codes


def test_a_stream_of_garbage_is_refused_as_invalid_even_while_the_client_writes(tmp_path: Path) -> None:
    assert set(asyncio.run(garbage_stream_scenario(tmp_path, 30))) == {grpc.StatusCode.INVALID_ARGUMENT}
