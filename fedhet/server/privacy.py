"""The server's per-client privacy ledger: the DP-SGD steps each client reported, and the epsilon they add up to.

A client that trains with DP-SGD reports, with every result, the noise multiplier, the Poisson sampling rate and the
number of steps behind it (``fedhet.v1.DPReport``). The ledger keeps, per client, the total steps at each
(noise multiplier, sample rate) pair: the whole history an RDP accountant needs, in a few numbers per client, and
part of the server's checkpoint. Epsilon is recomputed from it with Opacus's RDP accountant, so the server's
figure does not depend on the client's own accounting.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["DPStep", "PrivacyLedger", "check_dp_report"]

DPStep = tuple[float, float, int]  # (noise multiplier, sample rate, steps)

#: noise multipliers the accountant can vouch for: below, the guarantee is vacuous (and the RDP arithmetic
#: overflows); above, an update carries no signal. Opacus's own calibration stays far inside.
NOISE_RANGE = (1e-3, 1e4)


def check_dp_report(noise_multiplier: float, sample_rate: float, steps: int, local_steps: int) -> DPStep:
    """A reported DP-SGD history entry, checked; raises ValueError naming what is wrong."""
    low, high = NOISE_RANGE
    if not (math.isfinite(noise_multiplier) and low <= noise_multiplier <= high):
        raise ValueError(f"dp.noise_multiplier must be in [{low:g}, {high:g}], got {noise_multiplier}")
    if not (math.isfinite(sample_rate) and 0 < sample_rate <= 1):
        raise ValueError(f"dp.sample_rate must be in (0, 1], got {sample_rate}")
    if steps != local_steps or steps < 1:
        raise ValueError(f"dp.steps ({steps}) must equal the result's local_steps ({local_steps}) and be >= 1")
    return noise_multiplier, sample_rate, steps


class PrivacyLedger:
    """Per client, the total DP-SGD steps at each (noise multiplier, sample rate)."""

    def __init__(self) -> None:
        self._steps: dict[int, dict[tuple[float, float], int]] = {}

    def add(self, client_id: int, step: DPStep) -> None:
        noise, rate, steps = step
        history = self._steps.setdefault(client_id, {})
        history[(noise, rate)] = history.get((noise, rate), 0) + steps

    def __bool__(self) -> bool:
        return bool(self._steps)

    def snapshot(self) -> dict[int, list[DPStep]]:
        """The histories as they are now (cheap: a few numbers per client), for computing epsilon elsewhere."""
        return {c: [(n, q, s) for (n, q), s in h.items()] for c, h in self._steps.items()}

    @staticmethod
    def epsilons(snapshot: Mapping[int, list[DPStep]], delta: float) -> dict[str, float]:
        """Each client's epsilon at ``delta``, keyed by client id (as a string, as in ``metrics.jsonl``)."""
        from opacus.accountants import RDPAccountant

        out = {}
        for client_id, history in sorted(snapshot.items()):
            accountant = RDPAccountant()
            accountant.history = list(history)
            out[str(client_id)] = float(accountant.get_epsilon(delta))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {str(c): [[n, q, s] for (n, q), s in h.items()] for c, h in self._steps.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        steps: dict[int, dict[tuple[float, float], int]] = {}
        for client, rows in state.items():
            history: dict[tuple[float, float], int] = {}
            for noise, rate, count in rows:
                noise, rate, count = check_dp_report(float(noise), float(rate), int(count), int(count))
                history[(noise, rate)] = history.get((noise, rate), 0) + count
            steps[int(client)] = history
        self._steps = steps
