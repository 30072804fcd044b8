"""What the server writes to survive a crash: the write-ahead log's result events (their one schema, written live
and read back on replay) and the checkpoint writer that commits the coordinator's states off the event loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
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


class CheckpointWriter:
    """Commits checkpoints of a state directory: at once (``sync``) or, during a run, from a worker thread so the
    event loop never waits on the disk nor on copying, hashing and serializing the state (the loop only takes its
    JSON document and tensor references, :func:`~fedhet.runtime.checkpoint.prepare_checkpoint`). Only the newest
    checkpoint matters: one still waiting when a newer one comes is superseded, so however fast versions come, at
    most one write is in flight and one waits (memory stays flat).
    A failed write is logged and tried again every ``retry_seconds`` until it succeeds or a newer one replaces it
    (meanwhile the store reports the failure); the write-ahead log still holds every event, so nothing acknowledged
    is lost."""

    def __init__(self, store: StateStore, retry_seconds: float = 2.0) -> None:
        self.store = store
        self.retry_seconds = retry_seconds
        self._waiting: tuple[tuple[str, dict[str, Any]], int] | None = None
        self._ready = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.superseded = 0  # checkpoints replaced by a newer one before they were written

    def commit(self, state: Any, through_seq: int, sync: bool = False) -> None:
        """Checkpoint ``state``, which holds every logged event through ``through_seq``. Raises OSError only when
        ``sync``; otherwise a failure is logged (the log segment goes on; a later checkpoint covers it)."""
        prepared = prepare_checkpoint(state)
        if sync:
            self.store.rotate_log()
            self.store.commit_checkpoint(serialize_checkpoint(*prepared), through_seq)
            return
        try:
            self.store.rotate_log()
        except OSError as error:
            log.error("checkpoint through event %d not started: cannot open a log segment (%s)", through_seq, error)
        self.superseded += self._waiting is not None
        self._waiting = (prepared, through_seq)
        self._idle.clear()
        self._ready.set()

    async def run(self) -> None:
        """Write the newest waiting checkpoint, again and again, until cancelled."""
        while True:
            await self._ready.wait()
            self._ready.clear()
            waiting, self._waiting = self._waiting, None
            if waiting is not None:
                prepared, seq = waiting
                try:
                    await asyncio.to_thread(self._write, prepared, seq)
                except OSError as error:
                    log.error(
                        "checkpoint through event %d failed (%s); the write-ahead log keeps growing; retrying in %g s",
                        seq,
                        error,
                        self.retry_seconds,
                    )
                    if self._waiting is None:
                        self._waiting = waiting
                    await asyncio.sleep(self.retry_seconds)
                    self._ready.set()
                    continue
            if self._waiting is None:
                self._idle.set()

    def _write(self, prepared: tuple[str, dict[str, Any]], seq: int) -> None:
        self.store.commit_checkpoint(serialize_checkpoint(*prepared), seq)

    async def join(self) -> None:
        """Wait until the newest checkpoint is written."""
        await self._idle.wait()
