"""Update validation over gRPC: every bad update is refused before any arithmetic with a typed error and the right
status; the global model is then bit-exactly the aggregate of the other clients. Replays apply at most once."""

from __future__ import annotations

import asyncio
import copy
import json
import math
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import torch

from fedhet.server.persistence import StateStore
from fedhet.server.testing import ReceivedTask, ScriptedClient, running_server, test_config
from fedhet.server.validation import (
    ResultFields,
    SampleCountError,
    check_result_fields,
    check_update_manifest,
)
from fedhet.strategies import UpdateBuffer
from fedhet.strategies.aggregators import WeightedMean
from fedhet.types import Result
from fedhet.updates import NormBound, NormBoundExceeded, ShapeMismatch, TensorMeta
from fedhet.v1 import service_pb2 as spb
from fedhet.v1 import tensor_pb2 as tpb
from fedhet.v1.wire import chunks, encode

SAMPLES = 50
Mutation = Callable[[ScriptedClient, ReceivedTask, dict[str, torch.Tensor]], list[spb.ResultMessage]]


def trained(task: ReceivedTask, shift: float) -> dict[str, torch.Tensor]:
    """A plausible trained model: the task's weights moved by ``shift``."""
    return {k: v + shift if v.is_floating_point() else v.clone() for k, v in task.weights.items()}


def messages(
    client: ScriptedClient,
    task: ReceivedTask,
    manifest: tpb.Manifest,
    payload: bytes,
    num_samples: int = SAMPLES,
    chunk: int = 512,
) -> list[spb.ResultMessage]:
    header = client.header(task.header, manifest, num_samples)
    return [spb.ResultMessage(header=header)] + [spb.ResultMessage(chunk=c) for c in chunks(payload, chunk)]


def _with_weights(change: Callable[[dict[str, torch.Tensor]], None], encoding: str = "fp32") -> Mutation:
    def mutate(client: ScriptedClient, task: ReceivedTask, w: dict[str, torch.Tensor]) -> list[spb.ResultMessage]:
        change(w)
        return messages(client, task, *encode(w, encoding))

    return mutate


def _with_manifest(change: Callable[[tpb.Manifest], None]) -> Mutation:
    def mutate(client: ScriptedClient, task: ReceivedTask, w: dict[str, torch.Tensor]) -> list[spb.ResultMessage]:
        manifest, payload = encode(w)
        change(manifest)
        return messages(client, task, manifest, payload)

    return mutate


def _with_payload(change: Callable[[bytearray], bytes]) -> Mutation:
    def mutate(client: ScriptedClient, task: ReceivedTask, w: dict[str, torch.Tensor]) -> list[spb.ResultMessage]:
        manifest, payload = encode(w)
        return messages(client, task, manifest, change(bytearray(payload)))

    return mutate


def _with_samples(n: int) -> Mutation:
    def mutate(client: ScriptedClient, task: ReceivedTask, w: dict[str, torch.Tensor]) -> list[spb.ResultMessage]:
        return messages(client, task, *encode(w), num_samples=n)

    return mutate


def _with_header(**fields: float) -> Mutation:
    def mutate(client: ScriptedClient, task: ReceivedTask, w: dict[str, torch.Tensor]) -> list[spb.ResultMessage]:
        out = messages(client, task, *encode(w))
        for key, value in fields.items():
            setattr(out[0].header, key, value)
        return out

    return mutate


def _with_dp(noise_multiplier: float) -> Mutation:
    def mutate(client: ScriptedClient, task: ReceivedTask, w: dict[str, torch.Tensor]) -> list[spb.ResultMessage]:
        out = messages(client, task, *encode(w))
        out[0].header.dp.CopyFrom(spb.DPReport(noise_multiplier=noise_multiplier, sample_rate=0.1, steps=1))
        return out

    return mutate


def _reordered(client: ScriptedClient, task: ReceivedTask, w: dict[str, torch.Tensor]) -> list[spb.ResultMessage]:
    out = messages(client, task, *encode(w), chunk=256)
    out[1], out[2] = out[2], out[1]
    return out


