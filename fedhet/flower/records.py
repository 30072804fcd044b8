"""fedhet's tasks, results, profiles and tensor encodings as Flower records, without loss.

A tensor travels as one Flower :class:`~flwr.app.Array`:

- an fp32 tensor in an fp32 payload, and every integer or bool tensor, as Flower's own ``numpy.ndarray`` stype
  (``np.save`` bytes, no pickle), so Flower's strategies (``FedAvg`` and the rest, which aggregate
  ``Array.numpy()``) read fedhet updates unchanged;
- anything else (fp16, bf16, the packed ``int<b>`` encodings, a model whose dtype is not fp32) as stype
  ``fedhet.codec/<encoding>``: the bytes :func:`fedhet.codec.encode` writes for that one tensor, with the model's
  dtype and shape in the Array's own fields. Decoding goes through :func:`fedhet.codec.decode`, so a packed 4-bit
  update arrives at the server exactly as it would over fedhet's gRPC wire, at a 4-bit update's size;
- a pruned tensor (a task's ``sparse`` names: FedP3's unassigned shared layers) as stype
  ``fedhet.codec/sparse-<float encoding>`` (``sparse-fp32`` when the payload is packed; ``int<b>`` when the task's
  ``sparse_bits`` packs them): the codec's bitmask and
  nonzero values, so it arrives bit for bit, at its pruned size.

Message layout (keys of the :class:`~flwr.app.RecordDict`):

========== ========================================================================================================
query      server -> client: nothing. Reply ``profile`` (ConfigRecord): the client's ``partition-id``, ``num-samples``,
           ``seconds-per-sample``, ``bandwidth``, ``bitwidth``, ``memory-bytes``, ``availability``.
train      server -> client: ``arrays`` (the task's weights) and ``config`` (ConfigRecord: ``task-id``, ``version``,
           ``local-steps``, ``local-epochs``, ``server-round`` = version + 1, ``encoding``, ``train`` and
           ``sparse``: the task's name lists, empty for a whole-model task). Reply: ``arrays`` (the trained
           weights, at the client's encoding: every tensor, or only the task's ``train`` names when it has them),
           ``metrics`` (MetricRecord: ``num-examples``, ``local-steps``, ``train-seconds``, ``train-loss``, and
           ``epsilon`` under DP: the client's spent epsilon at its delta), and ``fedhet`` (ConfigRecord:
           ``task-id``, ``version``) when the task came from a fedhet strategy. A reply carries one ArrayRecord
           and one MetricRecord, the shape Flower's own strategies require, so the same ClientApp serves Flower's
           ``FedAvg`` too.
========== ========================================================================================================
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedhet import codec
from fedhet.types import ClientProfile, Result, Task, Weights

__all__ = [
    "CODEC_STYPE_PREFIX",
    "NUMPY_STYPE",
    "RecordError",
    "TaskSpec",
    "array_record_nbytes",
    "from_array_record",
    "parse_epsilon",
    "parse_personal_accuracy",
    "parse_profile",
    "parse_result",
    "parse_task",
    "profile_content",
    "result_content",
    "sparse_encoding",
    "sparse_names",
    "task_content",
    "to_array_record",
]

NUMPY_STYPE = "numpy.ndarray"
CODEC_STYPE_PREFIX = "fedhet.codec/"

ARRAYS, CONFIG, METRICS, PROFILE, FEDHET = "arrays", "config", "metrics", "profile", "fedhet"


class RecordError(ValueError):
    """A Flower record does not hold what fedhet expects; the message names the key or tensor."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def sparse_encoding(encoding: str, sparse_bits: int = 32) -> str:
    """The per-tensor encoding of a pruned tensor in a payload of ``encoding`` (the codec's rule): packed at
    ``sparse_bits`` in a float payload when that is below 32."""
    if encoding in codec.ENCODINGS and sparse_bits != 32:
        return f"int{sparse_bits}"
    return f"sparse-{encoding if encoding in codec.ENCODINGS else 'fp32'}"


def _to_array(name: str, tensor: torch.Tensor, encoding: str, sparse: bool, sparse_bits: int) -> Array:
    tensor = tensor.detach().to("cpu")
    floating = tensor.is_floating_point()
    if sparse and floating:
        stype = sparse_encoding(encoding, sparse_bits)
    elif not floating or (tensor.dtype == torch.float32 and encoding == "fp32"):
        return Array(tensor.contiguous().numpy())
    else:
        stype = encoding
    try:
        data = codec.encode({name: tensor}, encoding, frozenset({name}) if sparse else frozenset(), sparse_bits)
    except codec.CodecError as error:
        raise RecordError(f"tensor {name!r}: {error}") from None
    return Array(_dtype_name(tensor.dtype), tuple(tensor.shape), CODEC_STYPE_PREFIX + stype, data)


