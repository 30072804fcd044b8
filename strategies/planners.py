"""Planners: what each client receives."""

from __future__ import annotations

from fedhet.strategies.base import Plan
from fedhet.types import ClientInfo, Weights

__all__ = ["IdentityPlanner"]


class IdentityPlanner:
    """Every client receives the full global model as it is (shared, never copied: clients must not mutate it)."""

    def plan(self, client: ClientInfo, weights: Weights, version: int) -> Plan:
        return Plan(weights)
