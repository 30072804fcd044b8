"""Fair share of the server's upload capacity: no client, idle or slow, can hold what the others need.

An upload takes a slot when its header names the client and the payload's size, and gives it back when it ends.
It is refused (RESOURCE_EXHAUSTED, "server busy: ...", which clients retry later) when the server already has
``max_uploads`` in progress, when its client already has ``per_client`` of them, or when the bytes declared by the
uploads in progress would pass ``max_bytes``. Every message of an upload must arrive within ``read_timeout``
seconds of the previous one (:func:`read_within`), so an idle stream gives its slot back quickly.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

__all__ = ["ReadTimeout", "UploadLimits", "UploadSlots", "drain", "read_within"]

T = TypeVar("T")


@dataclass(frozen=True)
class UploadLimits:
    """Args:
    max_uploads: uploads in progress at once, over all clients.
    per_client: uploads one client may have in progress at once.
    max_bytes: payload bytes the uploads in progress may declare in all.
    read_timeout: seconds an upload may go without sending its next message.
    """

    max_uploads: int = 32
    per_client: int = 2
    max_bytes: int = 1 << 30
    read_timeout: float = 15.0


class ReadTimeout(Exception):
    """A client sent nothing for longer than the read timeout."""


async def read_within(stream: AsyncIterator[T], seconds: float, what: str) -> T | None:
    """The next message of ``stream``, or None at its end; raises :class:`ReadTimeout` (naming ``what`` was
    awaited) when none arrives within ``seconds``."""
    try:
        return await asyncio.wait_for(stream.__anext__(), seconds)
    except StopAsyncIteration:
        return None
    except asyncio.TimeoutError:
        raise ReadTimeout(f"no {what} within {seconds:g} s (server.read_timeout)") from None


class UploadSlots:
    """The uploads in progress, per client and in bytes (see the module's docstring)."""

    def __init__(self, limits: UploadLimits) -> None:
        self.limits = limits
        self.in_flight = 0
        self.bytes = 0
        self._by_client: Counter[int] = Counter()

    def refusal(self, client_id: int, nbytes: int) -> str | None:
        """Why an upload of ``nbytes`` by ``client_id`` cannot start now, or None when it can."""
        limits = self.limits
        if self.in_flight >= limits.max_uploads:
            return f"server busy: {self.in_flight} uploads in progress; retry later"
        if self._by_client[client_id] >= limits.per_client:
            return f"server busy: client {client_id} already has {self._by_client[client_id]} uploads in progress"
        if self.bytes + nbytes > limits.max_bytes:
            return f"server busy: {self.bytes} bytes of uploads in progress (cap {limits.max_bytes}); retry later"
        return None

    def take(self, client_id: int, nbytes: int) -> None:
        self.in_flight += 1
        self.bytes += nbytes
        self._by_client[client_id] += 1

    def give_back(self, client_id: int, nbytes: int) -> None:
        self.in_flight -= 1
        self.bytes -= nbytes
        self._by_client[client_id] -= 1
        if not self._by_client[client_id]:
            del self._by_client[client_id]


_DRAIN_SECONDS = 2.0  # longest a refused upload's remaining messages are read for


async def drain(stream: AsyncIterator[Any], limit: int) -> None:
    """Read (and drop) what a refused client is still sending, at most ``limit`` bytes for ``_DRAIN_SECONDS``, so
    its writes complete and it receives the refusal's status; a client cut off mid-write can see a bare INTERNAL
    error instead. Nothing read here is kept or used."""

    async def read() -> None:
        seen = 0
        async for message in stream:
            seen += message.ByteSize() if isinstance(message, Message) else 0  # unparsed: bounded by time alone
            if seen > limit:
                return

    with contextlib.suppress(asyncio.TimeoutError, grpc.RpcError):
        await asyncio.wait_for(read(), _DRAIN_SECONDS)
