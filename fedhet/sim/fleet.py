"""Fleets: sampled heterogeneity. A fleet config (:class:`fedhet.config.FleetConfig`) draws one
:class:`ClientProfile` per simulated client."""

from __future__ import annotations

import numpy as np

from fedhet.config import FleetConfig
from fedhet.quant import sample_bitwidths
from fedhet.types import ClientProfile

__all__ = ["sample_profiles"]


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
