"""Staleness-weighted aggregation, shared by FedCompass, FedAsync and FedBuff.

An update trained from global version ``v`` and aggregated at version ``T`` has staleness ``tau = T - v``. It enters
the global model with weight ``a_i = alpha * s(tau_i) * w_i``, where ``s`` is a staleness function and ``w_i`` the
client's weight, chosen by the scheduler (it knows the fleet): ``1/N`` for N clients, the client's share of all
samples, or 1. Two update rules:

- model-based: ``theta <- (1 - sum_i a_i) * theta + sum_i a_i * theta_i``;
- gradient-based, with ``g_i = theta_start,i - theta_i``: ``theta <- theta - sum_i a_i * g_i``.

Integer tensors (counters) are not mixed: they become the mean of the contributors, rounded down.

Gradient-based aggregation needs each update's start model ``theta_start,i``. Updates arrive folded per start
version and bitwidth (an :class:`~fedhet.strategies.base.UpdateBuffer` bucket holds ``sum w_i theta_i`` and
``sum w_i``), so ``sum_i a_i g_i = sum_v alpha s(T - v) (W_v theta_v - S_v)``, summed over a version's buckets,
needs ``theta_v`` once per start version, not once per update. The aggregator keeps the global weights of exactly
those versions that may still be needed: a scheduler returns a :class:`StalenessBuffer` whose ``live_versions``
names the start versions of every update still out (tasks in flight) or held in another buffer. The weights are
kept by reference (the strategy replaces its global weights each version and never mutates them), so in simulation
they are the very tensors the tasks in flight already hold. Memory: (distinct live start versions) x (model); the
live versions are those of clients training or waiting with an update, so at most a couple per client, and in
FedCompass about one per group.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from fedhet.strategies.buffer import UpdateBuffer
from fedhet.strategies.errors import StateError
from fedhet.strategies.journal import Journal
from fedhet.types import ClientInfo, Weights

__all__ = [
    "STALENESS_FUNCTIONS",
    "WEIGHTINGS",
    "ClientWeights",
    "StalenessBuffer",
    "StalenessFn",
    "StalenessWeighted",
    "StartVersions",
    "constant",
    "hinge",
    "make_staleness_fn",
    "polynomial",
]

StalenessFn = Callable[[int], float]

STALENESS_FUNCTIONS = ("constant", "polynomial", "hinge")
WEIGHTINGS = ("uniform", "samples", "none")


def _check_tau(tau: int) -> None:
    if tau < 0:
        raise ValueError(f"staleness must be >= 0 versions, got {tau}")


def constant(tau: int) -> float:
    """``s(tau) = 1``: every update counts fully, however stale."""
    _check_tau(tau)
    return 1.0


def polynomial(tau: int, a: float) -> float:
    """``s(tau) = (tau + 1) ** -a``: 1 for a fresh update, falling with staleness (``a > 0``)."""
    _check_tau(tau)
    return float((tau + 1) ** -a)


def hinge(tau: int, a: float, b: float) -> float:
    """``s(tau) = 1`` while ``tau <= b``, then ``1 / (a (tau - b) + 1)``."""
    _check_tau(tau)
    return 1.0 if tau <= b else 1.0 / (a * (tau - b) + 1.0)


def make_staleness_fn(name: str, a: float = 0.5, b: float = 4.0) -> StalenessFn:
    """The staleness function ``name`` (constant, polynomial or hinge) with its parameters bound.

    Raises ValueError for an unknown name or a parameter outside its range (polynomial: ``a > 0``; hinge: ``a >= 0``,
    ``b >= 0``).
    """
    if name == "constant":
        return constant
    if name == "polynomial":
        if not (math.isfinite(a) and a > 0):
            raise ValueError(f"polynomial staleness needs a > 0, got a = {a}")
        return lambda tau: polynomial(tau, a)
    if name == "hinge":
        if not (math.isfinite(a) and a >= 0 and math.isfinite(b) and b >= 0):
            raise ValueError(f"hinge staleness needs a >= 0 and b >= 0, got a = {a}, b = {b}")
        return lambda tau: hinge(tau, a, b)
    raise ValueError(f"unknown staleness function {name!r}; choose one of: {', '.join(STALENESS_FUNCTIONS)}")


class StalenessBuffer(UpdateBuffer):
    """An :class:`UpdateBuffer` that also says which start versions may still arrive after this aggregation.

    ``live_versions`` is set by the scheduler just before it hands the buffer over for aggregation; the
    gradient-based :class:`StalenessWeighted` keeps the global weights of those versions and drops the rest.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_versions: frozenset[int] = frozenset()


