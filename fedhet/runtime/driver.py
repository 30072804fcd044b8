"""The run's driver: what every runtime does around its strategy, written once.

A runtime (the simulator, ``fedhet server``, the Flower driver) owns a clock and a transport. It tells the
:class:`RunDriver` what happened (a client asks for work, a result arrived, a deadline passed) at what time on its
clock; the driver hands the event to the strategy and answers an :class:`Outcome`: the tasks to send, whether a new
global version came out, whether the model is due for an evaluation, and whether the run stops now and why. Stop
rules (versions, run time), the evaluation cadence and what a strategy's failure means live here and nowhere else.

A strategy's event is all-or-nothing: when it raises, the strategy is exactly as it was before the event. What a
failure means depends on the event:

- a *result* the strategy fails on is refused, as one that answers no outstanding task is:
  :meth:`RunDriver.result` raises :class:`ResultFailed` with a one-line reason (``strategy failed on the result of
  task N: ValueError: ...``), as it raises :class:`~fedhet.strategies.UnknownTaskError` for a result of no
  outstanding task, and the run goes on without that update. Its task stays outstanding until its client asks for
  work again, which loses it;
- a failure on a client *asking for work* or on a *deadline* stops the run with a one-line reason
  (:attr:`Outcome.stop`, :attr:`RunDriver.failure`): nothing a runtime could refuse caused it, and the strategy
  would fail the same way again.

A new global version that holds NaN or Inf (the updates were finite but their aggregate overflowed, or the
strategy's own arithmetic diverged: ProWD's dequantizer on a fleet of mostly 2-bit clients) stops the run with a
one-line reason (``the global model of version N holds NaN or Inf: training diverged``), and that event's tasks
are not sent: a client could only diverge on such a model, and a quantized one cannot even round it to its
bitwidth. The model is evaluated and checkpointed as it is, so the run's metrics end where it diverged.

No other exception escapes half-way through a runtime's bookkeeping. A strategy's failure is deterministic in its
inputs, so replaying the same events after a restart refuses the same results and reaches the same stop, never a
crash.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fedhet.runtime.evaluation import RunPoint
from fedhet.strategies import Strategy, UnknownTaskError
from fedhet.types import ClientInfo, Result, Task
from fedhet.updates import NormBound

__all__ = ["MAX_SECONDS", "MAX_VERSIONS", "EvalCadence", "Outcome", "ResultFailed", "RunDriver", "StopRules"]

#: why a run stopped: the global model reached ``max_versions``; the run's clock passed ``max_seconds``
MAX_VERSIONS = "max_versions"
MAX_SECONDS = "max_seconds"

log = logging.getLogger(__name__)


class ResultFailed(Exception):
    """The strategy failed on a result and took the event back, or the result's local training diverged: the result
    is refused, the run goes on. The message is one line: ``strategy failed on the result of task N: <error type>:
    <first line of its message>``, or ``the result of task N has loss NaN: its local training diverged``."""


@dataclass(frozen=True)
class StopRules:
    """When a run ends.

    Attributes:
        max_versions: stop once the global model reaches this version.
        max_seconds: stop once the run's clock (virtual in simulation, real when deployed) passes this many seconds
            (0 = no limit).
    """

    max_versions: int = 20
    max_seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.max_versions < 1:
            raise ValueError(f"max_versions must be >= 1, got {self.max_versions}")
        if not (math.isfinite(self.max_seconds) and self.max_seconds >= 0):
            raise ValueError(f"max_seconds must be finite and >= 0 (0 = no limit), got {self.max_seconds}")


@dataclass(frozen=True)
class EvalCadence:
    """When the global model is evaluated: at the start, every ``every`` versions but at most once per
    ``interval`` seconds of the run's clock (0 = no limit), and at the end.

    Asynchronous strategies make a version per update, far more often than an evaluation is worth: ``interval``
    bounds them on the run's clock.
    """

    every: int = 1
    interval: float = 0.0

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"eval_every must be >= 1, got {self.every}")
        if not (math.isfinite(self.interval) and self.interval >= 0):
            raise ValueError(f"eval_interval must be finite and >= 0 seconds, got {self.interval}")


@dataclass(frozen=True)
class Outcome:
    """What a runtime carries out after one event.

    Attributes:
        tasks: tasks to send, in order.
        new_version: the event produced a new global version.
        evaluate: the global model is due for an evaluation now (the runtime reports it with ``mark_evaluated``).
        stop: the reason the run ends now, or None.
        dropped: results the strategy discarded at this event (a result that arrived after its round closed).
    """

    tasks: list[Task] = field(default_factory=list)
    new_version: bool = False
    evaluate: bool = False
    stop: str | None = None
    dropped: int = 0


class RunDriver:
    """Feeds one strategy its events and decides evaluations and the end of the run (see the module docstring).

    Args:
        strategy: the run's strategy, already started.
        rules: when the run stops.
        cadence: when the global model is evaluated.
        norm: the largest update the run takes, and what it does with a larger one: every runtime checks each
            result against it (``norm.check``) before handing the result over, at the point its transport has the
            result and its task (the server in the upload's worker thread, before the result is stored).
    """

    def __init__(
        self, strategy: Strategy, rules: StopRules, cadence: EvalCadence, norm: NormBound | None = None
    ) -> None:
        self.strategy = strategy
        self.rules = rules
        self.cadence = cadence
        self.norm = norm if norm is not None else NormBound()
        self.evaluated_version = -1  # the last version handed out for evaluation
        self.evaluated_at = -math.inf  # run seconds of that evaluation
        self.failure: str | None = None  # why the strategy failed, when it did
        self.trained = (0.0, 0)  # (sum of samples x local loss, samples) of the results since that evaluation
        self._window = (0.0, 0)  # the same, over the results before that evaluation: its metrics line's

    # ------------------------------------------------------------------ events
    def available(self, client: ClientInfo, now: float) -> Outcome:
        """``client`` is idle and asks for work at ``now`` (run seconds)."""
        return self._stopping(
            f"client {client.client_id} asking for work", now, self.strategy.on_available, client, now
        )

    def result(self, result: Result, now: float) -> Outcome:
        """``result`` arrived at ``now``. Nothing is applied when it raises: :class:`UnknownTaskError` for a task
        that is not outstanding, :class:`ResultFailed` when the strategy failed on it or its loss is NaN (its local
        training diverged, :data:`~fedhet.types.DIVERGED`: refused as ``fedhet server`` refuses it; the run goes
        on)."""
        if math.isnan(result.loss):
            raise ResultFailed(f"the result of task {result.task_id} has loss NaN: its local training diverged")
        try:
            outcome = self._event(now, self.strategy.on_result, result, now)
        except UnknownTaskError:
            raise
        except Exception as error:  # the strategy took the event back: a refusal, not the end of the run
            raise ResultFailed(strategy_failure(f"the result of task {result.task_id}", error)) from error
        if math.isfinite(result.loss) and result.num_samples > 0:
            total, samples = self.trained
            self.trained = (total + result.loss * result.num_samples, samples + result.num_samples)
        return outcome

    def tick(self, now: float) -> Outcome:
        """A deadline the strategy asked for has passed."""
        return self._stopping("a deadline", now, self.strategy.on_tick, now)

    def _stopping(self, what: str, now: float, call: Callable[..., list[Task]], *args: Any) -> Outcome:
        """:meth:`_event`, where a failure of the strategy on ``what`` stops the run, with its reason."""
        try:
            return self._event(now, call, *args)
        except Exception as error:
            self.failure = strategy_failure(what, error)
            log.error("%s", self.failure)
            return Outcome(stop=self.failure)

    def _event(self, now: float, call: Callable[..., list[Task]], *args: Any) -> Outcome:
        before, dropped = self.strategy.version, self.strategy.updates_dropped
        tasks = call(*args)
        dropped = self.strategy.updates_dropped - dropped
        if self.strategy.version == before:
            return Outcome(tasks, dropped=dropped)
        if not _finite(self.strategy.global_weights):
            self.failure = f"the global model of version {self.strategy.version} holds NaN or Inf: training diverged"
            log.error("%s; the run stops", self.failure)
            return Outcome([], new_version=True, evaluate=True, stop=self.failure, dropped=dropped)
        done = self.strategy.version >= self.rules.max_versions
        stop = MAX_VERSIONS if done else None
        return Outcome(tasks, new_version=True, evaluate=self._due(now, force=done), stop=stop, dropped=dropped)

    # ------------------------------------------------------------------ stop rules and evaluation cadence
    def time_up(self, now: float) -> str | None:
        """The reason the run ends at ``now`` on its clock, or None while it may go on."""
        limit = self.rules.max_seconds
        if limit and now > limit:
            return MAX_SECONDS
        return None

    def _due(self, now: float, force: bool) -> bool:
        version = self.strategy.version
        return force or (version % self.cadence.every == 0 and now >= self.evaluated_at + self.cadence.interval)

    def mark_evaluated(self, now: float) -> None:
        """The runtime evaluates the current global model at ``now`` (the start, the end, or an outcome's due
        evaluation)."""
        self.evaluated_version = self.strategy.version
        self.evaluated_at = now
        self._window, self.trained = self.trained, (0.0, 0)

    def point(self, now: float, wall_time: float, bytes_up: int, bytes_down: int) -> RunPoint:
        """Where the run stands at ``now`` on its clock (``wall_time`` seconds since it started; payload bytes so
        far), for the metrics line of the evaluation just marked (its training loss is over the results received
        between the previous evaluation and this one)."""
        s, (total, samples) = self.strategy, self._window
        train_loss = total / samples if samples else None
        return RunPoint(
            s.version, now, wall_time, bytes_up, bytes_down, s.updates_applied, s.updates_dropped, train_loss
        )

    def evaluation_pending(self) -> bool:
        """The current global model has not been evaluated (at the end of a run, evaluate it once more)."""
        return bool(self.evaluated_version != self.strategy.version)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """What a run needs to resume, whatever its runtime: the strategy's state and the last evaluation."""
        return {
            "strategy": self.strategy.state_dict(),
            "evaluated_version": self.evaluated_version,
            "evaluated_at": self.evaluated_at,
            "trained": list(self.trained),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`; raises ValueError (or the strategy's StateError) for a state that does
        not fit this run."""
        version, at = int(state["evaluated_version"]), float(state["evaluated_at"])
        if version < -1 or math.isnan(at):
            raise ValueError(f"driver state: evaluated version {version} at {at} s is not a state")
        total, samples = state.get("trained", (0.0, 0))  # checkpoints from before the training loss: none
        if not (math.isfinite(float(total)) and int(samples) >= 0):
            raise ValueError(f"driver state: training loss sum {total} over {samples} samples is not a state")
        self.strategy.load_state_dict(state["strategy"])
        self.evaluated_version, self.evaluated_at = version, at
        self.trained = (float(total), int(samples))


def _finite(weights: Mapping[str, torch.Tensor]) -> bool:
    """Whether every floating-point value of ``weights`` is finite (one read back to the host for the whole model)."""
    checks = [torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()]
    return bool(torch.stack(checks).all()) if checks else True


def strategy_failure(what: str, error: BaseException) -> str:
    """One line saying that the strategy failed on ``what`` and why."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else "(no message)"
    return f"strategy failed on {what}: {type(error).__name__}: {message}"
