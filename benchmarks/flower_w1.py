"""Workload W1 under Flower's simulation engine: the baseline fedhet's simulator is compared with.

One FedAvg round over N IID clients of Fashion-MNIST (60,000 training samples), every client training one local
epoch with SGD (lr 0.01, batch 32), all clients every round; the FedAvg CNN or 2NN. Flower runs every client as a
ClientApp call on its Ray actors; ``--num-cpus`` sets the CPUs per client actor (Flower's default is 2, so one
actor on a 2-core machine). Prints one JSON line: round seconds (from the ServerApp's round-0 evaluation hook to
its round-1 hook, which excludes starting Ray), peak memory of the whole process tree (proportional set size, so
the object store shared by the actors counts once) and the accuracy after the round.

Needs ``flwr[simulation]`` (an optional benchmark extra; see docs/scale.md for an environment of its own)::

    python benchmarks/flower_w1.py --model cnn --clients 1000 --num-cpus 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedhet.data import load_fashion_mnist
from fedhet.data.partition import iid
from fedhet.models import build_model

LR = 0.01
BATCH = 32


def _cache() -> dict[Any, Any]:
    """A per-process cache. Ray ships the ClientApp's functions by value, module globals included, so a cache in
    this module's globals would start empty on every call; one registered in ``sys.modules`` lives as long as
    the actor process, as a Flower app's module-level data cache does."""
    module = sys.modules.setdefault("_fedhet_flower_w1_cache", types.ModuleType("_fedhet_flower_w1_cache"))
    cache: dict[Any, Any] = module.__dict__.setdefault("cache", {})
    return cache


def _dataset() -> Any:
    """Fashion-MNIST, loaded once per process (each Ray actor loads its own copy, as a Flower app would)."""
    cache = _cache()
    if "data" not in cache:
        cache["data"] = load_fashion_mnist()
    return cache["data"]


def _partition(num_clients: int, pid: int) -> torch.Tensor:
    """Client ``pid``'s IID shard, as fedhet's benchmark draws it."""
    cache = _cache()
    if ("parts", num_clients) not in cache:
        cache["parts", num_clients] = iid(_dataset().y_train.numpy(), num_clients, 0)
    return torch.from_numpy(cache["parts", num_clients][pid])


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> float:
    """One local epoch of plain SGD; returns the mean loss."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    model.train()
    total = 0.0
    steps = 0
    for i in range(0, len(x), BATCH):
        idx = order[i : i + BATCH]
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        optimizer.step()
        total += float(loss)
        steps += 1
    return total / max(steps, 1)


def _tree_pss_bytes(root: int) -> int:
    """Proportional set size of ``root`` and all its descendants (Ray's raylet, workers and actors)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


class _PeakMemory:
    """Samples the process tree's PSS every ``interval`` seconds in a background thread."""

    def __init__(self, interval: float = 0.5) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(interval,), daemon=True)

    def _loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.peak = max(self.peak, _tree_pss_bytes(os.getpid()))

    def __enter__(self) -> _PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def flower_round(model_name: str, num_clients: int, num_cpus: float | None) -> dict[str, Any]:
    """Run one W1 round under Flower's simulation engine; ``num_cpus`` None keeps Flower's default."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    data = _dataset()
    shape = tuple(data.x_train.shape[1:])
    marks: dict[str, float] = {}
    accuracy: dict[str, float] = {}
    client_app = ClientApp()

    @client_app.train()  # type: ignore[untyped-decorator]
    def train(msg: Message, context: Context) -> Message:
        ds = _dataset()
        pid = int(context.node_config["partition-id"])
        idx = _partition(num_clients, pid)
        model = build_model(model_name, shape, 10, 0)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        loss = _train(model, ds.x_train[idx], ds.y_train[idx], pid)
        content = RecordDict(
            {
                "arrays": ArrayRecord(model.state_dict()),
                "metrics": MetricRecord({"train_loss": loss, "num-examples": len(idx)}),
            }
        )
        return Message(content=content, reply_to=msg)

    server_app = ServerApp()

    @server_app.main()  # type: ignore[untyped-decorator]
    def main(grid: Grid, context: Context) -> None:
        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            marks[f"round{server_round}"] = time.perf_counter()
            if server_round == 1:
                model = build_model(model_name, shape, 10, 0)
                model.load_state_dict(arrays.to_torch_state_dict())
                model.eval()
                with torch.no_grad():
                    accuracy["value"] = float((model(data.x_test).argmax(1) == data.y_test).float().mean())
            return MetricRecord({})

        strategy = FedAvg(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=num_clients,
            min_available_nodes=num_clients,
        )
        initial = ArrayRecord(build_model(model_name, shape, 10, 0).state_dict())
        strategy.start(grid, initial, num_rounds=1, train_config=ConfigRecord({"lr": LR}), evaluate_fn=evaluate)

    backend: dict[str, Any] = {"init_args": {"logging_level": "ERROR", "log_to_driver": False}}
    if num_cpus is not None:
        backend["client_resources"] = {"num_cpus": num_cpus, "num_gpus": 0.0}
    start = time.perf_counter()
    with _PeakMemory() as memory:
        run_simulation(server_app, client_app, num_supernodes=num_clients, backend_config=backend)
    return {
        "system": "flower",
        "model": model_name,
        "clients": num_clients,
        "num_cpus": "default" if num_cpus is None else num_cpus,
        "seconds": marks["round1"] - marks["round0"],
        "total_seconds": time.perf_counter() - start,
        "peak_mib": memory.peak / 2**20,
        "accuracy": accuracy.get("value", float("nan")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cnn", choices=["cnn", "2nn"])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--num-cpus", default="default", help="CPUs per client actor, or 'default' (Flower's)")
    args = parser.parse_args()
    num_cpus = None if args.num_cpus == "default" else float(args.num_cpus)
    np.seterr(all="ignore")
    print(json.dumps(flower_round(args.model, args.clients, num_cpus)), flush=True)


if __name__ == "__main__":
    main()