class ClientWeights:
    """The weight ``w_i`` of each client's update, over the clients known so far (those that asked for work).

    ``uniform``: ``1/N`` with N the number of known clients; ``samples``: the client's share of all known clients'
    samples; ``none``: 1 (FedAsync as published). Memory: one sample count per client.
    """

    def __init__(self, weighting: str = "uniform") -> None:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
        self.weighting = weighting
        self._samples: dict[int, int] = {}
        self._total = 0

    def keep(self, journal: Journal, client_id: int) -> None:
        """Record in ``journal`` what observing (or weighting) client ``client_id`` may change."""
        journal.keep(self)
        journal.keep_item(self._samples, client_id)

    def observe(self, client: ClientInfo) -> None:
        """Count ``client`` in N (and its samples in the total) from now on."""
        old = self._samples.get(client.client_id, 0)
        self._samples[client.client_id] = client.num_samples
        self._total += client.num_samples - old

    @property
    def num_clients(self) -> int:
        """N, the clients known so far."""
        return len(self._samples)

    def weight(self, client: ClientInfo) -> float:
        """``w_i`` of ``client`` (which is counted first if it was not yet known)."""
        if client.client_id not in self._samples:
            self.observe(client)
        if self.weighting == "uniform":
            return 1.0 / len(self._samples)
        if self.weighting == "samples":
            return client.num_samples / self._total
        return 1.0

    def state_dict(self) -> dict[str, Any]:
        return {"samples": {str(c): n for c, n in self._samples.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if set(state) != {"samples"} or not isinstance(state["samples"], Mapping):
            raise StateError(f"client weights state keys {sorted(state)} differ from ['samples']")
        samples = {int(c): int(n) for c, n in state["samples"].items()}
        if any(n < 1 for n in samples.values()):
            raise StateError("client weights state holds a client with fewer than 1 sample")
        self._samples = samples
        self._total = sum(samples.values())


class StartVersions:
    """The global version each busy client's task started from (one int per client): the start versions whose
    weights gradient-based aggregation may still need."""

    def __init__(self) -> None:
        self._versions: dict[int, int] = {}

    def keep(self, journal: Journal, client_id: int) -> None:
        """Record in ``journal`` the start version of ``client_id`` (or its absence)."""
        journal.keep_item(self._versions, client_id)

    def start(self, client_id: int, version: int) -> None:
        """``client_id`` got a task from ``version`` (a task it held before is answered or lost)."""
        self._versions[client_id] = version

    def finish(self, client_id: int) -> None:
        self._versions.pop(client_id, None)

    def live(self) -> frozenset[int]:
        return frozenset(self._versions.values())

    def state_dict(self) -> dict[str, int]:
        return {str(c): v for c, v in self._versions.items()}

    def load_state_dict(self, state: Mapping[str, Any], version: int) -> None:
        """Load, refusing a start version outside ``0..version`` (the scheduler's current version)."""
        try:
            versions = {int(c): int(v) for c, v in state.items()}
        except (TypeError, ValueError, AttributeError) as error:
            raise StateError(f"start versions state is malformed: {error!r}") from None
        if any(not 0 <= v <= version for v in versions.values()):
            raise StateError(f"a client's task started from a version outside 0..{version}")
        self._versions = versions


class StalenessWeighted:
    """``a_i = alpha * s(tau_i) * w_i``, applied model-based or gradient-based (see the module docstring).

    Args:
        alpha: server mixing rate (FedBuff: the server learning rate), > 0.
        staleness: ``constant``, ``polynomial`` or ``hinge``.
        staleness_a: ``a`` of polynomial ``(tau + 1) ** -a`` and of hinge ``1 / (a (tau - b) + 1)``.
        staleness_b: ``b`` of hinge: updates at most ``b`` versions old count fully.
        gradient_based: apply ``theta - sum a_i g_i`` with ``g_i = theta_start,i - theta_i`` instead of mixing
            models; needs a scheduler that returns a :class:`StalenessBuffer`, older start weights are kept.
    """

    def __init__(
        self,
        alpha: float = 0.9,
        staleness: str = "polynomial",
        staleness_a: float = 0.5,
        staleness_b: float = 4.0,
        gradient_based: bool = False,
    ) -> None:
        if not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be finite and > 0, got {alpha}")
        self.alpha = alpha
        self.staleness = make_staleness_fn(staleness, staleness_a, staleness_b)
        self.gradient_based = gradient_based
        self._start_weights: dict[int, Weights] = {}  # gradient-based only: version -> global weights

    def coefficient(self, tau: int) -> float:
        """``alpha * s(tau)``: the factor of an update's own weight ``w_i``."""
        return self.alpha * self.staleness(tau)

    def aggregate(self, global_weights: Weights, updates: UpdateBuffer, version: int) -> dict[str, torch.Tensor]:
        """The next global model from ``global_weights`` (version ``version``) and the buffered ``updates``."""
        buckets = list(updates.items())
        if not buckets:
            return dict(global_weights)
        for start, bucket in buckets:
            if start > version:
                raise ValueError(f"an update started from version {start}, after the current version {version}")
            extra = set(bucket.weighted_sum) - set(global_weights)
            if extra:
                raise ValueError(f"updates from version {start} carry tensors the global model lacks: {sorted(extra)}")
        coefficients = [self.coefficient(version - start) for start, _ in buckets]
        starts = [self._start(start, version, global_weights) for start, _ in buckets] if self.gradient_based else []
        out: dict[str, torch.Tensor] = {}
        for name, current in global_weights.items():
            # each tensor moves by the updates that carried it (FedP3 clients send back only their layers): a layer
            # that half the group trained moves by half the group's weight, FedCompass's rule applied per tensor
            carried = [
                (c, b, s)
                for c, (_, b), s in itertools.zip_longest(coefficients, buckets, starts)
                if name in b.weighted_sum
            ]
            if not carried:
                out[name] = current
                continue
            if not current.is_floating_point():
                total = torch.stack([b.weighted_sum[name] for _, b, _ in carried]).sum(0)
                count = sum(b.key_counts[name] for _, b, _ in carried)
                out[name] = torch.div(total, count, rounding_mode="floor").to(current.dtype)
                continue
            new = current.to(torch.float64)
            if self.gradient_based:
                for c, bucket, start_weights in carried:
                    # sum_i a_i g_i over the bucket = c * (W theta_v - S)
                    step = start_weights[name].to(torch.float64) * bucket.weight_of(name) - bucket.weighted_sum[name]
                    new = new - c * step
            else:
                new = new * (1.0 - sum(c * b.weight_of(name) for c, b, _ in carried))
                for c, bucket, _ in carried:
                    new = new + c * bucket.weighted_sum[name]
            out[name] = new.to(current.dtype)
        if self.gradient_based:
            live = updates.live_versions if isinstance(updates, StalenessBuffer) else frozenset()
            self._retain(live, version, global_weights)
        return out

    def _start(self, start: int, version: int, global_weights: Weights) -> Weights:
        if start == version:
            return global_weights
        kept = self._start_weights.get(start)
        if kept is None:
            raise ValueError(
                f"gradient-based aggregation needs the global weights of version {start}, which were not kept: "
                "use a scheduler that reports live versions (fedcompass, fedasync, fedbuff) or gradient_based: false"
            )
        return kept

    def _retain(self, live: Iterable[int], version: int, global_weights: Weights) -> None:
        kept = {v: w for v, w in self._start_weights.items() if v in live}
        if version in live:
            kept[version] = global_weights
        self._start_weights = kept

    @property
    def kept_versions(self) -> list[int]:
        """Versions whose global weights are kept for gradient-based aggregation."""
        return sorted(self._start_weights)

    def state_dict(self) -> dict[str, Any]:
        """The kept start weights (gradient-based only); part of ``Strategy.state_dict``."""
        return {"start_weights": {str(v): dict(w) for v, w in self._start_weights.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if set(state) != {"start_weights"} or not isinstance(state["start_weights"], Mapping):
            raise StateError(f"staleness aggregator state keys {sorted(state)} differ from ['start_weights']")
        kept: dict[int, Weights] = {}
        for version, weights in state["start_weights"].items():
            if not isinstance(weights, Mapping) or not all(isinstance(t, torch.Tensor) for t in weights.values()):
                raise StateError(f"staleness aggregator: kept weights of version {version!r} are not tensors")
            kept[int(version)] = dict(weights)
        self._start_weights = kept
