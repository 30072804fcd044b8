"""How fast the fedhet server takes in client updates, against a raw gRPC sink of the same bytes.

For N concurrent clients (asyncio, one process; each with its own connection) every client uploads one
CNN-sized update (the FedAvg CNN: 1,663,370 fp32 parameters, 6.65 MB) to

* fedhet: a ``fedhet server`` process running FedAvg with all N clients in the round; each upload is validated
  (manifest, chunk order, SHA-256, decode, NaN/Inf), folded into the aggregate, and the last one closes the round;
* baseline: a raw gRPC server process in the same run that reads the very same serialized chunk messages and
  answers their byte count, with no parsing at all.

Both receive byte-identical streams (pre-serialized ``ResultMessage`` chunks, 1 MiB each). Printed: updates/s and
MB/s of each and the ratio fedhet / baseline (1.0 = the server adds nothing over moving the bytes).

    python benchmarks/grpc_ingest.py                 # N = 8, 64, 256
    python benchmarks/grpc_ingest.py --clients 8 --durable   # with the write-ahead log (fsync per update)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc import aio

from fedhet.data import load_dataset
from fedhet.models import build_model
from fedhet.v1 import service_pb2 as spb
from fedhet.v1.wire import chunks, encode

UPLOAD = "/fedhet.v1.FederatedLearning/UploadResult"
SINK = "/bench.Sink/Take"
CHUNK = 1 << 20
OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),  # every client its own connection, as separate devices would have
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
]


def identity(data: bytes) -> bytes:
    return data


async def sink_server(port_file: str) -> None:
    """The baseline: reads every message of a stream and answers the byte count (8 bytes)."""

    async def take(requests: object, context: aio.ServicerContext[bytes, bytes]) -> bytes:
        total = 0
        async for message in requests:  # type: ignore[attr-defined]
            total += len(message)
        return total.to_bytes(8, "little")

    handler = grpc.method_handlers_generic_handler(
        "bench.Sink",
        {
            "Take": grpc.stream_unary_rpc_method_handler(
                take, request_deserializer=identity, response_serializer=identity
            )
        },
    )
    server = aio.server(options=OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    Path(port_file).write_text(str(port))
    await server.wait_for_termination()


def wait_port(path: Path, process: subprocess.Popen[bytes], timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return int(path.read_text())
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}")
        time.sleep(0.05)
    raise SystemExit(f"no port in {path} after {timeout} s")


@dataclass
class Rate:
    seconds: float
    updates: int
    payload: int

    @property
    def per_second(self) -> float:
        return self.updates / self.seconds

    @property
    def mb_per_second(self) -> float:
        return self.updates * self.payload / self.seconds / 1e6


async def fedhet_round(port: int, n: int, chunks_bytes: list[bytes], header_for: dict[str, int]) -> Rate:
    """Register and poll N clients (not timed), then time their N concurrent uploads."""
    channels = [aio.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS) for _ in range(n)]
    try:
        for i, channel in enumerate(channels):
            register = channel.unary_unary(
                "/fedhet.v1.FederatedLearning/Register",
                request_serializer=spb.RegisterRequest.SerializeToString,
                response_deserializer=spb.RegisterReply.FromString,
            )
            await register(
                spb.RegisterRequest(
                    client_id=i,
                    num_samples=header_for["samples"],
                    profile=spb.ClientProfile(seconds_per_sample=0.001, bandwidth=1e7),
                )
            )

        async def poll(i: int) -> spb.TaskHeader:
            get = channels[i].unary_stream(
                "/fedhet.v1.FederatedLearning/GetTask",
                request_serializer=spb.GetTaskRequest.SerializeToString,
                response_deserializer=spb.TaskMessage.FromString,
            )
            for _ in range(100):
                header = None
                async for message in get(spb.GetTaskRequest(client_id=i)):
                    if message.WhichOneof("kind") == "header":
                        header = message.header  # the chunks that follow are read and dropped
                if header is not None:
                    return header
            raise SystemExit(f"client {i} got no task")

        headers = await asyncio.gather(*(poll(i) for i in range(n)))
        uploads = [
            channel.stream_unary(UPLOAD, request_serializer=identity, response_deserializer=identity)
            for channel in channels
        ]
        payload = header_for["payload"]

        async def upload(i: int) -> None:
            header = spb.ResultMessage(
                header=spb.ResultHeader(
                    client_id=i,
                    task_id=headers[i].task_id,
                    version=headers[i].version,
                    num_samples=header_for["samples"],
                    local_steps=1,
                    train_seconds=1.0,
                    loss=0.5,
                    manifest=MANIFEST,
                )
            ).SerializeToString()
            reply = spb.UploadReply.FromString(await uploads[i](iter([header, *chunks_bytes]), timeout=600))
            assert reply.task_id == headers[i].task_id

        start = time.perf_counter()
        await asyncio.gather(*(upload(i) for i in range(n)))
        return Rate(time.perf_counter() - start, n, payload)
    finally:
        for channel in channels:
            await channel.close(None)


async def sink_round(port: int, n: int, chunks_bytes: list[bytes], payload: int) -> Rate:
    channels = [aio.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS) for _ in range(n)]
    try:
        header = spb.ResultMessage(header=spb.ResultHeader(client_id=0, manifest=MANIFEST)).SerializeToString()
        takes = [c.stream_unary(SINK, request_serializer=identity, response_deserializer=identity) for c in channels]
        for channel in channels:  # connect first, as the fedhet clients are by the time they upload
            await channel.channel_ready()

        async def upload(i: int) -> None:
            await takes[i](iter([header, *chunks_bytes]), timeout=600)

        start = time.perf_counter()
        await asyncio.gather(*(upload(i) for i in range(n)))
        return Rate(time.perf_counter() - start, n, payload)
    finally:
        for channel in channels:
            await channel.close(None)


def start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--durable", action="store_true", help="fsync a write-ahead log entry per update")
    parser.add_argument("--sink-server", metavar="PORT_FILE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sink_server:
        asyncio.run(sink_server(args.sink_server))
        return

    data = load_dataset("fashion_mnist", root="/usr/share/datasets/fashion-mnist")
    model = build_model("cnn", data.input_shape, data.num_classes, seed=0)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = sum(v.numel() for v in weights.values())
    global MANIFEST
    MANIFEST, payload = encode(weights, "fp32")
    chunk_bytes = [spb.ResultMessage(chunk=c).SerializeToString() for c in chunks(payload, CHUNK)]
    print(
        f"update: FedAvg CNN, {params:,} fp32 parameters, {len(payload) / 1e6:.2f} MB in {len(chunk_bytes)} "
        f"chunks of {CHUNK >> 20} MiB; durable={args.durable}; {os.cpu_count()} CPUs shared by clients and server"
    )

    work = Path(tempfile.mkdtemp(prefix="grpc_ingest_"))
    sink = start([__file__, "--sink-server", str(work / "sink.port")], work / "sink.log")
    rows = []
    try:
        sink_port = wait_port(work / "sink.port", sink)
        for n in args.clients:
            state = work / f"state{n}"
            server = start(
                [
                    "-m",
                    "fedhet.server",
                    "dataset=fashion_mnist",
                    "model=cnn",
                    f"num_clients={n}",
                    "server.port=0",
                    f"server.port_file={state}.port",
                    f"server.state_dir={state}",
                    f"server.durable={str(args.durable).lower()}",
                    "server.max_versions=2",
                    "server.eval_every=1000",
                    f"server.max_concurrent_uploads={n}",
                    f"server.max_inflight_bytes={max(1 << 30, n * 2 * len(payload))}",
                    "server.threads=1",
                    "server.poll_timeout=30",
                    "server.client_timeout=600",
                    "server.shutdown_grace=1",
                    "strategy.scheduler.fraction=1.0",
                    f"strategy.scheduler.min_clients={n}",
                    "strategy.scheduler.round_timeout=3600",
                ],
                work / f"server{n}.log",
            )
            try:
                port = wait_port(Path(f"{state}.port"), server)
                deadline = time.monotonic() + 120  # the version-0 evaluation runs first; let it finish
                metrics = state / "metrics.jsonl"  # created at start; its first line is the version-0 evaluation
                while not (metrics.exists() and metrics.stat().st_size) and time.monotonic() < deadline:
                    time.sleep(0.1)
                ours = asyncio.run(fedhet_round(port, n, chunk_bytes, {"samples": 60000 // n, "payload": len(payload)}))
            finally:
                stop(server)
            base = asyncio.run(sink_round(sink_port, n, chunk_bytes, len(payload)))
            ratio = ours.per_second / base.per_second
            rows.append(
                {
                    "clients": n,
                    "fedhet_updates_per_s": round(ours.per_second, 2),
                    "fedhet_MB_per_s": round(ours.mb_per_second, 1),
                    "raw_grpc_updates_per_s": round(base.per_second, 2),
                    "raw_grpc_MB_per_s": round(base.mb_per_second, 1),
                    "ratio": round(ratio, 3),
                }
            )
            print(
                f"N={n:4d}  fedhet {ours.per_second:8.2f} updates/s {ours.mb_per_second:8.1f} MB/s   "
                f"raw gRPC {base.per_second:8.2f} updates/s {base.mb_per_second:8.1f} MB/s   "
                f"ratio {ratio:.3f}",
                flush=True,
            )
    finally:
        stop(sink)
    print(json.dumps(rows))


MANIFEST = encode({}, "fp32")[0]

if __name__ == "__main__":
    main()
