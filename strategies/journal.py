"""The journal that makes an event all-or-nothing: what an event changed in place, recorded before each change, so
that it can be put back exactly when a later step of the event fails.

A :class:`~fedhet.strategies.base.Strategy` event runs the scheduler, the aggregator and the planner one after the
other; any of them may raise. Each records, before it changes anything in place, the step that puts the old value
back: an attribute binding (:meth:`Journal.keep`), a dict entry, a list's length; a set changes through the journal
(:meth:`Journal.add`, :meth:`Journal.discard`), which records the changes it makes. Tensors and the
dicts that hold them are never changed in place (an update buffer replaces them), so a step holds references,
never copies: recording costs O(1) per change, whatever the fleet or the model.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping, MutableSet
from typing import Any, Concatenate, ParamSpec, TypeVar

__all__ = ["Journal"]

P = ParamSpec("P")
T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")

_ABSENT = object()


class Journal:
    """Steps that undo one event's changes, newest last; :meth:`rollback` runs them newest first."""

    __slots__ = ("_steps",)

    def __init__(self) -> None:
        self._steps: list[tuple[Callable[..., object], tuple[Any, ...]]] = []

    def run(self, change: Callable[Concatenate[Journal, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``change(self, *args, **kwargs)``: a change that records in this journal, rolled back (and re-raised)
        when it raises."""
        try:
            return change(self, *args, **kwargs)
        except BaseException:
            self.rollback()
            raise

    def record(self, step: Callable[..., object], *args: Any) -> None:
        """Run ``step(*args)`` on rollback."""
        self._steps.append((step, args))

    def keep(self, obj: object) -> None:
        """Every attribute binding of ``obj`` as it is now (its scalars, and the containers it holds: a container
        it replaces is put back; one it changes in place needs its own record)."""
        attrs = vars(obj)
        self._steps.append((attrs.update, (attrs.copy(),)))

    def keep_item(self, mapping: MutableMapping[K, V], key: K) -> None:
        """``mapping[key]`` as it is now, or its absence."""
        value = mapping.get(key, _ABSENT)
        if value is _ABSENT:
            self._steps.append((_discard_key, (mapping, key)))
        else:
            self._steps.append((mapping.__setitem__, (key, value)))

    def add(self, items: MutableSet[T], item: T) -> None:
        """``items.add(item)``, recorded when it changes ``items``."""
        if item not in items:
            items.add(item)
            self._steps.append((items.discard, (item,)))

    def discard(self, items: MutableSet[T], item: T) -> None:
        """``items.discard(item)``, recorded when it changes ``items``."""
        if item in items:
            items.discard(item)
            self._steps.append((items.add, (item,)))

    def keep_length(self, items: list[Any]) -> None:
        """The length of ``items``, which may only grow (appends) until the event ends."""
        self._steps.append((_truncate, (items, len(items))))

    def rollback(self) -> None:
        """Put back everything recorded, newest first; the journal is empty afterwards."""
        steps = self._steps
        while steps:
            step, args = steps.pop()
            step(*args)


def _discard_key(mapping: MutableMapping[Any, Any], key: object) -> None:
    mapping.pop(key, None)


def _truncate(items: list[Any], length: int) -> None:
    del items[length:]
