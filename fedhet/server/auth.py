"""Who may call: per-client tokens, the interceptor that checks them on every RPC, and TLS credentials."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc import aio

from fedhet.errors import ConfigError

__all__ = ["AuthInterceptor", "TokenStore", "bearer", "server_credentials"]

_HEADER = "authorization"
_PREFIX = "Bearer "


def bearer(token: str) -> tuple[tuple[str, str]]:
    """Call metadata carrying ``token``."""
    return ((_HEADER, _PREFIX + token),)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenStore:
    """Token -> client id, from a file of ``<client_id> <token>`` lines (``#`` starts a comment).

    Only SHA-256 digests of the tokens are kept; lookups compare digests in constant time.
    """

    def __init__(self, tokens: Mapping[int, str]) -> None:
        self._by_digest: dict[bytes, int] = {}
        for client_id, token in tokens.items():
            if len(token) < 16:
                raise ConfigError(f"token of client {client_id} is shorter than 16 characters")
            digest = _digest(token)
            if digest in self._by_digest:
                raise ConfigError(f"clients {self._by_digest[digest]} and {client_id} share a token")
            self._by_digest[digest] = client_id

    @classmethod
    def from_file(cls, path: str | Path) -> TokenStore:
        tokens: dict[int, str] = {}
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"{path}: cannot read the tokens file: {error}") from None
        for number, line in enumerate(text.splitlines(), 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            fields = text.split()
            if len(fields) != 2 or not fields[0].isdigit():
                raise ConfigError(f"{path}:{number}: expected '<client_id> <token>'")
            client_id = int(fields[0])
            if client_id in tokens:
                raise ConfigError(f"{path}:{number}: client {client_id} has a second token")
            tokens[client_id] = fields[1]
        if not tokens:
            raise ConfigError(f"{path}: no tokens")
        return cls(tokens)

    def client_for(self, metadata: Any) -> int | None:
        """The client id whose token the call metadata carries, or None."""
        for key, value in metadata or ():
            if key == _HEADER and isinstance(value, str) and value.startswith(_PREFIX):
                digest = _digest(value[len(_PREFIX) :])
                for known, client_id in self._by_digest.items():
                    if hmac.compare_digest(known, digest):
                        return client_id
        return None


if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    _Interceptor = aio.ServerInterceptor[Any, Any]
else:  # not generic at run time
    Handler = grpc.RpcMethodHandler
    _Interceptor = aio.ServerInterceptor


def _denied(handler: Handler, message: str) -> Handler:
    """A handler of the same shape as ``handler`` that answers UNAUTHENTICATED without reading the request."""

    async def unary(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator, as a streaming handler must be

    factories: dict[tuple[bool, bool], Callable[..., Handler]] = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    shape = (handler.request_streaming, handler.response_streaming)
    return factories[shape](
        streaming if shape[1] else unary,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class AuthInterceptor(_Interceptor):
    """Refuses every call to ``service`` without a valid token with UNAUTHENTICATED; other services (health)
    stay open."""

    def __init__(self, tokens: TokenStore, service: str) -> None:
        self._tokens = tokens
        self._prefix = f"/{service}/"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not method.startswith(self._prefix):
            return handler
        metadata = handler_call_details.invocation_metadata
        if self._tokens.client_for(metadata) is None:
            return _denied(handler, "missing or invalid token: send metadata 'authorization: Bearer <token>'")
        return handler


def server_credentials(cert: str, key: str, client_ca: str) -> grpc.ServerCredentials:
    """TLS credentials; with ``client_ca`` the server demands a client certificate signed by it (mutual TLS)."""
    chain = _pem("server.tls.cert", cert, b"CERTIFICATE")
    private = _pem("server.tls.key", key, b"PRIVATE KEY")
    if client_ca:
        roots = _pem("server.tls.client_ca", client_ca, b"CERTIFICATE")
        return grpc.ssl_server_credentials([(private, chain)], root_certificates=roots, require_client_auth=True)
    return grpc.ssl_server_credentials([(private, chain)])


def _pem(key: str, path: str, kind: bytes) -> bytes:
    """The bytes of a PEM file holding a ``kind`` block; anything else is a one-line ConfigError naming ``key`` (gRPC
    would only say later that it failed to bind)."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(f"{key}: cannot read {path}: {error.strerror or error}") from None
    if b"-----BEGIN " not in data or kind not in data:
        raise ConfigError(f"{key}: {path} holds no PEM {kind.decode().lower()}")
    return data
