"""Fleets: sampled heterogeneity. A fleet config draws one :class:`ClientProfile` per simulated client."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from fedhet.errors import ConfigError
from fedhet.quant import BITWIDTHS, FULL_PRECISION, sample_bitwidths
from fedhet.types import ClientProfile

__all__ = ["SPEED_DISTRIBUTIONS", "FleetConfig", "sample_profiles"]

SPEED_DISTRIBUTIONS = ("homogeneous", "normal", "exponential")
_SUPPORTED_BITWIDTHS = (*BITWIDTHS, FULL_PRECISION)


@dataclass
class FleetConfig:
    """How client profiles are drawn.

    Attributes:
        speed: ``homogeneous`` (all equal), ``normal`` (sigma = ``sigma_ratio`` * mean, truncated below at
            ``min_ratio`` * mean) or ``exponential`` (rate 1 / mean, truncated the same way).
        seconds_per_sample: mean local training seconds per sample (mu).
        sigma_ratio: sigma / mu of the normal distribution (0.3 in FedCompass).
        min_ratio: no client is faster than ``min_ratio`` * mu; keeps times positive.
        bandwidth: median link speed in bytes per second.
        bandwidth_sigma: sigma of log-bandwidth (0 = every client has ``bandwidth``).
        bitwidth: bits per weight every client computes at (2, 4, 6, 8, 12, 16, or 32 = fp32), unless
            ``bitwidths`` is given.
        bitwidths: a bitwidth mix, one entry per group (e.g. ``[8, 32]``); empty = every client at ``bitwidth``.
        bitwidth_fractions: the share of clients at each entry of ``bitwidths`` (summing to 1); the counts are exact
            (``round(fraction * num_clients)``, largest remainders settle the rounding) and who gets which bitwidth
            is drawn from the run seed.
        memory_bytes: model memory budget of every client in bytes (0 = unlimited).
        availability: probability that a task handed to a client comes back.
    """

    speed: str = "normal"
    seconds_per_sample: float = 0.005
    sigma_ratio: float = 0.3
    min_ratio: float = 0.05
    bandwidth: float = 2.0e6
    bandwidth_sigma: float = 0.0
    bitwidth: int = 32
    bitwidths: list[int] = field(default_factory=list)
    bitwidth_fractions: list[float] = field(default_factory=list)
    memory_bytes: int = 0
    availability: float = 1.0

    def validate(self) -> None:
        if self.speed not in SPEED_DISTRIBUTIONS:
            raise ConfigError(f"fleet.speed must be one of {', '.join(SPEED_DISTRIBUTIONS)}, got {self.speed!r}")
        for key in ("seconds_per_sample", "bandwidth", "min_ratio"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"fleet.{key} must be > 0, got {getattr(self, key)}")
        for key in ("sigma_ratio", "bandwidth_sigma"):
            if getattr(self, key) < 0:
                raise ConfigError(f"fleet.{key} must be >= 0, got {getattr(self, key)}")
        if not 0.0 < self.availability <= 1.0:
            raise ConfigError(f"fleet.availability must be in (0, 1], got {self.availability}")
        supported = ", ".join(map(str, _SUPPORTED_BITWIDTHS))
        if self.bitwidth not in _SUPPORTED_BITWIDTHS:
            raise ConfigError(f"fleet.bitwidth must be one of {supported}, got {self.bitwidth}")
        if len(self.bitwidths) != len(self.bitwidth_fractions):
            raise ConfigError(
                f"fleet.bitwidth_fractions must give one fraction per entry of fleet.bitwidths: "
                f"{len(self.bitwidth_fractions)} fractions for {len(self.bitwidths)} bitwidths"
            )
        bad = [b for b in self.bitwidths if b not in _SUPPORTED_BITWIDTHS]
        if bad:
            raise ConfigError(f"fleet.bitwidths must hold only {supported}, got {list(self.bitwidths)}")
        if len(set(self.bitwidths)) != len(self.bitwidths):
            raise ConfigError(f"fleet.bitwidths lists a bitwidth twice: {list(self.bitwidths)}")
        fractions = list(self.bitwidth_fractions)
        if fractions and (
            not all(math.isfinite(f) and f >= 0 for f in fractions)
            or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6)
        ):
            raise ConfigError(f"fleet.bitwidth_fractions must be >= 0 and sum to 1 (within 1e-6), got {fractions}")
        if self.memory_bytes < 0:
            raise ConfigError(f"fleet.memory_bytes must be >= 0 (0 = unlimited), got {self.memory_bytes}")


def sample_profiles(config: FleetConfig, num_clients: int, seed: int) -> list[ClientProfile]:
    """Draw ``num_clients`` profiles, deterministically for ``seed``. A bitwidth mix does not change the speeds and
    links drawn for the same seed."""
    config.validate()
    rng = np.random.default_rng([seed, 0xF1EE7])
    mu = config.seconds_per_sample
    if config.speed == "homogeneous":
        speeds = np.full(num_clients, mu)
    elif config.speed == "normal":
        speeds = rng.normal(mu, config.sigma_ratio * mu, num_clients)
    else:
        speeds = rng.exponential(mu, num_clients)
    speeds = np.maximum(speeds, config.min_ratio * mu)
    bandwidths = config.bandwidth * np.exp(rng.normal(0.0, config.bandwidth_sigma, num_clients))
    if config.bitwidths:
        bits = sample_bitwidths(num_clients, list(config.bitwidths), list(config.bitwidth_fractions), seed)
    else:
        bits = [config.bitwidth] * num_clients
    return [
        ClientProfile(
            seconds_per_sample=float(s),
            bandwidth=float(b),
            bitwidth=bitwidth,
            memory_bytes=config.memory_bytes,
            availability=config.availability,
        )
        for s, b, bitwidth in zip(speeds, bandwidths, bits, strict=True)
    ]
