"""A server process whose disk refuses writes (issue 16): clients are told UNAVAILABLE with the reason, never
UNKNOWN; health reports NOT_SERVING while checkpoints cannot be written; nothing acknowledged is lost, and the
versions a resume re-creates from the log are evaluated.

The failing disk is a real one: the server runs as its own process, and the test lowers that process's file-size
limit (RLIMIT_FSIZE, with SIGXFSZ ignored) while it runs, so its writes fail with EFBIG as they would with ENOSPC on
a full disk; both are the same OSError path.
"""

from __future__ import annotations

import asyncio
import json
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedhet.metrics import read_metrics
from fedhet.server.testing import ReceivedTask, ScriptedClient, wait_for_file

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prlimit on another process: Linux")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Server:
    """``python -m fedhet.server`` with its output collected through a pipe (a file would be limited too)."""

    def __init__(self, state: Path, *extra: str) -> None:
        args = [
            "num_clients=4",
            "server.port=0",
            f"server.port_file={state}.port",
            f"server.state_dir={state}",
            "server.poll_timeout=0.5",
            "server.heartbeat_seconds=0.2",
            "server.client_timeout=30",
            "server.shutdown_grace=0.2",
            "server.threads=1",
            "server.max_versions=10",
            "strategy.scheduler.fraction=1.0",
            "strategy.scheduler.min_clients=3",
            *extra,
        ]
        Path(f"{state}.port").unlink(missing_ok=True)
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "fedhet.server", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: signal.signal(signal.SIGXFSZ, signal.SIG_IGN),
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.port = int(wait_for_file(Path(f"{state}.port"), 60))

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line.decode(errors="replace"))

    def limit_file_size(self, nbytes: int) -> None:
        """Writes past ``nbytes`` of any file fail with EFBIG (RLIM_INFINITY lifts the limit)."""
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        resource.prlimit(self.popen.pid, resource.RLIMIT_FSIZE, (nbytes, hard))

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(timeout=10)


async def health_becomes(port: int, expected: int, seconds: float = 10.0) -> None:
    """Wait until the server's health check answers ``expected``."""
    deadline = time.monotonic() + seconds
    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while (await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)).status != expected:
            assert time.monotonic() < deadline, f"health did not become {expected} within {seconds} s"
            await asyncio.sleep(0.1)


async def storage_scenario(tmp_path: Path) -> None:
    state = tmp_path / "state"
    server = Server(state)
    try:
        clients = [ScriptedClient(f"127.0.0.1:{server.port}", i) for i in range(3)]
        for c in clients:
            await c.register()

        async def round_of(tasks: list[ReceivedTask]) -> list[int]:
            uploads = (c.upload(t.header, t.weights) for c, t in zip(clients, tasks, strict=True))
            replies = await asyncio.gather(*uploads)
            return [r.version for r in replies]

        first = await asyncio.gather(*(c.poll_task() for c in clients))
        assert max(await round_of(first)) == 1

        # a disk that takes nothing: the upload is refused as UNAVAILABLE, with the reason, and nothing applied
        second = await asyncio.gather(*(c.poll_task() for c in clients))
        server.limit_file_size(1)
        with pytest.raises(aio.AioRpcError) as refused:
            await clients[0].upload(second[0].header, second[0].weights)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "File too large" in (refused.value.details() or "")
        await health_becomes(server.port, NOT_SERVING)
        server.limit_file_size(resource.RLIM_INFINITY)
        assert max(await round_of(second)) == 2  # retried once the disk takes writes again, all applied
        await health_becomes(server.port, SERVING)

        # a disk with room for results and the log, not for a checkpoint: the round is acknowledged (the log
        # holds it), health says NOT_SERVING until a checkpoint is written again
        third = await asyncio.gather(*(c.poll_task() for c in clients))
        checkpoint_bytes = (state / "checkpoint.safetensors").stat().st_size
        result_bytes = 2440 + 512  # a result file: the logistic regression's weights and the safetensors header
        assert checkpoint_bytes > result_bytes + 512
        room = checkpoint_bytes - 256
        server.limit_file_size(room)
        assert max(await round_of(third)) == 3
        await health_becomes(server.port, NOT_SERVING)
        server.limit_file_size(resource.RLIM_INFINITY)
        await health_becomes(server.port, SERVING)  # the writer retried on its own
        server.limit_file_size(room)
        fourth = await asyncio.gather(*(c.poll_task() for c in clients))
        assert max(await round_of(fourth)) == 4  # acknowledged while its checkpoint fails

        for c in clients:
            await c.close()
        server.kill()  # SIGKILL: what was acknowledged must come back from the log
        output = "".join(server.lines)
        assert "Traceback" not in output, output[-3000:]
        assert "checkpoint through event" in output and "failed" in output

        # as if the crash came before version 4 was evaluated: the resume re-creates it from the log and must
        # evaluate it, once
        metrics = state / "metrics.jsonl"
        lines = [line for line in metrics.read_text().splitlines() if json.loads(line)["version"] < 4]
        metrics.write_text("".join(f"{line}\n" for line in lines))
        resumed = Server(state, "--resume")
        try:
            client = ScriptedClient(f"127.0.0.1:{resumed.port}", 0)
            reply = await client.register()
            assert reply.version == 4
            await client.close()
            deadline = time.monotonic() + 30
            while 4 not in (versions := [r.version for r in read_metrics(metrics)]):
                assert time.monotonic() < deadline, "the replayed version 4 was not evaluated"
                await asyncio.sleep(0.1)
            assert versions.count(4) == 1 and versions.count(3) == 1, versions
        finally:
            resumed.kill()
    finally:
        server.kill()


def test_a_full_disk_is_unavailable_not_unknown_and_loses_nothing_acknowledged(tmp_path: Path) -> None:
    asyncio.run(storage_scenario(tmp_path))