def _missing_chunk(client: ScriptedClient, task: ReceivedTask, w: dict[str, torch.Tensor]) -> list[spb.ResultMessage]:
    out = messages(client, task, *encode(w), chunk=256)
    del out[2]
    return out


def _flip(buf: bytearray) -> bytes:
    buf[100] ^= 0x01
    return bytes(buf)


def _set_shape(name: str, shape: list[int]) -> Callable[[tpb.Manifest], None]:
    def change(m: tpb.Manifest) -> None:
        spec = next(s for s in m.tensors if s.name == name)
        del spec.shape[:]
        spec.shape.extend(shape)

    return change


def _set_field(name: str, **fields: int) -> Callable[[tpb.Manifest], None]:
    def change(m: tpb.Manifest) -> None:
        spec = next(s for s in m.tensors if s.name == name)
        for key, value in fields.items():
            setattr(spec, key, value)

    return change


def _nan(w: dict[str, torch.Tensor]) -> None:
    w["1.weight"][0, 0] = float("nan")


def _inf(w: dict[str, torch.Tensor]) -> None:
    w["1.bias"][3] = float("inf")


def _huge(w: dict[str, torch.Tensor]) -> None:
    w["1.bias"][0] = 1.0e6  # finite in fp32, Inf once sent as fp16


def _broadcastable(w: dict[str, torch.Tensor]) -> None:
    w["1.weight"] = torch.zeros(1)


def _missing(w: dict[str, torch.Tensor]) -> None:
    del w["1.bias"]


def _extra(w: dict[str, torch.Tensor]) -> None:
    w["extra"] = torch.zeros(3)


def _largest(w: dict[str, torch.Tensor]) -> None:
    w["1.weight"] = torch.full_like(w["1.weight"], 3.4e38)  # finite, and the loss would be NaN


def _float64(w: dict[str, torch.Tensor]) -> None:
    w["1.bias"] = w["1.bias"].double()


BAD: dict[str, tuple[Mutation, str]] = {
    "broadcastable shape (1,) for (10, 60)": (_with_weights(_broadcastable), "ShapeMismatch"),
    "transposed shape in the manifest": (_with_manifest(_set_shape("1.weight", [60, 10])), "ShapeMismatch"),
    "dtype differs from the task's": (_with_weights(_float64), "DtypeMismatch"),
    "declared dtype disagrees with encoding": (
        _with_manifest(_set_field("1.bias", dtype=tpb.DTYPE_INT64)),
        "DtypeMismatch",
    ),
    "byte length disagrees with the shape": (_with_manifest(_set_field("1.bias", byte_length=44)), "ManifestError"),
    "packed from a client registered at 32 bits": (_with_weights(lambda w: None, "int8"), "BitwidthMismatch"),
    "NaN in the payload": (_with_weights(_nan), "NonFiniteError"),
    "Inf in the payload": (_with_weights(_inf), "NonFiniteError"),
    "Inf after decoding fp16": (_with_weights(_huge, "fp16"), "NonFiniteError"),
    "values near float32's largest, no bound configured": (_with_weights(_largest), "NormBoundExceeded"),
    "missing tensor": (_with_weights(_missing), "MissingTensor"),
    "extra tensor": (_with_weights(_extra), "ExtraTensor"),
    "zero samples": (_with_samples(0), "SampleCountError"),
    "negative samples": (_with_samples(-5), "SampleCountError"),
    "absurd samples": (_with_samples(10**12), "SampleCountError"),
    "NaN loss": (_with_header(loss=float("nan")), "SampleCountError"),
    "negative train time": (_with_header(train_seconds=-1.0), "SampleCountError"),
    "finite but absurd train time": (_with_header(train_seconds=1e308), "SampleCountError"),
    "vanishing DP noise": (_with_dp(5e-324), "SampleCountError"),
    "absurd DP noise": (_with_dp(1e300), "SampleCountError"),
    "personal accuracy over 1": (_with_header(personal_accuracy=1.5), "SampleCountError"),
    "corrupted chunk": (_with_payload(_flip), "ChunkError"),
    "truncated payload": (_with_payload(lambda b: bytes(b[:-8])), "ChunkError"),
    "reordered chunks": (_reordered, "ChunkError"),
    "missing chunk": (_missing_chunk, "ChunkError"),
}


