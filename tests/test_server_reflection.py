"""``fedhet server`` answers gRPC server reflection, so standard tools (grpcurl, grpc_health_probe, Postman) list its
services and call them without the .proto files."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from fedhet.server.testing import running_server, test_config


def discover(port: int) -> tuple[list[str], list[str]]:
    """What a generic tool learns: the services, and the methods of fedhet's, from reflection alone."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = sorted(database.get_services())
        service = DescriptorPool(database).FindServiceByName("fedhet.v1.FederatedLearning")
        return services, sorted(m.name for m in service.methods)


async def scenario(tmp_path: Path) -> tuple[list[str], list[str]]:
    async with running_server(test_config(str(tmp_path / "state"))) as app:
        return await asyncio.to_thread(discover, app.port)


def test_reflection_lists_the_services_and_their_methods(tmp_path: Path) -> None:
    services, methods = asyncio.run(scenario(tmp_path))
    assert services == [
        "fedhet.v1.FederatedLearning",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ]
    assert methods == ["GetTask", "Heartbeat", "Leave", "Register", "UploadResult"]
