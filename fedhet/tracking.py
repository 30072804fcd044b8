"""Experiment tracking: every metrics line of a run also goes to TensorBoard and/or MLflow, chosen by config
(``tracking.tensorboard``, ``tracking.mlflow``), the same way in every runtime.

Each metric is logged at step = the global model's version: ``accuracy``, ``loss`` (test), ``train_loss`` (the
clients' local training loss), ``virtual_time``, ``bytes_up``, ``bytes_down``, ``updates_applied``, and when
measured ``personal_accuracy``, ``accuracy_by_bitwidth/<b>`` and ``epsilon/max``. MLflow also gets the run's
composed config as parameters. Both libraries are optional (the ``tracking`` extra installs them); asking for one
that is not installed is a :class:`ConfigError` before the run starts.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedhet.errors import ConfigError
from fedhet.metrics import MetricsRecord, Sink

__all__ = [
    "MLflowSink",
    "TensorBoardSink",
    "TrackingConfig",
    "check_tracking",
    "flat_config",
    "open_sinks",
    "scalars",
]


@dataclass
class TrackingConfig:
    """Where a run's metrics go besides its ``metrics.jsonl``.

    Attributes:
        tensorboard: write TensorBoard event files (``tensorboard --logdir <run dir>/tensorboard``).
        mlflow: log to MLflow: the config as parameters, the metrics per version.
        mlflow_uri: MLflow tracking URI: a SQLite file by default (MLflow's recommended local store; its ``./mlruns``
            file store is deprecated), or a server's ``http://host:5000``; "" = ``MLFLOW_TRACKING_URI``.
        experiment: the MLflow experiment's name.
    """

    tensorboard: bool = False
    mlflow: bool = False
    mlflow_uri: str = "sqlite:///mlflow.db"
    experiment: str = "fedhet"


def scalars(record: MetricsRecord) -> dict[str, float]:
    """The numbers of a metrics line, by tracking name (non-finite ones left out: trackers refuse them)."""
    out: dict[str, float] = {
        "accuracy": record.accuracy,
        "loss": record.loss,
        "virtual_time": record.virtual_time,
        "bytes_up": float(record.bytes_up),
        "bytes_down": float(record.bytes_down),
        "updates_applied": float(record.updates_applied),
        "updates_dropped": float(record.updates_dropped),
    }
    if record.train_loss is not None:
        out["train_loss"] = record.train_loss
    if record.personal_accuracy is not None:
        out["personal_accuracy"] = record.personal_accuracy
    for bits, accuracy in (record.accuracy_by_bitwidth or {}).items():
        out[f"accuracy_by_bitwidth/{bits}"] = accuracy
    if record.epsilon:
        out["epsilon/max"] = max(record.epsilon.values())
    return {k: float(v) for k, v in out.items() if math.isfinite(v)}


class TensorBoardSink:
    """TensorBoard event files in ``log_dir``, one scalar per metric at step = version."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, record: MetricsRecord) -> None:
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, global_step=record.version)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflowSink:
    """One MLflow run: the config's keys as parameters, then the metrics at step = version."""

    def __init__(self, cfg: TrackingConfig, run_name: str, params: Mapping[str, Any]) -> None:
        import mlflow

        self.mlflow = mlflow
        if cfg.mlflow_uri:
            mlflow.set_tracking_uri(cfg.mlflow_uri)
        mlflow.set_experiment(cfg.experiment)
        self.run = mlflow.start_run(run_name=run_name)
        flat = {k: str(v)[:500] for k, v in params.items()}  # MLflow caps a parameter's value
        keys = sorted(flat)
        for start in range(0, len(keys), 100):  # MLflow takes at most 100 parameters a call
            mlflow.log_params({k: flat[k] for k in keys[start : start + 100]})

    def write(self, record: MetricsRecord) -> None:
        self.mlflow.log_metrics({k.replace("/", "."): v for k, v in scalars(record).items()}, step=record.version)

    def close(self) -> None:
        self.mlflow.end_run()


def flat_config(cfg: Any) -> dict[str, Any]:
    """A typed config's leaves by dotted key (what MLflow logs as the run's parameters)."""
    from omegaconf import OmegaConf

    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix.rstrip(".")] = node

    walk(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True), "")
    return out


def check_tracking(cfg: TrackingConfig) -> None:
    """Refuse a tracker that is not installed, naming the key and the package."""
    for enabled, key, module, package in (
        (cfg.tensorboard, "tracking.tensorboard", "tensorboard", "tensorboard"),
        (cfg.mlflow, "tracking.mlflow", "mlflow", "mlflow-skinny"),
    ):
        if enabled and importlib.util.find_spec(module) is None:
            raise ConfigError(f"{key}=true needs {package}: pip install {package} (or the tracking extra)")


def open_sinks(cfg: TrackingConfig, run_dir: Path, run_name: str, params: Mapping[str, Any]) -> Sequence[Sink]:
    """The trackers ``cfg`` asks for, open (TensorBoard files under ``run_dir/tensorboard``)."""
    check_tracking(cfg)
    sinks: list[Sink] = []
    if cfg.tensorboard:
        sinks.append(TensorBoardSink(run_dir / "tensorboard"))
    if cfg.mlflow:
        try:
            sinks.append(MLflowSink(cfg, run_name, params))
        except Exception as error:  # whatever MLflow raises for a store it cannot use
            for sink in sinks:
                sink.close()
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConfigError(f"tracking.mlflow_uri {cfg.mlflow_uri!r}: MLflow cannot log there: {reason}") from None
    return sinks
