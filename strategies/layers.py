"""Layers of a state dict: the module path each tensor belongs to (``"3.weight"`` -> ``"3"``)."""

from __future__ import annotations

from fedhet.types import Weights

__all__ = ["layer_names", "layer_of"]


def layer_of(name: str) -> str:
    """The layer (module path) of the tensor called ``name``."""
    return name.rpartition(".")[0]


def layer_names(weights: Weights) -> list[str]:
    """Layers of a state dict in order."""
    out: list[str] = []
    for name in weights:
        layer = layer_of(name)
        if layer not in out:
            out.append(layer)
    return out
