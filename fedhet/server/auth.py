"""Who may call: per-client tokens (checked on every call by :class:`~fedhet.server.gate.Gate`) and TLS credentials."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc

from fedhet.errors import ConfigError

__all__ = ["TokenStore", "bearer", "server_credentials"]

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
