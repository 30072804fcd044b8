"""Memory and speed of a simulation as the client count grows.

Runs the default simulation (Fashion-MNIST, CNN, FedAvg with C = 0.1, Dirichlet 0.5) for a few rounds at each
client count in its own process, and prints seconds per round and peak RSS, each as a ratio to the smallest
count measured in the same run. The samples per round are the same at every count (C * N clients of
60,000 * 0.8 / N samples each), so a flat ratio means the per-client cost is nil.

    python benchmarks/sim_scale.py [--clients 100 1000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def child(num_clients: int, rounds: int, out_dir: Path) -> None:
    from fedhet.cli import compose
    from fedhet.metrics import read_metrics
    from fedhet.sim.runner import simulate

    cfg = compose(
        [f"num_clients={num_clients}", f"sim.max_versions={rounds}", f"sim.eval_every={rounds}", "sim.progress=false"]
    )
    simulate(cfg, out_dir)
    records = read_metrics(out_dir / "metrics.jsonl")
    per_round = (records[-1].wall_time - records[0].wall_time) / rounds
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "clients": num_clients,
                "seconds_per_round": per_round,
                "peak_rss_mib": peak_mib,
                "accuracy": records[-1].accuracy,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.rounds, args.out)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.clients:
            done = subprocess.run(
                [sys.executable, __file__, "--child", str(n), "--rounds", str(args.rounds), "--out", f"{tmp}/{n}"],
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = rows[0]
    print(f"{'clients':>8} {'s/round':>8} {'ratio':>6} {'peak RSS MiB':>13} {'ratio':>6} {'accuracy':>9}")
    for row in rows:
        print(
            f"{row['clients']:>8} {row['seconds_per_round']:>8.2f} "
            f"{row['seconds_per_round'] / base['seconds_per_round']:>6.2f} {row['peak_rss_mib']:>13.0f} "
            f"{row['peak_rss_mib'] / base['peak_rss_mib']:>6.2f} {row['accuracy']:>9.4f}"
        )


if __name__ == "__main__":
    main()
