"""Aggregators: how buffered updates combine into the next global model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedhet.strategies.base import StateError, UpdateBuffer
from fedhet.types import Weights

__all__ = ["WeightedMean"]


class WeightedMean:
    """FedAvg's mean of the updates, each weighted by the weight it was buffered with (its sample count).

    Integer tensors (counters) take the unweighted mean of the contributors, rounded down.
    """

    def aggregate(self, global_weights: Weights, updates: UpdateBuffer, version: int) -> dict[str, torch.Tensor]:
        buckets = [b for _, b in updates.items()]
        total_weight = sum(b.total_weight for b in buckets)
        count = sum(b.count for b in buckets)
        out = {}
        for name, current in global_weights.items():
            acc = torch.stack([b.weighted_sum[name] for b in buckets]).sum(0)
            if current.is_floating_point():
                out[name] = (acc / total_weight).to(current.dtype)
            else:
                out[name] = torch.div(acc, count, rounding_mode="floor").to(current.dtype)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise StateError(f"weighted mean aggregator has no state, got keys {sorted(state)}")
