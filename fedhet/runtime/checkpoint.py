"""Checkpoints of a run, the same way in every runtime: any nested state of dicts, lists, numbers, strings and
tensors becomes one safetensors file (the tensors, each stored once) whose metadata holds the rest as JSON and a
SHA-256 over both, written atomically (temporary file, fsync, rename, fsync of the directory). Loading checks the
digest, so a corrupted file is refused with :class:`CheckpointError`; nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from fedhet.types import Result, Task

__all__ = [
    "CHECKPOINT",
    "CheckpointError",
    "decode_checkpoint",
    "encode_checkpoint",
    "flatten_state",
    "fsync_dir",
    "load_checkpoint",
    "prepare_checkpoint",
    "result_from_state",
    "result_state",
    "safetensors_metadata",
    "save_checkpoint",
    "serialize_checkpoint",
    "task_from_state",
    "task_state",
    "unflatten_state",
    "write_atomic",
]

FORMAT = 1


CHECKPOINT = "checkpoint.safetensors"  # the checkpoint's file name in a run's state directory


class CheckpointError(RuntimeError):
    """A checkpoint, log or result file is missing, corrupted or does not fit; the message names the file."""


def flatten_state(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state (dicts with any scalar keys, lists, tuples, tensors, scalars) into a JSON-able tree
    and named tensors (the state's own tensor objects, not copies: :func:`serialize_checkpoint` copies them, so a
    runtime may do that off its event loop). A tensor object that appears several times is stored once."""
    tensors: dict[str, torch.Tensor] = {}
    names: dict[int, str] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            key = names.get(id(node))
            if key is None:
                key = names[id(node)] = f"t{len(names)}"
                tensors[key] = node.detach()
            return {"tensor": key}
        if isinstance(node, Mapping):
            return {"dict": [[walk(k, path), walk(v, f"{path}.{k}")] for k, v in node.items()]}
        if isinstance(node, tuple):
            return {"tuple": [walk(v, f"{path}[{i}]") for i, v in enumerate(node)]}
        if isinstance(node, list):
            return [walk(v, f"{path}[{i}]") for i, v in enumerate(node)]
        if node is None or isinstance(node, bool | int | float | str):
            return node
        if hasattr(node, "item") and callable(node.item):  # numpy scalars
            return walk(node.item(), path)
        raise CheckpointError(f"state entry {path or '<root>'} has type {type(node).__name__}, which cannot be saved")

    return walk(obj, ""), tensors


