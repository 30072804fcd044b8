"""Seeds derived from several numbers, the same on every runtime."""

from __future__ import annotations

import numpy as np

__all__ = ["mix_seed"]


def mix_seed(*parts: int) -> int:
    """A 64-bit seed mixing every one of ``parts`` (a plain sum or xor would collide, and torch's CPU generator
    would ignore high bits of a shifted combination)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0])
