"""What a run says about its model: a registered name, or a class or function of the user's by import path."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["ModelConfig"]


@dataclass
class ModelConfig:
    """The run's model.

    Attributes:
        name: registered model (``cnn``, ``2nn``, ``logreg``, ``fedp3_cnn``, or one an installed package declares in
            the ``fedhet.models`` entry-point group).
        _target_: the import path of a model class or function of your own (``my_pkg.nets.Net``), called with
            ``kwargs`` and with ``input_shape`` and ``num_classes`` where its signature names them; set, it is the
            model and ``name`` is ignored.
        kwargs: keyword arguments of the model class or function (an entry with its own ``_target_`` is
            instantiated by Hydra first).
        dp_compatible: replace the layers DP-SGD cannot train per sample (BatchNorm by GroupNorm, through Opacus's
            ModuleValidator) in every instance of the model; a deployed run sets it on the server and every client
            alike. A simulation with ``privacy.enabled`` turns it on by itself.
    """

    name: str = "cnn"
    _target_: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)
    dp_compatible: bool = False

    @property
    def label(self) -> str:
        """What names the model in logs, metrics and reports: its import path, else its registered name."""
        return self._target_ or self.name
