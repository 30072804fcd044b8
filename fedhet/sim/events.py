"""The virtual clock: a priority queue of events ordered by (time, insertion order)."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from enum import Enum

__all__ = ["Event", "EventKind", "EventQueue"]


class EventKind(Enum):
    AVAILABLE = "available"  # a client is idle and asks for work
    ARRIVAL = "arrival"  # a task's result reaches the server
    TICK = "tick"  # a deadline the strategy asked for


@dataclass(order=True, frozen=True)
class Event:
    """Something that happens at virtual ``time`` (seconds). Ties keep insertion order (``seq``)."""

    time: float
    seq: int
    kind: EventKind = field(compare=False)
    client_id: int = field(compare=False, default=-1)
    task_id: int = field(compare=False, default=-1)


class EventQueue:
    """Events popped in time order; equal times in the order they were pushed."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Event]] = []  # tuples: compared in C, not by the dataclass's __lt__
        self._seq = 0
        self.now = 0.0

    def push(self, time: float, kind: EventKind, client_id: int = -1, task_id: int = -1) -> Event:
        if time < self.now:
            raise ValueError(f"cannot schedule {kind.value} at {time} s, before the current time {self.now} s")
        event = Event(time, self._seq, kind, client_id, task_id)
        self._seq += 1
        heapq.heappush(self._heap, (time, event.seq, event))
        return event

    def pop(self) -> Event:
        event = heapq.heappop(self._heap)[2]
        self.now = event.time
        return event

    def __len__(self) -> int:
        return len(self._heap)
