"""Aggregators: how buffered updates combine into the next global model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedhet.strategies.buffer import UpdateBuffer
from fedhet.strategies.errors import StateError
from fedhet.types import Weights

__all__ = ["WeightedMean"]


class WeightedMean:
    """FedAvg's mean of the updates, each weighted by the weight it was buffered with (its sample count).

    Each tensor is averaged over the updates that carried it (FedP3 clients send back only the layers they
    trained); a tensor no update carried keeps its global value. Integer tensors (counters) take the unweighted
    mean of their contributors, rounded down.
    """

    def aggregate(self, global_weights: Weights, updates: UpdateBuffer, version: int) -> dict[str, torch.Tensor]:
        buckets = [b for _, b in updates.items()]
        out = {}
        for name, current in global_weights.items():
            carried = [b for b in buckets if name in b.weighted_sum]
            if not carried:
                out[name] = current
                continue
            acc = torch.stack([b.weighted_sum[name] for b in carried]).sum(0)
            if current.is_floating_point():
                out[name] = (acc / sum(b.weight_of(name) for b in carried)).to(current.dtype)
            else:
                count = sum(b.key_counts[name] for b in carried)
                out[name] = torch.div(acc, count, rounding_mode="floor").to(current.dtype)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise StateError(f"weighted mean aggregator has no state, got keys {sorted(state)}")
