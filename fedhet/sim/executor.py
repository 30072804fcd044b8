"""Executors compute tasks' results. A result depends only on (start weights, client data, task, seed), so an
executor may compute tasks in any order or all at once; the simulator delivers them at their virtual times."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
import torch

from fedhet.clients.trainer import LocalTrainer
from fedhet.types import Result, Task

__all__ = ["Executor", "SequentialExecutor"]


class Executor(Protocol):
    """Computes results for tasks. ``batch_size`` is how many tasks it prefers to receive at once."""

    batch_size: int

    def run(self, tasks: Sequence[Task]) -> list[Result]: ...


class SequentialExecutor:
    """One task after another on one shared model instance: memory stays at one model, whatever the fleet."""

    batch_size = 1

    def __init__(
        self,
        trainer: LocalTrainer,
        x: torch.Tensor,
        y: torch.Tensor,
        shards: Mapping[int, np.ndarray],
        seed: int,
    ) -> None:
        self.trainer = trainer
        self.x = x
        self.y = y
        self.shards = shards
        self.seed = seed

    def run(self, tasks: Sequence[Task]) -> list[Result]:
        results = []
        for task in tasks:
            idx = torch.from_numpy(self.shards[task.client_id])
            results.append(self.trainer.train(task, self.x[idx], self.y[idx], self.seed))
        return results
