"""What the server's coordinator keeps per run, per client and per task, and the errors its API raises: small
types without behaviour of their own (:mod:`fedhet.server.runtime` is the coordinator that uses them)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from fedhet.runtime.driver import EvalCadence, StopRules
from fedhet.strategies import UnknownTaskError
from fedhet.types import ClientInfo, ClientProfile, Task
from fedhet.updates import NormBound, TensorMeta, meta_of

__all__ = [
    "ClientSession",
    "Counters",
    "DuplicateResult",
    "NotOutstanding",
    "RunEnded",
    "RuntimeSettings",
    "Submitted",
    "TaskRecord",
    "UnknownClient",
    "info_from_row",
    "info_row",
    "wait_event",
]


async def wait_event(event: asyncio.Event, timeout: float | None) -> None:
    """Wait until ``event`` is set or ``timeout`` seconds pass (None: no limit). Cancelling the caller cancels the
    wait at once (``asyncio.wait_for`` can hold a cancellation back on some Python versions)."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()


class UnknownClient(LookupError):
    """The client has not registered (or the server forgot it): it must call Register."""


class NotOutstanding(UnknownTaskError):
    """The task is not outstanding for this client: unknown, lost, or another client's."""


class DuplicateResult(Exception):
    """The task's result was already accepted; nothing is applied twice."""


@dataclass(frozen=True)
class Submitted:
    """What became of an accepted result: the global version after it, and whether it went into the model (False:
    the strategy dropped it as too late)."""

    version: int
    applied: bool


@dataclass(frozen=True)
class RunEnded:
    """The run is over: the final version and why it stopped."""

    version: int
    reason: str


@dataclass
class RuntimeSettings:
    """What the runtime needs of the server config (see :class:`fedhet.server.config.ServerSettings`): the run
    core's stop rules and evaluation cadence, and the server's own limits."""

    stop: StopRules = field(default_factory=StopRules)
    cadence: EvalCadence = field(default_factory=EvalCadence)
    client_timeout: float = 30.0
    norm: NormBound = field(default_factory=NormBound)
    shutdown_grace: float = 10.0
    dp_delta: float = 1e-5


@dataclass
class Counters:
    """Results the server saw: ``received == accepted + rejected + duplicates + not_outstanding``.

    ``accepted`` results went to the strategy (which may still drop a straggler's: ``updates_dropped``);
    ``clipped`` of them had their norm clipped. Bytes are payload bytes.
    """

    received: int = 0
    accepted: int = 0
    rejected: int = 0
    duplicates: int = 0
    not_outstanding: int = 0
    clipped: int = 0
    busy: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    gone: int = 0


@dataclass
class TaskRecord:
    """A task the strategy handed out and no result has answered yet; ``meta`` describes what its result must
    carry: the tensors the task trains (all it carries, or FedP3's assigned layers)."""

    task: Task
    meta: dict[str, TensorMeta]
    delivered: bool = False

    @classmethod
    def of(cls, task: Task) -> TaskRecord:
        return cls(task, meta_of({k: v for k, v in task.weights.items() if k in task.trained}))


@dataclass
class ClientSession:
    """What the server knows of one connected client: its registration, liveness and mailbox (its kept tensors
    are the client's own, on the device: :class:`fedhet.clients.trainer.ClientState`)."""

    info: ClientInfo
    last_seen: float
    gone: bool = False
    announced: bool = False  # the strategy holds this client as idle (asked for work, or answered its task)
    told_over: bool = False
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)


def info_row(info: ClientInfo) -> list[Any]:
    """A client's registration as a row of the log and the checkpoint."""
    p = info.profile
    return [info.client_id, info.num_samples, p.seconds_per_sample, p.bandwidth, p.bitwidth, p.memory_bytes]


def info_from_row(row: list[Any]) -> ClientInfo:
    """The registration of :func:`info_row`'s row."""
    cid, n, sps, bw, bits, mem = row
    return ClientInfo(int(cid), ClientProfile(float(sps), float(bw), int(bits), int(mem)), int(n))
