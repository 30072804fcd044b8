"""FedOpt's adaptive server optimizers: FedAdagrad, FedAdam and FedYogi (Reddi et al., "Adaptive Federated
Optimization", ICLR 2021, Algorithm 2).

The clients' sample-weighted mean ``x_bar`` of a round's updates gives the pseudo-gradient ``Delta = x_bar - x``
(the direction the clients moved the global model ``x``), and the server takes one step of an adaptive optimizer
along it, per coordinate:

- ``m <- beta1 * m + (1 - beta1) * Delta``
- FedAdagrad: ``v <- v + Delta^2``
- FedAdam:    ``v <- beta2 * v + (1 - beta2) * Delta^2``
- FedYogi:    ``v <- v - (1 - beta2) * Delta^2 * sign(v - Delta^2)``
- ``x <- x + eta * m / (sqrt(v) + tau)``

with ``m`` starting at 0 and ``v`` at ``tau^2`` (the algorithm asks for ``v_{-1} >= tau^2``). The paper fixes
``beta1 = 0.9``, ``beta2 = 0.99`` and tunes ``eta`` and ``tau`` per task; ``tau = 1e-3`` is its recommended default.
With ``beta1 = 0``, FedAdagrad with a huge ``tau`` and ``eta = 2 tau`` is plain FedAvg (``x <- x_bar``).

Each tensor moves by the updates that carried it (FedP3 clients send back only their layers): a tensor no update
carried keeps its value and its moments. Integer tensors (counters) take the mean of their contributors, as
:class:`~fedhet.strategies.aggregators.WeightedMean` does. The moments are kept in float32 on the model's device
and replaced, never changed in place, so a failed event leaves them as they were.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from fedhet.strategies.aggregators import WeightedMean
from fedhet.strategies.buffer import UpdateBuffer
from fedhet.strategies.errors import StateError
from fedhet.types import Weights

__all__ = ["FedAdagrad", "FedAdam", "FedYogi", "ServerOptimizer"]


class ServerOptimizer:
    """An adaptive server optimizer on the round's pseudo-gradient (see the module docstring); subclasses name the
    second-moment rule.

    Args:
        eta: the server learning rate, > 0.
        beta1: first-moment decay in [0, 1).
        beta2: second-moment decay in [0, 1) (unused by FedAdagrad).
        tau: adaptivity (how far ``sqrt(v)`` is from dividing by zero), > 0.
    """

    rule: ClassVar[str]

    def __init__(self, eta: float, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        for name, value in (("eta", eta), ("tau", tau)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be finite and > 0, got {value}")
        for name, value in (("beta1", beta1), ("beta2", beta2)):
            if not (math.isfinite(value) and 0 <= value < 1):
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        self.eta, self.beta1, self.beta2, self.tau = eta, beta1, beta2, tau
        self.first: dict[str, torch.Tensor] = {}  # m, per floating-point tensor that has moved
        self.second: dict[str, torch.Tensor] = {}  # v

    def aggregate(self, global_weights: Weights, updates: UpdateBuffer, version: int) -> dict[str, torch.Tensor]:
        carried = {name for _, bucket in updates.items() for name in bucket.weighted_sum}
        mean = WeightedMean().aggregate(global_weights, updates, version)
        out: dict[str, torch.Tensor] = {}
        first, second = dict(self.first), dict(self.second)
        for name, current in global_weights.items():
            if name not in carried or not current.is_floating_point():
                out[name] = mean[name]
                continue
            x = current.to(torch.float32)
            delta = mean[name].to(torch.float32) - x
            m = first.get(name, torch.zeros_like(x))
            v = second.get(name, torch.full_like(x, self.tau**2))
            first[name] = self.beta1 * m + (1 - self.beta1) * delta
            second[name] = self._second_moment(v, delta * delta)
            out[name] = (x + self.eta * first[name] / (second[name].sqrt() + self.tau)).to(current.dtype)
        self.first, self.second = first, second
        return out

    def _second_moment(self, v: torch.Tensor, square: torch.Tensor) -> torch.Tensor:
        if self.rule == "adagrad":
            return v + square
        if self.rule == "adam":
            return self.beta2 * v + (1 - self.beta2) * square
        return v - (1 - self.beta2) * square * torch.sign(v - square)  # yogi

    def state_dict(self) -> dict[str, Any]:
        return {"first": dict(self.first), "second": dict(self.second)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if set(state) != {"first", "second"}:
            raise StateError(f"{type(self).__name__} state keys {sorted(state)} differ from ['first', 'second']")
        first, second = state["first"], state["second"]
        if not all(isinstance(m, Mapping) for m in (first, second)) or set(first) != set(second):
            raise StateError(f"{type(self).__name__} state: its moments do not name the same tensors")
        for name, m in first.items():
            v = second[name]
            if not (isinstance(m, torch.Tensor) and isinstance(v, torch.Tensor) and m.shape == v.shape):
                raise StateError(f"{type(self).__name__} state: the moments of {name!r} are not tensors of one shape")
            if not (bool(torch.isfinite(m).all()) and bool(torch.isfinite(v).all()) and bool((v >= 0).all())):
                raise StateError(f"{type(self).__name__} state: the moments of {name!r} are not finite and v >= 0")
        self.first = {str(k): t.to(torch.float32) for k, t in first.items()}
        self.second = {str(k): t.to(torch.float32) for k, t in second.items()}


class FedAdagrad(ServerOptimizer):
    """FedAdagrad: ``v <- v + Delta^2``. The default ``eta`` is the paper's tuned rate for CIFAR-10
    (10^-1); it tunes ``eta`` per task."""

    rule = "adagrad"

    def __init__(self, eta: float = 0.1, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        super().__init__(eta, beta1, beta2, tau)


class FedAdam(ServerOptimizer):
    """FedAdam: ``v <- beta2 v + (1 - beta2) Delta^2``. The default ``eta`` is the paper's tuned rate for
    CIFAR-10 (10^-2); it tunes ``eta`` per task."""

    rule = "adam"

    def __init__(self, eta: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        super().__init__(eta, beta1, beta2, tau)


class FedYogi(ServerOptimizer):
    """FedYogi: ``v <- v - (1 - beta2) Delta^2 sign(v - Delta^2)``. The default ``eta`` is the paper's tuned
    rate for CIFAR-10 (10^-2); it tunes ``eta`` per task."""

    rule = "yogi"

    def __init__(self, eta: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        super().__init__(eta, beta1, beta2, tau)
