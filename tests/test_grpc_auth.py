"""Identity: every RPC of the service (read from the proto descriptor) refuses a missing or wrong token, and a
client cannot act for another client id."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedhet.server.auth import TokenStore
from fedhet.server.testing import ScriptedClient, running_server, test_config
from fedhet.v1 import service_pb2 as spb

SERVICE = spb.DESCRIPTOR.services_by_name["FederatedLearning"]
METHODS = [m.name for m in SERVICE.methods]
TOKENS = {0: "token-of-client-zero-0123456789", 1: "token-of-client-one-0123456789"}


def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens.txt"
    path.write_text("# client token\n" + "".join(f"{c} {t}\n" for c, t in TOKENS.items()))
    return path


def request_for(method: str, client_id: int) -> Any:
    """A request message of ``method`` naming ``client_id`` (the header, for the upload stream)."""
    descriptor = SERVICE.methods_by_name[method]
    request = message_factory.GetMessageClass(descriptor.input_type)()
    target = request.header if descriptor.input_type.name == "ResultMessage" else request
    target.client_id = client_id
    return request


async def call(channel: aio.Channel, method: str, request: Any, metadata: tuple[tuple[str, str], ...]) -> Any:
    """Invoke ``method`` generically, from its descriptor; returns the first response."""
    descriptor = SERVICE.methods_by_name[method]
    path = f"/{SERVICE.full_name}/{method}"
    output = message_factory.GetMessageClass(descriptor.output_type)
    kwargs = {"request_serializer": type(request).SerializeToString, "response_deserializer": output.FromString}
    if descriptor.client_streaming and descriptor.server_streaming:
        stream = channel.stream_stream(path, **kwargs)(iter([request]), metadata=metadata, timeout=10)
        return [r async for r in stream]
    if descriptor.client_streaming:
        return await channel.stream_unary(path, **kwargs)(iter([request]), metadata=metadata, timeout=10)
    if descriptor.server_streaming:
        return [r async for r in channel.unary_stream(path, **kwargs)(request, metadata=metadata, timeout=10)]
    return await channel.unary_unary(path, **kwargs)(request, metadata=metadata, timeout=10)


CREDENTIALS = {
    "no token": (),
    "wrong token": (("authorization", "Bearer not-a-token-of-anyone-000"),),
    "not a bearer": (("authorization", TOKENS[0]),),
}


async def refusal_scenario(tmp_path: Path, method: str) -> None:
    cfg = test_config(str(tmp_path / "state"), f"server.tokens_file={tokens_file(tmp_path)}")
    async with running_server(cfg) as app:
        async with aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            for label, metadata in CREDENTIALS.items():
                with pytest.raises(aio.AioRpcError) as refused:
                    await call(channel, method, request_for(method, 0), metadata)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, label
            # a valid token of client 0 naming client 1
            with pytest.raises(aio.AioRpcError) as denied:
                await call(channel, method, request_for(method, 1), (("authorization", f"Bearer {TOKENS[0]}"),))
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            # the health service stays open for probes
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE.full_name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert app.coordinator.clients == {}  # nothing a refused call sent took effect


@pytest.mark.parametrize("method", METHODS)
def test_every_rpc_refuses_missing_or_wrong_credentials_and_foreign_client_ids(tmp_path: Path, method: str) -> None:
    asyncio.run(refusal_scenario(tmp_path, method))


async def forged_upload_scenario(tmp_path: Path) -> None:
    cfg = test_config(
        str(tmp_path / "state"), f"server.tokens_file={tokens_file(tmp_path)}", "strategy.scheduler.min_clients=2"
    )
    async with running_server(cfg) as app:
        zero = ScriptedClient(f"127.0.0.1:{app.port}", 0, TOKENS[0])
        one = ScriptedClient(f"127.0.0.1:{app.port}", 1, TOKENS[1])
        stranger = ScriptedClient(f"127.0.0.1:{app.port}", 2, TOKENS[1])  # client 1's token, claiming id 2
        await zero.register()
        await one.register()
        with pytest.raises(aio.AioRpcError) as impostor:
            await stranger.register()
        assert impostor.value.code() == grpc.StatusCode.PERMISSION_DENIED
        task0, _ = await asyncio.gather(zero.poll_task(), one.poll_task())
        one.client_id = 0  # client 1's token, client 0's id and task
        with pytest.raises(aio.AioRpcError) as forged:
            await one.upload(task0.header, task0.weights)
        assert forged.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert app.coordinator.counters.accepted == 0
        assert (await zero.upload(task0.header, task0.weights)).version == 0
        assert app.coordinator.counters.accepted == 1
        for c in (zero, one, stranger):
            await c.close()


def test_a_client_cannot_submit_for_another_client_id(tmp_path: Path) -> None:
    asyncio.run(forged_upload_scenario(tmp_path))


def test_tokens_file_errors_are_clear(tmp_path: Path) -> None:
    from fedhet.errors import ConfigError

    bad = tmp_path / "bad.txt"
    bad.write_text("zero token-of-client-zero-0123456789\n")
    with pytest.raises(ConfigError, match=r"bad.txt:1: expected '<client_id> <token>'"):
        TokenStore.from_file(bad)
    bad.write_text("0 short\n")
    with pytest.raises(ConfigError, match="shorter than 16"):
        TokenStore.from_file(bad)
    bad.write_text("0 same-token-for-both-clients\n1 same-token-for-both-clients\n")
    with pytest.raises(ConfigError, match="share a token"):
        TokenStore.from_file(bad)