def to_array_record(
    weights: Weights, encoding: str = "fp32", sparse: frozenset[str] = frozenset(), sparse_bits: int = 32
) -> ArrayRecord:
    """``weights`` as an ArrayRecord (state-dict order), floating-point tensors at ``encoding`` (any of
    :data:`fedhet.codec.ALL_ENCODINGS`) and those named in ``sparse`` in the codec's sparse encoding (packed at
    ``sparse_bits`` below 32); :func:`from_array_record` returns what
    ``codec.decode(codec.encode(weights, encoding, sparse, sparse_bits))`` would, bit for bit."""
    if encoding not in codec.ALL_ENCODINGS:
        raise RecordError(f"unknown encoding {encoding!r}; choose one of {sorted(codec.ALL_ENCODINGS)}")
    unknown = sparse - set(weights)
    if unknown:
        raise RecordError(f"sparse names tensors the weights do not hold: {sorted(unknown)}")
    return ArrayRecord(
        {name: _to_array(name, tensor, encoding, name in sparse, sparse_bits) for name, tensor in weights.items()}
    )


def sparse_names(record: ArrayRecord) -> frozenset[str]:
    """Names of the tensors of ``record`` that travel in a sparse encoding."""
    prefix = CODEC_STYPE_PREFIX + "sparse-"
    return frozenset(name for name, array in record.items() if array.stype.startswith(prefix))


# Flower's Array.numpy() is np.load, which parses the header with ast; CPython 3.11's compile() is not safe in
# threads that run it at once (a spurious "AST constructor recursion depth mismatch" SystemError, python/cpython
# gh-106905), which threaded ClientApps and a ServerApp in one process (LocalGrid) do. One at a time here.
_NUMPY_LOAD = threading.Lock()


def _from_array(name: str, array: Array) -> torch.Tensor:
    shape = tuple(int(d) for d in array.shape)
    if array.stype == NUMPY_STYPE:
        try:
            with _NUMPY_LOAD:
                values = array.numpy()
        except (ValueError, TypeError) as error:
            raise RecordError(f"tensor {name!r}: unreadable numpy payload: {error}") from None
        if values.dtype == np.object_ or tuple(values.shape) != shape:
            raise RecordError(f"tensor {name!r}: numpy payload of shape {values.shape} declared as {shape}")
        return torch.from_numpy(np.array(values, copy=True))
    if not array.stype.startswith(CODEC_STYPE_PREFIX):
        raise RecordError(f"tensor {name!r}: unknown serialization {array.stype!r}")
    try:
        decoded = codec.decode(array.data)
    except codec.CodecError as error:
        raise RecordError(f"tensor {name!r}: {error}") from None
    tensor = decoded.get(name)
    if len(decoded) != 1 or tensor is None:
        raise RecordError(f"tensor {name!r}: its payload holds {sorted(decoded)}")
    if tuple(tensor.shape) != shape or _dtype_name(tensor.dtype) != array.dtype:
        raise RecordError(
            f"tensor {name!r}: payload of {_dtype_name(tensor.dtype)}{list(tensor.shape)} declared as "
            f"{array.dtype}{list(shape)}"
        )
    return tensor


