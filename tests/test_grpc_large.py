"""A model larger than one gRPC message travels both ways in chunks (the 2NN on Fashion-MNIST, 797 KB, through a
server whose messages are capped at 320 KB)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc import aio

from fedhet.server.testing import ScriptedClient, running_server, test_config
from fedhet.v1 import service_pb2 as spb
from fedhet.v1 import tensor_pb2 as tpb
from fedhet.v1.wire import encode

CHUNK = 64 << 10
MESSAGE_LIMIT = CHUNK + (256 << 10)  # the server's limit: one chunk plus room for a header


async def large_scenario(tmp_path: Path) -> None:
    cfg = test_config(
        str(tmp_path / "state"),
        "dataset=fashion_mnist",
        "model=2nn",
        f"server.chunk_bytes={CHUNK}",
        "strategy.scheduler.min_clients=1",
        "server.eval_every=100",
    )
    async with running_server(cfg) as app:
        client = ScriptedClient(f"127.0.0.1:{app.port}", 0)
        await client.register(num_samples=600)
        task = await client.poll_task()
        manifest, payload = encode(task.weights)
        assert len(payload) > MESSAGE_LIMIT
        trained = {k: v * 0.5 for k, v in task.weights.items()}
        assert (await client.upload(task.header, trained, num_samples=600)).version == 1  # the round closed
        assert app.coordinator.version == 1
        assert all(bool(app.coordinator.strategy.global_weights[k].eq(v).all()) for k, v in trained.items())
        # the same payload in one message is over the limit: chunking is what made it travel
        nxt = await client.poll_task()
        whole = [
            spb.ResultMessage(header=client.header(nxt.header, manifest, 600)),
            spb.ResultMessage(chunk=tpb.Chunk(offset=0, data=payload)),
        ]
        with pytest.raises(aio.AioRpcError) as refused:
            await client.upload_messages(iter(whole))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        await client.close()


def test_a_model_larger_than_one_grpc_message_travels_in_chunks(tmp_path: Path) -> None:
    asyncio.run(large_scenario(tmp_path))
