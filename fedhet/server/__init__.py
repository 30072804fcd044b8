"""The deployment server: ``fedhet server`` runs any registered strategy over gRPC on the real clock.

Parts: :mod:`~fedhet.server.config` (typed config), :mod:`~fedhet.server.auth` (tokens, TLS),
:mod:`~fedhet.server.validation` (update checks), :mod:`~fedhet.server.persistence` (log and checkpoints),
:mod:`~fedhet.server.runtime` (the coordinator that drives the strategy), :mod:`~fedhet.server.servicer` (gRPC),
:mod:`~fedhet.server.app` (assembly and ``main``).
"""

from fedhet.server.app import build_app, main, serve
from fedhet.server.config import ServerRunConfig, ServerSettings, compose_server

__all__ = ["ServerRunConfig", "ServerSettings", "build_app", "compose_server", "main", "serve"]
