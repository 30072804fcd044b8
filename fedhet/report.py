"""``fedhet report``: time-to-target tables and accuracy-vs-time plots from run and sweep directories.

A *setting* is what a comparison holds fixed (dataset, model, partition, fleet, number of clients); within a
setting each strategy gets one row and one curve, aggregated over its seeds. Runs of one strategy in one setting
whose configs differ in any other key (a learning rate, a bitwidth mix) are kept apart: each such key is named, and
the row is labelled with its value, e.g. ``fedavg (client.lr=0.5)``. Only the seed and keys that change how a run
is carried out, not what it computes (threads, device, progress bar, ports, paths, trackers), are not compared.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import NoReturn

import numpy as np
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedhet.errors import ConfigError, DataError
from fedhet.metrics import MetricsRecord

__all__ = [
    "REFERENCE_STRATEGY",
    "SYNC_STRATEGY",
    "UNKNOWN",
    "Curve",
    "Run",
    "Setting",
    "Summary",
    "default_target",
    "load_runs",
    "main",
    "markdown_table",
    "mean_curve",
    "plot_accuracy",
    "separate",
    "summarize",
    "targets",
    "time_to_target",
]

log = logging.getLogger(__name__)

#: label of a config value a run directory does not record
UNKNOWN = "unknown"
#: the synchronous baseline whose runs set the default target accuracy
SYNC_STRATEGY = "fedavg"
#: the strategy other strategies' times are divided by
REFERENCE_STRATEGY = "fedcompass"

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = Path(".hydra") / "config.yaml"
SERVER_CONFIG_FILE = Path("config.yaml")  # what fedhet server records in its state directory
TABLE_FILE = "report.md"
PLOT_FILE = "accuracy_vs_time.png"

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

    @property
    def best_accuracy(self) -> float:
        """Highest test accuracy of the run, in [0, 1]."""
        return max(r.accuracy for r in self.records)

    @property
    def final_accuracy(self) -> float:
        """Test accuracy at the run's last evaluation, in [0, 1]."""
        return self.records[-1].accuracy


@dataclass(frozen=True)
class Summary:
    """One table row: a strategy in a setting, over its seeds.

    Attributes:
        target: accuracy the times are measured to, in [0, 1].
        times: per seed, virtual seconds to reach ``target`` (None where it never does).
        final_accuracies: per seed, accuracy at the last evaluation, in [0, 1].
        reference_time: mean virtual seconds of :data:`REFERENCE_STRATEGY` to target in this setting, if any.
    """

    setting: Setting
    strategy: str
    target: float
    times: tuple[float | None, ...]
    final_accuracies: tuple[float, ...]
    reference_time: float | None
    seeds: tuple[int | None, ...] = ()

    @property
    def reached(self) -> list[float]:
        """Virtual seconds to target of the seeds that reach it."""
        return [t for t in self.times if t is not None]

    @property
    def mean_time(self) -> float | None:
        """Mean virtual seconds to target over the seeds that reach it; None if none does."""
        reached = self.reached
        return float(np.mean(reached)) if reached else None

    @property
    def relative_time(self) -> float | None:
        """Mean time to target divided by the reference strategy's (dimensionless)."""
        if self.mean_time is None or not self.reference_time:
            return None
        return self.mean_time / self.reference_time


@dataclass(frozen=True)
class Curve:
    """Accuracy over seeds on a common grid of virtual times (seconds), each seed's curve held between evaluations."""

    times: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray


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
        fleet=_label(cfg, "fleet.speed"),
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
    | {"num_clients", "strategy.name"}
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


def _seeds_cell(summary: Summary) -> str:
    """The number of runs, and of distinct seeds where fewer (the same seed run twice is not two seeds)."""
    runs, seeds = len(summary.times), len(set(summary.seeds))
    return str(runs) if seeds == runs else f"{runs} runs, {seeds} seed{'s' if seeds != 1 else ''}"


# --- analysis ------------------------------------------------------------------------------------------------


def time_to_target(records: Sequence[MetricsRecord], target: float) -> float | None:
    """Virtual seconds of the first evaluation with accuracy >= ``target`` (in [0, 1]); None if none reaches it."""
    return next((r.virtual_time for r in records if r.accuracy >= target), None)


def default_target(runs: Sequence[Run]) -> float:
    """Accuracy every synchronous run reaches, as in FedCompass: the lowest of the fedavg runs' best accuracies.

    Without fedavg runs, the lowest best accuracy over all ``runs``.
    """
    if not runs:
        raise ValueError("default_target needs at least one run")
    baseline = [run for run in runs if run.strategy == SYNC_STRATEGY] or list(runs)
    return min(run.best_accuracy for run in baseline)


