"""What ``fedhet report`` computes from runs: target levels, progress to target, final values and bytes per
strategy and setting over seeds, with 95% confidence intervals, and mean curves for the plot."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from fedhet.report.runs import Run, Setting

__all__ = [
    "REFERENCE_STRATEGY",
    "SYNC_STRATEGY",
    "Curve",
    "EpsilonPoint",
    "Summary",
    "by_setting",
    "confidence_half_width",
    "default_target",
    "epsilon_points",
    "mean_curve",
    "summarize",
    "targets",
    "time_to_target",
]

#: the synchronous baseline whose runs set the default target and whose bytes others are divided by
SYNC_STRATEGY = "fedavg"
#: the strategy other strategies' progress to target is divided by
REFERENCE_STRATEGY = "fedcompass"


@dataclass(frozen=True)
class Summary:
    """One table row: a strategy in a setting, over its seeds.

    Attributes:
        target: the metric's level progress is measured to, in [0, 1].
        times: per seed, position on the report's axis (virtual seconds or rounds) where the metric first reaches
            ``target``; None where it never does.
        final_values: per seed, the metric at the last evaluation that measured it, in [0, 1].
        gigabytes: per seed, bytes sent both ways by the last evaluation, in GB (1e9 bytes).
        epsilons: per seed, the largest epsilon any client had spent by the last evaluation; None without DP.
        reference_time: mean progress to target of :data:`REFERENCE_STRATEGY` in this setting, if any.
        baseline_gigabytes: mean GB of :data:`SYNC_STRATEGY` in this setting, if any.
    """

    setting: Setting
    strategy: str
    target: float
    times: tuple[float | None, ...]
    final_values: tuple[float, ...]
    gigabytes: tuple[float, ...]
    epsilons: tuple[float | None, ...]
    reference_time: float | None
    baseline_gigabytes: float | None
    seeds: tuple[int | None, ...] = ()

    @property
    def reached(self) -> list[float]:
        """Progress to target of the seeds that reach it."""
        return [t for t in self.times if t is not None]

    @property
    def mean_time(self) -> float | None:
        """Mean progress to target over the seeds that reach it; None if none does."""
        reached = self.reached
        return float(np.mean(reached)) if reached else None

    @property
    def relative_time(self) -> float | None:
        """Mean progress to target divided by the reference strategy's (dimensionless)."""
        if self.mean_time is None or not self.reference_time:
            return None
        return self.mean_time / self.reference_time

    @property
    def relative_bytes(self) -> float | None:
        """Mean bytes sent divided by the synchronous baseline's (dimensionless)."""
        if not self.baseline_gigabytes:
            return None
        return float(np.mean(self.gigabytes)) / self.baseline_gigabytes


@dataclass(frozen=True)
class Curve:
    """A metric over seeds on a common grid of axis positions, each seed's curve held between evaluations."""

    times: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray


def confidence_half_width(values: Sequence[float]) -> float:
    """Half-width of the 95% confidence interval of the mean of ``values`` (Student's t, sample std); nan for
    fewer than two values."""
    n = len(values)
    if n < 2:
        return math.nan
    return float(stats.t.ppf(0.975, n - 1) * np.std(values, ddof=1) / math.sqrt(n))


def time_to_target(points: Sequence[tuple[float, float]], target: float) -> float | None:
    """Position of the first (position, value) point with value >= ``target`` (in [0, 1]); None if none does."""
    return next((x for x, value in points if value >= target), None)


def _best(run: Run, metric: str) -> float:
    return max((value for _, value in run.points(metric, "rounds")), default=math.nan)


def default_target(runs: Sequence[Run], metric: str = "accuracy") -> float:
    """The level every synchronous run reaches, as in FedCompass: the lowest of the fedavg runs' best values of
    ``metric``. Without fedavg runs, the lowest best value over all ``runs``."""
    if not runs:
        raise ValueError("default_target needs at least one run")
    baseline = [run for run in runs if run.strategy == SYNC_STRATEGY] or list(runs)
    bests = [b for b in (_best(run, metric) for run in baseline) if not math.isnan(b)]
    return min(bests) if bests else math.nan


def by_setting(runs: Sequence[Run]) -> dict[Setting, list[Run]]:
    """``runs`` grouped by setting, settings in sorted order."""
    groups: dict[Setting, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.setting, []).append(run)
    return {setting: groups[setting] for setting in sorted(groups, key=Setting.sort_key)}


def targets(runs: Sequence[Run], metric: str = "accuracy", target: float | None = None) -> dict[Setting, float]:
    """Target level (in [0, 1]) of each setting: ``target`` if given, else :func:`default_target` of its runs."""
    return {
        setting: default_target(group, metric) if target is None else target
        for setting, group in by_setting(runs).items()
    }


