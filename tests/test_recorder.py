"""The recorder of the server and the Flower driver keeps only the newest evaluation waiting (issue 16: an
unbounded evaluation queue grew the server's memory when versions came faster than evaluations)."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

import torch

from fedhet.metrics import MetricsWriter, read_metrics
from fedhet.runtime import Recorder
from fedhet.runtime.evaluation import Evaluation, Evaluator, RunPoint
from fedhet.types import Weights


def test_evaluations_waiting_behind_a_slow_one_are_superseded_by_the_newest(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    evaluator = Evaluator(model, torch.randn(64, 4), torch.randint(0, 3, (64,)))
    started, release = threading.Event(), threading.Event()

    def slow(weights: Weights, bitwidths: Iterable[int]) -> Evaluation:  # the real evaluation, held at first
        started.set()
        release.wait(timeout=30)
        return evaluator(weights, bitwidths)

    path = tmp_path / "metrics.jsonl"
    with MetricsWriter(path) as metrics:
        recorder = Recorder(slow, metrics)
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        recorder.submit(RunPoint(0, 0.0, 0.0, 0, 0, 0, 0), weights, [32])
        assert started.wait(timeout=30)  # version 0 is being evaluated
        for version in range(1, 50):
            weights = {k: v + 1.0 for k, v in weights.items()}
            recorder.submit(RunPoint(version, float(version), 0.0, 0, 0, version, 0), weights, [32])
        release.set()
        recorder.close()
    assert [r.version for r in read_metrics(path)] == [0, 49]
    assert recorder.superseded == 48
    # the line of version 49 scores version 49's weights, not a superseded one's
    assert read_metrics(path)[1].accuracy == evaluator(weights).accuracy


def test_a_diverged_model_is_evaluated_at_every_bitwidth_as_it_is() -> None:
    """The last evaluation of a run that diverged: weights holding NaN cannot be rounded to a bitwidth, so each
    bitwidth scores as the weights themselves instead of the evaluation failing; finite weights are rounded."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    evaluator = Evaluator(model, x, y)
    finite = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rounded = evaluator(finite, bitwidths=(2, 32))
    assert rounded.accuracy_by_bitwidth is not None and set(rounded.accuracy_by_bitwidth) == {"2"}
    diverged = {**finite, "weight": torch.full((3, 4), float("nan"))}
    evaluation = evaluator(diverged, bitwidths=(2, 4, 32))
    assert evaluation.accuracy_by_bitwidth == {"2": evaluation.accuracy, "4": evaluation.accuracy}