def _by_setting(runs: Sequence[Run]) -> dict[Setting, list[Run]]:
    groups: dict[Setting, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.setting, []).append(run)
    return {setting: groups[setting] for setting in sorted(groups, key=Setting.sort_key)}


def targets(runs: Sequence[Run], target: float | None = None) -> dict[Setting, float]:
    """Target accuracy (in [0, 1]) of each setting: ``target`` if given, else :func:`default_target` of its runs."""
    return {
        setting: default_target(group) if target is None else target for setting, group in _by_setting(runs).items()
    }


def summarize(runs: Sequence[Run], target: float | None = None) -> list[Summary]:
    """One :class:`Summary` per setting and strategy, settings and strategies in sorted order."""
    setting_targets = targets(runs, target)
    summaries = []
    for setting, group in _by_setting(runs).items():
        goal = setting_targets[setting]
        by_strategy: dict[str, list[Run]] = {}  # by label: a strategy and its variant
        for run in group:
            by_strategy.setdefault(run.label, []).append(run)
        reference_times = [
            t
            for t in (time_to_target(r.records, goal) for r in by_strategy.get(REFERENCE_STRATEGY, []))
            if t is not None
        ]
        reference = float(np.mean(reference_times)) if reference_times else None
        for strategy in sorted(by_strategy):
            seeds = sorted(by_strategy[strategy], key=lambda r: (r.seed is None, r.seed or 0, str(r.path)))
            summaries.append(
                Summary(
                    setting=setting,
                    strategy=strategy,
                    target=goal,
                    times=tuple(time_to_target(r.records, goal) for r in seeds),
                    final_accuracies=tuple(r.final_accuracy for r in seeds),
                    reference_time=reference,
                    seeds=tuple(r.seed for r in seeds),
                )
            )
    return summaries


def _mean_std(values: Sequence[float], scale: float = 1.0) -> str:
    """``mean ± std`` to 2 decimals (sample std, ddof=1); just the mean for one value."""
    mean = float(np.mean(values)) * scale
    if len(values) < 2:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {float(np.std(values, ddof=1)) * scale:.2f}"


def _time_cell(summary: Summary) -> str:
    reached, total = len(summary.reached), len(summary.times)
    if not reached:
        return f"— (0/{total} reached)"
    cell = _mean_std(summary.reached)
    return cell if reached == total else f"{cell} ({reached}/{total} reached)"


