"""Executors compute tasks' results. A result depends only on (start weights, client data, task, seed), so an
executor may compute tasks in any order or all at once; the simulator delivers them at their virtual times."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
import torch

from fedhet import quant
from fedhet.clients.quantized import QuantizedTrainer
from fedhet.clients.trainer import ClientStates, ClientTrainer, LocalTrainer
from fedhet.types import Result, Task

__all__ = ["Executor", "SequentialExecutor"]


class Executor(Protocol):
    """Computes results for tasks. ``batch_size`` is how many tasks it prefers to receive at once; ``device`` is
    where its results' weights live (the simulator keeps the global model there, so aggregation never copies a
    result between devices). The simulator hands tasks over soonest arrival first: an executor that computes them in
    groups groups consecutive tasks, so that a group's results are delivered together."""

    batch_size: int
    device: torch.device

    def run(self, tasks: Sequence[Task]) -> list[Result]: ...


class SequentialExecutor:
    """One task after another on one shared model instance: memory stays at one model, whatever the fleet.

    Each client trains with the :class:`~fedhet.clients.trainer.ClientTrainer` at its bitwidth, the trainer that
    ``fedhet client`` uses: a client of ``b < 32`` bits trains with quantization-aware training at ``b`` bits
    (``quantized``, one more model instance shared by every such client, holding no fp32 weights between tasks);
    fp32 clients train with ``trainer``, exactly as without a quantized trainer.

    Args:
        trainer: trains fp32 clients.
        x, y: every client's samples; ``shards`` maps a client id to its indices into them.
        seed: the run seed (minibatch order).
        quantized: trains clients below 32 bits; needed when ``bitwidths`` names any.
        bitwidths: each client's bitwidth (its profile's); a client not listed is fp32.
        states: what each client keeps between tasks (FedP3's personal head, a DP accountant); by default a fresh
            store whose own tensors start from the trainer's model as it is now (the initial global model).
    """

    batch_size = 1
    device = torch.device("cpu")  # the trainer hands back CPU copies

    def __init__(
        self,
        trainer: LocalTrainer,
        x: torch.Tensor,
        y: torch.Tensor,
        shards: Mapping[int, np.ndarray],
        seed: int,
        quantized: QuantizedTrainer | None = None,
        bitwidths: Mapping[int, int] | None = None,
        states: ClientStates | None = None,
    ) -> None:
        self.trainer = ClientTrainer(trainer, quantized)
        self.states = states if states is not None else ClientStates(trainer.model.state_dict())
        self.x = x
        self.y = y
        self.shards = shards
        self.seed = seed
        self.bitwidths = dict(bitwidths or {})
        self.trainer.check(self.bitwidths.values())

    def run(self, tasks: Sequence[Task]) -> list[Result]:
        results = []
        for task in tasks:
            idx = torch.from_numpy(self.shards[task.client_id])
            bits = self.bitwidths.get(task.client_id, quant.FULL_PRECISION)
            state = self.states.get(task.client_id, task)
            results.append(self.trainer.train(task, self.x[idx], self.y[idx], self.seed, bits, state))
        return results
