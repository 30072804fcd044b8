"""fedhet's tensor encodings as Flower records: lossless, readable by Flower's strategies, refused when malformed."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedhet import codec
from fedhet.flower.records import (
    CODEC_STYPE_PREFIX,
    NUMPY_STYPE,
    RecordError,
    array_record_nbytes,
    from_array_record,
    parse_epsilon,
    parse_profile,
    parse_result,
    parse_task,
    profile_content,
    result_content,
    sparse_names,
    task_content,
    to_array_record,
)
from fedhet.types import ClientProfile, Result, Task


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(4, 1, 3, 3, generator=g),
        "fc.weight": torch.randn(10, 36, generator=g),
        "fc.bias": torch.randn(10, generator=g),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
    }


@pytest.mark.parametrize("encoding", codec.ALL_ENCODINGS)
def test_every_encoding_round_trips_exactly_as_the_codec(encoding: str) -> None:
    weights = _weights()
    record = to_array_record(weights, encoding)
    got = from_array_record(record)
    expected = codec.decode(codec.encode(weights, encoding))
    assert list(got) == list(weights)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape
        assert torch.equal(got[name], tensor), name


def test_fp32_payloads_are_flower_numpy_arrays_and_packed_ones_are_small() -> None:
    weights = _weights()
    fp32 = to_array_record(weights, "fp32")
    assert all(a.stype == NUMPY_STYPE for a in fp32.values())
    assert torch.equal(torch.from_numpy(fp32["fc.weight"].numpy()), weights["fc.weight"])  # what Flower's FedAvg reads
    int4 = to_array_record(weights, "int4")
    assert int4["fc.weight"].stype == CODEC_STYPE_PREFIX + "int4"
    assert int4["bn.num_batches_tracked"].stype == NUMPY_STYPE  # integer tensors travel exactly
    assert array_record_nbytes(int4) < array_record_nbytes(fp32) / 3


def test_a_plain_flower_array_record_decodes() -> None:
    record = ArrayRecord({"w": Array(torch.ones(2, 3).numpy())})
    assert torch.equal(from_array_record(record)["w"], torch.ones(2, 3))


@pytest.mark.parametrize(
    "array",
    [
        Array("float32", (2, 2), "pickle", b"\x80\x04"),
        Array("float32", (3, 3), NUMPY_STYPE, Array(torch.ones(2, 2).numpy()).data),
        Array("float32", (2, 2), CODEC_STYPE_PREFIX + "int4", b"garbage"),
        Array("float64", (10, 36), CODEC_STYPE_PREFIX + "fp16", codec.encode({"w": torch.ones(10, 36)}, "fp16")),
        Array("float32", (10, 36), CODEC_STYPE_PREFIX + "fp16", codec.encode({"other": torch.ones(10, 36)}, "fp16")),
    ],
    ids=["unknown-stype", "wrong-shape", "corrupt", "wrong-dtype", "wrong-name"],
)
def test_malformed_arrays_are_refused(array: Array) -> None:
    with pytest.raises(RecordError):
        from_array_record(ArrayRecord({"w": array}))


def test_task_result_and_profile_messages_round_trip() -> None:
    weights = _weights()
    task = Task(5, 3, 2, weights, local_steps=7)
    spec = parse_task(task_content(task, "int8"), client_id=3)
    assert spec.fedhet_task and spec.encoding == "int8"
    assert (spec.task.task_id, spec.task.version, spec.task.local_steps) == (5, 2, 7)
    result = Result(5, 3, 2, weights, num_samples=40, local_steps=7, train_seconds=0.5, loss=1.25)
    back = parse_result(result_content(result, "fp32"), client_id=3)
    assert (back.task_id, back.version, back.num_samples, back.train_seconds, back.loss) == (5, 2, 40, 0.5, 1.25)
    profile = ClientProfile(0.01, 1e6, bitwidth=4)
    assert parse_profile(profile_content(profile, 40, partition=3)) == (profile, 40, 3)


def test_fedprox_mu_travels_in_a_task_and_in_a_flower_fedprox_round() -> None:
    task = Task(5, 3, 2, _weights(), local_steps=7, proximal_mu=0.25)
    assert parse_task(task_content(task, "fp32"), client_id=3).task.proximal_mu == 0.25
    flower = {"server-round": 2, "proximal-mu": 0.5}  # what Flower's own FedProx strategy sends
    content = RecordDict({"arrays": to_array_record(_weights()), "config": ConfigRecord(flower)})
    assert parse_task(content, client_id=0).task.proximal_mu == 0.5
    for bad in (-1.0, float("nan")):
        config = ConfigRecord({"server-round": 2, "proximal-mu": bad})
        with pytest.raises(RecordError, match="proximal"):
            parse_task(RecordDict({"arrays": to_array_record(_weights()), "config": config}), client_id=0)


def test_a_flower_strategy_round_becomes_a_task_of_its_round() -> None:
    content = RecordDict({"arrays": to_array_record(_weights()), "config": ConfigRecord({"server-round": 4})})
    spec = parse_task(content, client_id=0, default_local_epochs=2)
    assert not spec.fedhet_task
    assert (spec.task.task_id, spec.task.version, spec.task.local_epochs) == (4, 3, 2)


def test_a_result_without_fedhet_ids_or_with_bad_metrics_is_refused() -> None:
    result = Result(1, 0, 0, _weights(), num_samples=10, local_steps=1, train_seconds=0.1, loss=0.5)
    with pytest.raises(RecordError, match="fedhet"):
        parse_result(result_content(result, "fp32", fedhet_task=False), client_id=0)
    content = result_content(result, "fp32")
    metrics = content["metrics"]
    assert isinstance(metrics, MetricRecord)
    metrics["train-seconds"] = float("nan")
    with pytest.raises(RecordError, match="train-seconds"):
        parse_result(content, client_id=0)


def _pruned() -> tuple[dict[str, torch.Tensor], frozenset[str]]:
    """Weights with two tensors pruned to about a third of their values."""
    weights = _weights()
    for name in ("conv.weight", "fc.weight"):
        tensor = weights[name]
        weights[name] = torch.where(tensor.abs() > 0.5, tensor, torch.zeros(()))
    return weights, frozenset({"conv.weight", "fc.weight"})


@pytest.mark.parametrize("encoding", codec.ALL_ENCODINGS)
def test_pruned_tensors_travel_sparse_and_round_trip_exactly_as_the_codec(encoding: str) -> None:
    weights, sparse = _pruned()
    record = to_array_record(weights, encoding, sparse)
    assert sparse_names(record) == sparse
    fp = encoding if encoding in codec.ENCODINGS else "fp32"
    assert record["fc.weight"].stype == CODEC_STYPE_PREFIX + "sparse-" + fp
    got = from_array_record(record)
    expected = codec.decode(codec.encode(weights, encoding, sparse))
    assert list(got) == list(weights)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    if encoding in codec.ENCODINGS:  # a third of the values kept: smaller than dense at the same float encoding
        dense = to_array_record(weights, encoding)
        assert len(record["fc.weight"].data) < len(dense["fc.weight"].data)


def test_a_partial_task_carries_its_train_and_sparse_names() -> None:
    weights, sparse = _pruned()
    task = Task(5, 3, 2, weights, local_epochs=1, train=frozenset({"fc.bias"}), sparse=sparse)
    content = task_content(task, "fp32")
    assert sparse_names(content["arrays"]) == sparse  # type: ignore[arg-type]
    spec = parse_task(content, client_id=3)
    assert spec.task.train == {"fc.bias"} and spec.task.sparse == sparse and spec.task.trained == {"fc.bias"}
    assert all(torch.equal(spec.task.weights[n], weights[n]) for n in weights)
    whole = parse_task(task_content(Task(6, 3, 2, weights, local_steps=1), "fp32"), client_id=3).task
    assert whole.train == whole.sparse == frozenset() and whole.trained == set(weights)


@pytest.mark.parametrize("case", ["unlisted-sparse", "unknown-train", "not-a-list"])
def test_a_task_with_inconsistent_names_is_refused(case: str) -> None:
    weights, sparse = _pruned()
    content = task_content(Task(5, 3, 2, weights, local_epochs=1, sparse=sparse), "fp32")
    config = content["config"]
    assert isinstance(config, ConfigRecord)
    if case == "unlisted-sparse":
        config["sparse"] = ["fc.weight"]  # conv.weight still travels sparse
    elif case == "unknown-train":
        config["train"] = ["head.weight"]
    else:
        config["train"] = "fc.bias"
    with pytest.raises(RecordError):
        parse_task(content, client_id=3)


def test_a_dp_reply_carries_its_epsilon() -> None:
    result = Result(1, 0, 0, {"fc.bias": torch.ones(3)}, num_samples=10, local_steps=1, train_seconds=0.1, loss=0.5)
    assert parse_epsilon(result_content(result, "fp32")) is None
    content = result_content(result, "fp32", epsilon=1.5)
    assert parse_epsilon(content) == 1.5
    metrics = content["metrics"]
    assert isinstance(metrics, MetricRecord)
    metrics["epsilon"] = -1.0
    with pytest.raises(RecordError, match="epsilon"):
        parse_epsilon(content)
