"""Liveness and load: dead clients never stall a run, heartbeats keep a training client alive, silent clients are
marked gone within a bounded time and can come back, and an overload gets RESOURCE_EXHAUSTED while health checks
answer quickly."""

from __future__ import annotations

import asyncio
import gc
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedhet.metrics import read_metrics
from fedhet.server.testing import Process, ScriptedClient, running_server, spawn, test_config, wait_for_file
from fedhet.v1 import service_pb2 as spb
from fedhet.v1.wire import chunks, encode


def test_clients_killed_mid_task_do_not_stall_a_synchronous_run(tmp_path: Path) -> None:
    server = spawn(
        "fedhet.server",
        [
            "num_clients=4",
            "server.port=0",
            f"server.port_file={tmp_path / 'port'}",
            f"server.state_dir={tmp_path / 'state'}",
            "server.max_versions=4",
            "server.poll_timeout=1.0",
            "server.heartbeat_seconds=0.2",
            "server.client_timeout=3.0",
            "server.shutdown_grace=3.0",
            "server.threads=1",
            "strategy.scheduler.fraction=1.0",
            "strategy.scheduler.min_clients=2",
            "strategy.scheduler.round_timeout=1.5",
        ],
        tmp_path / "server.log",
        tmp_path,
    )
    clients: list[Process] = []
    try:
        port = wait_for_file(tmp_path / "port", 60, server)
        clients = [
            spawn(
                "fedhet.clients.network",
                [
                    "num_clients=4",
                    f"partition_id={i}",
                    f"network.client_id={i}",
                    f"network.server=127.0.0.1:{port}",
                    "profile.seconds_per_sample=0.002",
                    f"profile.slowdown={1 if i < 2 else 50}",
                    "network.max_seconds=60",
                    "network.backoff_initial=0.2",
                    "threads=1",
                ],
                tmp_path / f"client{i}.log",
                tmp_path,
            )
            for i in range(4)
        ]
        deadline = time.monotonic() + 60
        while "received" not in clients[3].text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        wait_for_file(tmp_path / "state" / "metrics.jsonl", 30, server)
        for slow in clients[2:]:
            slow.kill()  # in the middle of their (slow) tasks
        assert [c.wait(timeout=60) for c in clients[:2]] == [0, 0], clients[0].text()[-2000:]
        assert server.wait(timeout=30) == 0, server.text()[-2000:]
    finally:
        for p in (*clients, server):
            p.kill()
    final = read_metrics(tmp_path / "state" / "metrics.jsonl")[-1]
    assert final.version == 4


async def async_strategy_scenario(tmp_path: Path) -> None:
    cfg = test_config(
        str(tmp_path / "state"), "strategy=fedasync", "strategy.scheduler.local_steps=1", "server.max_versions=50"
    )
    async with running_server(cfg) as app:
        clients = [ScriptedClient(f"127.0.0.1:{app.port}", i) for i in range(3)]
        for c in clients:
            await c.register()
        await clients[2].poll_task()  # then it dies with its task
        for _ in range(3):
            for c in clients[:2]:
                task = await c.poll_task()
                await c.upload(task.header, task.weights)
        assert app.coordinator.version == 6  # FedAsync applies every update on arrival, whoever is gone
        for c in clients:
            await c.close()


def test_an_asynchronous_strategy_carries_on_past_a_dead_client(tmp_path: Path) -> None:
    asyncio.run(async_strategy_scenario(tmp_path))


async def gone_scenario(tmp_path: Path) -> None:
    cfg = test_config(
        str(tmp_path / "state"),
        "server.client_timeout=1.0",
        "server.poll_timeout=0.3",
        "server.heartbeat_seconds=0.2",
        "strategy=fedasync",
        "strategy.scheduler.local_steps=1",
    )
    async with running_server(cfg) as app:
        coord = app.coordinator
        trainer = ScriptedClient(f"127.0.0.1:{app.port}", 0)
        silent = ScriptedClient(f"127.0.0.1:{app.port}", 1)
        await trainer.register()
        await silent.register()
        lost = await silent.poll_task()  # then it falls silent
        task = await trainer.poll_task()
        start = time.monotonic()
        # the trainer "trains" for three client timeouts, sending heartbeats; the other says nothing
        while time.monotonic() - start < 3.0:
            reply = await trainer.stub.Heartbeat(
                spb.HeartbeatRequest(client_id=0, task_id=task.header.task_id), timeout=5
            )
            assert reply.known and not reply.run_over
            assert not coord.clients[0].gone
            await asyncio.sleep(0.2)
        assert coord.clients[1].gone  # silent for > client_timeout (1 s), checked every 0.25 s
        assert (await trainer.upload(task.header, task.weights)).version == 1
        # the silent client comes back with the same identity and gets work
        back = await silent.poll_task()
        assert not coord.clients[1].gone and back.header.client_id == 1
        assert back.header.task_id != lost.header.task_id
        for c in (trainer, silent):
            await c.close()