def reference(initial: dict[str, torch.Tensor], results: list[Result]) -> dict[str, torch.Tensor]:
    """The global model FedAvg makes of exactly ``results`` (same arithmetic, same order)."""
    buffer = UpdateBuffer()
    for r in results:
        buffer.add(r, float(r.num_samples))
    return WeightedMean().aggregate(initial, buffer, 0)


def as_result(client: ScriptedClient, task: ReceivedTask, w: dict[str, torch.Tensor]) -> Result:
    return Result(task.header.task_id, client.client_id, task.header.version, w, SAMPLES, 1, 0.01, 0.5)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"tensor {k} differs"


async def bad_update_scenario(tmp_path: Path, mutate: Mutation, error: str, *overrides: str) -> None:
    cfg = test_config(str(tmp_path / "state"), *overrides)
    async with running_server(cfg) as app:
        coord = app.coordinator
        target = f"127.0.0.1:{app.port}"
        bad, b, c = (ScriptedClient(target, i) for i in range(3))
        for cl in (bad, b, c):
            await cl.register(SAMPLES)
        tasks = await asyncio.gather(*(cl.poll_task() for cl in (bad, b, c)))
        initial = {k: v.clone() for k, v in coord.strategy.global_weights.items()}

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await bad.upload_messages(iter(mutate(bad, tasks[0], trained(tasks[0], 0.5))))
        status = grpc.StatusCode.RESOURCE_EXHAUSTED if error == "PayloadTooLarge" else grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.code() == status, refused.value.details()
        assert error in (refused.value.details() or "")
        assert coord.version == 0
        assert_same(coord.strategy.global_weights, initial)
        assert coord.counters.rejected == 1

        good = [(b, tasks[1], trained(tasks[1], 1.0)), (c, tasks[2], trained(tasks[2], -2.0))]
        for cl, task, w in good:
            assert (await cl.upload(task.header, w, SAMPLES)).version == 0
        assert await bad.poll_task()  # asking again: its task is lost, the round closes with b and c
        assert coord.version == 1
        assert_same(coord.strategy.global_weights, reference(initial, [as_result(*g) for g in good]))
        counters = coord.counters
        assert (
            counters.received == counters.accepted + counters.rejected + counters.duplicates + counters.not_outstanding
        )
        for cl in (bad, b, c):
            await cl.close()


@pytest.mark.parametrize("case", list(BAD))
def test_bad_update_is_refused_and_the_model_is_the_others_aggregate(tmp_path: Path, case: str) -> None:
    mutate, error = BAD[case]
    asyncio.run(bad_update_scenario(tmp_path, mutate, error))


def test_update_over_the_norm_bound_is_rejected(tmp_path: Path) -> None:
    def far(w: dict[str, torch.Tensor]) -> None:
        w["1.weight"] += 10.0  # norm about 245; the good updates' are 25 and 49

    asyncio.run(bad_update_scenario(tmp_path, _with_weights(far), "NormBoundExceeded", "server.norm_bound=100"))


def test_payload_declared_over_the_cap_is_resource_exhausted(tmp_path: Path) -> None:
    def declare_huge(m: tpb.Manifest) -> None:
        m.total_bytes = 10**12

    asyncio.run(bad_update_scenario(tmp_path, _with_manifest(declare_huge), "PayloadTooLarge"))


def test_stream_past_its_declared_size_is_cut_off(tmp_path: Path) -> None:
    def longer(client: ScriptedClient, task: ReceivedTask, w: dict[str, torch.Tensor]) -> list[spb.ResultMessage]:
        manifest, payload = encode(w)
        return messages(client, task, manifest, payload + bytes(4096))

    asyncio.run(bad_update_scenario(tmp_path, longer, "PayloadTooLarge"))


