"""Components a config names by import path: a ``_target_`` (Hydra's convention, located as Hydra locates one)
called with the config's ``kwargs`` (their own ``_target_`` entries instantiated by Hydra) and with whichever of the
values fedhet offers (a model's ``input_shape`` and ``num_classes``, a dataset's ``num_clients`` and ``seed``) its
signature names.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from hydra._internal.utils import _locate  # hydra.utils.get_object, less its error log line
from hydra.utils import instantiate

from fedhet.errors import ConfigError

__all__ = ["call_target", "locate"]


def locate(key: str, target: str) -> Callable[..., Any]:
    """The callable at import path ``target`` (``package.module.Name``, on the Python path or in the current
    directory); a :class:`ConfigError` naming ``key`` when it cannot be imported or is not callable."""
    if "." not in target:
        raise ConfigError(f"{key}: {target!r} is not an import path (package.module.Name)")
    if os.getcwd() not in sys.path and "" not in sys.path:  # a module beside you is found, as `python -m` finds it
        sys.path.append(os.getcwd())
    try:
        found = _locate(target)
    except Exception as error:  # whatever importing the user's module raised
        cause = error.__cause__ or error
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise ConfigError(f"{key}: cannot import {target!r}: {reason}") from None
    if not callable(found):
        raise ConfigError(f"{key}: {target!r} is a {type(found).__name__}, not a class or function")
    return found  # type: ignore[no-any-return]


def call_target(key: str, factory: Callable[..., Any], kwargs: Mapping[str, Any], offered: Mapping[str, Any]) -> Any:
    """``factory(**offered it names, **kwargs)``, ``kwargs``' own ``_target_`` entries instantiated first. A
    keyword the factory does not take (or one it needs and is not given) is a :class:`ConfigError` naming
    ``key``'s ``kwargs``."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin without a signature: it gets the kwargs alone
        signature = None
    params = signature.parameters if signature is not None else {}
    given = {k: v for k, v in offered.items() if k in params and k not in kwargs}
    args = instantiate(dict(kwargs), _convert_="all") if kwargs else {}
    if signature is not None:
        try:
            signature.bind(**given, **args)
        except TypeError as error:
            names = ", ".join(p for p in params if p not in offered) or "none"
            raise ConfigError(f"{key}.kwargs: {error}; its keyword arguments: {names}") from None
    return factory(**given, **args)
