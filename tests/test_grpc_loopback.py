"""Real processes on loopback: one server and four clients of different speeds finish a run to a target version.

Synchronous FedAvg over every client is deterministic, so the deployed run must reach the simulator's accuracy
for the same config exactly; FedCompass (if registered) must reach the target version.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from fedhet.cli import compose
from fedhet.metrics import read_metrics
from fedhet.server.testing import Process, spawn, wait_for_file
from fedhet.strategies import SCHEDULERS

SLOWDOWNS = (1.0, 2.0, 4.0, 8.0)
VERSIONS = 5
COMMON = ["num_clients=4", "seed=0"]


def server_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        *COMMON,
        "server.port=0",
        f"server.port_file={tmp_path / 'port'}",
        f"server.state_dir={tmp_path / 'state'}",
        f"server.max_versions={VERSIONS}",
        "server.poll_timeout=1.0",
        "server.heartbeat_seconds=0.2",
        "server.client_timeout=5.0",
        "server.shutdown_grace=5.0",
        "server.threads=1",
        *extra,
    ]


def client_args(port: str | int, i: int, *extra: str, slowdown: float | None = None) -> list[str]:
    return [
        *COMMON,
        f"partition_id={i}",
        f"network.client_id={i}",
        f"network.server=127.0.0.1:{port}",
        f"profile.slowdown={SLOWDOWNS[i] if slowdown is None else slowdown}",
        "profile.seconds_per_sample=0.001",
        "network.backoff_initial=0.2",
        "network.backoff_max=1.0",
        "network.reconnect_timeout=30",
        "network.max_seconds=90",
        "threads=1",
        *extra,
    ]


def run_loopback(
    tmp_path: Path,
    server_extra: list[str],
    client_extra: list[str],
    per_client: Sequence[Sequence[str]] = ((),) * len(SLOWDOWNS),
    slowdown: float | None = None,
) -> tuple[list[int], float]:
    """Run a server and one client per entry of ``per_client`` (its own extra args; four by default, at
    ``SLOWDOWNS`` unless ``slowdown`` is given) to the end; returns the clients' exit codes and the wall time (s)."""
    start = time.monotonic()
    server = spawn("fedhet.server", server_args(tmp_path, *server_extra), tmp_path / "server.log", tmp_path)
    clients: list[Process] = []
    try:
        port = wait_for_file(tmp_path / "port", 60, server)
        clients = [
            spawn(
                "fedhet.clients.network",
                client_args(port, i, *client_extra, *own, slowdown=slowdown),
                tmp_path / f"client{i}.log",
                tmp_path,
            )
            for i, own in enumerate(per_client)
        ]
        codes = [c.wait(timeout=100) for c in clients]
        assert server.wait(timeout=30) == 0, server.text()[-3000:]
    finally:
        for p in (*clients, server):
            p.kill()
    for i, c in enumerate(clients):
        assert codes[i] == 0, f"client {i}:\n{c.text()[-3000:]}"
    return codes, time.monotonic() - start


def test_fedavg_four_clients_of_different_speeds_reach_the_simulators_accuracy(tmp_path: Path) -> None:
    fedavg = ["strategy.scheduler.fraction=1.0", "strategy.scheduler.min_clients=4"]
    _, wall = run_loopback(tmp_path, fedavg, [])
    records = read_metrics(tmp_path / "state" / "metrics.jsonl")
    assert [r.version for r in records] == list(range(VERSIONS + 1))
    final = records[-1]
    assert final.updates_applied == 4 * VERSIONS and final.updates_dropped == 0

    from fedhet.sim.runner import simulate

    sim_cfg = compose(
        [
            "dataset=synthetic",
            "model=logreg",
            *COMMON,
            *fedavg,
            f"sim.max_versions={VERSIONS}",
            "sim.progress=false",
            "fleet=homogeneous",
        ]
    )
    expected = simulate(sim_cfg, tmp_path / "sim").final
    assert final.accuracy == expected.accuracy
    assert final.loss == pytest.approx(expected.loss, rel=1e-5)
    assert final.accuracy > records[0].accuracy + 0.3
    print(
        json.dumps(
            {
                "strategy": "fedavg",
                "versions": final.version,
                "accuracy": final.accuracy,
                "wall_s": round(wall, 1),
                "run_s": round(final.virtual_time, 2),
            }
        )
    )


