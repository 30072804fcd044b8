"""Experiment tracking and artifacts: TensorBoard and MLflow get every metrics line, the metrics carry the clients'
training loss, and a simulation leaves its final global model as safetensors."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from helpers import client
from safetensors.torch import load_file

from fedhet.cli import compose
from fedhet.errors import ConfigError
from fedhet.metrics import read_metrics
from fedhet.models import build_model, evaluate
from fedhet.runtime.driver import EvalCadence, RunDriver, StopRules
from fedhet.sim.runner import simulate, validate
from fedhet.strategies import build_strategy
from fedhet.types import Result

SMALL = ["dataset=synthetic", "model=logreg", "num_clients=6", "sim.max_versions=3", "sim.progress=false"]
SMALL += ["sim.threads=1", "strategy.scheduler.fraction=0.5"]


def test_tensorboard_gets_every_metrics_line(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    simulate(compose([*SMALL, "tracking.tensorboard=true"]), tmp_path)
    records = read_metrics(tmp_path / "metrics.jsonl")
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    accuracy = {e.step: e.value for e in events.Scalars("accuracy")}
    assert accuracy == pytest.approx({r.version: r.accuracy for r in records})
    train = {e.step: e.value for e in events.Scalars("train_loss")}
    assert train == pytest.approx({r.version: r.train_loss for r in records if r.train_loss is not None})
    assert set(train) == {1, 2, 3}


def test_mlflow_gets_the_config_and_every_metrics_line(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [*SMALL, "tracking.mlflow=true", f"tracking.mlflow_uri={uri}", "tracking.experiment=tests"]
    simulate(compose(overrides), tmp_path / "run")
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    tracker = MlflowClient(tracking_uri=uri)
    [run] = tracker.search_runs([tracker.get_experiment_by_name("tests").experiment_id])
    assert run.data.params["client.lr"] == "0.05" and run.data.params["strategy.name"] == "fedavg"
    history = tracker.get_metric_history(run.info.run_id, "accuracy")
    assert {m.step: m.value for m in history} == pytest.approx({r.version: r.accuracy for r in records})
    assert run.info.status == "FINISHED"


def test_a_tracker_that_is_not_installed_is_one_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"tracking.mlflow=true needs mlflow-skinny: pip install mlflow-skinny"):
        validate(compose([*SMALL, "tracking.mlflow=true"]))


def test_the_train_loss_is_the_sample_weighted_mean_of_the_updates_since_the_last_evaluation() -> None:
    spec = {
        "scheduler": {"name": "fedavg", "min_clients": 2, "fraction": 1.0},
        "planner": {"name": "identity"},
        "aggregator": {"name": "weighted_mean"},
    }
    strategy = build_strategy(spec, seed=0)
    strategy.start({"w": torch.zeros(2)}, 0.0)
    driver = RunDriver(strategy, StopRules(10), EvalCadence(1))
    driver.mark_evaluated(0.0)
    assert driver.point(0.0, 0.0, 0, 0).train_loss is None  # nothing trained yet
    for c in range(2):
        driver.available(client(c, num_samples=10 * (c + 1)), 0.0)
    tasks = driver.tick(0.0).tasks
    for task, loss in zip(tasks, (1.0, 4.0), strict=True):
        samples = 10 * (task.client_id + 1)
        driver.result(Result(task.task_id, task.client_id, 0, {"w": torch.ones(2)}, samples, 1, 0.1, loss), 1.0)
    restored = RunDriver(build_strategy(spec, seed=0), StopRules(10), EvalCadence(1))
    restored.load_state_dict(driver.state_dict())  # a checkpoint between evaluations keeps the running sums
    for d in (driver, restored):
        d.mark_evaluated(1.0)
        assert d.point(1.0, 0.0, 0, 0).train_loss == pytest.approx((10 * 1.0 + 20 * 4.0) / 30)
        d.mark_evaluated(2.0)
        assert d.point(2.0, 0.0, 0, 0).train_loss is None  # counted afresh after each evaluation


def test_a_simulation_leaves_its_final_model_as_safetensors(tmp_path: Path) -> None:
    cfg = compose(SMALL)
    summary = simulate(cfg, tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert all(r.train_loss is not None and math.isfinite(r.train_loss) for r in records[1:])
    from fedhet.data import load_configured

    data = load_configured(cfg.dataset, cfg.num_clients, cfg.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes, cfg.seed)
    model.load_state_dict(weights)
    accuracy, _ = evaluate(model, data.x_test, data.y_test)
    assert accuracy == pytest.approx(summary.final.accuracy) == pytest.approx(records[-1].accuracy)


@pytest.mark.parametrize(
    ("version", "seconds", "limits", "position"),
    [
        (3, 10.0, (60, 0.0), 5.0),  # versions only
        (3, 900.0, (60, 1200.0), 75.0),  # the time limit comes first: the ETA follows it
        (45, 100.0, (60, 1200.0), 75.0),  # the version limit comes first
        (70, 5000.0, (60, 1200.0), 100.0),
    ],
)
def test_the_progress_bar_runs_toward_whichever_stop_rule_comes_first(
    version: int, seconds: float, limits: tuple[int, float], position: float
) -> None:
    from fedhet.metrics import MetricsRecord
    from fedhet.sim.runner import progress_position

    record = MetricsRecord(version, seconds, 0.0, 0.5, 1.0, 0, 0, 0, 0)
    assert progress_position(record, *limits) == position


def test_an_mlflow_store_it_cannot_use_is_one_config_error(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    blocker = tmp_path / "a file"
    blocker.write_text("not a directory")
    uri = f"sqlite:///{blocker / 'mlflow.db'}"  # under a file: no database can be made there
    with pytest.raises(ConfigError, match=r"tracking.mlflow_uri .*MLflow cannot log there"):
        simulate(compose([*SMALL, "tracking.mlflow=true", f"tracking.mlflow_uri={uri}"]), tmp_path / "run")
