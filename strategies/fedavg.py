"""Synchronous FedAvg (McMahan et al., 2017): rounds of sampled clients, a round deadline, a sample-weighted mean."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedhet.strategies.base import Assignment, Decision, undoable
from fedhet.strategies.buffer import UpdateBuffer
from fedhet.strategies.errors import StateError
from fedhet.strategies.journal import Journal
from fedhet.strategies.layers import layer_names
from fedhet.types import ClientInfo, Result

__all__ = ["SYNC_WEIGHTINGS", "SyncScheduler"]

SYNC_WEIGHTINGS = ("samples", "uniform", "layers")


class SyncScheduler:
    """Synchronous rounds.

    A round starts when at least ``m = max(min_clients, ceil(fraction * reachable clients))`` clients are idle,
    where reachable clients are the known ones less the stragglers still busy with a closed round's task; it
    samples ``m`` of them uniformly (seeded by ``seed`` and the round number) and ends when every sampled client
    has answered or been lost, or at ``now + round_timeout`` seconds, whichever comes first. At its end the
    arrived updates are aggregated (if any); a straggler's update arriving after its round ended is dropped.

    Args:
        fraction: C, the fraction of known clients sampled per round, in (0, 1].
        min_clients: fewest clients a round starts with.
        round_timeout: seconds after its start at which a round closes with whatever arrived.
        local_epochs: E, local passes over each client's shard (or 0 when ``local_steps`` is set).
        local_steps: local minibatch steps per task (or 0 when ``local_epochs`` is set).
        weighting: the weight of each update in the mean: ``samples`` (FedAvg: its sample count), ``uniform``
            (1 each) or ``layers`` (the number of layers it carries: FedP3's layer-count weighting; the mean of
            every tensor is normalised over the updates that carried it).
        seed: seeds client sampling.
        proximal_mu: FedProx's mu (Li et al., 2020): each client minimises its loss plus
            ``mu/2 * ||w - w_global||^2``; 0 is FedAvg.
        keep_updates: hold each update of a round apart as well as folded (the strategy builder sets it for an
            aggregator that looks at every update: median, trimmed mean, Krum).
    """

    def __init__(
        self,
        fraction: float = 0.1,
        min_clients: int = 2,
        round_timeout: float = 600.0,
        local_epochs: int = 1,
        local_steps: int = 0,
        weighting: str = "samples",
        seed: int = 0,
        proximal_mu: float = 0.0,
        keep_updates: bool = False,
    ) -> None:
        if not (math.isfinite(proximal_mu) and proximal_mu >= 0):
            raise ValueError(f"strategy.proximal_mu must be finite and >= 0, got {proximal_mu}")
        if weighting not in SYNC_WEIGHTINGS:
            raise ValueError(f"strategy.weighting must be one of {', '.join(SYNC_WEIGHTINGS)}, got {weighting!r}")
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"strategy.fraction must be in (0, 1], got {fraction}")
        if min_clients < 1:
            raise ValueError(f"strategy.min_clients must be >= 1, got {min_clients}")
        if not round_timeout > 0:
            raise ValueError(f"strategy.round_timeout must be > 0 seconds, got {round_timeout}")
        if (local_epochs > 0) == (local_steps > 0) or local_epochs < 0 or local_steps < 0:
            raise ValueError(
                f"exactly one of strategy.local_epochs ({local_epochs}) and strategy.local_steps ({local_steps}) "
                "must be > 0"
            )
        self.fraction = fraction
        self.min_clients = min_clients
        self.round_timeout = round_timeout
        self.local_epochs = local_epochs
        self.local_steps = local_steps
        self.weighting = weighting
        self.seed = seed
        self.round = 0
        self.keep_updates = keep_updates
        self.proximal_mu = proximal_mu
        self.buffer = UpdateBuffer(keep_updates)
        self._known: set[int] = set()
        self._idle: set[int] = set()
        self._pending: set[int] = set()
        self._stragglers: set[int] = set()  # still training for a round that closed without them
        self._round_deadline: float | None = None  # set while a round runs
        self._start_at: float | None = None  # when to try starting the next round

    @property
    def round_size(self) -> int:
        """Clients sampled per round given the clients reachable now."""
        return max(self.min_clients, math.ceil(self.fraction * len(self._known - self._stragglers)))

    def on_available(self, client: ClientInfo, now: float) -> Decision:
        return undoable(self._available, client, now)

    def on_result(self, result: Result, client: ClientInfo, now: float) -> Decision:
        return undoable(self._result, result, client, now)

    def on_tick(self, now: float) -> Decision:
        return undoable(self._tick, now)

    # the events, each recording its changes in ``journal``: the client sets change through it one client at a
    # time, a round's start and end replace them
    def _available(self, journal: Journal, client: ClientInfo, now: float) -> Decision:
        cid = client.client_id
        journal.keep(self)
        journal.add(self._known, cid)
        journal.add(self._idle, cid)
        journal.discard(self._stragglers, cid)
        if cid in self._pending:  # it lost its task: the round no longer waits for it
            journal.discard(self._pending, cid)
            if not self._pending:
                return self._close_round(now)
        if self._round_deadline is None and self._start_at is None:
            self._start_at = now  # start on a tick, after every other event at this time was seen
        return Decision()

    def _result(self, journal: Journal, result: Result, client: ClientInfo, now: float) -> Decision:
        cid = client.client_id
        journal.keep(self)
        if cid not in self._pending:
            journal.add(self._idle, cid)
            journal.discard(self._stragglers, cid)
            if self._round_deadline is None and self._start_at is None:
                self._start_at = now
            return Decision(dropped=1)  # its round already closed
        journal.record(self.buffer.restore_point())
        self.buffer.add(result, self._weight(result))
        journal.add(self._idle, cid)
        journal.discard(self._stragglers, cid)
        journal.discard(self._pending, cid)
        return self._close_round(now) if not self._pending else Decision()

    def _tick(self, journal: Journal, now: float) -> Decision:
        journal.keep(self)
        if self._round_deadline is not None and now >= self._round_deadline:
            decision = self._close_round(now)
            decision.assign = self._try_start(now)
            return decision
        if self._start_at is not None and now >= self._start_at:
            return Decision(assign=self._try_start(now))
        return Decision()

    def _weight(self, result: Result) -> float:
        if self.weighting == "samples":
            return float(result.num_samples)
        if self.weighting == "layers":
            return float(len(layer_names(result.weights)))
        return 1.0

    def next_deadline(self) -> float | None:
        return self._round_deadline if self._round_deadline is not None else self._start_at

    def _close_round(self, now: float) -> Decision:
        self._stragglers = self._stragglers | self._pending
        self._pending = set()
        self._round_deadline = None
        self._start_at = now
        self.round += 1
        closed, self.buffer = self.buffer, UpdateBuffer(self.keep_updates)
        return Decision(aggregate=closed)

    def _try_start(self, now: float) -> list[Assignment]:
        self._start_at = None
        size = self.round_size
        if len(self._idle) < size:
            return []  # wait: the next client to become available tries again
        rng = np.random.default_rng([self.seed, self.round])
        chosen = sorted(int(c) for c in rng.choice(sorted(self._idle), size=size, replace=False))
        self._idle = self._idle.difference(chosen)
        self._pending = set(chosen)
        self._round_deadline = now + self.round_timeout
        return [Assignment(c, self.local_steps, self.local_epochs, self.proximal_mu) for c in chosen]

    def state_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "known": sorted(self._known),
            "idle": sorted(self._idle),
            "pending": sorted(self._pending),
            "stragglers": sorted(self._stragglers),
            "round_deadline": self._round_deadline,
            "start_at": self._start_at,
            "buffer": self.buffer.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        expected = {"round", "known", "idle", "pending", "stragglers", "round_deadline", "start_at", "buffer"}
        if set(state) != expected:
            raise StateError(f"fedavg scheduler state keys {sorted(state)} differ from {sorted(expected)}")
        self.round = int(state["round"])
        self._known = {int(c) for c in state["known"]}
        self._idle = {int(c) for c in state["idle"]}
        self._pending = {int(c) for c in state["pending"]}
        self._stragglers = {int(c) for c in state["stragglers"]}
        if not (self._idle | self._pending | self._stragglers) <= self._known:
            raise StateError("fedavg scheduler state lists idle or pending clients that are not known")
        self._round_deadline = None if state["round_deadline"] is None else float(state["round_deadline"])
        self._start_at = None if state["start_at"] is None else float(state["start_at"])
        self.buffer.load_state_dict(state["buffer"])
