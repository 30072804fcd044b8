"""One JSON-lines metrics file per run: a line per evaluation of the global model."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

__all__ = ["WALL_CLOCK_FIELDS", "MetricsRecord", "MetricsWriter", "Sink", "read_metrics"]

#: fields that depend on the machine's speed; everything else is a function of the config and seed
WALL_CLOCK_FIELDS = ("wall_time",)


@dataclass(frozen=True)
class MetricsRecord:
    """The state of a run when the global model was evaluated.

    Attributes:
        version: global model version evaluated.
        virtual_time: seconds on the run's clock (virtual in simulation, real in deployment).
        wall_time: wall-clock seconds since the run started.
        accuracy: test accuracy in [0, 1].
        loss: mean test cross-entropy.
        bytes_up: total bytes clients uploaded so far.
        bytes_down: total bytes the server sent so far.
        updates_applied: client updates folded into the global model so far.
        updates_dropped: client updates discarded (arrived after their round closed) so far.
        personal_accuracy: mean over clients of the accuracy of each client's personalised model (the global
            shared layers with its own head fine-tuned) on its own held-out split; None when not measured.
        epsilon: under DP, each client's epsilon spent so far, keyed by client id; None without DP.
        accuracy_by_bitwidth: test accuracy of the global model rounded to each bitwidth below 32 that a client
            of the run computes at, keyed by bitwidth; None when every client is fp32.
        train_loss: the clients' local training loss (each update's mean minibatch loss, weighted by its samples)
            over the updates received since the previous evaluation; None when none arrived.
    """

    version: int
    virtual_time: float
    wall_time: float
    accuracy: float
    loss: float
    bytes_up: int
    bytes_down: int
    updates_applied: int
    updates_dropped: int
    personal_accuracy: float | None = None
    epsilon: dict[str, float] | None = None
    accuracy_by_bitwidth: dict[str, float] | None = None
    train_loss: float | None = None


class Sink(Protocol):
    """Takes a run's metrics lines too (a tracker: :mod:`fedhet.tracking`)."""

    def write(self, record: MetricsRecord) -> None: ...
    def close(self) -> None: ...


class MetricsWriter:
    """Appends :class:`MetricsRecord` lines to ``path`` and flushes each, so a killed run keeps its history; every
    line also goes to ``sinks`` (TensorBoard, MLflow)."""

    def __init__(self, path: str | Path, sinks: Sequence[Sink] = ()) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        self.sinks = list(sinks)

    def write(self, record: MetricsRecord) -> None:
        row = {k: v for k, v in asdict(record).items() if v is not None}  # unmeasured fields are left out
        self._file.write(json.dumps(_strict(row), allow_nan=False) + "\n")
        self._file.flush()
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        self._file.close()
        for sink in self.sinks:
            sink.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[MetricsRecord]:
    """Records of a ``metrics.jsonl`` file, in order (a null number, written for NaN or an infinity, reads as NaN)."""
    with Path(path).open(encoding="utf-8") as f:
        return [MetricsRecord(**_numbers(json.loads(line))) for line in f if line.strip()]


def last_version(path: str | Path) -> int:
    """The highest version a ``metrics.jsonl`` file records (-1 when none); a torn last line, left by a crash
    mid-write, is skipped."""
    if not Path(path).exists():
        return -1
    last = -1
    with Path(path).open(encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                last = max(last, int(json.loads(line)["version"]))
            except (ValueError, KeyError, TypeError):
                continue
    return last


def _strict(value: Any) -> Any:
    """``value`` with every non-finite float as None: metrics files are strict JSON, which has no NaN or Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict(v) for v in value]
    return value


_FLOATS = ("virtual_time", "wall_time", "accuracy", "loss")


def _numbers(row: dict[str, Any]) -> dict[str, Any]:
    """A line's nulls back as NaN where the record holds a number."""
    out: dict[str, Any] = {k: math.nan if k in _FLOATS and v is None else v for k, v in row.items()}
    for key in ("epsilon", "accuracy_by_bitwidth"):
        values = out.get(key)
        if isinstance(values, dict):
            out[key] = {c: math.nan if v is None else v for c, v in values.items()}
    for key in ("personal_accuracy", "train_loss"):
        if key in out and out[key] is None:
            out[key] = math.nan
    return out
