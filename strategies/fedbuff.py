"""FedBuff (Nguyen et al., 2022): asynchronous clients, updates buffered and applied K at a time."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedhet.strategies.base import Assignment, Decision, undoable
from fedhet.strategies.errors import StateError
from fedhet.strategies.journal import Journal
from fedhet.strategies.staleness import ClientWeights, StalenessBuffer, StartVersions
from fedhet.types import ClientInfo, Result

__all__ = ["FedBuffScheduler"]


class FedBuffScheduler:
    """Buffer updates as they arrive and flush them together once ``buffer_size`` (K) have arrived.

    Every client is reassigned at once from the current model, flush or not. Each update is buffered with weight
    ``w_i``, so the gradient-based ``staleness_weighted`` aggregator applies
    ``theta <- theta + eta * sum_i w_i s(tau_i) Delta_i`` with ``eta`` its ``alpha`` (the server learning rate)
    and ``Delta_i`` the update's change to the model it started from. ``weighting=none`` is the paper's
    ``w_i = 1/K``; ``samples`` (as APPFL does) is ``w_i = (n_i / n_total) * N / K``, the client's sample share of
    the N known clients scaled so that K updates of clients of average size sum to 1. The global version moves once
    per flush, so staleness ``tau`` counts flushes.

    Args:
        buffer_size: K, updates per flush.
        local_steps: local minibatch steps per task.
        weighting: ``none`` (1/K) or ``samples`` (by the client's share of the samples).
    """

    def __init__(self, buffer_size: int = 10, local_steps: int = 100, weighting: str = "none") -> None:
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        if local_steps < 1:
            raise ValueError(f"local_steps must be >= 1, got {local_steps}")
        if weighting not in ("none", "samples"):
            raise ValueError(f"weighting must be none or samples, got {weighting!r}")
        self.buffer_size = buffer_size
        self.local_steps = local_steps
        self.version = 0
        self.buffer = StalenessBuffer()
        self._starts = StartVersions()
        self._weights = ClientWeights(weighting)

    def on_available(self, client: ClientInfo, now: float) -> Decision:
        return undoable(self._available, client)

    def on_result(self, result: Result, client: ClientInfo, now: float) -> Decision:
        return undoable(self._result, result, client)

    def _available(self, journal: Journal, client: ClientInfo) -> Decision:
        self._starts.keep(journal, client.client_id)
        self._weights.keep(journal, client.client_id)
        self._weights.observe(client)
        return Decision(assign=[self._assign(client.client_id)])

    def _weight(self, client: ClientInfo) -> float:
        """``w_i`` of an update of ``client``: 1/K, or its sample share times N/K."""
        if self._weights.weighting == "none":
            return 1.0 / self.buffer_size
        return self._weights.weight(client) * self._weights.num_clients / self.buffer_size

    def _result(self, journal: Journal, result: Result, client: ClientInfo) -> Decision:
        journal.keep(self)
        journal.record(self.buffer.restore_point())
        self._starts.keep(journal, client.client_id)
        self._weights.keep(journal, client.client_id)
        self.buffer.add(result, self._weight(client))
        self._starts.finish(client.client_id)
        if len(self.buffer) < self.buffer_size:
            return Decision(assign=[self._assign(client.client_id)])
        flush, self.buffer = self.buffer, StalenessBuffer()
        self.version += 1
        assignment = self._assign(client.client_id)
        flush.live_versions = self._starts.live()  # the new, empty buffer holds nothing older
        return Decision(aggregate=flush, assign=[assignment])

    def on_tick(self, now: float) -> Decision:
        return Decision()

    def next_deadline(self) -> float | None:
        return None

    def buffered_task_ids(self) -> list[int]:
        """Tasks accepted and waiting for the next flush."""
        return self.buffer.task_ids()

    def _assign(self, cid: int) -> Assignment:
        self._starts.start(cid, self.version)
        return Assignment(cid, local_steps=self.local_steps)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "starts": self._starts.state_dict(),
            "buffer": self.buffer.state_dict(),
            "weights": self._weights.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        expected = {"version", "starts", "buffer", "weights"}
        if set(state) == expected - {"weights"}:  # written before FedBuff weighted by samples: no counts kept
            state = {**state, "weights": ClientWeights().state_dict()}
        if set(state) != expected:
            raise StateError(f"fedbuff scheduler state keys {sorted(state)} differ from {sorted(expected)}")
        version = state["version"]
        if not isinstance(version, int) or version < 0:
            raise StateError(f"fedbuff scheduler version must be an int >= 0, got {version!r}")
        starts = StartVersions()
        starts.load_state_dict(state["starts"], version)
        buffer = StalenessBuffer()
        buffer.load_state_dict(state["buffer"])
        if len(buffer) >= self.buffer_size:
            raise StateError(f"fedbuff buffer holds {len(buffer)} updates, a flush is due at {self.buffer_size}")
        if any(v > version for v in buffer.versions()):
            raise StateError(f"fedbuff buffer holds an update started after version {version}")
        weights = ClientWeights(self._weights.weighting)
        weights.load_state_dict(state["weights"])
        self.version, self._starts, self.buffer, self._weights = version, starts, buffer, weights