@pytest.mark.skipif("fedcompass" not in SCHEDULERS, reason="FedCompass has not landed")
def test_fedcompass_runs_unchanged_over_grpc(tmp_path: Path) -> None:
    compass = ["strategy=fedcompass", "strategy.scheduler.q_min=2", "strategy.scheduler.q_max=8"]
    _, wall = run_loopback(tmp_path, compass, [])
    records = read_metrics(tmp_path / "state" / "metrics.jsonl")
    final = records[-1]
    assert final.version == VERSIONS
    assert final.accuracy > records[0].accuracy  # it learns; how fast is the algorithm's business, not the server's
    print(
        json.dumps(
            {
                "strategy": "fedcompass",
                "versions": final.version,
                "accuracy": final.accuracy,
                "wall_s": round(wall, 1),
                "run_s": round(final.virtual_time, 2),
            }
        )
    )


def test_fedp3_with_dp_over_grpc_keeps_heads_and_accounts_privacy(tmp_path: Path) -> None:
    """FedP3 (LowerB) with DP-SGD clients: each client sends back only its layer, keeps its head in its state file,
    and the epsilon the server computes from the reported steps equals the client's own accountant's. Its frozen
    layer travels packed at int8 (frozen_bits=8): the server sends exactly those bytes; every task asks the client to
    train all the layers it receives (train_all)."""
    from fedhet.clients.config import compose_client, local_partition
    from fedhet.clients.trainer import ClientState
    from fedhet.models import build_model
    from fedhet.strategies.fedp3 import FedP3Planner
    from fedhet.types import ClientInfo, ClientProfile
    from fedhet.v1.wire import encode

    server = ["model=2nn", "strategy=fedp3", "strategy.planner.variant=lowerb", "strategy.scheduler.local_epochs=1"]
    server += ["strategy.planner.frozen_bits=8", "strategy.planner.train_all=true"]
    state_dir = tmp_path / "client_state"
    client = ["model=2nn", "privacy.enabled=true", "privacy.noise_multiplier=1.0", f"state_dir={state_dir}"]
    run_loopback(tmp_path, server, client)
    records = read_metrics(tmp_path / "state" / "metrics.jsonl")
    final = records[-1]
    assert final.version == VERSIONS
    assert final.bytes_up < final.bytes_down  # one shared layer up; every shared layer (one pruned) down
    data = local_partition(compose_client(COMMON))
    model = build_model("2nn", data.input_shape, data.num_classes, seed=0).state_dict()
    planner = FedP3Planner("lowerb", frozen_bits=8)
    plans = [planner.plan(ClientInfo(c, ClientProfile(1.0, 1e6), 10), model, c) for c in range(4)]
    sizes = [encode(p.weights, "fp32", p.sparse, p.sparse_bits)[0].total_bytes for p in plans]  # values don't matter
    logs = [(tmp_path / f"client{c}.log").read_text() for c in range(4)]
    received = [len(re.findall(r"task \d+ received", log)) for log in logs]
    assert all(n == log.count("trains every received layer") for n, log in zip(received, logs, strict=True))
    assert final.bytes_down == sum(n * size for n, size in zip(received, sizes, strict=True))  # clients join late
    assert final.epsilon is not None and sorted(final.epsilon, key=int) == ["0", "1", "2", "3"]
    for cid, epsilon in final.epsilon.items():
        state = ClientState.from_bytes((state_dir / f"client{cid}.state").read_bytes())
        assert set(state.tensors) == {"5.weight", "5.bias"}  # the head: never sent, kept across tasks
        assert epsilon == pytest.approx(state.epsilon(1e-5), rel=1e-6) and epsilon > 0