def markdown_table(summaries: Sequence[Summary]) -> str:
    """A markdown table, one row per summary: times in virtual seconds, accuracies in percent, std over seeds."""
    header = [
        "dataset",
        "model",
        "partition",
        "fleet",
        "clients",
        "strategy",
        "seeds",
        "target acc. (%)",
        "time to target (s)",
        "final acc. (%)",
        f"time / {REFERENCE_STRATEGY}",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries:
        relative = s.relative_time
        row = [
            s.setting.dataset,
            s.setting.model,
            s.setting.partition,
            s.setting.fleet,
            UNKNOWN if s.setting.num_clients is None else str(s.setting.num_clients),
            s.strategy,
            _seeds_cell(s),
            f"{s.target * 100:.2f}",
            _time_cell(s),
            _mean_std(s.final_accuracies, scale=100.0),
            "—" if relative is None else f"{relative:.2f}",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def mean_curve(runs: Sequence[Run]) -> Curve:
    """Accuracy (in [0, 1]) of ``runs`` on the union of their evaluation times (seconds).

    Each run's accuracy is held from one evaluation to the next and after its last; before its first evaluation a
    run does not count. As every seed's curve is a step function changing only at grid points, the grid is exact.
    """
    times = np.unique(np.concatenate([[r.virtual_time for r in run.records] for run in runs]))
    values = np.full((len(runs), len(times)), np.nan)
    for row, run in enumerate(runs):
        run_times = np.array([r.virtual_time for r in run.records])
        accuracy = np.array([r.accuracy for r in run.records])
        # the last evaluation at or before each grid time (a later one at the same time wins)
        index = np.searchsorted(run_times, times, side="right") - 1
        values[row] = np.where(index >= 0, accuracy[np.maximum(index, 0)], np.nan)
    return Curve(times, np.nanmean(values, axis=0), np.nanmin(values, axis=0), np.nanmax(values, axis=0))


def plot_accuracy(runs: Sequence[Run], setting_targets: dict[Setting, float], path: Path) -> None:
    """Save a PNG with one panel per setting: mean accuracy over seeds per strategy, min..max band, target line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _by_setting(runs)
    strategies = sorted({run.label for run in runs})
    palette = plt.get_cmap("tab10")
    colours = {strategy: palette(i % 10) for i, strategy in enumerate(strategies)}
    columns = min(len(groups), 2)
    rows = math.ceil(len(groups) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6.5 * columns, 4.2 * rows), squeeze=False)
    for ax, (setting, group) in zip(axes.flat, groups.items(), strict=False):  # spare panels stay empty
        for strategy in sorted({run.label for run in group}):
            seeds = [run for run in group if run.label == strategy]
            curve = mean_curve(seeds)
            colour = colours[strategy]
            ax.step(curve.times, curve.mean * 100, where="post", color=colour, label=f"{strategy} (n={len(seeds)})")
            ax.fill_between(curve.times, curve.low * 100, curve.high * 100, step="post", color=colour, alpha=0.2)
            ax.plot(
                curve.times[-1], curve.mean[-1] * 100, "o", color=colour, markersize=3
            )  # the last step has no width
        goal = setting_targets[setting]
        ax.axhline(goal * 100, color="0.3", linestyle="--", linewidth=1, label=f"target {goal * 100:.2f}%")
        ax.set_title(setting.title(), fontsize=10)
        ax.set_xlabel("virtual time (s)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    for ax in axes.flat[len(groups) :]:
        ax.set_visible(False)
    fig.suptitle("Accuracy vs virtual time: mean over seeds, band = min..max", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- command line --------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Reports a usage error as one line (via :class:`ConfigError`) instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fedhet report",
        description="Time-to-target table (report.md) and accuracy-vs-time plot (accuracy_vs_time.png) of runs.",
    )
    parser.add_argument("dirs", nargs="+", type=Path, metavar="RUN_OR_SWEEP_DIR", help="run or sweep directories")
    parser.add_argument(
        "--target",
        type=float,
        metavar="FLOAT",
        help="target accuracy in (0, 1] for every setting (default: the lowest best accuracy of its fedavg runs)",
    )
    parser.add_argument(
        "--out", type=Path, metavar="DIR", help="directory for report.md and the plot (default: the first input)"
    )
    return parser


def _report(args: list[str]) -> None:
    options = _parser().parse_args(args)
    target: float | None = options.target
    if target is not None and not 0.0 < target <= 1.0:
        raise ConfigError(f"--target {target:g}: give the accuracy as a fraction in (0, 1], e.g. 0.8 for 80%")
    loaded: list[Run] = []
    seen: set[Path] = set()
    for directory in options.dirs:
        for run in load_runs(directory):
            if run.path.resolve() not in seen:
                seen.add(run.path.resolve())
                loaded.append(run)
    sources = ", ".join(map(str, options.dirs))
    if not loaded:
        raise DataError(f"{sources}: every metrics file is empty")
    runs, differing = separate(loaded)
    apart = (
        f"Runs of one strategy and setting whose configs differ are separate rows, labelled by the keys in which "
        f"they differ: {', '.join(differing)}.\n\n"
        if differing
        else ""
    )
    first: Path = options.dirs[0]
    out: Path = options.out or (first if first.is_dir() else first.parent)
    setting_targets = targets(runs, target)
    table = markdown_table(summarize(runs, target))
    rule = (
        f"{target * 100:.2f}% (--target)"
        if target is not None
        else f"per setting, the lowest best accuracy of its {SYNC_STRATEGY} runs (of all runs without {SYNC_STRATEGY})"
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / TABLE_FILE).write_text(
        f"# fedhet report\n\n{len(runs)} runs from {sources}.\n\n"
        f"Target accuracy: {rule}. Times are virtual seconds, mean ± sample std over the seeds that reach the "
        f"target; accuracies are percent, mean ± sample std over seeds.\n\n{apart}"
        f"{table}\n![accuracy vs virtual time]({PLOT_FILE})\n",
        encoding="utf-8",
    )
    plot_accuracy(runs, setting_targets, out / PLOT_FILE)
    if differing:
        print(f"separated by: {', '.join(differing)}")
    print(table, end="")
    print(f"\nwrote {out / TABLE_FILE} and {out / PLOT_FILE}")


def main(args: list[str]) -> int:
    """``fedhet report RUN_OR_SWEEP_DIR [...] [--target FLOAT] [--out DIR]``; 0 on success, 2 on bad input."""
    try:
        _report(args)
    except (ConfigError, DataError, OSError) as error:  # OSError: the output directory is not writable
        print(f"fedhet: error: {error}", file=sys.stderr)
        return 2
    except SystemExit as stop:  # --help
        return stop.code if isinstance(stop.code, int) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
