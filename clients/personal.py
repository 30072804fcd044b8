"""Personalised accuracy of one client: the global shared layers with its own head, fine-tuned on its data.

FedP3's metric (and the fair one for any strategy whose clients keep a head): freeze the shared layers at the
global model's values, fine-tune the head (the model's last layer, a Linear) for ``epochs`` epochs of SGD on the
client's training split, starting from the client's own head (the global head for a client that keeps none), and
measure accuracy on the client's held-out split. Fine-tuning works on copies, so measuring never alters what the
client keeps.

With the shared layers frozen the head sees fixed features, so they are computed once (one forward pass) and the
fine-tuning is a small linear problem. A deployed client measures itself with :func:`personal_accuracy` when a
task arrives; the simulator computes the features of every client in one pass and scores each with the same
:func:`fine_tune_head` and :func:`head_accuracy`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedhet.clients.trainer import minibatches, task_seed
from fedhet.types import Weights

__all__ = [
    "FineTune",
    "PersonalProbe",
    "fine_tune_head",
    "head_accuracy",
    "head_features",
    "head_of",
    "personal_accuracy",
]


@dataclass(frozen=True)
class FineTune:
    """How a head is fine-tuned before scoring: SGD ``epochs`` (0: score the head as it is), ``lr``, minibatch
    ``batch_size`` (samples)."""

    epochs: int = 5
    lr: float = 0.01
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"fine-tuning epochs must be >= 0, got {self.epochs}")
        if not self.lr > 0 or self.batch_size < 1:
            raise ValueError(f"fine-tuning needs lr > 0 and batch_size >= 1, got {self.lr} and {self.batch_size}")


def head_of(model: nn.Module) -> tuple[str, nn.Linear]:
    """The name and module of ``model``'s head, its last module; raises ValueError unless it is a Linear."""
    name = [n for n, _ in model.named_modules()][-1]
    head = model.get_submodule(name)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"personalised evaluation needs a Linear last layer, got {type(head).__name__}")
    return name, head


@torch.no_grad()
def head_features(model: nn.Module, head: nn.Module, x: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    """The head's input for every sample of ``x``, from ``model``'s layers as loaded."""
    captured: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    try:
        model.eval()
        for start in range(0, len(x), batch):
            model(x[start : start + batch])
    finally:
        hook.remove()
    return torch.cat(captured) if captured else torch.empty(0)


def fine_tune_head(
    w: torch.Tensor,
    b: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    tune: FineTune,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of the head ``(w, b)`` after ``tune`` on ``(features, labels)``."""
    if tune.epochs == 0 or len(features) == 0:
        return w, b
    w, b = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    optimizer = torch.optim.SGD([w, b], lr=tune.lr)
    steps = tune.epochs * -(-len(features) // tune.batch_size)
    for idx in minibatches(len(features), tune.batch_size, steps, generator):
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(F.cross_entropy(features[idx] @ w.T + b, labels[idx]))
        optimizer.step()
    return w.detach(), b.detach()


@torch.no_grad()
def head_accuracy(w: torch.Tensor, b: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy in [0, 1] of the head ``(w, b)`` on ``(features, labels)``."""
    return float(((features @ w.T + b).argmax(1) == labels).float().mean())


def personal_accuracy(
    model: nn.Module,
    weights: Weights,
    own: Mapping[str, torch.Tensor],
    train: tuple[torch.Tensor, torch.Tensor],
    held: tuple[torch.Tensor, torch.Tensor],
    tune: FineTune,
    seed: int,
) -> float:
    """One client's personalised accuracy (see the module docstring): ``weights`` are the global model's tensors
    (any it lacks are the client's ``own``), ``train`` and ``held`` the client's (x, y) splits. ``model`` is an
    instance of the run's architecture; its weights are overwritten."""
    name, head = head_of(model)
    model.load_state_dict({**weights, **own}, strict=False)
    keys = (f"{name}.weight", f"{name}.bias")
    if not all(k in own or k in weights for k in keys):
        raise ValueError(f"the model's head {name!r} is neither in the global weights nor the client's own tensors")
    w, b = ((own[k] if k in own else weights[k]).to(torch.float32) for k in keys)
    features = head_features(model, head, torch.cat([train[0], held[0]]))
    generator = torch.Generator().manual_seed(seed)
    w, b = fine_tune_head(w, b, features[: len(train[0])], train[1], tune, generator)
    return head_accuracy(w, b, features[len(train[0]) :], held[1])


class PersonalProbe:
    """A deployed client's measurement of itself: :func:`personal_accuracy` of a task's weights with the client's
    own tensors, on its local splits.

    Args:
        model: an instance of the run's architecture, used only for measuring (its weights are overwritten).
        train, held: the client's (x, y) training and held-out splits.
        tune: how the head is fine-tuned first.
        seed: with the task id, the fine-tuning's minibatch order.
    """

    def __init__(
        self,
        model: nn.Module,
        train: tuple[torch.Tensor, torch.Tensor],
        held: tuple[torch.Tensor, torch.Tensor],
        tune: FineTune,
        seed: int,
    ) -> None:
        head_of(model)  # a model without a Linear head cannot be measured: fail at start, not at a task
        if len(held[0]) == 0:
            raise ValueError("personalised accuracy needs held-out samples: set dataset.partition.test_fraction > 0")
        self.model, self.train, self.held, self.tune, self.seed = model, train, held, tune, seed

    def __call__(self, weights: Weights, own: Mapping[str, torch.Tensor], task_id: int) -> float:
        """The accuracy in [0, 1] of ``weights`` (a task's) completed by ``own``, the client's kept tensors."""
        return personal_accuracy(
            self.model, weights, own, self.train, self.held, self.tune, task_seed(self.seed, task_id)
        )
