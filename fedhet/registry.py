"""Name -> component registries that refuse duplicates, so configs name components by a short key.

A registry with an entry-point ``group`` also offers what installed packages declare there (``[project.entry-points.
"fedhet.models"] mynet = "my_pkg.nets:MyNet"`` in a package's ``pyproject.toml``); built-in names win, and an entry
point is imported only when its name is asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from importlib.metadata import EntryPoint, entry_points
from typing import Generic, TypeVar

__all__ = ["Registry", "UnknownNameError"]

T = TypeVar("T")


class UnknownNameError(KeyError):
    """A config named a component that is not registered."""

    def __init__(self, kind: str, name: str, known: list[str]) -> None:
        super().__init__(name)
        self.message = f"unknown {kind} {name!r}; choose one of: {', '.join(known)}"

    def __str__(self) -> str:
        return self.message


class Registry(Generic[T]):
    """A mapping from short names to components of one kind (datasets, models, schedulers ...)."""

    def __init__(self, kind: str, group: str = "") -> None:
        self.kind = kind
        self.group = group
        self._items: dict[str, T] = {}
        self._plugins: dict[str, EntryPoint] | None = None  # found at the first lookup

    def _entry_points(self) -> dict[str, EntryPoint]:
        if self._plugins is None:
            found = entry_points(group=self.group) if self.group else ()
            self._plugins = {ep.name: ep for ep in found if ep.name not in self._items}
        return self._plugins

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``item`` under ``name``; a second registration of a name is an error."""

        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = item
            return item

        return add

    def get(self, name: str) -> T:
        item = self._items.get(name)
        if item is not None:
            return item
        plugin = self._entry_points().get(name)
        if plugin is None:
            raise UnknownNameError(self.kind, name, self.names())
        try:
            loaded: T = plugin.load()
        except Exception as error:  # a broken plugin: say which, whatever it raised
            raise ImportError(f"{self.kind} {name!r} (entry point {plugin.value!r} of {self.group}): {error}") from None
        self._items[name] = loaded
        return loaded

    def names(self) -> list[str]:
        return sorted({*self._items, *self._entry_points()})

    def __contains__(self, name: object) -> bool:
        return name in self._items or (isinstance(name, str) and name in self._entry_points())

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
