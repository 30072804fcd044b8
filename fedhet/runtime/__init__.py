"""The run core: the assembly of a run from its config and the driver every runtime feeds its events to."""

from __future__ import annotations

from fedhet.runtime.assembly import RunParts, RunSpec, assemble, check_spec, run_spec
from fedhet.runtime.driver import MAX_SECONDS, MAX_VERSIONS, EvalCadence, Outcome, ResultFailed, RunDriver, StopRules
from fedhet.runtime.evaluation import (
    Evaluate,
    Evaluation,
    Evaluator,
    PersonalReports,
    RunPoint,
    describe,
    metrics_record,
)
from fedhet.runtime.recorder import Extras, Recorder

__all__ = [
    "MAX_SECONDS",
    "MAX_VERSIONS",
    "EvalCadence",
    "Evaluate",
    "Evaluation",
    "Evaluator",
    "Extras",
    "Outcome",
    "PersonalReports",
    "Recorder",
    "ResultFailed",
    "RunDriver",
    "RunParts",
    "RunPoint",
    "RunSpec",
    "StopRules",
    "assemble",
    "check_spec",
    "describe",
    "metrics_record",
    "run_spec",
]
