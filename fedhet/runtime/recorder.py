"""Metrics lines, the same way in every runtime: evaluate a global model where the run stood, write its line, log
it. The simulator records inline (its clock waits); the server and the Flower driver hand evaluations to one
worker thread, so an evaluation never delays a client's reply. There only the newest evaluation matters: one still
waiting when a newer one comes is superseded (logged and counted), so however fast versions come, memory holds at
most one model being evaluated and one waiting.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from fedhet.metrics import MetricsRecord, MetricsWriter
from fedhet.runtime.evaluation import Evaluate, RunPoint, describe, metrics_record
from fedhet.types import Weights

__all__ = ["Extras", "Recorder"]

log = logging.getLogger(__name__)

#: further measured fields of a line (``personal_accuracy``, ``epsilon``), computed where the evaluation runs
Extras = Callable[[], Mapping[str, Any]]


@dataclass(frozen=True)
class _Job:
    point: RunPoint
    weights: dict[str, torch.Tensor]
    bitwidths: list[int]
    extras: Extras | None


class Recorder:
    """Evaluates global models and writes their metrics lines.

    Args:
        evaluate: the run's evaluation.
        metrics: where lines go (None: evaluate and log only).
        on_record: called with every line written (a progress bar, a run summary).
    """

    def __init__(
        self,
        evaluate: Evaluate,
        metrics: MetricsWriter | None = None,
        on_record: Callable[[MetricsRecord], None] | None = None,
    ) -> None:
        self.evaluate = evaluate
        self.metrics = metrics
        self.on_record = on_record
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future[None]] = []
        self._lock = threading.Lock()
        self._waiting: _Job | None = None  # the newest submission, not yet started
        self.superseded = 0  # submissions replaced by a newer one before they were evaluated

    def record(
        self, point: RunPoint, weights: Weights, bitwidths: Iterable[int], extras: Extras | None = None
    ) -> MetricsRecord:
        """Evaluate ``weights`` (the global model at ``point``) now and write the line."""
        evaluation = self.evaluate(weights, bitwidths)
        record = metrics_record(point, evaluation, extras() if extras is not None else None)
        with self._lock:
            if self.metrics is not None:
                self.metrics.write(record)
            if self.on_record is not None:
                self.on_record(record)
        return record

    def submit(self, point: RunPoint, weights: Weights, bitwidths: Iterable[int], extras: Extras | None = None) -> None:
        """Record in the worker thread, after the evaluation in progress; a submission still waiting is superseded
        by this one. ``weights`` are copied first, so the run may go on changing its model. A failure is logged,
        never raised: metrics must not stop a run."""
        job = _Job(point, {k: v.detach().clone() for k, v in weights.items()}, list(bitwidths), extras)
        with self._lock:
            if self._waiting is not None:
                self.superseded += 1
                skipped = self._waiting.point.version
                log.info("evaluation of version %d superseded by version %d", skipped, point.version)
            queued, self._waiting = self._waiting is not None, job
        if queued:
            return  # the worker's queued call takes the newest
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedhet-eval")
        self._pending.append(self._pool.submit(self._record_newest))

    def _record_newest(self) -> None:
        with self._lock:
            job, self._waiting = self._waiting, None
        if job is None:
            return
        try:
            log.info("%s", describe(self.record(job.point, job.weights, job.bitwidths, job.extras)))
        except Exception as error:  # metrics must never stop a run, nor leave a failed job for drain() to raise
            log.error("evaluating version %d failed: %s: %s", job.point.version, type(error).__name__, error)

    def drain(self) -> None:
        """Wait until every submitted evaluation is written."""
        while self._pending:
            self._pending.pop(0).result()

    def close(self) -> None:
        """Finish the submitted evaluations and stop the worker."""
        self.drain()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
