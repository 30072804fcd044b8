"""The real-clock runtime: feeds a :class:`~fedhet.strategies.Strategy` the events of a live run.

Everything here runs on one asyncio event loop, and no ``await`` separates a check from the strategy call it
guards, so the strategy is never touched concurrently. The clock is the run's clock: ``time.monotonic()`` plus the
run time reached before a restart, so deadlines the strategy set survive a restart. Every event is logged (and
fsynced) before it takes effect; a restart loads the last checkpoint and replays the log through the same code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from fedhet.metrics import MetricsRecord, MetricsWriter, last_version
from fedhet.runtime import (
    Evaluate,
    Outcome,
    PersonalReports,
    Recorder,
    ResultFailed,
    RunDriver,
    describe,
)
from fedhet.runtime.checkpoint import CheckpointError, task_from_state, task_state
from fedhet.server.journal import CheckpointWriter, LoggedResult, parse_result_event, result_event
from fedhet.server.persistence import StateStore
from fedhet.server.privacy import DPStep, PrivacyLedger
from fedhet.server.session import (
    ClientSession,
    Counters,
    DuplicateResult,
    NotOutstanding,
    RunEnded,
    RuntimeSettings,
    Submitted,
    TaskRecord,
    UnknownClient,
    info_from_row,
    info_row,
    wait_event,
)
from fedhet.strategies import Strategy, UnknownTaskError
from fedhet.types import ClientInfo, Result, Task, Weights

__all__ = ["Coordinator"]

log = logging.getLogger(__name__)

_FINAL_CHECKPOINT_SECONDS = 30.0  # longest the end of a run waits for a checkpoint the disk keeps refusing


class Coordinator:
    """Owns the strategy, the clock, the clients' mailboxes, the log and the checkpoints of one run.

    Args:
        strategy: any registered strategy, built but not started.
        initial_weights: the version-0 model.
        settings: stopping, timeouts, norm bound.
        store: the state directory, or None to keep nothing on disk but metrics.
        metrics: where evaluations go.
        evaluate: the evaluation of a global model (and of its rounding to the given client bitwidths) on the
            test set, run in a worker thread.
        on_end: called once when the run ends (the server flips its health status).
    """

    def __init__(
        self,
        strategy: Strategy,
        initial_weights: Weights,
        settings: RuntimeSettings,
        store: StateStore | None,
        metrics: MetricsWriter | None = None,
        evaluate: Evaluate | None = None,
        on_end: Callable[[RunEnded], None] | None = None,
    ) -> None:
        self.strategy = strategy
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.on_end = on_end
        self.counters = Counters()
        self.run_id = uuid.uuid4().hex
        self.clients: dict[int, ClientSession] = {}
        self.records: dict[int, TaskRecord] = {}
        self.accepted: dict[int, int] = {}  # task id -> client id of every accepted result
        self.privacy = PrivacyLedger()  # DP-SGD steps each client reported
        self.personal = PersonalReports()  # the personalised accuracy each client last reported
        self.ended: RunEnded | None = None
        self._replaying = False
        self._recorded = -1  # the newest version metrics.jsonl held when a resume began
        self._time_base = 0.0  # run seconds reached before this process started
        self._mono_start = time.monotonic()
        self._wall_start = time.time()
        self._wake = asyncio.Event()
        self._ended_event = asyncio.Event()
        self.driver = RunDriver(strategy, settings.stop, settings.cadence, settings.norm)
        # a status line per evaluated version, so a person watching the server sees the run go on
        self.recorder = Recorder(evaluate, metrics, _status) if evaluate is not None else None
        self.checkpoints = CheckpointWriter(store, self._capture) if store is not None else None
        self._last_seq = -1
        strategy.start(initial_weights, 0.0)

    # ------------------------------------------------------------------ clock and state
    def now(self) -> float:
        """Run seconds: time.monotonic() since start, plus the run time reached before a restart."""
        return self._time_base + time.monotonic() - self._mono_start

    @property
    def version(self) -> int:
        return self.strategy.version

    def resume(self) -> int:
        """Load the checkpoint and replay the log after it; returns the number of events replayed.

        Raises :class:`CheckpointError` when a file is corrupted or does not fit this run's model.
        """
        assert self.store is not None
        state = self.store.load_checkpoint()
        if state is not None:
            self._load_state(state)
        events = self.store.events_after(self._last_seq)
        # versions the log re-creates are evaluated as they were live, unless metrics already hold them
        self._recorded = last_version(self.metrics.path) if self.metrics is not None else -1
        self._replaying = True
        try:
            for event in events:
                self._replay(event.seq, event.body)
        finally:
            self._replaying = False
        referenced = {str(e.body["file"]) for e in events if e.body.get("kind") == "result"}
        self.store.remove_orphans(referenced)
        self._mono_start = time.monotonic()
        for c in self.clients.values():
            c.last_seen = self.now()
        log.info(
            "resumed run %s at version %d, run time %.1f s (%d events replayed)",
            self.run_id,
            self.version,
            self._time_base,
            len(events),
        )
        return len(events)

    def open(self) -> None:
        """Start logging (after :meth:`resume`, or for a fresh run) and write the first checkpoint."""
        if self.store is None:
            return
        self.store.open_log(self._last_seq + 1)
        self._checkpoint_now(sync=True)

    def _state(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "seq": self._last_seq,
            "now": self.now(),
            "wall_start": self._wall_start,
            "clients": [[*info_row(c.info), c.announced] for c in self.clients.values()],
            "tasks": [task_state(r.task) for r in self.records.values()],
            "privacy": self.privacy.state_dict(),
            "personal": self.personal.state_dict(),
            # one tensor, not a list of pairs: it grows with every result, and a checkpoint walks lists in Python
            "accepted": torch.tensor(sorted(self.accepted.items()), dtype=torch.int64).reshape(-1, 2),
            "counters": asdict(self.counters),
            "driver": self.driver.state_dict(),
            "ended": None if self.ended is None else [self.ended.version, self.ended.reason],
        }

    def _load_state(self, state: Any) -> None:
        try:
            self.run_id = str(state["run_id"])
            self._last_seq = int(state["seq"])
            self._time_base = float(state["now"])
            self._wall_start = float(state["wall_start"])
            self.clients = {}
            for row in state["clients"]:
                info = info_from_row(row[:6])
                self.clients[info.client_id] = ClientSession(info, 0.0, announced=bool(row[6]))
            self.records = {}
            for row in state["tasks"]:
                task = task_from_state(row)
                self.records[task.task_id] = TaskRecord.of(task)
            self.privacy = PrivacyLedger()
            self.privacy.load_state_dict(state.get("privacy", {}))
            self.personal = PersonalReports()
            self.personal.load_state_dict(state.get("personal", {}))
            rows = state["accepted"]
            self.accepted = {int(t): int(c) for t, c in (rows.tolist() if isinstance(rows, torch.Tensor) else rows)}
            self.counters = Counters(**state["counters"])
            self.driver.load_state_dict(state["driver"])
            ended = state["ended"]
            self.ended = None if ended is None else RunEnded(int(ended[0]), str(ended[1]))
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"checkpoint does not fit this run: {error}") from None

    # ------------------------------------------------------------------ events
    def _log(self, body: dict[str, Any]) -> None:
        """Log an event before it takes effect; raises OSError (the event does not happen) when it cannot."""
        if self.store is not None and not self._replaying:
            self._last_seq = self.store.append(body)

    def _replay(self, seq: int, body: dict[str, Any]) -> None:
        self._last_seq = seq
        now = float(body["now"])
        self._time_base = max(self._time_base, now)
        kind = body["kind"]
        try:
            if kind == "register":
                self._register(info_from_row(body["client"]), now)
            elif kind == "available":
                self._available(int(body["client_id"]), now)
            elif kind == "tick":
                self._tick(now)
            elif kind == "result":
                assert self.store is not None
                weights = self.store.read_result(str(body["file"]), str(body["sha256"]))
                bitwidth = self.clients[int(body["client_id"])].info.profile.bitwidth  # the registered one, as live
                with contextlib.suppress(ResultFailed):  # refused live, refused again: the strategy took it back
                    self._apply_result(parse_result_event(body, weights, bitwidth), now)
            elif kind == "end":
                self._end(str(body["reason"]), now)
            else:
                raise CheckpointError(f"log event {seq} has unknown kind {kind!r}")
        except (UnknownTaskError, KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"log event {seq} ({kind}) does not replay onto the checkpoint: {error}") from None

    def _register(self, info: ClientInfo, now: float) -> None:
        self._log({"kind": "register", "now": now, "client": info_row(info)})
        self.clients[info.client_id] = ClientSession(info, now)

    def _available(self, client_id: int, now: float) -> None:
        self._log({"kind": "available", "now": now, "client_id": client_id})
        state = self.clients[client_id]
        for tid in [t for t, r in self.records.items() if r.task.client_id == client_id]:
            del self.records[tid]  # the strategy forgets a task its client asks past
        state.announced = True
        self._carry_out(self.driver.available(state.info, now), now)

    def _tick(self, now: float) -> None:
        self._log({"kind": "tick", "now": now})
        self._carry_out(self.driver.tick(now), now)

    def _apply_result(self, accepted: LoggedResult, now: float) -> bool:
        """Hand an accepted result to the strategy; True when it went into the model (or its buffer), False when
        the strategy dropped it (it arrived after its round closed). Raises :class:`ResultFailed`, with nothing
        changed but the rejection counted, when the strategy failed on it."""
        result, dp, personal = accepted.result, accepted.dp, accepted.personal
        try:
            outcome = self.driver.result(result, now)
        except ResultFailed:
            self.reject()
            raise
        if dp is not None:
            self.privacy.add(result.client_id, dp)
        if personal is not None:
            self.personal.report(result.client_id, personal)
        self.records.pop(result.task_id, None)
        self.accepted[result.task_id] = result.client_id
        self.counters.received += 1
        self.counters.accepted += 1
        self.counters.clipped += int(accepted.clipped)
        self.counters.bytes_up += accepted.nbytes
        self.clients[result.client_id].announced = True
        self._carry_out(outcome, now)
        return outcome.dropped == 0

    def _carry_out(self, outcome: Outcome, now: float) -> None:
        """Send the outcome's tasks; stop, or evaluate and checkpoint a new version, as the driver decided."""
        for task in outcome.tasks:
            self.records[task.task_id] = TaskRecord.of(task)
            state = self.clients[task.client_id]
            state.announced = False
            state.wakeup.set()
        self._wake.set()
        if outcome.stop is not None:
            self._end(outcome.stop, now)  # evaluates (when not yet done) and checkpoints
        elif outcome.new_version:
            if outcome.evaluate:
                if self._replaying and self.version <= self._recorded:
                    self.driver.mark_evaluated(now)  # its line was written before the restart
                else:
                    self._queue_eval(now)
            if not self._replaying:
                self._checkpoint_now()

    def _end(self, reason: str, now: float) -> None:
        if self.ended is not None:
            return
        try:
            self._log({"kind": "end", "now": now, "reason": reason})
        except OSError as error:  # the run still ends; a resume would find it running and go on
            log.error("the end of the run could not be logged (%s)", error)
        self.ended = RunEnded(self.version, reason)
        if self._replaying:
            return
        log.info("run over (%s) at version %d after %.1f s", reason, self.version, now)
        for state in self.clients.values():
            state.wakeup.set()
        if self.driver.evaluation_pending():
            self._queue_eval(now)
        self._checkpoint_now()
        self._ended_event.set()
        self._wake.set()
        if self.on_end is not None:
            self.on_end(self.ended)

    # ------------------------------------------------------------------ checkpoints and metrics
    def _checkpoint_now(self, sync: bool = False) -> None:
        if self.checkpoints is not None and self.store is not None and self.store.log is not None:
            if sync:
                self.checkpoints.commit_now()
            else:
                self.checkpoints.request()

    def _capture(self) -> tuple[dict[str, Any], int]:
        """The state now and the last logged event it holds (a checkpoint's content)."""
        return self._state(), self._last_seq

    def _queue_eval(self, now: float) -> None:
        self.driver.mark_evaluated(now)
        if self.recorder is None:
            return
        point = self.driver.point(now, time.time() - self._wall_start, self.counters.bytes_up, self.counters.bytes_down)
        bitwidths = sorted({c.info.profile.bitwidth for c in self.clients.values()})
        personal = self.personal.mean()
        privacy = self.privacy.snapshot() if self.privacy else None
        delta = self.settings.dp_delta

        def extras() -> dict[str, Any]:  # in the recorder's thread: the epsilons take a while
            out: dict[str, Any] = {} if personal is None else {"personal_accuracy": personal}
            if privacy is not None:
                out["epsilon"] = PrivacyLedger.epsilons(privacy, delta)
            return out

        self.recorder.submit(point, self.strategy.global_weights, bitwidths, extras)

    # ------------------------------------------------------------------ the API the servicer calls
    def touch(self, client_id: int) -> ClientSession:
        """Note that ``client_id`` is alive; raises :class:`UnknownClient` when it has not registered."""
        state = self.clients.get(client_id)
        if state is None:
            raise UnknownClient(f"client {client_id} is not registered; call Register first")
        state.last_seen = self.now()
        if state.gone:
            state.gone = False
            log.info("client %d is back", client_id)
        return state

    def register(self, info: ClientInfo) -> ClientInfo:
        """Register ``info``; a client that registers again keeps its first profile (the strategy's view)."""
        known = self.clients.get(info.client_id)
        if known is not None:
            self.touch(info.client_id)
            return known.info
        if self.ended is None:
            self._register(info, self.now())
        return info

    async def next_task(self, client_id: int, timeout: float) -> Task | RunEnded | None:
        """Long poll: the client's next task, :class:`RunEnded`, or None after ``timeout`` seconds."""
        state = self.touch(client_id)
        deadline = time.monotonic() + timeout
        while True:
            if self.ended is not None:
                state.told_over = True
                return self.ended
            pending = [r for r in self.records.values() if r.task.client_id == client_id]
            ready = [r for r in pending if not r.delivered]
            if ready:
                record = min(ready, key=lambda r: r.task.task_id)
                record.delivered = True
                return record.task
            if pending or not state.announced:
                # asking while holding a delivered task means the client lost it (crash, restart, rejection)
                self._available(client_id, self.now())
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                state.last_seen = self.now()
                return None
            state.wakeup.clear()
            await wait_event(state.wakeup, remaining)

    def undeliver(self, task_id: int) -> None:
        """The task's download failed: hand it out again on the next poll."""
        record = self.records.get(task_id)
        if record is not None:
            record.delivered = False

    def begin_result(self, client_id: int, task_id: int, version: int) -> TaskRecord:
        """The record of the task a result answers, before its payload is read.

        Raises :class:`DuplicateResult` for a task already accepted and :class:`NotOutstanding` otherwise.
        """
        self.touch(client_id)
        if self.accepted.get(task_id) == client_id:
            self.counters.received += 1
            self.counters.duplicates += 1
            raise DuplicateResult(f"task {task_id} was already accepted")
        record = self.records.get(task_id)
        if record is None or record.task.client_id != client_id or record.task.version != version:
            self.counters.received += 1
            self.counters.not_outstanding += 1
            raise NotOutstanding(
                f"task {task_id} of client {client_id} at version {version} is not outstanding "
                "(unknown, lost, or already closed)"
            )
        return record

    def reject(self) -> None:
        """Count a result refused by validation."""
        self.counters.received += 1
        self.counters.rejected += 1

    def bound_norm(self, weights: Weights, record: TaskRecord) -> tuple[Weights, bool]:
        """An update's weights under the configured norm bound, and whether they were clipped; raises
        NormBoundExceeded when rejecting. Reads only the settings and the task, so any thread may call it."""
        checked = self.driver.norm.check(weights, record.task.weights)
        return checked.weights, checked.clipped

    async def submit(
        self,
        result: Result,
        record: TaskRecord,
        nbytes: int,
        clipped: bool,
        dp: DPStep | None = None,
        personal: float | None = None,
    ) -> Submitted:
        """Make a validated result durable, then hand it to the strategy; returns the global version after it and
        whether the result was applied.
        ``dp`` is the DP-SGD history entry the client reported with it (None without DP), ``personal`` the
        personalised accuracy it measured (None when it keeps no personal head).

        Raises :class:`DuplicateResult` or :class:`NotOutstanding` when, while the result was being stored, the
        task was answered by another upload or lost.
        """
        file = sha = ""
        if self.store is not None:
            file, sha = await asyncio.to_thread(self.store.write_result, result.weights)
        try:
            if self.accepted.get(result.task_id) == result.client_id:
                self.counters.received += 1
                self.counters.duplicates += 1
                raise DuplicateResult(f"task {result.task_id} was already accepted")
            if self.records.get(result.task_id) is not record or self.ended is not None:
                self.counters.received += 1
                self.counters.not_outstanding += 1
                raise NotOutstanding(f"task {result.task_id} is no longer outstanding")
        except (DuplicateResult, NotOutstanding):
            if self.store is not None:
                self.store.delete_result(file)
            raise
        now = self.now()
        accepted = LoggedResult(result, nbytes, clipped, dp, personal)
        try:
            self._log(result_event(accepted, now, file, sha))
        except OSError:
            if self.store is not None:
                self.store.delete_result(file)
            raise
        applied = self._apply_result(accepted, now)
        return Submitted(self.version, applied)

    def heartbeat(self, client_id: int) -> bool:
        """Note a heartbeat; returns True when the run is over (and notes that the client was told)."""
        state = self.touch(client_id)
        if self.ended is not None:
            state.told_over = True
            return True
        return False

    def leave(self, client_id: int) -> None:
        state = self.touch(client_id)
        state.gone = True
        state.told_over = True
        self.counters.gone += 1

    def request_stop(self, reason: str) -> None:
        """End the run now (a signal, or an operator)."""
        self._end(reason, self.now())

    # ------------------------------------------------------------------ background work
    async def run(self) -> RunEnded:
        """Drive ticks, stopping and liveness until the run ends and clients were told (or the grace passed)."""
        tasks = [asyncio.create_task(self.checkpoints.run())] if self.checkpoints is not None else []
        if self.driver.evaluated_version < 0:
            self._queue_eval(self.now())
        reaper = asyncio.create_task(self._reaper())
        try:
            if self.ended is None:
                await self._drive()
            await self._grace()
            if self.recorder is not None:
                await asyncio.to_thread(self.recorder.close)
            if self.checkpoints is not None:
                try:
                    await asyncio.wait_for(self.checkpoints.join(), _FINAL_CHECKPOINT_SECONDS)
                except asyncio.TimeoutError:
                    log.error("the final checkpoint could not be written; the write-ahead log holds every event")
        finally:
            for t in (*tasks, reaper):
                t.cancel()
            await asyncio.gather(*tasks, reaper, return_exceptions=True)
        assert self.ended is not None
        return self.ended

    async def _drive(self) -> None:
        stop_at = self.driver.rules.max_seconds or math.inf
        while self.ended is None:
            deadline = self.strategy.next_deadline()
            target = min(stop_at, math.inf if deadline is None else deadline)
            self._wake.clear()
            await wait_event(self._wake, max(0.0, target - self.now()) if math.isfinite(target) else None)
            if self.ended is not None:
                return
            now = self.now()
            over = self.driver.time_up(now)
            if over is not None:
                self._end(over, now)
                return
            deadline = self.strategy.next_deadline()
            if deadline is not None and now >= deadline:
                try:
                    self._tick(now)
                except OSError as error:  # not logged, so not taken: the deadline stays, tried again shortly
                    log.error("deadline at %.1f s not handled: the write-ahead log failed (%s)", deadline, error)
                    await asyncio.sleep(1.0)
                    continue
                if self.strategy.next_deadline() == deadline:
                    await asyncio.sleep(0.05)  # the tick did not move the deadline: do not spin on it

    async def _grace(self) -> None:
        end = time.monotonic() + self.settings.shutdown_grace
        while time.monotonic() < end:
            if all(c.told_over or c.gone for c in self.clients.values()):
                return
            await asyncio.sleep(0.05)

    async def _reaper(self) -> None:
        period = max(0.05, min(1.0, self.settings.client_timeout / 4))
        while True:
            await asyncio.sleep(period)
            now = self.now()
            for cid, state in self.clients.items():
                if not state.gone and now - state.last_seen > self.settings.client_timeout:
                    state.gone = True
                    self.counters.gone += 1
                    log.info("client %d silent for %.1f s: marked gone", cid, now - state.last_seen)

    @property
    def ended_event(self) -> asyncio.Event:
        return self._ended_event


def _status(record: MetricsRecord) -> None:
    log.info("%s, %d updates applied", describe(record), record.updates_applied)
