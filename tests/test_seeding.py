"""The seed mixer is numpy's SeedSequence hash, one row at a time and for many rows at once."""

from __future__ import annotations

import random

import numpy as np
import pytest

from fedhet.seeding import mix_seed, mix_seeds


def reference(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0])


def rows(width: int, count: int, seed: int) -> list[tuple[int, ...]]:
    """Parts of one word, of two (at and above 2**32) and small ones, mixed in every row."""
    rng = random.Random(seed)
    ranges = [10, 2**32, 2**64]
    return [tuple(rng.randrange(rng.choice(ranges)) for _ in range(width)) for _ in range(count)]


EDGES = [(0,), (0, 0), (2**32 - 1, 7), (2**32, 1), (1, 2, 3, 4), (1, 2, 3, 4, 5), (2**64 - 1,) * 3]


@pytest.mark.parametrize("parts", EDGES + rows(3, 20, 0) + [(2**100 + 3, 5)])
def test_mix_seed_is_seed_sequence(parts: tuple[int, ...]) -> None:
    assert mix_seed(*parts) == reference(*parts)


@pytest.mark.parametrize("width", [1, 2, 3, 5])
def test_mix_seeds_is_mix_seed_of_every_row(width: int) -> None:
    table = rows(width, 300, width) + [e for e in EDGES if len(e) == width]
    assert mix_seeds(table).tolist() == [reference(*row) for row in table]
    tasks = np.stack([np.full(500, 7), np.arange(500)], 1)  # a run seed and task ids, as the executor draws them
    assert mix_seeds(tasks).tolist() == [mix_seed(7, t) for t in range(500)]


@pytest.mark.parametrize("table", [[(-1, 2)], np.array([[-1, 2]]), [(2**64, 1)], np.array([[1.0]]), np.arange(3)])
def test_mix_seeds_refuses_what_seed_sequence_cannot_hash(table: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        mix_seeds(table)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        mix_seed(3, -1)
