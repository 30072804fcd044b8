"""Small builders shared by the tests."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedhet.types import ClientInfo, ClientProfile, Result, Task


def client(
    client_id: int,
    num_samples: int = 10,
    seconds_per_sample: float = 0.01,
    bandwidth: float = 1e6,
    availability: float = 1.0,
) -> ClientInfo:
    return ClientInfo(client_id, ClientProfile(seconds_per_sample, bandwidth, availability=availability), num_samples)


def weights(*values: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values, dtype=torch.float32), "count": torch.tensor(0, dtype=torch.int64)}


def result_for(task: Task, value: float, num_samples: int, count: int = 0) -> Result:
    """A result whose weights are ``value`` everywhere (and ``count`` in the integer counter)."""
    w = {
        k: torch.full_like(v, value) if v.is_floating_point() else torch.tensor(count) for k, v in task.weights.items()
    }
    return Result(task.task_id, task.client_id, task.version, w, num_samples, task.local_steps or 1, 0.0, 0.0)


class EchoExecutor:
    """Returns ``start + client_id + 1`` without training: makes runs checkable by hand."""

    batch_size = 1
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.ran: list[int] = []

    def run(self, tasks: Sequence[Task]) -> list[Result]:
        self.ran += [t.task_id for t in tasks]
        return [
            Result(
                t.task_id,
                t.client_id,
                t.version,
                {k: v + t.client_id + 1 if v.is_floating_point() else v for k, v in t.weights.items()},
                10,
                3,
                0.0,
                0.0,
            )
            for t in tasks
        ]
