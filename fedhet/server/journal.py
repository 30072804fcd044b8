"""What the server writes to survive a crash: the write-ahead log's result events (their one schema, written live
and read back on replay) and the checkpoint writer that commits the coordinator's states off the event loop."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fedhet.runtime.checkpoint import prepare_checkpoint, serialize_checkpoint
from fedhet.server.persistence import StateStore
from fedhet.server.privacy import DPStep
from fedhet.types import Result, Weights

__all__ = ["CheckpointWriter", "LoggedResult", "parse_result_event", "result_event"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoggedResult:
    """A result as the log holds it, with what the server noted when it accepted it: its payload bytes, whether
    its norm was clipped, the DP-SGD step it reported and the personalised accuracy it measured."""

    result: Result
    nbytes: int
    clipped: bool
    dp: DPStep | None
    personal: float | None


def result_event(accepted: LoggedResult, now: float, file: str, sha256: str) -> dict[str, Any]:
    """The log line of an accepted result whose weights went to ``file``."""
    r = accepted.result
    return {
        "kind": "result",
        "now": now,
        "task_id": r.task_id,
        "client_id": r.client_id,
        "version": r.version,
        "num_samples": r.num_samples,
        "local_steps": r.local_steps,
        "train_seconds": r.train_seconds,
        "loss": r.loss,
        "file": file,
        "sha256": sha256,
        "bytes": accepted.nbytes,
        "clipped": accepted.clipped,
        "dp": None if accepted.dp is None else list(accepted.dp),
        "personal": accepted.personal,
    }


def parse_result_event(body: Mapping[str, Any], weights: Weights, bitwidth: int) -> LoggedResult:
    """The accepted result of a :func:`result_event` line, its weights read back; ``bitwidth`` is the client's
    registered one, as when it was accepted. Raises KeyError, TypeError or ValueError for a malformed line."""
    result = Result(
        int(body["task_id"]),
        int(body["client_id"]),
        int(body["version"]),
        weights,
        int(body["num_samples"]),
        int(body["local_steps"]),
        float(body["train_seconds"]),
        float(body["loss"]),
        bitwidth,
    )
    dp, personal = body.get("dp"), body.get("personal")
    step = None if dp is None else (float(dp[0]), float(dp[1]), int(dp[2]))
    accuracy = None if personal is None else float(personal)
    return LoggedResult(result, int(body["bytes"]), bool(body["clipped"]), step, accuracy)


#: what a checkpoint captures: the state now, and the last logged event it holds
Capture = Callable[[], tuple[Any, int]]


class CheckpointWriter:
    """Commits checkpoints of a state directory: at once (:meth:`commit_now`) or, during a run, when one is due
    (:meth:`request`). A due checkpoint captures the state only when the writer is free and at most once every
    ``min_interval`` seconds (the write-ahead log covers the events in between), so however fast versions come, the
    event loop takes one state's JSON document and tensor references per write
    (:func:`~fedhet.runtime.checkpoint.prepare_checkpoint`), and copying, hashing, serializing and the disk are left
    to a worker thread; memory holds at most the one state being written. A failed write is logged and tried again
    every ``retry_seconds`` with a fresh capture until it succeeds (meanwhile the store reports the failure); the
    write-ahead log still holds every event, so nothing acknowledged is lost.

    Args:
        store: the state directory.
        capture: the coordinator's state now and the last event it holds (called on the event loop).
    """

    def __init__(
        self, store: StateStore, capture: Capture, min_interval: float = 1.0, retry_seconds: float = 2.0
    ) -> None:
        self.store = store
        self.capture = capture
        self.min_interval = min_interval
        self.retry_seconds = retry_seconds
        self._due = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.superseded = 0  # requests served by a later capture (versions no checkpoint captured alone)
        self.written = 0

    def commit_now(self) -> None:
        """Capture and write a checkpoint at once (the first of a run); raises OSError when it cannot."""
        state, seq = self.capture()
        self.store.rotate_log()
        self.store.commit_checkpoint(serialize_checkpoint(*prepare_checkpoint(state)), seq)
        self.written += 1

    def request(self) -> None:
        """A checkpoint is due (a new version): one is captured and written as soon as the writer may."""
        self.superseded += self._due.is_set()
        self._due.set()
        self._idle.clear()

    async def run(self) -> None:
        """Write due checkpoints until cancelled."""
        loop = asyncio.get_running_loop()
        last = -math.inf
        while True:
            await self._due.wait()
            await asyncio.sleep(max(0.0, last + self.min_interval - loop.time()))
            self._due.clear()
            last = loop.time()
            state, seq = self.capture()  # no await from here to the rotation: the state holds exactly the log so far
            try:
                self.store.rotate_log()
                prepared = prepare_checkpoint(state)
                await asyncio.to_thread(self._write, prepared, seq)
            except OSError as error:
                log.error(
                    "checkpoint through event %d failed (%s); the write-ahead log keeps growing; retrying in %g s",
                    seq,
                    error,
                    self.retry_seconds,
                )
                await asyncio.sleep(self.retry_seconds)
                self._due.set()
                continue
            if not self._due.is_set():
                self._idle.set()

    def _write(self, prepared: tuple[str, dict[str, Any]], seq: int) -> None:
        self.store.commit_checkpoint(serialize_checkpoint(*prepared), seq)
        self.written += 1

    async def join(self) -> None:
        """Wait until a checkpoint of the newest state is written."""
        await self._idle.wait()
