"""Personalised accuracy of every simulated client, as :mod:`fedhet.clients.personal` defines it for one client:
the features of all clients' samples come from one forward pass, then each client's head is fine-tuned and scored
with the same functions a deployed client uses. The reported value is the mean over clients with a held-out split;
the clients' kept heads are read, never written, so measuring never alters the run.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from fedhet.clients.personal import FineTune, fine_tune_head, head_accuracy, head_features, head_of
from fedhet.clients.trainer import ClientStates, task_seed
from fedhet.types import Weights

__all__ = ["PersonalEvaluator"]


class PersonalEvaluator:
    """Mean personalised accuracy over clients (see the module docstring).

    Args:
        model: an instance of the run's architecture (its weights are overwritten); its last layer is the head.
        x, y: the clients' samples; ``splits[c]`` are client ``c``'s (train, held-out) indices into them.
        states: the clients' kept tensors (their heads), read, never written.
        epochs: fine-tuning epochs (0: evaluate the client's head as it is).
        lr, batch_size: SGD settings of the fine-tuning.
        seed: minibatch order.
    """

    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        splits: Mapping[int, tuple[np.ndarray, np.ndarray]],
        states: ClientStates,
        epochs: int = 5,
        lr: float = 0.01,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        self.tune = FineTune(epochs, lr, batch_size)
        self.model = model
        self.head_name, self.head = head_of(model)
        self.x, self.y = x, y
        self.splits = {c: (torch.from_numpy(t), torch.from_numpy(h)) for c, (t, h) in splits.items() if len(h)}
        self.states = states
        self.seed = seed
        self.evaluations = 0

    def __call__(self, weights: Weights) -> dict[str, float]:
        """``{"personal_accuracy": mean over clients}`` for the global model ``weights``."""
        self.model.load_state_dict(weights)
        features = head_features(self.model, self.head, self.x)
        keys = (f"{self.head_name}.weight", f"{self.head_name}.bias")
        accuracies = []
        for client, (train, held) in sorted(self.splits.items()):
            own = self.states.own_tensors(client)
            w, b = (own.get(k, weights[k]).to(features.device, torch.float32) for k in keys)
            generator = torch.Generator().manual_seed(task_seed(self.seed, (client << 20) + self.evaluations))
            w, b = fine_tune_head(w, b, features[train], self.y[train], self.tune, generator)
            accuracies.append(head_accuracy(w, b, features[held], self.y[held]))
        self.evaluations += 1
        return {"personal_accuracy": float(np.mean(accuracies)) if accuracies else float("nan")}
