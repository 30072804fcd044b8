"""Errors that the CLI reports as one clear line instead of a traceback."""

from __future__ import annotations

__all__ = ["ConfigError", "DataError"]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and what to change."""


class DataError(RuntimeError):
    """A data file or directory is missing or malformed; the message names the path."""
