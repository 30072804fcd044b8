"""A mixed-bitwidth fleet on the vectorized executor against the sequential one, in the same run.

Runs the default simulation (Fashion-MNIST, FedAvg with C = 0.1, Dirichlet 0.5) with a fleet of fp32, int8 and
int4 clients (a third each) for a few rounds, once per executor, and prints seconds per round (from the second
round on: the first holds warm-up), the ratio to the sequential executor, the vectorized executor's fallback
warnings (none means every task ran vectorized) and the accuracies, which differ only by float rounding.

    python benchmarks/sim_mixed_bitwidth.py [--clients 1000] [--rounds 3] [--model cnn] [--threads 1]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import torch

from fedhet.cli import compose
from fedhet.metrics import read_metrics
from fedhet.sim.runner import simulate


class _Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def run(executor: str, args: argparse.Namespace, out: Path) -> tuple[float, float, list[str]]:
    """Seconds per round after the first, final accuracy, and the vectorized executor's warnings."""
    cfg = compose(
        [
            f"num_clients={args.clients}",
            f"model={args.model}",
            "fleet=int2_4_8_32",
            "fleet.bitwidths=[32,8,4]",
            "fleet.bitwidth_fractions=[0.34,0.33,0.33]",
            f"sim.executor={executor}",
            f"sim.max_versions={args.rounds}",
            f"sim.threads={args.threads}",
            "sim.progress=false",
        ]
    )
    count = _Count()
    logger = logging.getLogger("fedhet.sim.vectorized")
    logger.addHandler(count)
    try:
        simulate(cfg, out)
    finally:
        logger.removeHandler(count)
    records = read_metrics(out / "metrics.jsonl")
    per_round = (records[-1].wall_time - records[0].wall_time) / max(1, len(records) - 1)
    return per_round, records[-1].accuracy, count.messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (the first round is warm-up)")
    print(f"torch {torch.__version__}, {args.clients} clients (fp32/int8/int4), {args.model}, {args.threads} threads")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for executor in ("sequential", "vectorized"):
            rows[executor] = run(executor, args, Path(tmp) / executor)
    base = rows["sequential"][0]
    print(f"{'executor':<11} {'s/round':>8} {'speedup':>8} {'accuracy':>9}  fallback warnings")
    for executor, (seconds, accuracy, warnings) in rows.items():
        shown = "; ".join(warnings) if warnings else "none"
        print(f"{executor:<11} {seconds:8.2f} {base / seconds:7.2f}x {accuracy:9.4f}  {shown}")


if __name__ == "__main__":
    main()
