"""FedAsync (Xie et al., 2019): every client trains all the time; each update is mixed in alone, on arrival."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedhet.strategies.base import Assignment, Decision, undoable
from fedhet.strategies.errors import StateError
from fedhet.strategies.journal import Journal
from fedhet.strategies.staleness import ClientWeights, StalenessBuffer, StartVersions
from fedhet.types import ClientInfo, Result

__all__ = ["FedAsyncScheduler"]


class FedAsyncScheduler:
    """Apply each update as it arrives, then hand its client the new model at once.

    With the ``staleness_weighted`` aggregator an update of staleness ``tau`` enters with ``a = alpha * s(tau) * w``:
    ``theta <- (1 - a) theta + a theta_i``. The paper has no client factor (``weighting: none``, ``w = 1``);
    ``uniform`` (``w = 1/N``) and ``samples`` (the client's share of all samples) are the alternatives.

    Args:
        local_steps: local minibatch steps per task.
        weighting: ``none``, ``uniform`` or ``samples``: the client factor ``w`` of each update.
    """

    def __init__(self, local_steps: int = 100, weighting: str = "none") -> None:
        if local_steps < 1:
            raise ValueError(f"local_steps must be >= 1, got {local_steps}")
        self.local_steps = local_steps
        self.version = 0
        self._weights = ClientWeights(weighting)
        self._starts = StartVersions()

    def on_available(self, client: ClientInfo, now: float) -> Decision:
        return undoable(self._available, client)

    def on_result(self, result: Result, client: ClientInfo, now: float) -> Decision:
        return undoable(self._result, result, client)

    def _available(self, journal: Journal, client: ClientInfo) -> Decision:
        self._keep(journal, client.client_id)
        self._weights.observe(client)
        return Decision(assign=[self._assign(client.client_id)])

    def _result(self, journal: Journal, result: Result, client: ClientInfo) -> Decision:
        self._keep(journal, client.client_id)
        update = StalenessBuffer()
        update.add(result, self._weights.weight(client))
        self.version += 1
        assignment = self._assign(client.client_id)
        update.live_versions = self._starts.live()
        return Decision(aggregate=update, assign=[assignment])

    def on_tick(self, now: float) -> Decision:
        return Decision()

    def next_deadline(self) -> float | None:
        return None

    def buffered_task_ids(self) -> list[int]:
        """Tasks accepted and not yet aggregated: none, every update is applied on arrival."""
        return []

    def _keep(self, journal: Journal, cid: int) -> None:
        """Record what an event of client ``cid`` may change: the version, its weight and its start version."""
        journal.keep(self)
        self._weights.keep(journal, cid)
        self._starts.keep(journal, cid)

    def _assign(self, cid: int) -> Assignment:
        self._starts.start(cid, self.version)
        return Assignment(cid, local_steps=self.local_steps)

    def state_dict(self) -> dict[str, Any]:
        return {"version": self.version, "weights": self._weights.state_dict(), "starts": self._starts.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        expected = {"version", "weights", "starts"}
        if set(state) != expected:
            raise StateError(f"fedasync scheduler state keys {sorted(state)} differ from {sorted(expected)}")
        version = _version(state["version"])
        weights = ClientWeights(self._weights.weighting)
        weights.load_state_dict(state["weights"])
        starts = StartVersions()
        starts.load_state_dict(state["starts"], version)
        self.version, self._weights, self._starts = version, weights, starts


def _version(value: Any) -> int:
    if not isinstance(value, int) or value < 0:
        raise StateError(f"scheduler version must be an int >= 0, got {value!r}")
    return value
