"""What simulating N clients costs against training the same samples centrally, and against Flower.

Workload W1: Fashion-MNIST train (60,000 samples) split IID over N clients, the FedAvg CNN and the 2NN, one local
epoch, minibatch 32, SGD lr 0.01, synchronous FedAvg with every client in the round. For each model this prints

* the baseline: one epoch of a plain single-process PyTorch loop over the 60,000 samples (batch 32, fp32);
* one fedhet round (strategy, simulator, executor, aggregation) at each N: seconds, the ratio round / baseline,
  peak RSS, the seconds inside the executor, and the test accuracy after the round next to the accuracy the
  sequential executor (fp32, same seed) reaches after the same round (``--check``);
* the same round under Flower's simulation engine (``--flower``) at each CPU-per-client setting, and the ratio
  fedhet / Flower against Flower's best setting.

Every measurement runs in a fresh process (so peak RSS is its own) on the same machine in the same run, and
the baseline and fedhet rounds take the fastest of ``--repeat`` runs; compare ratios, not seconds, across
machines. glibc's malloc is set to reuse freed memory in every fedhet and
baseline process alike (see ``fedhet.sim.vectorized.reuse_freed_memory``).

    python benchmarks/sim_overhead.py                                   # CPU, bf16, N = 100, 1,000, 10,000
    python benchmarks/sim_overhead.py --threads 1                       # steadier while other work shares the CPU
    python benchmarks/sim_overhead.py --flower /work/venv-flower/bin/python --flower-clients 1000
    python benchmarks/sim_overhead.py --device cuda --models cnn 2nn --clients 10000 --no-baseline --rounds 3
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

LR = 0.01
BATCH = 32
SEED = 0


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def plain_epoch(model_name: str, device: str) -> dict[str, Any]:
    """One epoch of a plain PyTorch loop over all 60,000 samples, batch 32, fp32."""
    import torch
    from torch import nn

    from fedhet.data import load_fashion_mnist
    from fedhet.models import build_model
    from fedhet.sim.vectorized import reuse_freed_memory

    reuse_freed_memory()
    data = load_fashion_mnist()
    x, y = data.x_train.to(device), data.y_train.to(device)
    model = build_model(model_name, tuple(x.shape[1:]), 10, SEED).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SEED)).to(device)
    _sync(device)
    start = time.perf_counter()
    for i in range(0, len(x), BATCH):
        idx = order[i : i + BATCH]
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    _sync(device)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mib": _peak_rss_mib(), "accuracy": _accuracy(model, data, device)}


def _accuracy(model: Any, data: Any, device: str) -> float:
    from fedhet.models import evaluate

    return evaluate(model, data.x_test.to(device), data.y_test.to(device))[0]


def fedhet_round(
    model_name: str, num_clients: int, executor_name: str, precision: str, device: str, rounds: int = 1
) -> dict[str, Any]:
    """Synchronous FedAvg rounds over ``num_clients`` IID clients through fedhet's simulator: the seconds of the
    last of ``rounds`` (the ones before it warm up a GPU's kernels and caches)."""
    import torch

    from fedhet.clients.trainer import LocalTrainer, TrainConfig
    from fedhet.data import load_fashion_mnist
    from fedhet.data.partition import iid
    from fedhet.metrics import MetricsWriter
    from fedhet.models import build_model
    from fedhet.runtime import Evaluation, StopRules
    from fedhet.sim.executor import SequentialExecutor
    from fedhet.sim.simulator import SimConfig, Simulator
    from fedhet.sim.vectorized import VectorizedExecutor, reuse_freed_memory
    from fedhet.strategies import Strategy
    from fedhet.strategies.aggregators import WeightedMean
    from fedhet.strategies.fedavg import SyncScheduler
    from fedhet.strategies.planners import IdentityPlanner
    from fedhet.types import ClientInfo, ClientProfile, Result, Task

    reuse_freed_memory()
    data = load_fashion_mnist()
    shards = dict(enumerate(iid(data.y_train.numpy(), num_clients, SEED)))
    shape = tuple(data.x_train.shape[1:])
    model = build_model(model_name, shape, 10, SEED)
    trainer = LocalTrainer(model, TrainConfig(lr=LR, batch_size=BATCH), device)
    x, y = data.x_train.to(device), data.y_train.to(device)
    inner: SequentialExecutor | VectorizedExecutor
    if executor_name == "vectorized":
        inner = VectorizedExecutor(trainer, x, y, shards, SEED, precision=precision)
    else:
        inner = SequentialExecutor(trainer, x, y, shards, SEED)
    executor_seconds = 0.0

    class Timed:
        batch_size = inner.batch_size
        device = inner.device

        def run(self, tasks: Sequence[Task]) -> list[Result]:
            nonlocal executor_seconds
            start = time.perf_counter()
            results = inner.run(tasks)
            _sync(device)
            executor_seconds += time.perf_counter() - start
            return results

    profile = ClientProfile(seconds_per_sample=1e-3, bandwidth=1e7)
    clients = [ClientInfo(c, profile, len(s)) for c, s in shards.items()]
    strategy = Strategy(
        SyncScheduler(fraction=1.0, min_clients=1, local_epochs=1, seed=SEED), IdentityPlanner(), WeightedMean()
    )
    initial = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    walls: list[tuple[float, float]] = []  # (wall-clock, executor) seconds at each version (0 = the start)
    with tempfile.TemporaryDirectory() as tmp, MetricsWriter(Path(tmp) / "metrics.jsonl") as metrics:
        simulator = Simulator(
            strategy,
            clients,
            Timed(),
            lambda w, bits: Evaluation(0.0, 0.0),
            metrics,
            SimConfig(StopRules(rounds)),
            SEED,
            progress=lambda record: walls.append((record.wall_time, executor_seconds)),
        )
        simulator.run(initial)
    (seconds, executor_seconds), before = walls[-1], walls[-2]
    seconds, executor_seconds = seconds - before[0], executor_seconds - before[1]
    assert strategy.version == rounds and strategy.updates_applied == rounds * num_clients
    model.load_state_dict(strategy.global_weights)
    fallback = getattr(inner, "fallback_tasks", 0)
    return {
        "seconds": seconds,
        "executor_seconds": executor_seconds,
        "peak_mib": _peak_rss_mib(),
        "accuracy": _accuracy(model, data, device),
        "chunk": inner.batch_size,
        "fallback": fallback,
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
    }


def _child(args: list[str]) -> dict[str, Any]:
    """Run this script in a fresh process with ``args`` and return the JSON it prints."""
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    row: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return row


def _best(args: list[str], repeat: int) -> dict[str, Any]:
    """The fastest of ``repeat`` runs: other work on a shared machine only ever adds time."""
    return min((_child(args) for _ in range(repeat)), key=lambda row: float(row["seconds"]))


def _flower(python: str, model: str, clients: int, num_cpus: str) -> dict[str, Any] | None:
    script = Path(__file__).with_name("flower_w1.py")
    cmd = [python, str(script), "--model", model, "--clients", str(clients), "--num-cpus", num_cpus]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        print(f"  flower num_cpus={num_cpus}: failed ({done.stderr.strip().splitlines()[-1:]})", flush=True)
        return None
    row: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["cnn", "2nn"], choices=["cnn", "2nn"])
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=2, help="time the baseline and fedhet this many times")
    parser.add_argument(
        "--rounds", type=int, default=1, help="fedhet rounds per run; the last is timed (2+ on a GPU: warm-up)"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads in the baseline and fedhet processes (0: torch's)"
    )
    parser.add_argument("--no-check", dest="check", action="store_false", help="skip the sequential reference")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the plain loop")
    parser.add_argument("--flower", metavar="PYTHON", help="interpreter with flwr[simulation] installed")
    parser.add_argument("--flower-clients", type=int, nargs="+", default=[1000])
    parser.add_argument("--flower-cpus", nargs="+", default=["0.5", "1", "default"])
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        kind, model = args.child[:2]
        if kind == "plain":
            row = plain_epoch(model, args.device)
        else:
            row = fedhet_round(model, int(args.child[2]), kind, args.precision, args.device, args.rounds)
        print(json.dumps(row))
        return

    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    common = ["--device", args.device, "--precision", args.precision, "--threads", str(args.threads)]
    common += ["--rounds", str(args.rounds)]
    for model in args.models:
        threads = args.threads or "default"
        print(
            f"== W1, {model}, {args.device}, {threads} torch threads, fedhet vectorized executor in {args.precision}",
            flush=True,
        )
        base = _best(["--child", "plain", model, *common], args.repeat) if args.baseline else None
        if base:
            print(
                f"plain PyTorch epoch (60,000 samples, batch 32, fp32): {base['seconds']:.2f} s, "
                f"peak RSS {base['peak_mib']:.0f} MiB, accuracy {base['accuracy']:.4f}",
                flush=True,
            )
        print(
            f"{'clients':>8} {'round s':>8} {'ratio':>6} {'exec s':>7} {'peak MiB':>9} {'chunk':>6} "
            f"{'acc':>7} {'seq acc':>8} {'seq s':>7} {'|d acc| pts':>11}",
            flush=True,
        )
        fedhet_at: dict[int, float] = {}
        for n in args.clients:
            row = _best(["--child", "vectorized", model, str(n), *common], args.repeat)
            fedhet_at[n] = row["seconds"]
            ratio = f"{row['seconds'] / base['seconds']:>6.2f}" if base else f"{'-':>6}"
            ref = _child(["--child", "sequential", model, str(n), *common]) if args.check else None
            check = (
                f"{ref['accuracy']:>8.4f} {ref['seconds']:>7.1f} {abs(row['accuracy'] - ref['accuracy']) * 100:>11.2f}"
                if ref
                else ""
            )
            print(
                f"{n:>8} {row['seconds']:>8.2f} {ratio} {row['executor_seconds']:>7.2f} {row['peak_mib']:>9.0f} "
                f"{row['chunk']:>6} {row['accuracy']:>7.4f} {check}"
                + (f"  ({row['fallback']} tasks fell back)" if row["fallback"] else "")
                + (f"  [{row['device']}]" if row["device"] != "cpu" else ""),
                flush=True,
            )
        if not args.flower:
            continue
        for n in args.flower_clients:
            rows = [r for c in args.flower_cpus if (r := _flower(args.flower, model, n, c))]
            for r in rows:
                print(
                    f"  flower N={n} num_cpus={r['num_cpus']}: round {r['seconds']:.1f} s"
                    + (f" ({r['seconds'] / base['seconds']:.2f}x plain)" if base else "")
                    + f", peak PSS {r['peak_mib']:.0f} MiB, accuracy {r['accuracy']:.4f}",
                    flush=True,
                )
            if rows and n in fedhet_at:
                best = min(rows, key=lambda r: r["seconds"])
                print(
                    f"  fedhet / Flower at N={n}: {fedhet_at[n] / best['seconds']:.3f} "
                    f"(fedhet {best['seconds'] / fedhet_at[n]:.1f}x faster than Flower's best, "
                    f"num_cpus={best['num_cpus']})",
                    flush=True,
                )


if __name__ == "__main__":
    main()