def _epsilon(run: Run) -> float | None:
    spent = run.records[-1].epsilon
    return max(spent.values()) if spent else None


def summarize(
    runs: Sequence[Run], metric: str = "accuracy", axis: str = "time", target: float | None = None
) -> list[Summary]:
    """One :class:`Summary` per setting and strategy (with its variant), settings and strategies in sorted order;
    runs that never measured ``metric`` are left out."""
    setting_targets = targets(runs, metric, target)
    summaries = []
    for setting, group in by_setting(runs).items():
        goal = setting_targets[setting]
        by_strategy: dict[str, list[Run]] = {}  # by label: a strategy and its variant
        for run in group:
            if run.points(metric, axis):
                by_strategy.setdefault(run.label, []).append(run)
        reference_times = [
            t
            for t in (time_to_target(r.points(metric, axis), goal) for r in by_strategy.get(REFERENCE_STRATEGY, []))
            if t is not None
        ]
        baseline = by_strategy.get(SYNC_STRATEGY, [])
        for strategy in sorted(by_strategy):
            seeds = sorted(by_strategy[strategy], key=lambda r: (r.seed is None, r.seed or 0, str(r.path)))
            summaries.append(
                Summary(
                    setting=setting,
                    strategy=strategy,
                    target=goal,
                    times=tuple(time_to_target(r.points(metric, axis), goal) for r in seeds),
                    final_values=tuple(r.points(metric, axis)[-1][1] for r in seeds),
                    gigabytes=tuple(_gigabytes(r) for r in seeds),
                    epsilons=tuple(_epsilon(r) for r in seeds),
                    reference_time=float(np.mean(reference_times)) if reference_times else None,
                    baseline_gigabytes=float(np.mean([_gigabytes(r) for r in baseline])) if baseline else None,
                    seeds=tuple(r.seed for r in seeds),
                )
            )
    return summaries


def _gigabytes(run: Run) -> float:
    last = run.records[-1]
    return (last.bytes_up + last.bytes_down) / 1e9


def mean_curve(runs: Sequence[Run], metric: str = "accuracy", axis: str = "time") -> Curve:
    """``metric`` (in [0, 1]) of ``runs`` on the union of their evaluation positions along ``axis``.

    Each run's value is held from one evaluation to the next and after its last; before its first evaluation a
    run does not count. As every seed's curve is a step function changing only at grid points, the grid is exact.
    """
    series = [run.points(metric, axis) for run in runs]
    grid = np.unique(np.concatenate([[x for x, _ in points] for points in series]))
    values = np.full((len(runs), len(grid)), np.nan)
    for row, points in enumerate(series):
        xs = np.array([x for x, _ in points])
        ys = np.array([y for _, y in points])
        # the last evaluation at or before each grid position (a later one at the same position wins)
        index = np.searchsorted(xs, grid, side="right") - 1
        values[row] = np.where(index >= 0, ys[np.maximum(index, 0)], np.nan)
    return Curve(grid, np.nanmean(values, axis=0), np.nanmin(values, axis=0), np.nanmax(values, axis=0))


@dataclass(frozen=True)
class EpsilonPoint:
    """A table row as a point of the metric against privacy: its final value against the epsilon it spent.

    Attributes:
        epsilon: mean over seeds of the largest epsilon any client spent; None for a row without DP.
        value: mean over seeds of the final metric, in [0, 1].
        half_width: half-width of that mean's 95% confidence interval (nan for one seed).
    """

    setting: Setting
    strategy: str
    epsilon: float | None
    value: float
    half_width: float


def epsilon_points(summaries: Sequence[Summary]) -> list[EpsilonPoint]:
    """Every summary as an :class:`EpsilonPoint`, private rows (every seed spent a finite epsilon) by epsilon within
    each setting, then the rows without DP; a row with some seeds private and some not, or an infinite epsilon, has
    no place on the axis and is left out."""
    points = []
    for s in summaries:
        spent = [e for e in s.epsilons if e is not None]
        if spent and (len(spent) < len(s.epsilons) or not all(math.isfinite(e) for e in spent)):
            continue
        epsilon = float(np.mean(spent)) if spent else None
        points.append(
            EpsilonPoint(
                s.setting, s.strategy, epsilon, float(np.mean(s.final_values)), confidence_half_width(s.final_values)
            )
        )
    order = {setting: i for i, setting in enumerate(dict.fromkeys(p.setting for p in points))}
    return sorted(points, key=lambda p: (order[p.setting], p.epsilon is None, p.epsilon or 0.0))