def from_array_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The tensors of ``record`` (written by :func:`to_array_record`, or a Flower ``ArrayRecord`` of numpy
    arrays), in order; raises :class:`RecordError` for anything that does not decode."""
    return {name: _from_array(name, array) for name, array in record.items()}


def array_record_nbytes(record: ArrayRecord) -> int:
    """Bytes of tensor data an ArrayRecord carries (what travels, before Flower's framing)."""
    return sum(len(array.data) for array in record.values())


def _int(record: ConfigRecord | MetricRecord, key: str, where: str) -> int:
    value = record.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise RecordError(f"{where}[{key!r}] must be an integer, got {value!r}")
    return value


def _float(record: ConfigRecord | MetricRecord, key: str, where: str) -> float:
    value = record.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise RecordError(f"{where}[{key!r}] must be a finite number, got {value!r}")
    return float(value)


def _bool(record: ConfigRecord, key: str, where: str) -> bool:
    value = record.get(key)
    if not isinstance(value, bool):
        raise RecordError(f"{where}[{key!r}] must be a bool, got {value!r}")
    return value


def _str(record: ConfigRecord, key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise RecordError(f"{where}[{key!r}] must be a string, got {value!r}")
    return value


def _names(record: ConfigRecord, key: str, where: str) -> frozenset[str]:
    """A list of tensor names (absent: empty)."""
    value = record.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RecordError(f"{where}[{key!r}] must be a list of tensor names, got {value!r}")
    return frozenset(str(v) for v in value)


def _config(content: RecordDict, key: str) -> ConfigRecord:
    record = content.get(key)
    if not isinstance(record, ConfigRecord):
        raise RecordError(f"message has no ConfigRecord {key!r}")
    return record


def _arrays(content: RecordDict) -> ArrayRecord:
    record = content.get(ARRAYS)
    if not isinstance(record, ArrayRecord):
        raise RecordError(f"message has no ArrayRecord {ARRAYS!r}")
    return record


def profile_content(profile: ClientProfile, num_samples: int, partition: int = -1) -> RecordDict:
    """A query reply: the client's profile, sample count and partition id (-1: none)."""
    return RecordDict(
        {
            PROFILE: ConfigRecord(
                {
                    "partition-id": partition,
                    "num-samples": num_samples,
                    "seconds-per-sample": profile.seconds_per_sample,
                    "bandwidth": profile.bandwidth,
                    "bitwidth": profile.bitwidth,
                    "memory-bytes": profile.memory_bytes,
                    "availability": profile.availability,
                }
            )
        }
    )


def parse_profile(content: RecordDict) -> tuple[ClientProfile, int, int]:
    """(profile, sample count, partition id or -1) of a query reply; raises :class:`RecordError` for a missing or
    invalid value."""
    record = _config(content, PROFILE)
    try:
        profile = ClientProfile(
            seconds_per_sample=_float(record, "seconds-per-sample", PROFILE),
            bandwidth=_float(record, "bandwidth", PROFILE),
            bitwidth=_int(record, "bitwidth", PROFILE),
            memory_bytes=_int(record, "memory-bytes", PROFILE),
            availability=_float(record, "availability", PROFILE),
        )
    except ValueError as error:
        raise RecordError(f"{PROFILE}: {error}") from None
    samples = _int(record, "num-samples", PROFILE)
    if samples < 1:
        raise RecordError(f"{PROFILE}['num-samples'] must be >= 1, got {samples}")
    partition = _int(record, "partition-id", PROFILE) if "partition-id" in record else -1
    return profile, samples, max(-1, partition)


def task_content(task: Task, encoding: str) -> RecordDict:
    """A train message's content for ``task``, its weights at ``encoding`` (its ``sparse`` names pruned), with its
    ``train`` and ``sparse`` name lists and ``train-all``."""
    return RecordDict(
        {
            ARRAYS: to_array_record(task.weights, encoding, task.sparse, task.sparse_bits),
            CONFIG: ConfigRecord(
                {
                    "task-id": task.task_id,
                    "version": task.version,
                    "local-steps": task.local_steps,
                    "local-epochs": task.local_epochs,
                    "server-round": task.version + 1,
                    "encoding": encoding,
                    "train": [n for n in task.weights if n in task.train],
                    "sparse": [n for n in task.weights if n in task.sparse],
                    "proximal-mu": task.proximal_mu,
                    "train-all": task.train_all,
                }
            ),
        }
    )


class TaskSpec:
    """What a train message asks of a client: a fedhet task (``fedhet_task`` true) or a Flower strategy's round
    (``task-id`` and ``version`` absent: the task id is derived from ``server-round``)."""

    def __init__(self, task: Task, encoding: str, fedhet_task: bool) -> None:
        self.task = task
        self.encoding = encoding
        self.fedhet_task = fedhet_task


def parse_task(content: RecordDict, client_id: int, default_local_epochs: int = 1) -> TaskSpec:
    """The task a train message carries. A message from a Flower strategy (no ``task-id``) becomes a task of
    ``default_local_epochs`` epochs whose id is ``server-round`` (so its minibatch order depends on the round)."""
    config = _config(content, CONFIG)
    arrays = _arrays(content)
    weights = from_array_record(arrays)
    train, sparse = _names(config, "train", CONFIG), _names(config, "sparse", CONFIG)
    unlisted = sparse_names(arrays) - sparse
    if unlisted:
        raise RecordError(f"tensors {sorted(unlisted)} travel sparse but the task does not list them as sparse")
    fedhet_task = "task-id" in config
    if fedhet_task:
        task_id = _int(config, "task-id", CONFIG)
        version = _int(config, "version", CONFIG)
        steps = _int(config, "local-steps", CONFIG)
        epochs = _int(config, "local-epochs", CONFIG)
        encoding = _str(config, "encoding", CONFIG)
    else:
        task_id = _int(config, "server-round", CONFIG) if "server-round" in config else 0
        version = max(0, task_id - 1)
        steps = _int(config, "local-steps", CONFIG) if "local-steps" in config else 0
        epochs = 0 if steps else _int(config, "local-epochs", CONFIG) if "local-epochs" in config else 0
        epochs = epochs or (0 if steps else default_local_epochs)
        encoding = "fp32"
    if encoding not in codec.ALL_ENCODINGS:
        raise RecordError(f"{CONFIG}['encoding']: unknown encoding {encoding!r}")
    # FedProx's mu, under the key Flower's own FedProx strategy sends too
    mu = _float(config, "proximal-mu", CONFIG) if "proximal-mu" in config else 0.0
    train_all = _bool(config, "train-all", CONFIG) if "train-all" in config else False
    try:
        task = Task(task_id, client_id, version, weights, steps, epochs, train, sparse, mu, train_all=train_all)
    except ValueError as error:
        raise RecordError(str(error)) from None
    return TaskSpec(task, encoding, fedhet_task)


def result_content(
    result: Result,
    encoding: str,
    fedhet_task: bool = True,
    epsilon: float | None = None,
    personal_accuracy: float | None = None,
) -> RecordDict:
    """A train reply for ``result``, its weights at ``encoding``; ``fedhet_task`` adds the task id and version a
    fedhet strategy checks (a Flower strategy's reply carries only ``arrays`` and ``metrics``); ``epsilon`` (a DP
    client's spent epsilon) and ``personal_accuracy`` (measured by a client with a personal head) go into the
    metrics."""
    metrics = MetricRecord(
        {
            "num-examples": result.num_samples,
            "local-steps": result.local_steps,
            "train-seconds": result.train_seconds,
            "train-loss": result.loss,
        }
    )
    if epsilon is not None:
        metrics["epsilon"] = float(epsilon)
    if personal_accuracy is not None:
        metrics["personal-accuracy"] = float(personal_accuracy)
    content = RecordDict({ARRAYS: to_array_record(result.weights, encoding), METRICS: metrics})
    if fedhet_task:
        content[FEDHET] = ConfigRecord({"task-id": result.task_id, "version": result.version})
    return content


def parse_result(content: RecordDict, client_id: int) -> Result:
    """The fedhet :class:`~fedhet.types.Result` of a train reply from ``client_id`` (the sender, as the runtime
    knows it: never taken from the message)."""
    ids = _config(content, FEDHET)
    metrics = content.get(METRICS)
    if not isinstance(metrics, MetricRecord):
        raise RecordError(f"message has no MetricRecord {METRICS!r}")
    samples = _int(metrics, "num-examples", METRICS)
    steps = _int(metrics, "local-steps", METRICS)
    if samples < 1 or steps < 0:
        raise RecordError(f"{METRICS}: num-examples must be >= 1 and local-steps >= 0, got {samples}, {steps}")
    seconds = _float(metrics, "train-seconds", METRICS)
    if seconds < 0:
        raise RecordError(f"{METRICS}['train-seconds'] must be >= 0, got {seconds}")
    return Result(
        task_id=_int(ids, "task-id", FEDHET),
        client_id=client_id,
        version=_int(ids, "version", FEDHET),
        weights=from_array_record(_arrays(content)),
        num_samples=samples,
        local_steps=steps,
        train_seconds=seconds,
        loss=_float(metrics, "train-loss", METRICS),
    )


def parse_personal_accuracy(content: RecordDict) -> float | None:
    """The personalised accuracy a client with a personal head reports in a train reply (None: it reports none);
    raises :class:`RecordError` for a value outside [0, 1]."""
    metrics = content.get(METRICS)
    if not isinstance(metrics, MetricRecord) or "personal-accuracy" not in metrics:
        return None
    value = _float(metrics, "personal-accuracy", METRICS)
    if not 0.0 <= value <= 1.0:
        raise RecordError(f"{METRICS}['personal-accuracy'] must be in [0, 1], got {value}")
    return value


def parse_epsilon(content: RecordDict) -> float | None:
    """The epsilon a DP client reports in a train reply (None: not a DP client); raises :class:`RecordError` for a
    negative or non-finite value."""
    metrics = content.get(METRICS)
    if not isinstance(metrics, MetricRecord) or "epsilon" not in metrics:
        return None
    value = _float(metrics, "epsilon", METRICS)
    if value < 0:
        raise RecordError(f"{METRICS}['epsilon'] must be >= 0, got {value}")
    return value