@pytest.mark.parametrize("low_bit_weights", [False, True], ids=["qat", "low-bit-weights"])
def test_clients_at_32_8_and_4_bits_train_and_upload_at_their_bitwidth(tmp_path: Path, low_bit_weights: bool) -> None:
    """One fp32, one 8-bit and one 4-bit `fedhet client` under FedAvg: the low-bit clients upload packed int8 and
    int4 updates (a quarter and an eighth of fp32's bytes, plus scales) and receive their tasks packed alike; the
    server counts exactly those bytes, and the model still learns; with quantization-aware training and with weights
    held at the client's bitwidth (train.low_bit_weights)."""
    from fedhet.clients.config import compose_client, local_partition
    from fedhet.models import build_model
    from fedhet.v1.wire import encode

    bitwidths = (32, 8, 4)
    fedavg = ["strategy.scheduler.fraction=1.0", f"strategy.scheduler.min_clients={len(bitwidths)}"]
    mode = [f"train.low_bit_weights={str(low_bit_weights).lower()}"]
    run_loopback(tmp_path, fedavg, mode, [[f"profile.bitwidth={b}"] for b in bitwidths], slowdown=1.0)

    data = local_partition(compose_client(COMMON))
    model = build_model("logreg", data.input_shape, data.num_classes, seed=0).state_dict()
    size = {b: encode(model, "fp32" if b == 32 else f"int{b}")[0].total_bytes for b in bitwidths}
    assert size[8] / size[32] == pytest.approx(1 / 4, abs=0.02) and size[4] / size[32] == pytest.approx(1 / 8, abs=0.02)
    for i, bits in enumerate(bitwidths):  # each client's uploads, as it logged them
        uploads = re.findall(r"uploaded at (\w+), (\d+) bytes", (tmp_path / f"client{i}.log").read_text())
        assert uploads == [("fp32" if bits == 32 else f"int{bits}", str(size[bits]))] * VERSIONS, (bits, uploads)
        held = "weights held at that bitwidth" in (tmp_path / f"client{i}.log").read_text()
        assert held == (low_bit_weights and bits < 32)

    records = read_metrics(tmp_path / "state" / "metrics.jsonl")
    final = records[-1]
    assert final.version == VERSIONS and final.updates_applied == len(bitwidths) * VERSIONS
    assert final.bytes_up == VERSIONS * sum(size.values())  # what the server received: packed from 8 and 4 bits
    assert final.bytes_down == VERSIONS * sum(size.values())  # and sent: tasks packed at each client's bitwidth
    assert final.accuracy > records[0].accuracy


def test_a_client_whose_training_diverges_sends_nothing_and_the_run_goes_on(tmp_path: Path) -> None:
    """A 4-bit `fedhet client` whose every task diverges (learning rate 1e38: NaN weights, which no bitwidth can
    hold) sends no update and asks again, as a simulated client's result is refused (loss NaN); the server loses its
    tasks, and the healthy client's updates make every version."""
    fedavg = ["strategy.scheduler.fraction=1.0", "strategy.scheduler.min_clients=2"]
    per_client = [["profile.bitwidth=32"], ["profile.bitwidth=4", "train.lr=1e38"]]
    run_loopback(tmp_path, fedavg, [], per_client, slowdown=1.0)
    diverged = (tmp_path / "client1.log").read_text()
    assert "local training diverged (NaN or Inf); no update sent, asking again" in diverged
    assert "uploaded at" not in diverged
    final = read_metrics(tmp_path / "state" / "metrics.jsonl")[-1]
    assert final.version == VERSIONS and final.updates_applied == VERSIONS  # the fp32 client's, one a version
