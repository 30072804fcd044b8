"""What every call to the service passes before the servicer sees it.

* **Authentication before parsing**: a call without a valid token is refused with UNAUTHENTICATED before one byte
  of its request is decoded.
* **Malformed messages** (bytes that do not parse as the method's request) are refused with INVALID_ARGUMENT
  naming the message type; no traceback is logged for them.
* **Storage failures** (a full disk, a file-size limit: any ``OSError`` from the state directory) reach the client
  as UNAVAILABLE with the reason, never UNKNOWN; the client retries and nothing it was told is lost.
* Anything else that escapes the servicer is a server bug: INTERNAL for the client, and a traceback in the log,
  at most a few per minute (:class:`RateLimitedLog`).

Client-caused log lines go through :class:`RateLimitedLog`, so one sender cannot flood the log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError
from grpc import aio
from grpc._cython import cygrpc  # type: ignore[attr-defined]  # the stubs omit the C core

from fedhet.server.admission import drain
from fedhet.server.auth import TokenStore

__all__ = ["Gate", "RateLimitedLog"]

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    _Interceptor = aio.ServerInterceptor[Any, Any]
else:  # not generic at run time
    Handler = grpc.RpcMethodHandler
    _Interceptor = aio.ServerInterceptor

Context = aio.ServicerContext[Any, Any]

#: what grpc raises when a handler answers a call whose client is gone ("execute_batch" failed, abort called twice)
_CALL_GONE: tuple[type[BaseException], ...] = tuple(
    getattr(cygrpc, name) for name in ("ExecuteBatchError", "UsageError") if hasattr(cygrpc, name)
)


class RateLimitedLog:
    """Log lines grouped by a key (what happened, not who sent it): at most ``burst`` lines of one key per
    ``window`` seconds; the rest are counted and reported in one line when the key's next window opens.

    Args:
        logger: where lines go.
        burst: lines of one key written per window.
        window: seconds.
    """

    def __init__(self, logger: logging.Logger, burst: int = 5, window: float = 60.0) -> None:
        self.logger = logger
        self.burst = burst
        self.window = window
        self._windows: dict[str, tuple[float, int, int]] = {}  # key -> (window start, written, suppressed)

    def __call__(self, level: int, key: str, message: str, *args: Any, exc_info: bool = False) -> None:
        now = time.monotonic()
        start, written, suppressed = self._windows.get(key, (now, 0, 0))
        if now - start >= self.window:
            if suppressed:
                self.logger.log(level, "%d more lines like '%s' in the last %.0f s", suppressed, key, now - start)
            start, written, suppressed = now, 0, 0
        if written < self.burst:
            self.logger.log(level, message, *args, exc_info=exc_info)
            written += 1
        else:
            suppressed += 1
        self._windows[key] = (start, written, suppressed)
        if len(self._windows) > 1024:  # keys are few (kinds of event); never let them grow without bound
            self._windows.pop(next(iter(self._windows)))


@dataclass(frozen=True)
class Malformed:
    """A request whose bytes did not parse (what the gate's deserializer returns instead of raising)."""

    type_name: str
    reason: str


def _parse(deserializer: Callable[[bytes], Any] | None, type_name: str) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        if deserializer is None:
            return data
        try:
            return deserializer(data)
        except (DecodeError, ValueError, TypeError) as error:
            return Malformed(type_name, str(error) or type(error).__name__)

    return parse


_SHAPES: dict[tuple[bool, bool], Callable[..., Handler]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _behaviour(handler: Handler) -> Callable[..., Any]:
    shape = (handler.request_streaming, handler.response_streaming)
    behaviour = {
        (False, False): handler.unary_unary,
        (False, True): handler.unary_stream,
        (True, False): handler.stream_unary,
        (True, True): handler.stream_stream,
    }[shape]
    assert behaviour is not None
    return behaviour


def _refused(handler: Handler, code: grpc.StatusCode, message: str) -> Handler:
    """A handler of ``handler``'s shape that answers ``code`` without reading, let alone parsing, the request."""

    async def unary(request: Any, context: Context) -> Any:
        await context.abort(code, message)

    async def streaming(request: Any, context: Context) -> Any:
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator, as a streaming handler must be

    shape = (handler.request_streaming, handler.response_streaming)
    return _SHAPES[shape](
        streaming if shape[1] else unary, request_deserializer=None, response_serializer=handler.response_serializer
    )


class Gate(_Interceptor):
    """Guards every call to ``service`` (other services, such as health, pass untouched).

    Args:
        tokens: the token store, or None when clients are trusted (loopback only).
        service: the guarded service's full name.
        noisy: the rate-limited log of client-caused lines.
        drain_bytes: the most bytes read (and dropped) from a stream refused as malformed before its refusal.
    """

    def __init__(self, tokens: TokenStore | None, service: str, noisy: RateLimitedLog, drain_bytes: int) -> None:
        self._drain_bytes = drain_bytes
        self._tokens = tokens
        self._prefix = f"/{service}/"
        self._noisy = noisy

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not method.startswith(self._prefix):
            return handler
        if self._tokens is not None and self._tokens.client_for(handler_call_details.invocation_metadata) is None:
            self._noisy(logging.INFO, "unauthenticated call", "refused an unauthenticated call to %s", method)
            return _refused(
                handler,
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or invalid token: send metadata 'authorization: Bearer <token>'",
            )
        return self._guarded(handler, method)

    def _guarded(self, handler: Handler, method: str) -> Handler:
        name = method.rsplit("/", 1)[-1]
        behaviour = _behaviour(handler)
        request_type = f"{name} request"
        deserializer = _parse(handler.request_deserializer, request_type)
        noisy = self._noisy

        async def check(request: Any, context: Context) -> Any:
            if isinstance(request, Malformed):
                noisy(logging.WARNING, f"malformed {name}", "refused a malformed %s: %s", request_type, request.reason)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {request_type}: {request.reason}")
            return request

        async def checked(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
            async for request in requests:
                if isinstance(request, Malformed):  # let the client finish writing, so it reads the refusal
                    await drain(requests, self._drain_bytes)
                yield await check(request, context)

        async def failed(error: Exception, context: Context) -> None:
            if isinstance(error, _CALL_GONE):  # the client went away (cancelled, killed): nobody to answer
                log.debug("%s: the client is gone (%s)", name, type(error).__name__)
                return
            if isinstance(error, OSError):
                reason = error.strerror or str(error)
                noisy(logging.ERROR, "storage failure", "%s: storage failed: %s", name, reason)
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE, f"the server cannot store its state now ({reason}); retry later"
                )
            noisy(logging.ERROR, f"internal error in {name}", "%s failed", name, exc_info=True)
            await context.abort(grpc.StatusCode.INTERNAL, "internal server error (logged on the server)")

        async def unary_in(request: Any, context: Context) -> Any:
            request = await check(request, context)
            try:
                return await behaviour(request, context)
            except (aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as error:  # mapped to a status; never a traceback for the client's input
                await failed(error, context)

        async def unary_in_stream_out(request: Any, context: Context) -> AsyncIterator[Any]:
            request = await check(request, context)
            try:
                async for reply in behaviour(request, context):
                    yield reply
            except (aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as error:
                await failed(error, context)

        async def stream_in(requests: AsyncIterator[Any], context: Context) -> Any:
            try:
                return await behaviour(checked(requests, context), context)
            except (aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as error:
                await failed(error, context)

        async def stream_in_stream_out(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
            try:
                async for reply in behaviour(checked(requests, context), context):
                    yield reply
            except (aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as error:
                await failed(error, context)

        shape = (handler.request_streaming, handler.response_streaming)
        wrapped = {
            (False, False): unary_in,
            (False, True): unary_in_stream_out,
            (True, False): stream_in,
            (True, True): stream_in_stream_out,
        }[shape]
        return _SHAPES[shape](
            wrapped, request_deserializer=deserializer, response_serializer=handler.response_serializer
        )
