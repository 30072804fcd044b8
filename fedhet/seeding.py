"""Seeds derived from several numbers, the same on every runtime.

A seed is numpy's :class:`~numpy.random.SeedSequence` of the numbers, its first 64-bit word of state: a plain sum
or xor would collide, and torch's CPU generator would ignore high bits of a shifted combination.
:func:`mix_seeds` computes that hash for many rows of numbers at once as array operations (a simulator draws one
seed per task, ten thousand a round); :func:`mix_seed` is its one-row case.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

__all__ = ["mix_seed", "mix_seeds"]

# numpy.random.SeedSequence's constants (numpy/random/bit_generator.pyx): a pool of four 32-bit words
_POOL = 4
_MASK32 = 0xFFFFFFFF
_INIT_A, _MULT_A = 0x43B0D7E5, 0x931E8875
_INIT_B, _MULT_B = 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R = 0xCA01F9DD, 0x4973F715


# a 32-bit word: of one row, or of every row at once (uint64 arrays: their products stay below 2**64)
Word = TypeVar("Word", int, npt.NDArray[np.integer[Any]])


def mix_seed(*parts: int) -> int:
    """A 64-bit seed mixing every one of ``parts`` (non-negative):
    ``np.random.SeedSequence(parts).generate_state(1, np.uint64)[0]``."""
    words: list[int] = []
    for part in parts:  # as SeedSequence coerces an integer: 32-bit words, low word first, one for 0
        if part < 0:
            raise ValueError(f"mix_seed: every part must be >= 0, got {part}")
        words.append(part & _MASK32)
        part >>= 32
        while part:
            words.append(part & _MASK32)
            part >>= 32
    return _hash(words + [0] * (_POOL - len(words)))  # fewer words than the pool hash as zeros up to it


def mix_seeds(rows: npt.ArrayLike) -> npt.NDArray[np.uint64]:
    """:func:`mix_seed` of every row of ``rows`` (a 2-D array of integers in [0, 2**64)), as uint64."""
    if isinstance(rows, np.ndarray):
        if rows.dtype.kind not in "iu":
            raise TypeError(f"mix_seeds takes integers, got {rows.dtype}")
        if rows.dtype.kind == "i" and (rows < 0).any():
            raise ValueError("mix_seeds: every part must be >= 0")
        table = rows.astype(np.uint64)
    else:  # a sequence of rows of Python integers (numpy would guess float64 for a mix of small and huge ones)
        try:
            table = np.array(rows, dtype=np.uint64)
        except OverflowError:
            raise ValueError("mix_seeds: every part must be >= 0 and below 2**64") from None
    if table.ndim != 2:
        raise ValueError(f"mix_seeds takes a 2-D array of rows, got shape {table.shape}")
    # each part is one word below 2**32 and two from there on; rows of as many words hash together
    big = table > _MASK32
    counts = 1 + big.astype(np.int64)
    offset = np.cumsum(counts, 1) - counts
    length = np.maximum(counts.sum(1), _POOL)  # fewer words than the pool hash as zeros up to it
    out = np.empty(len(table), dtype=np.uint64)
    for size in np.unique(length):
        rows_of = np.flatnonzero(length == size)
        every = np.arange(len(rows_of))
        words = np.zeros((len(rows_of), int(size)), dtype=np.uint64)
        for j in range(table.shape[1]):
            part, at = table[rows_of, j], offset[rows_of, j]
            words[every, at] = part & _MASK32
            high = big[rows_of, j]
            words[every[high], at[high] + 1] = part[high] >> 32
        out[rows_of] = _hash(list(words.T))
    return out


def _hash(words: Sequence[Word]) -> Word:
    """SeedSequence's pool mixed from the entropy ``words`` (at least the pool's four) and its first 64 bits of
    state: the same arithmetic on one row's words (ints) or on every row's (uint64 arrays of 32-bit values)."""
    hash_const = _INIT_A

    def hashmix(value: Word) -> Word:
        nonlocal hash_const
        value = value ^ hash_const
        hash_const = hash_const * _MULT_A & _MASK32
        value = value * hash_const & _MASK32
        return value ^ value >> 16

    def mix(x: Word, y: Word) -> Word:
        result = (_MIX_L * x - _MIX_R * y) & _MASK32
        return result ^ result >> 16

    pool = [hashmix(word) for word in words[:_POOL]]
    for src in range(_POOL):
        for dst in range(_POOL):
            if src != dst:
                pool[dst] = mix(pool[dst], hashmix(pool[src]))
    for word in words[_POOL:]:
        for dst in range(_POOL):
            pool[dst] = mix(pool[dst], hashmix(word))
    hash_const = _INIT_B
    state = []
    for value in pool[:2]:  # two 32-bit words of state make the 64-bit seed, low word first
        value = value ^ hash_const
        hash_const = hash_const * _MULT_B & _MASK32
        value = value * hash_const & _MASK32
        state.append(value ^ value >> 16)
    return state[0] | state[1] << 32
