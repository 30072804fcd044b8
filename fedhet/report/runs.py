"""Loading run and sweep directories for ``fedhet report``: each run's config labels and evaluations, the metric
a report compares (:data:`METRICS`) and the axis it compares along (:data:`AXES`)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedhet.errors import DataError
from fedhet.metrics import MetricsRecord

__all__ = [
    "AXES",
    "METRICS",
    "UNKNOWN",
    "Run",
    "Setting",
    "load_runs",
    "metric_value",
    "position",
    "separate",
]

log = logging.getLogger(__name__)

#: label of a config value a run directory does not record
UNKNOWN = "unknown"

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = Path(".hydra") / "config.yaml"
SERVER_CONFIG_FILE = Path("config.yaml")  # what fedhet server records in its state directory

_RECORD_FIELDS = tuple(f.name for f in fields(MetricsRecord))
_REQUIRED_FIELDS = tuple(f.name for f in fields(MetricsRecord) if f.default is MISSING)  # others: when measured


@dataclass(frozen=True)
class Setting:
    """What a comparison holds fixed; ``num_clients`` is None when the run does not record it."""

    dataset: str
    model: str
    partition: str
    fleet: str
    num_clients: int | None

    def sort_key(self) -> tuple[str, str, str, str, int]:
        return (
            self.dataset,
            self.model,
            self.partition,
            self.fleet,
            -1 if self.num_clients is None else self.num_clients,
        )

    def title(self) -> str:
        clients = UNKNOWN if self.num_clients is None else str(self.num_clients)
        return f"{self.dataset} / {self.model}, {self.partition} partition, {self.fleet} fleet, {clients} clients"


@dataclass(frozen=True)
class Run:
    """One run directory: its config labels and its evaluations in file order.

    Attributes:
        path: the run's ``metrics.jsonl``.
        seed: the run's seed, None when not recorded.
        records: evaluations of the global model, in file order (virtual time non-decreasing).
    """

    path: Path
    strategy: str
    fleet: str
    num_clients: int | None
    partition: str
    dataset: str
    model: str
    seed: int | None
    records: list[MetricsRecord]
    config: dict[str, str] = field(default_factory=dict)  # every compared key of the run's config, as text
    variant: str = ""  # the keys (and values) that set it apart from runs of its strategy and setting

    @property
    def label(self) -> str:
        """Its row's and curve's name: the strategy, and its variant when it has one."""
        return f"{self.strategy} ({self.variant})" if self.variant else self.strategy

    @property
    def setting(self) -> Setting:
        return Setting(self.dataset, self.model, self.partition, self.fleet, self.num_clients)

    def points(self, metric: str, axis: str) -> list[tuple[float, float]]:
        """(position on ``axis``, value of ``metric``) of each evaluation that measured the metric, in file order."""
        return [
            (position(record, axis), value)
            for record in self.records
            if (value := metric_value(record, metric)) is not None
        ]


#: what a report can compare, and how its table and plot name it
METRICS = {
    "accuracy": "test accuracy of the global model",
    "personal_accuracy": "personalised accuracy (mean over clients of their own head on the shared layers, on their "
    "held-out split)",
    "bitwidth_mean": "mean test accuracy of the global model at each bitwidth of the run (fp32 and every lower one)",
}
#: what a report measures progress in: virtual seconds or global model versions (rounds of a synchronous run)
AXES = {"time": "virtual time (s)", "rounds": "rounds (global model versions)"}


def metric_value(record: MetricsRecord, metric: str) -> float | None:
    """``metric`` (a key of :data:`METRICS`) of one evaluation, in [0, 1]; None where the run did not measure it.

    ``bitwidth_mean`` averages the fp32 model's accuracy with its accuracy rounded to each lower bitwidth of the run,
    as ProWD reports a mixed fleet (the fp32 accuracy alone for a run of fp32 clients)."""
    if metric == "accuracy":
        return record.accuracy
    if metric == "personal_accuracy":
        return record.personal_accuracy
    if metric == "bitwidth_mean":
        values = [record.accuracy, *(record.accuracy_by_bitwidth or {}).values()]
        return sum(values) / len(values)
    raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")


def position(record: MetricsRecord, axis: str) -> float:
    """Where an evaluation lies on ``axis`` (a key of :data:`AXES`)."""
    if axis == "time":
        return record.virtual_time
    if axis == "rounds":
        return float(record.version)
    raise ValueError(f"unknown axis {axis!r}; known: {', '.join(AXES)}")


# --- loading -------------------------------------------------------------------------------------------------


def _read_records(path: Path) -> list[MetricsRecord]:
    """Records of one metrics file; fields beyond :class:`MetricsRecord`'s are ignored, missing ones are an error."""
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read metrics: {error}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: malformed metrics line: {error.msg}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{number}: malformed metrics line: expected a JSON object")
        missing = [name for name in _REQUIRED_FIELDS if name not in obj]
        if missing:
            raise DataError(f"{path}:{number}: malformed metrics line: missing {', '.join(missing)}")
        for name in ("virtual_time", "accuracy"):
            value = obj[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise DataError(f"{path}:{number}: malformed metrics line: {name} is {value!r}, not a number")
        records.append(MetricsRecord(**{name: obj[name] for name in _RECORD_FIELDS if name in obj}))
    return records


def _read_config(path: Path) -> DictConfig | None:
    """The run's composed Hydra config, or None (with a warning) when the run directory has none."""
    if not path.is_file():
        log.warning("%s: no %s; labelling the run %r", path.parent.parent, CONFIG_FILE, UNKNOWN)
        return None
    try:
        cfg = OmegaConf.load(path)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, OmegaConfBaseException) as error:
        raise DataError(f"{path}: cannot read config: {str(error).strip().splitlines()[0]}") from None
    if not isinstance(cfg, DictConfig):
        raise DataError(f"{path}: cannot read config: expected a mapping at the top level")
    return cfg


