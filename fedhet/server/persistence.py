"""Crash safety: a write-ahead log of every event and atomic checkpoints, in one state directory.

Layout of ``state_dir``::

    checkpoint.safetensors   the latest checkpoint: every tensor of the state, the rest as JSON in the metadata
    wal/<first seq>.jsonl    the events since (one JSON line each, fsynced before the event takes effect)
    results/<name>.safetensors   the weights of each logged result
    metrics.jsonl            one line per evaluation (see fedhet.metrics)

A checkpoint is written to a temporary file, fsynced and renamed over the old one, then the directory is fsynced;
its metadata holds a SHA-256 over the JSON state and every tensor, so a corrupted file is refused. A result is
durable (its file and its log line fsynced) before the server acknowledges it; on restart the server loads the
checkpoint and replays the log after it. Nothing is pickled: tensors go through safetensors, the rest through JSON.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from fedhet.runtime.checkpoint import (
    CHECKPOINT,
    CheckpointError,
    fsync_dir,
    load_checkpoint,
    safetensors_metadata,
    write_atomic,
)

__all__ = ["EventLog", "StateStore"]


def _drop_torn_tail(path: Path) -> None:
    """Cut a partial last line (a crash mid-append, never acknowledged) so appends start on a fresh line."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
            f.flush()
            os.fsync(f.fileno())


@dataclass(frozen=True)
class LoggedEvent:
    """One line of the write-ahead log."""

    seq: int
    body: dict[str, Any]


class EventLog:
    """Append-only JSON-lines log in segments ``wal/<first seq>.jsonl``; each append is fsynced, and one that fails
    (a full disk, a file-size limit) leaves the segment as it was: no torn line for later appends to follow."""

    def __init__(self, directory: Path, next_seq: int) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.next_seq = next_seq
        self._fd = self._open(next_seq)

    def _open(self, first_seq: int) -> int:
        fd = os.open(self.directory / f"{first_seq:012d}.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fsync_dir(self.directory)
        except OSError:
            os.close(fd)
            raise
        return fd

    def append(self, body: Mapping[str, Any]) -> int:
        """Log ``body`` durably; returns its sequence number. Raises OSError, the log unchanged, when it cannot."""
        seq = self.next_seq
        line = (json.dumps({"seq": seq, **body}, separators=(",", ":")) + "\n").encode()
        start = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view) :]
            os.fsync(self._fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, start)
            raise
        self.next_seq += 1
        return seq

    def rotate(self) -> None:
        """Start a new segment at the next sequence number (called when a checkpoint captures the state)."""
        fd = self._open(self.next_seq)
        os.close(self._fd)
        self._fd = fd

    def segments(self) -> list[Path]:
        return sorted(self.directory.glob("*.jsonl"))

    def drop_through(self, seq: int) -> list[dict[str, Any]]:
        """Delete the segments whose events all have sequence numbers <= ``seq``; returns their events."""
        paths = self.segments()
        dropped: list[dict[str, Any]] = []
        for path, successor in itertools.pairwise(paths):
            if int(successor.stem) <= seq + 1:
                dropped.extend(e.body for e in read_segment(path, last=False))
                path.unlink()
        return dropped

    def close(self) -> None:
        os.close(self._fd)


def read_segment(path: Path, last: bool) -> Iterator[LoggedEvent]:
    """Events of one segment; a torn final line of the ``last`` segment (a crash mid-append) is ignored."""
    lines = path.read_text(encoding="utf-8").split("\n")
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            body = json.loads(line)
            seq = int(body.pop("seq"))
        except (ValueError, KeyError, TypeError):
            if last and number >= len(lines) - 1:
                return  # torn tail: never acknowledged
            raise CheckpointError(f"{path}:{number}: corrupted log line") from None
        yield LoggedEvent(seq, body)