def unflatten_state(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(tree, list):
        return [unflatten_state(v, tensors) for v in tree]
    if isinstance(tree, dict):
        if set(tree) == {"tensor"}:
            if tree["tensor"] not in tensors:
                raise CheckpointError(f"checkpoint refers to a missing tensor {tree['tensor']!r}")
            return tensors[tree["tensor"]]
        if set(tree) == {"tuple"}:
            return tuple(unflatten_state(v, tensors) for v in tree["tuple"])
        if set(tree) == {"dict"}:
            return {unflatten_state(k, tensors): unflatten_state(v, tensors) for k, v in tree["dict"]}
        raise CheckpointError(f"malformed checkpoint entry with keys {sorted(tree)}")
    return tree


def _digest(state_json: str, tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256(state_json.encode())
    for key in sorted(tensors):
        tensor = tensors[key]
        h.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)  # in place, no copy
    return h.hexdigest()


def encode_checkpoint(state: Any) -> bytes:
    """The bytes of a checkpoint file holding ``state`` (safetensors with the JSON state and checksum in its
    metadata)."""
    return serialize_checkpoint(*prepare_checkpoint(state))


def prepare_checkpoint(state: Any) -> tuple[str, dict[str, torch.Tensor]]:
    """The cheap half of :func:`encode_checkpoint`, which must see ``state`` as it is now: its JSON document and the
    state's tensors (referenced; fedhet's states never change a tensor in place, they replace it)."""
    tree, tensors = flatten_state(state)
    return json.dumps({"format": FORMAT, "state": tree}, separators=(",", ":")), tensors


def serialize_checkpoint(state_json: str, tensors: Mapping[str, torch.Tensor]) -> bytes:
    """The costly half of :func:`encode_checkpoint` (copies, checksum, serialization; releases the GIL, so it can
    run in a worker thread): the checkpoint bytes of a :func:`prepare_checkpoint` result."""
    copies = {k: v.to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    return save_tensors(copies, metadata={"fedhet": state_json, "sha256": _digest(state_json, copies)})


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes."""
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise ValueError("metadata is not a mapping")
    return metadata


def decode_checkpoint(data: bytes, source: str) -> Any:
    """The state in checkpoint bytes; raises :class:`CheckpointError` naming ``source`` when corrupted."""
    try:
        metadata = safetensors_metadata(data)
        state_json, checksum = metadata["fedhet"], metadata["sha256"]
        tensors = load_tensors(data)
    except (ValueError, KeyError, TypeError, AttributeError, SafetensorError) as error:
        raise CheckpointError(f"{source} is corrupted or not a fedhet checkpoint ({error})") from None
    if _digest(state_json, tensors) != checksum:
        raise CheckpointError(f"{source} is corrupted: its checksum does not match its contents")
    document = json.loads(state_json)
    if document.get("format") != FORMAT:
        raise CheckpointError(f"{source} has format {document.get('format')}, this fedhet reads format {FORMAT}")
    return unflatten_state(document["state"], tensors)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temporary file, fsync, rename, fsync of the directory."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a write that failed (full disk) leaves no partial file behind
        raise
    fsync_dir(path.parent)


def save_checkpoint(path: Path, state: Any) -> None:
    """Write ``state`` to ``path`` as one checkpoint, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, encode_checkpoint(state))


def load_checkpoint(path: Path) -> Any | None:
    """The state in the checkpoint at ``path`` (None when there is none); a corrupted file is a CheckpointError."""
    if not path.exists():
        return None
    return decode_checkpoint(path.read_bytes(), str(path))


def task_state(task: Task) -> list[Any]:
    """A task as a checkpoint row (its weights stored as tensors; tasks sharing a planned model share them)."""
    return [
        task.task_id,
        task.client_id,
        task.version,
        task.local_steps,
        task.local_epochs,
        dict(task.weights),
        sorted(task.train),
        sorted(task.sparse),
        task.proximal_mu,
        task.sparse_bits,
        task.train_all,
    ]


def task_from_state(row: Sequence[Any]) -> Task:
    """The task of :func:`task_state`'s row; raises ValueError (or TypeError) for a malformed one."""
    # rows before FedProx have no mu, rows before FedP3's packed frozen layers no sparse_bits nor train_all
    tid, cid, version, steps, epochs, weights, train, sparse, *rest = row
    if len(rest) > 3:
        raise ValueError(f"a task row has {len(row)} entries, at most 11")
    names = (frozenset(map(str, train)), frozenset(map(str, sparse)))
    mu = float(rest[0]) if rest else 0.0
    bits = int(rest[1]) if len(rest) > 1 else 32
    train_all = bool(rest[2]) if len(rest) > 2 else False
    return Task(int(tid), int(cid), int(version), dict(weights), int(steps), int(epochs), *names, mu, bits, train_all)


def result_state(result: Result) -> list[Any]:
    """A result as a checkpoint row (its weights made plain tensors)."""
    weights = {k: v.detach().contiguous() for k, v in result.weights.items()}
    r = result
    return [
        r.task_id,
        r.client_id,
        r.version,
        weights,
        r.num_samples,
        r.local_steps,
        r.train_seconds,
        r.loss,
        r.bitwidth,
    ]


def result_from_state(row: Sequence[Any]) -> Result:
    """The result of :func:`result_state`'s row; raises ValueError (or TypeError) for a malformed one."""
    tid, cid, version, weights, samples, steps, seconds, loss, bits = row
    return Result(
        int(tid),
        int(cid),
        int(version),
        dict(weights),
        int(samples),
        int(steps),
        float(seconds),
        float(loss),
        int(bits),
    )
