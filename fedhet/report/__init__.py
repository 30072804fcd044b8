"""``fedhet report``: progress-to-target tables and plots from run and sweep directories.

A *setting* is what a comparison holds fixed (dataset, model, partition, fleet with its bitwidths, number of
clients); within a setting each strategy gets one row and one curve, aggregated over its seeds. Runs of one
strategy in one setting whose configs differ in any other key (a learning rate, a keep ratio) are kept apart: each
such key is named, and the row is labelled with its value, e.g. ``fedavg (client.lr=0.5)``. Only the seed and keys
that change how a run is carried out, not what it computes (threads, device, progress bar, ports, paths, trackers),
are not compared. A strategy's row name is its ``strategy.name``: an experiment's variants name themselves there.
"""

from fedhet.report.analysis import (
    REFERENCE_STRATEGY,
    SYNC_STRATEGY,
    Curve,
    Summary,
    confidence_half_width,
    default_target,
    mean_curve,
    summarize,
    targets,
    time_to_target,
)
from fedhet.report.cli import main
from fedhet.report.output import markdown_table, plot_metric
from fedhet.report.runs import AXES, METRICS, UNKNOWN, Run, Setting, load_runs, metric_value, separate

__all__ = [
    "AXES",
    "METRICS",
    "REFERENCE_STRATEGY",
    "SYNC_STRATEGY",
    "UNKNOWN",
    "Curve",
    "Run",
    "Setting",
    "Summary",
    "confidence_half_width",
    "default_target",
    "load_runs",
    "main",
    "markdown_table",
    "mean_curve",
    "metric_value",
    "plot_metric",
    "separate",
    "summarize",
    "targets",
    "time_to_target",
]
