"""The Ray executor: client tasks computed by workers on a Ray cluster, so one simulation can use several machines.

Each worker is a Ray actor holding the training data (shipped once through Ray's object store), a copy of the
model and a :class:`~fedhet.sim.vectorized.VectorizedExecutor` (which itself falls back to the sequential trainer
for what it cannot batch). :meth:`RayExecutor.run` splits the tasks it receives into even runs of consecutive
tasks, one per worker, and returns their results in task order; a result depends only on (start weights, client
data, task, seed), so it does not matter which worker computes it. The simulator hands tasks over soonest arrival
first, so each worker's chunk holds results that arrive together.

With ``address=""`` a local cluster is started on this machine (and shut down by :meth:`RayExecutor.close`).
To use several machines, start Ray on them first (``ray start --head`` on one, ``ray start --address=HEAD:6379``
on the others, each with fedhet installed in the same version) and pass ``address="auto"`` when the simulation
runs on a cluster node, or ``ray://HEAD:10001`` from outside it. ``docs/scale.md`` has the walk-through.

Ray is an optional dependency: ``pip install 'fedhet[ray]'``.
"""

from __future__ import annotations

import copy
import importlib
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from fedhet.clients.trainer import LocalTrainer, TrainConfig
from fedhet.sim.vectorized import VectorizedExecutor
from fedhet.types import Result, Task

__all__ = ["RayExecutor"]

log = logging.getLogger(__name__)


class _Worker:
    """One Ray actor: a model, the data and a vectorized executor."""

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        x: np.ndarray,
        y: np.ndarray,
        shards: Mapping[int, np.ndarray],
        seed: int,
        precision: str,
        threads: int,
        quantized: Any,
        bitwidths: Mapping[int, int] | None,
    ) -> None:
        torch.set_num_threads(threads)
        with warnings.catch_warnings():  # object-store arrays are read-only; training never writes its inputs
            warnings.simplefilter("ignore", UserWarning)
            xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        self.executor = VectorizedExecutor(
            LocalTrainer(model, config), xt, yt, shards, seed, precision, quantized=quantized, bitwidths=bitwidths
        )

    def batch_size(self) -> int:
        return self.executor.batch_size

    def counts(self) -> tuple[int, int]:
        """(tasks vectorized, tasks that fell back to the sequential trainer) so far."""
        return self.executor.vectorized_tasks, self.executor.fallback_tasks

    def run(self, tasks: Sequence[Task]) -> list[Result]:
        # vectorized results are views into one stacked tensor; pickling a view would ship the whole stack
        return [replace(r, weights={k: v.clone() for k, v in r.weights.items()}) for r in self.executor.run(tasks)]


class RayExecutor:
    """Computes tasks on the workers of a Ray cluster; see the module docstring.

    Args:
        trainer: the model (architecture and initial values, shipped to every worker) and optimiser settings.
        x, y: all training inputs and labels (CPU); ``shards`` maps a client id to its indices into them.
        seed: the run seed (with the task id it fixes a task's minibatch order).
        address: the Ray cluster to join (``auto``, ``ray://host:10001``); empty starts a local one.
        workers: number of worker actors; 0 = one per ``threads`` CPUs of the cluster.
        threads: CPU cores (and torch threads) per worker.
        precision: ``fp32`` or ``bf16``, as for :class:`~fedhet.sim.vectorized.VectorizedExecutor`.
        quantized, bitwidths: clients below 32 bits and their trainer, as for the vectorized executor.
    """

    device = torch.device("cpu")  # results come back from the workers as CPU tensors

    def __init__(
        self,
        trainer: LocalTrainer,
        x: torch.Tensor,
        y: torch.Tensor,
        shards: Mapping[int, np.ndarray],
        seed: int,
        address: str = "",
        workers: int = 0,
        threads: int = 1,
        precision: str = "fp32",
        quantized: Any = None,
        bitwidths: Mapping[int, int] | None = None,
    ) -> None:
        try:
            ray: Any = importlib.import_module("ray")
        except ImportError:
            raise ImportError("the Ray executor needs Ray: pip install 'fedhet[ray]'") from None
        if workers < 0 or threads < 1:
            raise ValueError(f"workers must be >= 0 and threads >= 1, got {workers} and {threads}")
        self._ray = ray
        self._owns_cluster = not ray.is_initialized()
        if self._owns_cluster:
            ray.init(address=address or None, include_dashboard=False, configure_logging=False, log_to_driver=False)
        if workers == 0:
            workers = max(1, int(ray.cluster_resources().get("CPU", 1) // threads))
        model = copy.deepcopy(trainer.model).cpu()  # the caller's trainer keeps its device
        data = (ray.put(x.cpu().numpy()), ray.put(y.cpu().numpy()), ray.put(dict(shards)))
        actor = ray.remote(num_cpus=threads)(_Worker)
        self.workers: list[Any] = [
            actor.remote(model, trainer.config, *data, seed, precision, threads, quantized, bitwidths)
            for _ in range(workers)
        ]
        per_worker = int(ray.get(self.workers[0].batch_size.remote()))
        self.batch_size = per_worker * len(self.workers)
        log.info("ray executor: %d workers of %d CPUs, %d tasks per worker call", workers, threads, per_worker)

    def run(self, tasks: Sequence[Task]) -> list[Result]:
        """Results of ``tasks`` in their order, computed on the workers in parallel."""
        parts = [list(p) for p in np.array_split(np.arange(len(tasks)), len(self.workers)) if len(p)]
        futures = [w.run.remote([tasks[i] for i in p]) for w, p in zip(self.workers, parts, strict=False)]
        results: list[Result | None] = [None] * len(tasks)
        for part, done in zip(parts, self._ray.get(futures), strict=True):
            for i, result in zip(part, done, strict=True):
                results[i] = result
        return [r for r in results if r is not None]

    def counts(self) -> tuple[int, int]:
        """(tasks vectorized, tasks run sequentially) over all workers so far."""
        pairs = self._ray.get([w.counts.remote() for w in self.workers])
        return sum(p[0] for p in pairs), sum(p[1] for p in pairs)

    def close(self) -> None:
        """Stop the workers, and the local cluster if this executor started it."""
        for worker in self.workers:
            self._ray.kill(worker)
        self.workers = []
        if self._owns_cluster:
            self._ray.shutdown()

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
