"""Errors of the strategy core: a result that answers no outstanding task, a state dict that does not fit."""

from __future__ import annotations

__all__ = ["StateError", "UnknownTaskError"]


class UnknownTaskError(ValueError):
    """A result names a task that is not outstanding: unknown, already applied, lost, or another client's."""


class StateError(ValueError):
    """A state dict does not fit the object it is loaded into."""