async def clipped_scenario(tmp_path: Path) -> None:
    cfg = test_config(
        str(tmp_path / "state"),
        "server.norm_bound=1.0",
        "server.norm_action=clip",
        "strategy.scheduler.min_clients=1",
        "strategy.scheduler.fraction=1.0",
    )
    async with running_server(cfg) as app:
        client = ScriptedClient(f"127.0.0.1:{app.port}", 0)
        await client.register(SAMPLES)
        task = await client.poll_task()
        start = task.weights
        await client.upload(task.header, trained(task, 1.0), SAMPLES)
        new = app.coordinator.strategy.global_weights
        delta = torch.cat([(new[k].double() - start[k].double()).reshape(-1) for k in new])
        assert float(delta.norm()) == pytest.approx(1.0, rel=1e-5)
        assert app.coordinator.counters.clipped == 1
        await client.close()


def test_update_over_the_norm_bound_is_clipped_when_configured(tmp_path: Path) -> None:
    asyncio.run(clipped_scenario(tmp_path))


async def replay_scenario(tmp_path: Path) -> None:
    cfg = test_config(str(tmp_path / "state"), "strategy.scheduler.min_clients=2")
    async with running_server(cfg) as app:
        coord = app.coordinator
        a, b = ScriptedClient(f"127.0.0.1:{app.port}", 0), ScriptedClient(f"127.0.0.1:{app.port}", 1)
        for cl in (a, b):
            await cl.register(SAMPLES)
        ta, tb = await asyncio.gather(a.poll_task(), b.poll_task())
        initial = {k: v.clone() for k, v in coord.strategy.global_weights.items()}
        wa, wb = trained(ta, 1.0), trained(tb, 3.0)
        first = await a.upload(ta.header, wa, SAMPLES)
        again = await a.upload(ta.header, wa, SAMPLES)  # replay before the round closes
        assert not first.duplicate and again.duplicate
        # b cannot submit a's task, nor its own task under a's id
        with pytest.raises(grpc.aio.AioRpcError) as stolen:
            await b.upload(ta.header, wb, SAMPLES)
        assert stolen.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        await b.upload(tb.header, wb, SAMPLES)
        assert coord.version == 1
        expected = reference(initial, [as_result(a, ta, wa), as_result(b, tb, wb)])
        assert_same(coord.strategy.global_weights, expected)
        late = await a.upload(ta.header, wa, SAMPLES)  # replay after aggregation
        assert late.duplicate and coord.version == 1
        assert_same(coord.strategy.global_weights, expected)
        assert coord.counters.duplicates == 2 and coord.strategy.updates_applied == 2
        for cl in (a, b):
            await cl.close()


def test_replayed_update_is_applied_at_most_once(tmp_path: Path) -> None:
    asyncio.run(replay_scenario(tmp_path))


async def packed_scenario(tmp_path: Path) -> None:
    """A client registered at 8 bits gets its task packed at int8; its int4 upload is refused naming both
    bitwidths, its int8 upload accepted; byte counters count the payloads that travelled."""
    cfg = test_config(str(tmp_path / "state"))
    async with running_server(cfg) as app:
        coord = app.coordinator
        target = f"127.0.0.1:{app.port}"
        low, b, c = (ScriptedClient(target, i) for i in range(3))
        profile = spb.ClientProfile(seconds_per_sample=0.001, bandwidth=1e7, bitwidth=8)
        await low.stub.Register(spb.RegisterRequest(client_id=0, num_samples=SAMPLES, profile=profile), timeout=10)
        for cl in (b, c):
            await cl.register(SAMPLES)
        tasks = await asyncio.gather(*(cl.poll_task() for cl in (low, b, c)))
        packed, dense = tasks[0].header.manifest, tasks[1].header.manifest
        assert {(s.encoding, s.quant.bits) for s in packed.tensors} == {(tpb.ENCODING_PACKED_INT, 8)}
        assert {s.encoding for s in dense.tensors} == {tpb.ENCODING_FP32}
        assert packed.total_bytes < 0.3 * dense.total_bytes
        assert coord.counters.bytes_down == sum(t.header.manifest.total_bytes for t in tasks)

        w = trained(tasks[0], 0.5)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await low.upload(tasks[0].header, w, SAMPLES, encoding="int4")
        details = refused.value.details() or ""
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "BitwidthMismatch" in details and "4 bits" in details and "8 bits" in details, details
        assert coord.counters.rejected == 1 and coord.counters.bytes_up == 0
        await low.upload(tasks[0].header, w, SAMPLES, encoding="int8")
        for cl, task in ((b, tasks[1]), (c, tasks[2])):
            await cl.upload(task.header, trained(task, 1.0), SAMPLES)
        assert coord.version == 1
        uploads = [encode(w, "int8")[0], *(encode(trained(t, 1.0))[0] for t in tasks[1:])]
        assert coord.counters.bytes_up == sum(m.total_bytes for m in uploads)
        for cl in (low, b, c):
            await cl.close()


