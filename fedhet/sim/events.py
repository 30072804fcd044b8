"""The virtual clock: a priority queue of events ordered by (time, insertion order)."""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from enum import Enum
from typing import Any, NamedTuple

__all__ = ["Event", "EventKind", "EventQueue"]


class EventKind(Enum):
    AVAILABLE = "available"  # a client is idle and asks for work
    ARRIVAL = "arrival"  # a task's result reaches the server
    TICK = "tick"  # a deadline the strategy asked for


class Event(NamedTuple):
    """Something that happens at virtual ``time`` (seconds). Ties keep insertion order (``seq``, unique in a
    queue, so events order by ``(time, seq)`` alone). A tuple, made and compared in C: a simulation makes one or
    more per task."""

    time: float
    seq: int
    kind: EventKind
    client_id: int = -1
    task_id: int = -1


class EventQueue:
    """Events popped in time order; equal times in the order they were pushed."""

    def __init__(self) -> None:
        self._heap: list[Event] = []
        self._seq = 0
        self.now = 0.0

    def push(self, time: float, kind: EventKind, client_id: int = -1, task_id: int = -1) -> Event:
        if time < self.now:
            raise ValueError(f"cannot schedule {kind.value} at {time} s, before the current time {self.now} s")
        event = Event(time, self._seq, kind, client_id, task_id)
        self._seq += 1
        heapq.heappush(self._heap, event)
        return event

    def pop(self) -> Event:
        event = heapq.heappop(self._heap)
        self.now = event.time
        return event

    def __len__(self) -> int:
        return len(self._heap)

    def pending(self, kind: EventKind) -> list[Event]:
        """The events of ``kind`` still to pop, in no particular order."""
        return [e for e in self._heap if e.kind is kind]

    def state_dict(self) -> dict[str, Any]:
        """The pending events and the clock, for a checkpoint."""
        events = [[e.time, e.seq, e.kind.value, e.client_id, e.task_id] for e in sorted(self._heap)]
        return {"now": self.now, "next_seq": self._seq, "events": events}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; raises ValueError for a malformed state."""
        try:
            rows = [(float(t), int(q), EventKind(str(k)), int(c), int(i)) for t, q, k, c, i in state["events"]]
            now, next_seq = float(state["now"]), int(state["next_seq"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"event queue state is malformed: {error}") from None
        if any(t < now or q >= next_seq for t, q, *_ in rows):
            raise ValueError("event queue state holds an event before its clock or after its sequence")
        if len({q for _, q, *_ in rows}) != len(rows):
            raise ValueError("event queue state repeats a sequence number")
        self._heap = [Event(t, q, k, c, i) for t, q, k, c, i in rows]
        heapq.heapify(self._heap)
        self.now, self._seq = now, next_seq
