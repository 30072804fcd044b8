"""What ``fedhet report`` writes: the markdown table and the plot of a metric against virtual time or rounds."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedhet.report.analysis import (
    REFERENCE_STRATEGY,
    SYNC_STRATEGY,
    EpsilonPoint,
    Summary,
    by_setting,
    confidence_half_width,
    mean_curve,
)
from fedhet.report.runs import AXES, METRICS, UNKNOWN, Run, Setting

__all__ = ["markdown_table", "plot_epsilon", "plot_metric"]

#: the table's name for progress along each axis
_PROGRESS = {"time": "time to target (s)", "rounds": "rounds to target"}


def _mean_ci(values: Sequence[float], scale: float = 1.0, digits: str = ".2f") -> str:
    """``mean ± h`` (formatted as ``digits``), h the half-width of the 95% confidence interval; just the mean for
    one value."""
    mean = float(np.mean(values)) * scale
    if len(values) < 2:
        return f"{mean:{digits}}"
    return f"{mean:{digits}} ± {confidence_half_width(values) * scale:{digits}}"


def _progress_cell(summary: Summary) -> str:
    reached, total = len(summary.reached), len(summary.times)
    if not reached:
        return f"— (0/{total} reached)"
    cell = _mean_ci(summary.reached)
    return cell if reached == total else f"{cell} ({reached}/{total} reached)"


def _seeds_cell(summary: Summary) -> str:
    """The number of runs, and of distinct seeds where fewer (the same seed run twice is not two seeds)."""
    runs, seeds = len(summary.times), len(set(summary.seeds))
    return str(runs) if seeds == runs else f"{runs} runs, {seeds} seed{'s' if seeds != 1 else ''}"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def markdown_table(summaries: Sequence[Summary], metric: str = "accuracy", axis: str = "time") -> str:
    """A markdown table, one row per summary: progress to target on ``axis``, ``metric`` in percent, GB sent,
    epsilon where any run is private; each a mean ± the 95% confidence interval's half-width over seeds."""
    private = any(e is not None for s in summaries for e in s.epsilons)
    header = [
        "dataset",
        "model",
        "partition",
        "fleet",
        "clients",
        "strategy",
        "seeds",
        "target (%)",
        _PROGRESS[axis],
        f"final {metric} (%)",
        "GB sent",
        *(["epsilon"] if private else []),
        f"{'time' if axis == 'time' else 'rounds'} / {REFERENCE_STRATEGY}",
        f"bytes / {SYNC_STRATEGY}",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries:
        spent = [e for e in s.epsilons if e is not None]
        row = [
            s.setting.dataset,
            s.setting.model,
            s.setting.partition,
            s.setting.fleet,
            UNKNOWN if s.setting.num_clients is None else str(s.setting.num_clients),
            s.strategy,
            _seeds_cell(s),
            f"{s.target * 100:.2f}",
            _progress_cell(s),
            _mean_ci(s.final_values, scale=100.0),
            _mean_ci(s.gigabytes, digits=".3g"),
            *([_mean_ci(spent) if spent else "—"] if private else []),
            _ratio(s.relative_time),
            _ratio(s.relative_bytes),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot_metric(
    runs: Sequence[Run], setting_targets: dict[Setting, float], path: Path, metric: str = "accuracy", axis: str = "time"
) -> None:
    """Save a PNG with one panel per setting: ``metric``'s mean over seeds per strategy along ``axis``, a min..max
    band and the target line."""
    groups = {s: [r for r in g if r.points(metric, axis)] for s, g in by_setting(runs).items()}
    groups = {setting: group for setting, group in groups.items() if group}
    strategies = sorted({run.label for group in groups.values() for run in group})
    plt, fig, axes = _panels(len(groups))
    palette = plt.get_cmap("tab10")
    colours = {strategy: palette(i % 10) for i, strategy in enumerate(strategies)}
    for ax, (setting, group) in zip(axes.flat, groups.items(), strict=False):  # spare panels stay empty
        for strategy in sorted({run.label for run in group}):
            seeds = [run for run in group if run.label == strategy]
            curve = mean_curve(seeds, metric, axis)
            colour = colours[strategy]
            ax.step(curve.times, curve.mean * 100, where="post", color=colour, label=f"{strategy} (n={len(seeds)})")
            ax.fill_between(curve.times, curve.low * 100, curve.high * 100, step="post", color=colour, alpha=0.2)
            ax.plot(curve.times[-1], curve.mean[-1] * 100, "o", color=colour, markersize=3)  # the last step
        goal = setting_targets[setting]
        if not math.isnan(goal):
            ax.axhline(goal * 100, color="0.3", linestyle="--", linewidth=1, label=f"target {goal * 100:.2f}%")
        ax.set_title(setting.title(), fontsize=10)
        ax.set_xlabel(AXES[axis])
        ax.set_ylabel(f"{metric} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    _save(plt, fig, axes, len(groups), f"{METRICS[metric]}: mean over seeds, band = min..max", path)


#: epsilon above which a row protects nothing worth an axis position (DP-SGD with almost no noise, a reference):
#: it is drawn as a level line like a row without DP, its epsilon in its label
EPSILON_AXIS_LIMIT = 1000.0


def plot_epsilon(points: Sequence[EpsilonPoint], path: Path, metric: str = "accuracy") -> None:
    """Save a PNG with one panel per setting: the final ``metric`` of each private row against the epsilon it spent
    (log scale), with 95% confidence intervals over seeds as error bars, and each row without DP (or above
    :data:`EPSILON_AXIS_LIMIT`) as a level line with its interval as a band."""
    settings = list(dict.fromkeys(p.setting for p in points))
    plt, fig, axes = _panels(len(settings))
    palette = plt.get_cmap("tab10")
    for ax, setting in zip(axes.flat, settings, strict=False):
        private = [p for p in points if p.setting == setting and _on_axis(p)]
        if private:
            ax.errorbar(
                [p.epsilon for p in private],
                [p.value * 100 for p in private],
                yerr=[0.0 if math.isnan(p.half_width) else p.half_width * 100 for p in private],
                fmt="o-",
                color=palette(0),
                capsize=3,
                label="private rows: mean, 95% CI",
            )
            for p in private:
                ax.annotate(
                    f"{p.value * 100:.1f}%",
                    (p.epsilon or 0.0, p.value * 100),
                    fontsize=7,
                    xytext=(5, -11),
                    textcoords="offset points",
                )
            ax.set_xscale("log")
            plain = plt.FuncFormatter(lambda value, _: f"{value:g}")
            ax.xaxis.set_major_formatter(plain)
            ax.xaxis.set_minor_formatter(plain)
        others = [p for p in points if p.setting == setting and not _on_axis(p)]
        for i, p in enumerate(others, start=1):
            colour = palette(i % 10)
            spent = "no DP" if p.epsilon is None else f"epsilon {p.epsilon:.2g}"
            ax.axhline(p.value * 100, color=colour, linestyle="--", linewidth=1, label=f"{p.strategy} ({spent})")
            if not math.isnan(p.half_width):
                low, high = (p.value - p.half_width) * 100, (p.value + p.half_width) * 100
                ax.axhspan(low, high, color=colour, alpha=0.15)
        ax.set_title(setting.title(), fontsize=10)
        ax.set_xlabel("epsilon spent (largest over clients, mean over seeds)")
        ax.set_ylabel(f"final {metric} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.2))  # long row labels: below the panel
    _save(plt, fig, axes, len(settings), f"final {metric} against the privacy spent: mean over seeds", path)


def _on_axis(point: EpsilonPoint) -> bool:
    return point.epsilon is not None and point.epsilon <= EPSILON_AXIS_LIMIT


def _panels(count: int) -> tuple[Any, Any, np.ndarray]:
    """pyplot (headless), a figure and its grid of axes for ``count`` panels, two to a row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(1, min(count, 2))
    rows = max(1, math.ceil(count / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(6.5 * columns, 4.2 * rows), squeeze=False)
    return plt, fig, axes


def _save(plt: Any, fig: Any, axes: np.ndarray, used: int, title: str, path: Path) -> None:
    """Hide the spare panels, title the figure and write it to ``path``."""
    for ax in axes.flat[used:]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # a legend placed below a panel stays in the picture
    plt.close(fig)
