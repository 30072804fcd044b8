"""Planners: what each client receives."""

from __future__ import annotations

from fedhet import quant
from fedhet.seeding import mix_seed
from fedhet.strategies.base import Plan
from fedhet.types import ClientInfo, Weights

__all__ = ["IdentityPlanner"]


class IdentityPlanner:
    """Every client receives the full global model.

    Args:
        rounding: how a client below 32 bits receives it. ``nearest`` (the default): as it is, shared and never
            copied (clients must not mutate it), to be rounded to the nearest value of the client's grid (by the
            codec on the wire, by the trainer in simulation). ``stochastic``: a copy rounded to the client's bitwidth
            with stochastic rounding (:func:`fedhet.quant.stochastic_round_weights`), unbiased, so that a round's
            progress smaller than half a quantization step survives in expectation instead of being rounded away; the
            random draw comes from ``(seed, version, client id)`` (and each tensor's name), so every runtime sends the
            same values. It costs one copy
            of the model per low-bit task.
        seed: the run seed.
    """

    def __init__(self, rounding: str = "nearest", seed: int = 0) -> None:
        self.rounding = quant.check_rounding(rounding, "rounding")
        self.seed = seed

    def plan(self, client: ClientInfo, weights: Weights, version: int) -> Plan:
        bits = client.profile.bitwidth
        if self.rounding == "nearest" or bits == quant.FULL_PRECISION:
            return Plan(weights)
        return Plan(quant.stochastic_round_weights(weights, bits, mix_seed(self.seed, version, client.client_id)))
