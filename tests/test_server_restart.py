"""SIGKILL the server mid-run and restart it on the same state directory: it resumes at the last durable version,
no acknowledged update is lost or counted twice, and the clients reconnect by themselves."""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

from fedhet.cli import compose
from fedhet.metrics import read_metrics
from fedhet.server.persistence import StateStore
from fedhet.server.testing import Process, free_port, spawn

VERSIONS = 6
FEDAVG = ["num_clients=4", "seed=0", "strategy.scheduler.fraction=1.0", "strategy.scheduler.min_clients=4"]


def server_args(tmp_path: Path, port: int) -> list[str]:
    return [
        *FEDAVG,
        f"server.port={port}",
        f"server.state_dir={tmp_path / 'state'}",
        f"server.max_versions={VERSIONS}",
        "server.poll_timeout=1.0",
        "server.heartbeat_seconds=0.2",
        "server.client_timeout=5.0",
        "server.shutdown_grace=5.0",
        "server.threads=1",
    ]


def client_args(port: int, i: int) -> list[str]:
    return [
        "num_clients=4",
        "seed=0",
        f"partition_id={i}",
        f"network.client_id={i}",
        f"network.server=127.0.0.1:{port}",
        f"profile.slowdown={(1, 2, 3, 4)[i]}",
        "profile.seconds_per_sample=0.001",
        "network.backoff_initial=0.1",
        "network.backoff_max=0.5",
        "network.reconnect_timeout=60",
        "network.max_seconds=100",
        "threads=1",
    ]


def current_version(metrics: Path) -> int:
    if not metrics.exists():
        return -1
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip().endswith("}")]
    return max((r["version"] for r in lines), default=-1)


def test_sigkilled_server_resumes_and_loses_no_acknowledged_update(tmp_path: Path) -> None:
    port = free_port()
    metrics = tmp_path / "state" / "metrics.jsonl"
    server = spawn("fedhet.server", server_args(tmp_path, port), tmp_path / "server1.log", tmp_path)
    clients: list[Process] = []
    restarted: Process | None = None
    try:
        clients = [
            spawn("fedhet.clients.network", client_args(port, i), tmp_path / f"client{i}.log", tmp_path)
            for i in range(4)
        ]
        deadline = time.monotonic() + 90
        while current_version(metrics) < 2:
            assert time.monotonic() < deadline, server.text()[-3000:]
            assert server.popen.poll() is None, server.text()[-3000:]
            time.sleep(0.05)
        time.sleep(random.uniform(0.0, 0.3))  # any moment in the middle of a round
        killed_at = current_version(metrics)
        server.kill()  # SIGKILL: no shutdown code runs
        assert killed_at < VERSIONS, "the run ended before the kill; slow the clients down"
        time.sleep(0.5)
        restarted = spawn(
            "fedhet.server", [*server_args(tmp_path, port), "--resume"], tmp_path / "server2.log", tmp_path
        )
        codes = [c.wait(timeout=100) for c in clients]
        assert restarted.wait(timeout=30) == 0, restarted.text()[-3000:]
    finally:
        for p in (*clients, server, *([restarted] if restarted else [])):
            p.kill()
    assert codes == [0, 0, 0, 0], [c.text()[-2000:] for c in clients]
    assert "resumed run" in restarted.text()

    final = read_metrics(metrics)[-1]
    assert final.version == VERSIONS
    assert final.updates_applied == 4 * VERSIONS and final.updates_dropped == 0  # nothing lost, nothing twice

    state = StateStore(tmp_path / "state").load_checkpoint()
    accepted = {int(t) for t, _ in state["accepted"]}
    acked = {int(m) for c in clients for m in re.findall(r"task (\d+) uploaded", c.text())}
    assert acked <= accepted, f"acknowledged but lost: {sorted(acked - accepted)}"

    from fedhet.sim.runner import simulate

    cfg = compose(
        [
            "dataset=synthetic",
            "model=logreg",
            *FEDAVG,
            f"sim.max_versions={VERSIONS}",
            "sim.progress=false",
            "fleet=homogeneous",
        ]
    )
    assert final.accuracy == simulate(cfg, tmp_path / "sim").final.accuracy
