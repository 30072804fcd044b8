"""Personalised accuracy: each client's model is the global shared layers with its own head, fine-tuned on its data.

FedP3's metric (and the fair one for any strategy whose clients keep a head): for every client, freeze the shared
layers at the global model's values, fine-tune the head (the model's last layer, a Linear) for ``epochs`` epochs of
SGD on the client's training split, starting from the client's own head (the one it kept between tasks; the
global head for a client that keeps none, as under FedAvg), and measure accuracy on the client's held-out split.
The reported value is the mean over clients with a held-out split. Fine-tuning works on a copy: the clients' kept
heads are not changed, so measuring never alters the run.

With the shared layers frozen the head sees fixed features, so the features are computed once per evaluation (one
forward pass over the clients' samples) and the fine-tuning is a small linear problem per client.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedhet.clients.trainer import ClientStates, minibatches, task_seed
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
        if epochs < 0:
            raise ValueError(f"fine-tuning epochs must be >= 0, got {epochs}")
        self.model = model
        self.head_name = [name for name, _ in model.named_modules()][-1]
        self.head = model.get_submodule(self.head_name)
        if not isinstance(self.head, nn.Linear):
            raise ValueError(f"personalised evaluation needs a Linear last layer, got {type(self.head).__name__}")
        self.x, self.y = x, y
        self.splits = {c: (torch.from_numpy(t), torch.from_numpy(h)) for c, (t, h) in splits.items() if len(h)}
        self.states = states
        self.epochs, self.lr, self.batch_size, self.seed = epochs, lr, batch_size, seed
        self.evaluations = 0

    def __call__(self, weights: Weights) -> dict[str, float]:
        """``{"personal_accuracy": mean over clients}`` for the global model ``weights``."""
        self.model.load_state_dict(weights)
        features = self._features()
        keys = (f"{self.head_name}.weight", f"{self.head_name}.bias")
        accuracies = []
        for client, (train, held) in sorted(self.splits.items()):
            own = self.states.own_tensors(client)
            w, b = (own.get(k, weights[k]).to(features.device, torch.float32) for k in keys)
            w, b = self._fine_tune(client, w, b, features[train], self.y[train])
            with torch.no_grad():
                predicted = (features[held] @ w.T + b).argmax(1)
            accuracies.append(float((predicted == self.y[held]).float().mean()))
        self.evaluations += 1
        return {"personal_accuracy": float(np.mean(accuracies)) if accuracies else float("nan")}

    def _features(self) -> torch.Tensor:
        """The head's input for every sample, from the shared layers as loaded."""
        captured: list[torch.Tensor] = []
        hook = self.head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
        try:
            self.model.eval()
            with torch.no_grad():
                for start in range(0, len(self.x), 4096):
                    self.model(self.x[start : start + 4096])
        finally:
            hook.remove()
        return torch.cat(captured)

    def _fine_tune(
        self, client: int, w: torch.Tensor, b: torch.Tensor, features: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.epochs == 0 or len(features) == 0:
            return w, b
        w, b = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
        optimizer = torch.optim.SGD([w, b], lr=self.lr)
        steps = self.epochs * -(-len(features) // self.batch_size)
        generator = torch.Generator().manual_seed(task_seed(self.seed, (client << 20) + self.evaluations))
        for idx in minibatches(len(features), self.batch_size, steps, generator):
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(F.cross_entropy(features[idx] @ w.T + b, labels[idx]))
            optimizer.step()
        return w.detach(), b.detach()