def test_packed_update_at_the_registered_bitwidth_is_accepted_and_another_refused(tmp_path: Path) -> None:
    asyncio.run(packed_scenario(tmp_path))


async def unpackable_registration_scenario(tmp_path: Path) -> None:
    async with running_server(test_config(str(tmp_path / "state"))) as app:
        client = ScriptedClient(f"127.0.0.1:{app.port}", 0)
        profile = spb.ClientProfile(seconds_per_sample=0.001, bandwidth=1e7, bitwidth=7)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.stub.Register(spb.RegisterRequest(client_id=0, num_samples=SAMPLES, profile=profile))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "no encoding for bitwidth 7" in (refused.value.details() or "")
        assert not app.coordinator.clients
        await client.close()


def test_registration_at_a_bitwidth_without_a_wire_encoding_is_refused(tmp_path: Path) -> None:
    asyncio.run(unpackable_registration_scenario(tmp_path))


async def absurd_samples_scenario(tmp_path: Path) -> None:
    async with running_server(test_config(str(tmp_path / "state"))) as app:
        client = ScriptedClient(f"127.0.0.1:{app.port}", 0)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.register(4_600_000_000_000_000_000)  # would make its update the whole weighted mean
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "num_samples 4600000000000000000 must be in 1.." in (refused.value.details() or "")
        assert not app.coordinator.clients
        await client.register(SAMPLES)  # the same client, honest, is welcome
        assert 0 in app.coordinator.clients
        await client.close()


def test_a_registration_with_more_samples_than_the_dataset_holds_is_refused(tmp_path: Path) -> None:
    asyncio.run(absurd_samples_scenario(tmp_path))


# ---------------------------------------------------------------- unit checks, no server
META = {"w": TensorMeta("w", (3, 3), torch.float32), "n": TensorMeta("n", (), torch.int64)}


def test_broadcastable_shape_is_a_shape_mismatch_before_the_payload() -> None:
    manifest, _ = encode({"w": torch.zeros(1), "n": torch.tensor(0)})
    with pytest.raises(ShapeMismatch, match=r"\(1,\) sent for \(3, 3\)"):
        check_update_manifest(manifest, META)


@pytest.mark.parametrize("n", [0, -1, 101])
def test_sample_count_out_of_range_is_refused(n: int) -> None:
    with pytest.raises(SampleCountError):
        check_result_fields(ResultFields(n, 1, 0.1, 0.5), registered_samples=100)


@pytest.mark.parametrize("accuracy", [-0.1, 1.5, float("nan"), float("inf")])
def test_a_personal_accuracy_outside_zero_one_is_refused(accuracy: float) -> None:
    check_result_fields(ResultFields(5, 1, 0.1, 0.5, 0.75), registered_samples=100)
    with pytest.raises(SampleCountError, match="personal_accuracy must be in"):
        check_result_fields(ResultFields(5, 1, 0.1, 0.5, accuracy), registered_samples=100)


