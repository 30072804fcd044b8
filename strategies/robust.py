"""Byzantine-robust aggregation: the coordinate-wise median and trimmed mean (Yin et al., "Byzantine-Robust
Distributed Learning: Towards Optimal Statistical Rates", ICML 2018) and Krum / Multi-Krum (Blanchard et al.,
"Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017).

Each looks at every update of the round apart, so the scheduler's buffer keeps them (``needs_updates``: the strategy
builder tells the scheduler; memory is (updates in the round) x (model)). The rules are the papers': unweighted,
whatever the updates' sample counts (a weight is what an attacker would inflate). Every tensor is aggregated over the
updates that carried it (FedP3 clients send back only their layers); a tensor no update carried keeps its value.
Integer tensors (counters) take the same rule, rounded down.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from fedhet.strategies.buffer import UpdateBuffer
from fedhet.strategies.errors import StateError
from fedhet.types import Weights

__all__ = ["CoordinateMedian", "Krum", "TrimmedMean", "kept_updates"]


def kept_updates(updates: UpdateBuffer) -> list[Mapping[str, torch.Tensor]]:
    """The tensors of every update in ``updates``, which must keep them apart."""
    if not updates.keep_updates:
        raise ValueError("this aggregator needs every update apart, but the scheduler's buffer folds them together")
    return [u for _, bucket in updates.items() for u, _ in bucket.updates]


def _per_tensor(global_weights: Weights, members: list[Mapping[str, torch.Tensor]], rule: Any) -> dict[str, Any]:
    """``rule(sorted values, dim 0)`` for each tensor, over the updates that carried it."""
    out: dict[str, torch.Tensor] = {}
    for name, current in global_weights.items():
        values = [u[name].to(current.device) for u in members if name in u]
        if not values:
            out[name] = current
            continue
        ordered = torch.stack(values).sort(dim=0).values
        if current.is_floating_point():
            out[name] = rule(ordered.to(torch.float64)).to(current.dtype)
        else:
            out[name] = torch.floor(rule(ordered.to(torch.float64))).to(current.dtype)
    return out


class _Stateless:
    needs_updates = True

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise StateError(f"{type(self).__name__} aggregator has no state, got keys {sorted(state)}")


class CoordinateMedian(_Stateless):
    """Each coordinate of the next model is the median of that coordinate over the round's updates (the mean of the
    two middle values for an even count)."""

    def aggregate(self, global_weights: Weights, updates: UpdateBuffer, version: int) -> dict[str, torch.Tensor]:
        def median(ordered: torch.Tensor) -> torch.Tensor:
            n = len(ordered)
            return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2

        return _per_tensor(global_weights, kept_updates(updates), median)


class TrimmedMean(_Stateless):
    """Each coordinate is the mean of that coordinate's values after the ``floor(beta * n)`` largest and smallest of
    the round's ``n`` updates are removed.

    Args:
        beta: fraction trimmed from each end, in [0, 0.5) (Yin et al.'s beta; it should exceed the fraction of
            Byzantine clients). A round with too few updates to trim keeps at least one value per coordinate.
    """

    def __init__(self, beta: float = 0.1) -> None:
        if not (math.isfinite(beta) and 0 <= beta < 0.5):
            raise ValueError(f"beta must be in [0, 0.5), got {beta}")
        self.beta = beta

    def aggregate(self, global_weights: Weights, updates: UpdateBuffer, version: int) -> dict[str, torch.Tensor]:
        def trimmed(ordered: torch.Tensor) -> torch.Tensor:
            n = len(ordered)
            k = min(math.floor(self.beta * n), (n - 1) // 2)
            return ordered[k : n - k].mean(dim=0)

        return _per_tensor(global_weights, kept_updates(updates), trimmed)


class Krum(_Stateless):
    """Krum: the next model is the update whose summed squared distance to its ``n - f - 2`` nearest other updates
    is smallest; Multi-Krum (``keep`` > 1) averages the ``keep`` updates of smallest score.

    Distances are taken over every floating-point tensor the updates carry (all must carry the same ones). Krum's
    guarantee needs ``n >= 2f + 3`` updates; a round with fewer (stragglers lost) still scores each update over its
    ``max(1, n - f - 2)`` nearest neighbours.

    Args:
        byzantine: f, the number of Byzantine clients tolerated, >= 0.
        keep: m, the updates averaged (1 = Krum), >= 1.
    """

    def __init__(self, byzantine: int = 1, keep: int = 1) -> None:
        if byzantine < 0:
            raise ValueError(f"byzantine must be >= 0, got {byzantine}")
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.byzantine = byzantine
        self.keep = keep

    def scores(self, members: list[Mapping[str, torch.Tensor]]) -> torch.Tensor:
        """Each update's Krum score: the sum of squared distances to its ``max(1, n - f - 2)`` nearest others."""
        names = [k for k, v in members[0].items() if v.is_floating_point()]
        if any(set(k for k, v in u.items() if v.is_floating_point()) != set(names) for u in members):
            raise ValueError("Krum needs updates that carry the same tensors")
        flat = torch.stack([torch.cat([u[k].reshape(-1).to(torch.float64) for k in names]) for u in members])
        n = len(members)
        if n == 1:
            return torch.zeros(1, dtype=torch.float64)
        squares = torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist") ** 2
        squares.fill_diagonal_(math.inf)  # an update is not its own neighbour
        closest = max(1, n - self.byzantine - 2)
        return squares.sort(dim=1).values[:, :closest].sum(dim=1)

    def aggregate(self, global_weights: Weights, updates: UpdateBuffer, version: int) -> dict[str, torch.Tensor]:
        members = kept_updates(updates)
        if not members:
            return dict(global_weights)
        chosen = self.scores(members).argsort(stable=True)[: self.keep].tolist()
        return _per_tensor(global_weights, [members[i] for i in chosen], lambda ordered: ordered.mean(dim=0))