class StateStore:
    """The state directory: checkpoint, write-ahead log and result files.

    Every write that fails (``OSError``: a full disk, a file-size limit, a read-only mount) is noted in
    :attr:`failure` until a write of the same kind succeeds, so the server can report itself NOT_SERVING."""

    def __init__(self, root: str | Path) -> None:
        self._failures: dict[str, str] = {}
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.results = self.root / "results"
        self.results.mkdir(exist_ok=True)
        self.wal_dir = self.root / "wal"
        self.log: EventLog | None = None
        for stale in [*self.root.glob(".*.tmp"), *self.results.glob(".*.tmp")]:  # interrupted atomic writes
            stale.unlink(missing_ok=True)

    @property
    def failure(self) -> str | None:
        """What cannot be written now (None when the last write of every kind succeeded)."""
        return "; ".join(f"{kind}: {why}" for kind, why in self._failures.items()) or None

    @contextlib.contextmanager
    def _writing(self, kind: str) -> Iterator[None]:
        try:
            yield
        except OSError as error:
            self._failures[kind] = error.strerror or str(error)
            raise
        self._failures.pop(kind, None)

    def append(self, body: Mapping[str, Any]) -> int:
        """Log ``body`` durably (see :class:`EventLog`); returns its sequence number."""
        assert self.log is not None, "open_log first"
        with self._writing("write-ahead log"):
            return self.log.append(body)

    def rotate_log(self) -> None:
        """Start a new log segment (a checkpoint is about to capture the state)."""
        assert self.log is not None, "open_log first"
        with self._writing("write-ahead log"):
            self.log.rotate()

    @property
    def checkpoint_path(self) -> Path:
        return self.root / CHECKPOINT

    def holds_run(self) -> bool:
        """True when the directory has a checkpoint or logged events."""
        return self.checkpoint_path.exists() or any(p.stat().st_size for p in self.wal_dir.glob("*.jsonl"))

    def check_resumable(self) -> None:
        """Raise :class:`CheckpointError` unless the directory holds a run to resume: its checkpoint (written when
        a run opens) must be there; the log alone cannot be replayed onto nothing."""
        if self.checkpoint_path.exists():
            return
        logged = self.holds_run()
        raise CheckpointError(
            f"cannot resume: {self.checkpoint_path} is missing"
            + (" while the write-ahead log holds events (restore the checkpoint)" if logged else "; no run to resume")
        )

    def load_checkpoint(self) -> Any | None:
        """The latest checkpoint's state, or None when there is none."""
        return load_checkpoint(self.checkpoint_path)

    def events_after(self, seq: int) -> list[LoggedEvent]:
        """Logged events with sequence numbers > ``seq``, in order."""
        paths = sorted(self.wal_dir.glob("*.jsonl")) if self.wal_dir.exists() else []
        events: list[LoggedEvent] = []
        for i, path in enumerate(paths):
            events.extend(e for e in read_segment(path, last=i == len(paths) - 1) if e.seq > seq)
        for before, after in itertools.pairwise(events):
            if after.seq != before.seq + 1:
                raise CheckpointError(f"write-ahead log in {self.wal_dir} skips from event {before.seq} to {after.seq}")
        return events

    def open_log(self, next_seq: int) -> EventLog:
        """Start appending at ``next_seq``; a torn last line left by a crash is cut first."""
        segments = sorted(self.wal_dir.glob("*.jsonl")) if self.wal_dir.exists() else []
        if segments:
            _drop_torn_tail(segments[-1])
        self.log = EventLog(self.wal_dir, next_seq)
        return self.log

    def write_result(self, weights: Mapping[str, torch.Tensor]) -> tuple[str, str]:
        """Store a result's weights durably; returns the file's name (relative to the state directory) and the
        SHA-256 of its bytes."""
        tensors = {k: v.detach().contiguous().clone() for k, v in weights.items()}
        data = save_tensors(tensors, metadata={"order": json.dumps(list(tensors))})
        name = f"results/{uuid.uuid4().hex}.safetensors"
        with self._writing("result files"):
            try:
                with (self.root / name).open("wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                fsync_dir(self.results)
            except OSError:
                self.delete_result(name)
                raise
        return name, hashlib.sha256(data).hexdigest()

    def read_result(self, name: str, sha256: str) -> dict[str, torch.Tensor]:
        path = self.root / name
        if path.parent != self.results:
            raise CheckpointError(f"log names a result file outside {self.results}: {name}")
        try:
            data = path.read_bytes()
        except OSError as error:
            raise CheckpointError(f"result file {path} is missing: {error}") from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise CheckpointError(f"result file {path} is corrupted: its checksum does not match the log")
        tensors = load_tensors(data)
        order = json.loads(safetensors_metadata(data)["order"])  # safetensors sorts names; the model's order matters
        return {k: tensors[k] for k in order}

    def delete_result(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.root / name).unlink()

    def commit_checkpoint(self, data: bytes, through_seq: int) -> None:
        """Make checkpoint ``data`` (state through event ``through_seq``) the latest, then drop the log segments
        and result files it covers."""
        with self._writing("checkpoint"):
            write_atomic(self.checkpoint_path, data)
        if self.log is not None:
            for body in self.log.drop_through(through_seq):
                if body.get("kind") == "result":
                    self.delete_result(str(body["file"]))

    def remove_orphans(self, referenced: set[str]) -> None:
        """Delete result files no logged event refers to (written before a crash, never acknowledged)."""
        for path in self.results.glob("*.safetensors"):
            if f"results/{path.name}" not in referenced:
                path.unlink()
