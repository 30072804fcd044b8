"""How many torch threads a simulation should use: seconds per version at ``sim.threads`` = 1 and = the CPU count,
on an idle machine and with other work running (busy-loop processes standing in for a shared machine's other
jobs), measured in the same run.

Each measurement is its own ``fedhet simulate`` process (torch's thread pool is per process): the FedAvg CNN on
Fashion-MNIST, 100 clients, 5 a round, one local epoch, ``--versions`` versions after a warm-up version. Printed:
seconds per version for each (load, threads) and the ratio (CPU-count threads / 1 thread; above 1 = one thread is
faster). The default of ``sim.threads`` follows from it (configs/config.yaml).

    python benchmarks/sim_threads.py                   # loads 0, 1 and 2 busy processes
    python benchmarks/sim_threads.py --loads 0 2 --versions 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUN = """
import json, sys, time
from pathlib import Path
from fedhet.cli import compose
from fedhet.sim.runner import simulate
from fedhet.metrics import read_metrics
overrides, out = json.loads(sys.argv[1]), Path(sys.argv[2])
simulate(compose(overrides), out)
records = read_metrics(out / "metrics.jsonl")
print(json.dumps({"versions": records[-1].version, "wall": records[-1].wall_time - records[1].wall_time}))
"""


def busy(count: int) -> list[subprocess.Popen[bytes]]:
    """``count`` processes that spin on a core each (the other jobs of a shared machine)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def seconds_per_version(threads: int, versions: int, work: Path) -> float:
    overrides = [
        "model=cnn",
        "num_clients=100",
        "strategy.scheduler.fraction=0.05",
        f"sim.max_versions={versions + 1}",
        f"sim.threads={threads}",
        "sim.progress=false",
    ]
    out = Path(tempfile.mkdtemp(dir=work))
    done = subprocess.run(
        [sys.executable, "-c", RUN, json.dumps(overrides), str(out)], capture_output=True, text=True, timeout=1800
    )
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    row = json.loads(done.stdout.strip().splitlines()[-1])
    return float(row["wall"]) / (int(row["versions"]) - 1)  # the first version (warm-up) left out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loads", type=int, nargs="+", default=[0, 1, 2], help="busy processes beside the run")
    parser.add_argument("--versions", type=int, default=3)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="sim_threads_"))
    print(f"{cores} CPUs; FedAvg CNN, 5 clients a round; seconds per version (after one warm-up version)")
    rows = []
    for load in args.loads:
        spinners = busy(load)
        try:
            time.sleep(1.0)
            one = seconds_per_version(1, args.versions, work)
            many = seconds_per_version(cores, args.versions, work)
        finally:
            for p in spinners:
                p.kill()
        rows.append({"busy_processes": load, "threads_1_s": round(one, 2), f"threads_{cores}_s": round(many, 2)})
        print(
            f"busy processes {load}: sim.threads=1 {one:7.2f} s/version   sim.threads={cores} {many:7.2f} s/version"
            f"   ratio ({cores} threads / 1) {many / one:.2f}",
            flush=True,
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
