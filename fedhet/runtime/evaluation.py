"""Evaluating a global model, the same way in every runtime.

The test accuracy and loss of the global model, and, when the fleet holds clients below 32 bits, the accuracy of
the model each such client starts from: the global model rounded to its bitwidth (ProWD's metric is the mean over
the fleet's bitwidths). A :class:`RunPoint` is where the run stood when the model was evaluated; together they make
the :class:`~fedhet.metrics.MetricsRecord` a runtime writes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedhet import quant
from fedhet.metrics import MetricsRecord
from fedhet.models import evaluate
from fedhet.types import Weights

__all__ = ["Evaluate", "Evaluation", "Evaluator", "PersonalReports", "RunPoint", "describe", "metrics_record"]


@dataclass(frozen=True)
class Evaluation:
    """Test metrics of one global model.

    Attributes:
        accuracy: test accuracy in [0, 1] of the full-precision model.
        loss: its mean test cross-entropy.
        accuracy_by_bitwidth: test accuracy of the model rounded to each bitwidth below 32 that a client of the
            run computes at, keyed by the bitwidth as a string (None when every client is fp32).
    """

    accuracy: float
    loss: float
    accuracy_by_bitwidth: dict[str, float] | None = None


#: what a runtime calls to evaluate a global model: ``(weights, the fleet's bitwidths) -> Evaluation``
Evaluate = Callable[[Weights, Iterable[int]], Evaluation]


@dataclass(frozen=True)
class RunPoint:
    """Where a run stood when its model was evaluated: version, run-clock and wall seconds, payload bytes each
    way, updates applied and dropped so far, and the clients' training loss since the previous evaluation."""

    version: int
    time: float
    wall_time: float
    bytes_up: int
    bytes_down: int
    updates_applied: int
    updates_dropped: int
    train_loss: float | None = None


class Evaluator:
    """Evaluates global models on a test set (see the module docstring).

    Args:
        model: an instance of the run's architecture, on the device to evaluate on (its weights are overwritten).
        x, y: test inputs and labels.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        device = next(model.parameters()).device
        self.model = model
        self.x, self.y = x.to(device), y.to(device)

    def __call__(self, weights: Weights, bitwidths: Iterable[int] = ()) -> Evaluation:
        """The evaluation of ``weights``, and of their rounding to each of ``bitwidths`` below 32. Weights holding
        NaN or Inf (a run that diverged: its last evaluation) have no rounding: each bitwidth scores as the weights
        themselves."""
        accuracy, loss = self._score(weights)
        low = sorted({b for b in bitwidths if b < quant.FULL_PRECISION})
        by_bits = {str(b): self._rounded_score(weights, b, accuracy) for b in low}
        return Evaluation(accuracy, loss, by_bits or None)

    def _rounded_score(self, weights: Weights, bits: int, unrounded: float) -> float:
        try:
            rounded = quant.quantize_weights(weights, bits)
        except quant.QuantError:
            return unrounded
        return self._score(rounded)[0]

    @torch.no_grad()
    def _score(self, weights: Weights) -> tuple[float, float]:
        self.model.load_state_dict(weights)
        return evaluate(self.model, self.x, self.y)


def metrics_record(point: RunPoint, evaluation: Evaluation, extras: Mapping[str, Any] | None = None) -> MetricsRecord:
    """The metrics line of ``evaluation`` taken at ``point``; ``extras`` are further measured fields
    (``personal_accuracy``, ``epsilon``)."""
    return MetricsRecord(
        version=point.version,
        virtual_time=point.time,
        wall_time=point.wall_time,
        accuracy=evaluation.accuracy,
        loss=evaluation.loss,
        bytes_up=point.bytes_up,
        bytes_down=point.bytes_down,
        updates_applied=point.updates_applied,
        updates_dropped=point.updates_dropped,
        accuracy_by_bitwidth=evaluation.accuracy_by_bitwidth,
        train_loss=point.train_loss,
        **(extras or {}),
    )


def describe(record: MetricsRecord) -> str:
    """One log line for an evaluation."""
    line = f"version {record.version} at {record.virtual_time:.1f} s: accuracy {record.accuracy:.4f}"
    line += f", loss {record.loss:.4f}"
    if record.accuracy_by_bitwidth:
        line += ", by bitwidth " + ", ".join(f"{b}: {a:.4f}" for b, a in record.accuracy_by_bitwidth.items())
    if record.personal_accuracy is not None:
        line += f", personal {record.personal_accuracy:.4f}"
    return line


class PersonalReports:
    """The personalised accuracy each deployed client last reported (a client with a personal head measures itself
    on its own held-out samples, :mod:`fedhet.clients.personal`); their mean is the run's ``personal_accuracy``,
    what the simulator computes for every client at each evaluation."""

    def __init__(self) -> None:
        self.latest: dict[int, float] = {}

    def report(self, client_id: int, accuracy: float) -> None:
        """Note ``client_id``'s latest accuracy (in [0, 1]; anything else is a ValueError)."""
        if not (math.isfinite(accuracy) and 0.0 <= accuracy <= 1.0):
            raise ValueError(f"client {client_id}: personalised accuracy must be in [0, 1], got {accuracy}")
        self.latest[client_id] = accuracy

    def mean(self) -> float | None:
        """The mean over the clients that reported (None before any did)."""
        return sum(self.latest.values()) / len(self.latest) if self.latest else None

    def state_dict(self) -> dict[str, float]:
        return {str(c): a for c, a in sorted(self.latest.items())}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.latest = {}
        for client, accuracy in state.items():
            self.report(int(client), float(accuracy))
