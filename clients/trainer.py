"""Local training: what one client does with a task."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedhet.types import Result, Task

__all__ = ["LocalTrainer", "TrainConfig"]


@dataclass(frozen=True)
class TrainConfig:
    """Local optimiser settings.

    Attributes:
        lr: SGD learning rate (> 0).
        batch_size: samples per minibatch.
        momentum: SGD momentum in [0, 1).
        weight_decay: L2 penalty (>= 0).
    """

    lr: float = 0.05
    batch_size: int = 32
    momentum: float = 0.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"client.lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ValueError(f"client.batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"client.momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"client.weight_decay must be >= 0, got {self.weight_decay}")


class LocalTrainer:
    """Local SGD from a task's weights on one client's samples.

    One trainer (and one model instance) serves any number of clients in turn: it holds no client state between
    tasks, so memory does not grow with the number of clients.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.config = config
        self.loss_fn = nn.CrossEntropyLoss()

    def train(self, task: Task, x: torch.Tensor, y: torch.Tensor, seed: int) -> Result:
        """Run ``task`` on samples ``(x, y)``; minibatch order is drawn from ``seed`` and the task id, so the
        result depends only on (start weights, data, task, seed)."""
        if len(x) == 0 or len(x) != len(y):
            raise ValueError(f"task {task.task_id}: client {task.client_id} has {len(x)} inputs and {len(y)} labels")
        start = time.perf_counter()
        self.model.load_state_dict(task.weights)
        self.model.train()
        cfg = self.config
        optimizer = torch.optim.SGD(
            self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        generator = torch.Generator().manual_seed(_task_seed(seed, task.task_id))
        steps = task.steps_for(len(x), cfg.batch_size)
        batches = _minibatches(len(x), cfg.batch_size, steps, generator)
        total_loss = torch.zeros((), device=self.device)
        for idx in batches:
            xb = x[idx].to(self.device, non_blocking=True)
            yb = y[idx].to(self.device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            loss = self.loss_fn(self.model(xb), yb)
            loss.backward()
            optimizer.step()
            total_loss += loss.detach()
        weights = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        return Result(
            task_id=task.task_id,
            client_id=task.client_id,
            version=task.version,
            weights=weights,
            num_samples=len(x),
            local_steps=steps,
            train_seconds=time.perf_counter() - start,
            loss=float(total_loss) / steps,
        )


def _task_seed(seed: int, task_id: int) -> int:
    """A 64-bit seed mixing both numbers (torch's CPU generator would ignore high bits of a plain combination)."""
    return int(np.random.SeedSequence([seed, task_id]).generate_state(1, np.uint64)[0])


def _minibatches(num_samples: int, batch_size: int, steps: int, generator: torch.Generator) -> list[torch.Tensor]:
    """``steps`` minibatch index tensors, walking through fresh permutations epoch after epoch."""
    out: list[torch.Tensor] = []
    while len(out) < steps:
        order = torch.randperm(num_samples, generator=generator)
        out.extend(order[i : i + batch_size] for i in range(0, num_samples, batch_size))
    return out[:steps]
