"""Persistence: states round-trip without pickle, checkpoints are atomic and checksummed, and a coordinator
rebuilt from its state directory continues exactly where the acknowledged events left it."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from fedhet.runtime import StopRules
from fedhet.runtime.checkpoint import (
    CheckpointError,
    decode_checkpoint,
    encode_checkpoint,
    flatten_state,
    unflatten_state,
    write_atomic,
)
from fedhet.server.app import main
from fedhet.server.persistence import StateStore
from fedhet.server.runtime import Coordinator
from fedhet.server.session import DuplicateResult, RuntimeSettings
from fedhet.strategies import Strategy, build_strategy
from fedhet.types import ClientInfo, ClientProfile, Result, Task

SPEC = {
    "scheduler": {"name": "fedavg", "fraction": 1.0, "min_clients": 2, "local_steps": 1, "local_epochs": 0},
    "planner": {"name": "identity"},
    "aggregator": {"name": "weighted_mean"},
}
INITIAL = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "n": torch.tensor(0)}


def nested_state() -> dict[str, Any]:
    shared = torch.randn(3)
    return {
        "ints": {1: "a", 2: [1.5, None, True]},
        "tuple": (shared, shared, torch.tensor(7, dtype=torch.int64)),
        "deep": {"bf16": torch.ones(2, dtype=torch.bfloat16), "inf": float("inf")},
    }


def test_state_round_trips_through_json_and_tensors_only() -> None:
    state = nested_state()
    tree, tensors = flatten_state(state)
    json.dumps(tree)  # plain JSON
    assert len(tensors) == 3  # the shared tensor is stored once
    back = unflatten_state(json.loads(json.dumps(tree)), tensors)
    assert back["ints"] == {1: "a", 2: [1.5, None, True]}
    assert torch.equal(back["tuple"][0], state["tuple"][0]) and back["tuple"][0] is back["tuple"][1]
    assert back["deep"]["bf16"].dtype == torch.bfloat16 and back["deep"]["inf"] == float("inf")


def test_unsupported_state_is_named() -> None:
    with pytest.raises(CheckpointError, match=r"state entry \.x has type set"):
        flatten_state({"x": {1, 2}})


def test_corrupted_checkpoint_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    data = bytearray(encode_checkpoint(nested_state()))
    decode_checkpoint(bytes(data), "ckpt")
    for position in (len(data) - 3, 40, 3):
        broken = bytearray(data)
        broken[position] ^= 0xFF
        with pytest.raises(CheckpointError, match="ckpt is corrupted"):
            decode_checkpoint(bytes(broken), "ckpt")


def test_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoint.safetensors"
    write_atomic(path, b"old")

    def crash(src: str, dst: str) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        write_atomic(path, b"new")
    assert path.read_bytes() == b"old"


def info(cid: int) -> ClientInfo:
    return ClientInfo(cid, ClientProfile(0.001, 1e6), 10)


def coordinator(root: Path) -> Coordinator:
    strategy = build_strategy(SPEC, seed=0)
    return Coordinator(strategy, INITIAL, RuntimeSettings(stop=StopRules(50), shutdown_grace=0.1), StateStore(root))


def result(task: Task, value: float) -> Result:
    weights = {"w": torch.full((2, 3), value), "n": torch.tensor(1)}
    return Result(task.task_id, task.client_id, task.version, weights, 10, 1, 0.01, 0.3)


async def poll(coord: Coordinator, *clients: int) -> list[Task]:
    got = await asyncio.gather(*(coord.next_task(c, 2.0) for c in clients))
    assert all(isinstance(t, Task) for t in got), got
    return [t for t in got if isinstance(t, Task)]


def snapshot(strategy: Strategy) -> tuple[str, dict[str, torch.Tensor]]:
    tree, tensors = flatten_state(strategy.state_dict())
    return json.dumps(tree, sort_keys=True), tensors


async def crash_and_resume(root: Path) -> None:
    first = coordinator(root)
    first.open()
    runner = asyncio.create_task(first.run())
    for c in (0, 1):
        first.register(info(c))
    t0, t1 = await poll(first, 0, 1)
    await first.submit(result(t0, 1.0), first.records[t0.task_id], 24, False)
    await first.submit(result(t1, 3.0), first.records[t1.task_id], 24, False)
    assert first.version == 1
    t0, t1 = await poll(first, 0, 1)
    await first.submit(result(t0, 5.0), first.records[t0.task_id], 24, False)  # acknowledged, not aggregated
    before = snapshot(first.strategy)
    # a checkpoint write runs in a worker thread, which a cancelled task cannot stop (a real crash would): let it
    # finish, so no thread of the "dead" process deletes files under the resumed one
    assert first.checkpoints is not None
    await asyncio.wait_for(first.checkpoints.join(), 30)
    runner.cancel()  # the process dies here: no end event, no final checkpoint
    await asyncio.gather(runner, return_exceptions=True)

    second = coordinator(root)
    replayed = second.resume()
    second.open()
    assert replayed >= 1
    after = snapshot(second.strategy)
    assert after[0] == before[0]
    assert all(torch.equal(after[1][k], before[1][k]) for k in before[1])
    assert second.version == 1 and second.strategy.updates_applied == 2
    with pytest.raises(DuplicateResult):  # the acknowledged result is not taken twice
        second.begin_result(0, t0.task_id, t0.version)
    runner = asyncio.create_task(second.run())
    record = second.records[t1.task_id]  # client 1's task survived the crash
    await second.submit(result(t1, 7.0), record, 24, False)
    assert second.version == 2
    assert torch.equal(second.strategy.global_weights["w"], torch.full((2, 3), 6.0))  # mean of 5 and 7
    second.request_stop("test over")
    await asyncio.wait_for(runner, 10)


def test_a_coordinator_resumes_from_its_state_directory_with_nothing_acknowledged_lost(tmp_path: Path) -> None:
    asyncio.run(crash_and_resume(tmp_path / "state"))


def test_server_refuses_a_corrupted_checkpoint_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    store = StateStore(state)
    store.checkpoint_path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    args = ["num_clients=4", "server.port=0", f"server.state_dir={state}"]
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint.safetensors is corrupted" in err[0]
    assert main(args) == 2  # without --resume a used state dir is refused too
    assert "pass --resume" in capsys.readouterr().err


def test_a_torn_log_line_is_ignored_and_cut_before_appending(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    log = store.open_log(0)
    log.append({"kind": "tick", "now": 1.0})
    log.close()
    segment = store.wal_dir / f"{0:012d}.jsonl"
    with segment.open("a") as f:
        f.write('{"seq":1,"kind":"ti')  # the process died mid-append
    assert [e.seq for e in store.events_after(-1)] == [0]
    log = store.open_log(1)
    log.append({"kind": "tick", "now": 2.0})
    log.close()
    assert [e.seq for e in store.events_after(-1)] == [0, 1]


async def many_checkpoints(root: Path) -> tuple[int, int, Any]:
    """Versions come faster than checkpoints can be written: a checkpoint captures the newest state when the writer
    is free, never a queue of states; the newest lands."""
    from fedhet.server.journal import CheckpointWriter

    store = StateStore(root)
    store.open_log(0)
    current: dict[str, Any] = {}
    writer = CheckpointWriter(store, lambda: (dict(current), current["seq"]), min_interval=0.02)
    slow = store.commit_checkpoint

    def commit_slowly(data: bytes, seq: int) -> None:
        time.sleep(0.05)
        slow(data, seq)

    store.commit_checkpoint = commit_slowly  # type: ignore[method-assign]  # a slow disk
    task = asyncio.create_task(writer.run())
    for version in range(40):
        assert store.log is not None
        seq = store.log.append({"kind": "tick", "now": float(version)})
        current.update(version=version, w=torch.full((1000,), float(version)), seq=seq)
        writer.request()
        await asyncio.sleep(0.001)
    await asyncio.wait_for(writer.join(), 10)
    task.cancel()
    return writer.superseded, writer.written, store.load_checkpoint()


def test_checkpoints_coalesce_when_versions_outpace_the_disk(tmp_path: Path) -> None:
    superseded, written, latest = asyncio.run(many_checkpoints(tmp_path))
    assert superseded >= 30 and written <= 10  # one state captured per write, never a queue of 40 states in memory
    assert latest["version"] == 39 and torch.equal(latest["w"], torch.full((1000,), 39.0))