def test_norm_check_clips_onto_the_bound_and_leaves_integers() -> None:
    start = {"w": torch.zeros(4), "n": torch.tensor(3)}
    out = NormBound(1.0, "clip").check({"w": torch.full((4,), 2.0), "n": torch.tensor(3)}, start)
    assert out.clipped and out.norm == pytest.approx(4.0)
    assert float(out.weights["w"].norm()) == pytest.approx(1.0)
    assert torch.equal(out.weights["n"], torch.tensor(3))
    untouched = copy.deepcopy(start)
    assert not NormBound(1.0, "reject").check(untouched, start).clipped


@pytest.mark.parametrize("value", [math.inf, math.nan, 3e38])
@pytest.mark.parametrize("action", ["reject", "clip"])
def test_an_update_whose_norm_is_not_finite_is_refused_even_when_clipping(value: float, action: str) -> None:
    """NaN or Inf weights, or squares that overflow float32, have no finite norm to scale onto the bound: clipping
    would make NaN weights, so such an update is refused under either action (in simulation, where no decoding
    checks finiteness first, too)."""
    start = {"w": torch.zeros(4)}
    with pytest.raises(NormBoundExceeded, match="weights hold NaN or Inf, or values near float32's largest"):
        NormBound(0.0, action).check({"w": torch.tensor([1.0, value, 0.0, 0.0])}, start)


async def late_result_scenario(tmp_path: Path) -> None:
    cfg = test_config(
        str(tmp_path / "state"), "strategy.scheduler.min_clients=2", "strategy.scheduler.round_timeout=0.5"
    )
    async with running_server(cfg) as app:
        target = f"127.0.0.1:{app.port}"
        late, prompt = ScriptedClient(target, 0), ScriptedClient(target, 1)
        for cl in (late, prompt):
            await cl.register(SAMPLES)
        tasks = await asyncio.gather(late.poll_task(), prompt.poll_task())
        reply = await prompt.upload(tasks[1].header, trained(tasks[1], 1.0), SAMPLES)
        assert not reply.dropped and not reply.duplicate
        for _ in range(100):  # the round closes at its timeout with the prompt client's update
            if app.coordinator.version == 1:
                break
            await asyncio.sleep(0.05)
        assert app.coordinator.version == 1
        reply = await late.upload(tasks[0].header, trained(tasks[0], 5.0), SAMPLES)
        assert reply.dropped and not reply.duplicate  # taken in, but not in the model: the client is told so
        assert app.coordinator.strategy.updates_dropped == 1 and app.coordinator.version == 1
        for cl in (late, prompt):
            await cl.close()


def test_a_late_results_reply_says_it_was_dropped(tmp_path: Path) -> None:
    asyncio.run(late_result_scenario(tmp_path))


async def timed_out_round_scenario(tmp_path: Path) -> None:
    """A round closed by its timeout makes a version like any other: evaluated, checkpointed, counted toward
    ``max_versions`` (here the last one: the run ends there)."""
    overrides = ("strategy.scheduler.min_clients=2", "strategy.scheduler.round_timeout=0.5", "server.max_versions=1")
    async with running_server(test_config(str(tmp_path / "state"), *overrides)) as app:
        target = f"127.0.0.1:{app.port}"
        silent, prompt = ScriptedClient(target, 0), ScriptedClient(target, 1)
        for cl in (silent, prompt):
            await cl.register(SAMPLES)
        tasks = await asyncio.gather(silent.poll_task(), prompt.poll_task())
        await prompt.upload(tasks[1].header, trained(tasks[1], 1.0), SAMPLES)
        await asyncio.wait_for(app.coordinator.ended_event.wait(), 10)
        assert app.coordinator.ended is not None and app.coordinator.ended.reason == "max_versions"
        for cl in (silent, prompt):
            await cl.close()
    versions = [json.loads(line)["version"] for line in (tmp_path / "state" / "metrics.jsonl").read_text().splitlines()]
    assert versions == [0, 1]  # the timed-out round's version was evaluated
    resumed = StateStore(tmp_path / "state").load_checkpoint()
    assert resumed is not None and resumed["driver"]["strategy"]["version"] == 1  # and checkpointed


def test_a_round_closed_by_its_timeout_is_evaluated_checkpointed_and_counted(tmp_path: Path) -> None:
    asyncio.run(timed_out_round_scenario(tmp_path))
