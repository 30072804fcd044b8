"""``fedhet report RUN_OR_SWEEP_DIR [...]``: the command line of the report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from fedhet.errors import ConfigError, DataError
from fedhet.report.analysis import SYNC_STRATEGY, epsilon_points, summarize, targets
from fedhet.report.output import markdown_table, plot_epsilon, plot_metric
from fedhet.report.runs import AXES, METRICS, Run, load_runs, separate

__all__ = ["TABLE_FILE", "main", "plot_file"]

TABLE_FILE = "report.md"


def plot_file(metric: str, axis: str) -> str:
    """The plot's file name, e.g. ``accuracy_vs_time.png``; ``axis`` ``epsilon`` names the privacy plot."""
    return f"{metric}_vs_{axis}.png"


class _Parser(argparse.ArgumentParser):
    """Reports a usage error as one line (via :class:`ConfigError`) instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fedhet report",
        description="Progress-to-target table (report.md) and a plot of a metric (METRIC_vs_AXIS.png) of runs; "
        "with private runs, the final metric against epsilon (METRIC_vs_epsilon.png).",
    )
    parser.add_argument("dirs", nargs="+", type=Path, metavar="RUN_OR_SWEEP_DIR", help="run or sweep directories")
    parser.add_argument(
        "--metric",
        choices=list(METRICS),
        default="accuracy",
        help="what to compare: " + "; ".join(f"{name}: {meaning}" for name, meaning in METRICS.items()),
    )
    parser.add_argument(
        "--axis", choices=list(AXES), default="time", help="progress in virtual seconds (time) or in rounds"
    )
    parser.add_argument(
        "--target",
        type=float,
        metavar="FLOAT",
        help="target level in (0, 1] for every setting (default: the lowest best value of its fedavg runs)",
    )
    parser.add_argument(
        "--out", type=Path, metavar="DIR", help="directory for report.md and the plot (default: the first input)"
    )
    return parser


def _load(dirs: list[Path]) -> list[Run]:
    loaded: list[Run] = []
    seen: set[Path] = set()
    for directory in dirs:
        for run in load_runs(directory):
            if run.path.resolve() not in seen:
                seen.add(run.path.resolve())
                loaded.append(run)
    if not loaded:
        raise DataError(f"{', '.join(map(str, dirs))}: every metrics file is empty")
    return loaded


def _report(args: list[str]) -> None:
    options = _parser().parse_args(args)
    target: float | None = options.target
    metric: str = options.metric
    axis: str = options.axis
    if target is not None and not 0.0 < target <= 1.0:
        raise ConfigError(f"--target {target:g}: give the level as a fraction in (0, 1], e.g. 0.8 for 80%")
    sources = ", ".join(map(str, options.dirs))
    runs, differing = separate(_load(options.dirs))
    summaries = summarize(runs, metric, axis, target)
    if not summaries:
        raise DataError(f"{sources}: no run measured {metric} ({METRICS[metric]})")
    apart = (
        f"Runs of one strategy and setting whose configs differ are separate rows, labelled by the keys in which "
        f"they differ: {', '.join(differing)}.\n\n"
        if differing
        else ""
    )
    first: Path = options.dirs[0]
    out: Path = options.out or (first if first.is_dir() else first.parent)
    table = markdown_table(summaries, metric, axis)
    plot = plot_file(metric, axis)
    points = epsilon_points(summaries)
    privacy_plot = plot_file(metric, "epsilon") if any(p.epsilon is not None for p in points) else None
    privacy = f"\n![{metric} vs epsilon]({privacy_plot})\n" if privacy_plot else ""
    rule = (
        f"{target * 100:.2f}% (--target)"
        if target is not None
        else f"per setting, the lowest best value of its {SYNC_STRATEGY} runs (of all runs without {SYNC_STRATEGY})"
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / TABLE_FILE).write_text(
        f"# fedhet report\n\n{len(runs)} runs from {sources}. Metric: {metric}, {METRICS[metric]}.\n\n"
        f"Target: {rule}. Progress to target is in {AXES[axis]}, over the seeds that reach it; every cell is the "
        f"mean ± the half-width of its 95% confidence interval over seeds (Student's t); GB are sent both ways by "
        f"the last evaluation.\n\n{apart}{table}\n![{metric} vs {axis}]({plot})\n{privacy}",
        encoding="utf-8",
    )
    plot_metric(runs, targets(runs, metric, target), out / plot, metric, axis)
    if privacy_plot:
        plot_epsilon(points, out / privacy_plot, metric)
    if differing:
        print(f"separated by: {', '.join(differing)}")
    print(table, end="")
    plots = " and ".join(str(out / name) for name in (plot, privacy_plot) if name)
    print(f"\nwrote {out / TABLE_FILE} and {plots}")


def main(args: list[str]) -> int:
    """``fedhet report RUN_OR_SWEEP_DIR [...] [--metric M] [--axis A] [--target FLOAT] [--out DIR]``; 0 on success,
    2 on bad input."""
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