def _label(cfg: DictConfig | None, key: str) -> str:
    value = None if cfg is None else OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    return UNKNOWN if value is None else str(value)


def _component(cfg: DictConfig | None, group: str) -> str:
    """A model's or dataset's label: its import path (``_target_``) when it is the user's, else its name."""
    target = _label(cfg, f"{group}._target_")
    return target if target not in (UNKNOWN, "") else _label(cfg, f"{group}.name")


def _integer(cfg: DictConfig | None, key: str) -> int | None:
    value = None if cfg is None else OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _fleet(cfg: DictConfig | None) -> str:
    """A fleet's label: its speed distribution, and its clients' bitwidths where any is below 32."""
    speed = _label(cfg, "fleet.speed")
    if cfg is None:
        return speed
    bits = list(OmegaConf.select(cfg, "fleet.bitwidths", default=None) or [])
    if set(bits) - {32}:
        fractions = list(OmegaConf.select(cfg, "fleet.bitwidth_fractions", default=None) or [])
        shares = f" at {'/'.join(f'{100 * f:g}' for f in fractions)}%" if len(fractions) == len(bits) else ""
        return f"{speed}, {'/'.join(map(str, bits))} bits{shares}"
    single = _integer(cfg, "fleet.bitwidth")
    return speed if single in (None, 32) else f"{speed}, {single} bits"


def _load_run(metrics_path: Path) -> Run | None:
    records = _read_records(metrics_path)
    if not records:
        log.warning("%s: no evaluations; skipping the run", metrics_path)
        return None
    server = metrics_path.parent / SERVER_CONFIG_FILE
    cfg = _read_config(server if server.is_file() else metrics_path.parent / CONFIG_FILE)
    return Run(
        path=metrics_path,
        strategy=_label(cfg, "strategy.name"),
        fleet=_fleet(cfg),
        num_clients=_integer(cfg, "num_clients"),
        partition=_label(cfg, "dataset.partition.name"),
        dataset=_component(cfg, "dataset"),
        model=_component(cfg, "model"),
        seed=_integer(cfg, "seed"),
        records=records,
        config=_compared(cfg),
    )


#: keys that say how a run is carried out, not what it computes (a prefix covers the keys below it)
NOT_COMPARED = (
    "seed",
    "hydra",
    "tracking",
    "dataset.root",
    "sim.progress",
    "sim.threads",
    "sim.device",
    "sim.resume",
    "sim.checkpoint_every",
    "sim.ray_address",
    "sim.executor",
    "server.address",
    "server.port",
    "server.port_file",
    "server.state_dir",
    "server.tls",
    "server.tokens_file",
    "server.threads",
    "server.resume",
    "server.durable",
    "server.poll_timeout",
    "server.heartbeat_seconds",
    "server.shutdown_grace",
)
#: keys that make the setting or the strategy (the table's own columns)
SETTING_KEYS = frozenset(
    {"dataset.name", "dataset._target_", "model.name", "model._target_", "dataset.partition.name", "fleet.speed"}
    | {"fleet.bitwidth", "fleet.bitwidths", "fleet.bitwidth_fractions", "num_clients", "strategy.name"}
)


def _compared(cfg: DictConfig | None) -> dict[str, str]:
    """The run's config keys a comparison looks at, flattened to text."""
    if cfg is None:
        return {}
    flat: dict[str, str] = {}

    def walk(node: object, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
            return
        key = prefix.rstrip(".")
        if key not in SETTING_KEYS and not any(key == p or key.startswith(f"{p}.") for p in NOT_COMPARED):
            flat[key] = json.dumps(node) if isinstance(node, list | dict) else str(node)

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return flat


def separate(runs: Sequence[Run]) -> tuple[list[Run], list[str]]:
    """``runs`` with each one's variant set: the keys in which runs of its setting and strategy differ, with its
    values; and every such key, sorted."""
    groups: dict[tuple[Setting, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.setting, run.strategy), []).append(run)
    differing: dict[tuple[Setting, str], list[str]] = {}
    for key, group in groups.items():
        keys = sorted({k for run in group for k in run.config})
        differing[key] = [k for k in keys if len({run.config.get(k, "—") for run in group}) > 1]
    out = []
    for run in runs:
        keys = differing[(run.setting, run.strategy)]
        out.append(replace(run, variant=", ".join(f"{k}={run.config.get(k, '—')}" for k in keys)))
    return out, sorted({k for keys in differing.values() for k in keys})


def load_runs(path: Path) -> list[Run]:
    """Every run under ``path`` (a run directory, a sweep directory, or one ``metrics.jsonl``), by path.

    Raises:
        DataError: ``path`` does not exist, holds no metrics file, or a metrics or config file is malformed.
    """
    if path.is_file():
        metrics_paths = [path]
    elif path.is_dir():
        metrics_paths = sorted(path.rglob(METRICS_FILE))
        if not metrics_paths:
            raise DataError(f"{path}: no {METRICS_FILE} in this directory or below it")
    else:
        raise DataError(f"{path}: no such file or directory")
    return [run for run in map(_load_run, metrics_paths) if run is not None]