def test_heartbeats_keep_a_training_client_and_silence_marks_a_client_gone(tmp_path: Path) -> None:
    asyncio.run(gone_scenario(tmp_path))


async def overload_scenario(tmp_path: Path) -> None:
    cfg = test_config(str(tmp_path / "state"), "server.max_concurrent_uploads=2", "strategy.scheduler.min_clients=6")
    async with running_server(cfg) as app:
        clients = [ScriptedClient(f"127.0.0.1:{app.port}", i) for i in range(6)]
        for c in clients:
            await c.register()
        tasks = await asyncio.gather(*(c.poll_task() for c in clients))
        release = asyncio.Event()

        def stalled(client: ScriptedClient, i: int) -> AsyncIterator[spb.ResultMessage]:
            manifest, payload = encode(tasks[i].weights)

            async def stream() -> AsyncIterator[spb.ResultMessage]:
                yield spb.ResultMessage(header=client.header(tasks[i].header, manifest))
                await release.wait()
                for chunk in chunks(payload, 1024):
                    yield spb.ResultMessage(chunk=chunk)

            return stream()

        first = [asyncio.create_task(c.upload_messages(stalled(c, i))) for i, c in enumerate(clients[:2])]
        await asyncio.sleep(0.3)  # both hold an upload slot
        for i, c in enumerate(clients[2:], 2):
            with pytest.raises(aio.AioRpcError) as busy:
                await c.upload_messages(stalled(c, i))
            assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "server busy" in (busy.value.details() or "")
        async with aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            started = time.monotonic()
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            assert time.monotonic() - started < 0.5
        release.set()
        assert [r.version for r in await asyncio.gather(*first)] == [0, 0]
        for i, c in enumerate(clients[2:], 2):  # retried later, they are taken
            await c.upload(tasks[i].header, tasks[i].weights)
        assert app.coordinator.version == 1 and app.coordinator.counters.busy == 4
        for c in clients:
            await c.close()


def test_an_overload_gets_resource_exhausted_and_health_still_answers(tmp_path: Path) -> None:
    asyncio.run(overload_scenario(tmp_path))


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def crowd_scenario(tmp_path: Path, n: int, rounds: int) -> list[float]:
    cfg = test_config(
        str(tmp_path / "state"),
        f"strategy.scheduler.min_clients={n}",
        "server.durable=false",
        f"server.max_concurrent_uploads={n}",
        f"server.max_versions={rounds + 1}",
    )
    rss: list[float] = []
    async with running_server(cfg) as app:
        clients = [ScriptedClient(f"127.0.0.1:{app.port}", i) for i in range(n)]
        await asyncio.gather(*(c.register() for c in clients))
        async with aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for _ in range(rounds):
                polls = asyncio.gather(*(c.poll_task() for c in clients))
                started = time.monotonic()
                await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert time.monotonic() - started < 1.0  # while hundreds of polls are open
                tasks = await polls
                await asyncio.gather(*(c.upload(t.header, t.weights) for c, t in zip(clients, tasks, strict=True)))
                gc.collect()
                rss.append(current_rss_mb())
        assert app.coordinator.version == rounds
        assert len(app.coordinator.records) <= n  # the next round's tasks, nothing left over
        assert len(app.coordinator.strategy.scheduler.buffer) == 0  # type: ignore[attr-defined]
        for c in clients:
            await c.close()
    return rss


def test_hundreds_of_concurrent_clients_with_bounded_memory(tmp_path: Path) -> None:
    rss = asyncio.run(crowd_scenario(tmp_path, n=200, rounds=6))
    assert rss[-1] - rss[1] < 32, f"RSS grew from {rss[1]:.0f} MB to {rss[-1]:.0f} MB over rounds 2 to 6"
