"""Partitioners that split a training set among clients by its labels, and a per-client train/test split.

Every partitioner returns one sorted int64 index array per client; together they hold each index of
``range(len(labels))`` exactly once, every client gets at least one sample, and the result depends only on the
arguments (``seed`` included).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from fedhet.data.base import IndexArray, call_with_params
from fedhet.errors import ConfigError
from fedhet.registry import Registry

__all__ = [
    "PARTITIONERS",
    "Partitioner",
    "dirichlet",
    "dual_dirichlet",
    "iid",
    "partition",
    "shards",
    "split_train_test",
]

Partitioner = Callable[..., list[IndexArray]]
PARTITIONERS: Registry[Partitioner] = Registry("partitioner")

_KEY = "dataset.partition"
_DIRICHLET_TRIES = 20  # Dirichlet draws before the deterministic repair takes over


def _check(labels: npt.ArrayLike, num_clients: int) -> npt.NDArray[np.int64]:
    """``labels`` as a 1-D int64 array, after checking ``num_clients`` against its length."""
    arr = np.asarray(labels)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise ConfigError(f"labels must be a 1-D integer array, got dtype {arr.dtype} and shape {arr.shape}")
    if num_clients < 1:
        raise ConfigError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > arr.size:
        raise ConfigError(f"num_clients ({num_clients}) exceeds the number of training samples ({arr.size})")
    return arr.astype(np.int64, copy=False)


def _positive(name: str, value: float) -> None:
    if not value > 0 or not np.isfinite(value):
        raise ConfigError(f"{_KEY}.{name} must be > 0, got {value}")


def _finish(parts: list[IndexArray]) -> list[IndexArray]:
    return [np.sort(p).astype(np.int64, copy=False) for p in parts]


def _apportion(weights: npt.NDArray[np.float64], total: int, lo: int, hi: npt.NDArray[np.int64]) -> IndexArray:
    """Integers near ``total * weights / sum(weights)`` that sum to ``total``, each in ``lo..hi``.

    Needs ``len(weights) * lo <= total <= sum(hi)`` and ``lo <= hi``.
    """
    target = total * weights / weights.sum()
    counts: IndexArray = np.clip(np.floor(target).astype(np.int64), lo, hi)
    while (gap := total - int(counts.sum())) != 0:
        room = counts < hi if gap > 0 else counts > lo
        cand = np.flatnonzero(room)
        # Raise those furthest below their target (or lower those furthest above), at most one step each.
        slack = counts[cand] - target[cand] if gap > 0 else target[cand] - counts[cand]
        order = cand[np.argsort(slack, kind="stable")]
        counts[order[: abs(gap)]] += 1 if gap > 0 else -1
    return counts


def iid(labels: npt.ArrayLike, num_clients: int, seed: int) -> list[IndexArray]:
    """Shuffle and split into ``num_clients`` parts whose sizes differ by at most 1."""
    n = _check(labels, num_clients).size
    perm = np.random.default_rng(seed).permutation(n)
    return _finish(np.array_split(perm, num_clients))


def dirichlet(labels: npt.ArrayLike, num_clients: int, alpha: float, seed: int, min_size: int = 1) -> list[IndexArray]:
    """Split each class among clients in proportions drawn from Dir(alpha, ..., alpha).

    Small ``alpha`` (0.1) gives each client few classes; large ``alpha`` (1000) approaches IID. The draw is
    repeated (up to 20 times) until every client holds ``min_size`` samples; after that the clients short of
    ``min_size`` take samples from the currently largest clients.
    """
    y = _check(labels, num_clients)
    _positive("alpha", alpha)
    if min_size < 1 or min_size * num_clients > y.size:
        raise ConfigError(
            f"{_KEY}.min_size must be in 1..{y.size // num_clients} "
            f"({y.size} samples over {num_clients} clients), got {min_size}"
        )
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    for _ in range(_DIRICHLET_TRIES):
        pieces: list[list[IndexArray]] = [[] for _ in range(num_clients)]
        for members in by_class:
            idx = rng.permutation(members)
            cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha))) * idx.size).astype(np.int64)
            for k, part in enumerate(np.split(idx, cuts[:-1])):
                pieces[k].append(part)
        parts = [np.concatenate(p) for p in pieces]
        if min(p.size for p in parts) >= min_size:
            return _finish(parts)
    return _finish(_repair(parts, min_size))


def _repair(parts: list[IndexArray], min_size: int) -> list[IndexArray]:
    """Move samples from the largest clients to those below ``min_size`` (needs enough samples in all)."""
    parts = list(parts)
    for k in range(len(parts)):
        while (need := min_size - parts[k].size) > 0:
            big = int(np.argmax([p.size for p in parts]))
            take = min(need, parts[big].size - min_size)
            parts[k] = np.concatenate([parts[k], parts[big][-take:]])
            parts[big] = parts[big][:-take]
    return parts


def shards(labels: npt.ArrayLike, num_clients: int, classes_per_client: int, seed: int) -> list[IndexArray]:
    """FedAvg's pathological non-IID split: each client gets ``classes_per_client`` single-class shards.

    The samples, sorted by label, are cut into ``num_clients * classes_per_client`` shards that never cross a
    class boundary (each class gets a number of shards proportional to its size, at least one); shards are
    dealt to clients at random, so each client holds at most ``classes_per_client`` classes.
    """
    y = _check(labels, num_clients)
    classes, sizes = np.unique(y, return_counts=True)
    k = classes_per_client
    if not 1 <= k <= classes.size:
        raise ConfigError(f"{_KEY}.classes_per_client must be in 1..{classes.size} (the classes), got {k}")
    num_shards = num_clients * k
    if num_shards < classes.size or num_shards > y.size:
        raise ConfigError(
            f"{_KEY}.classes_per_client * num_clients ({num_shards}) must be between the number of classes "
            f"({classes.size}) and the number of samples ({y.size}) so every sample lands in a shard"
        )
    rng = np.random.default_rng(seed)
    per_class = _apportion(sizes.astype(np.float64), num_shards, 1, sizes.astype(np.int64))
    cut: list[IndexArray] = []
    for c, s in zip(classes, per_class, strict=True):
        cut.extend(np.array_split(rng.permutation(np.flatnonzero(y == c)), s))
    deal = rng.permutation(num_shards).reshape(num_clients, k)
    return _finish([np.concatenate([cut[s] for s in row]) for row in deal])


def dual_dirichlet(
    labels: npt.ArrayLike, num_clients: int, alpha1: float, alpha2: float, seed: int
) -> list[IndexArray]:
    """FedCompass's dual Dirichlet split: client sizes from Dir(alpha1 * p1), class mixes from Dir(alpha2 * p2).

    Both Dirichlets scale a prior: p1 is uniform over the clients (1/N each) and p2 is the dataset's class
    frequencies. The clients' shares of the samples are drawn from Dir(alpha1/N, ..., alpha1/N) (the paper sets
    alpha1 to the number of clients, a flat Dirichlet) and rounded to at least one sample; each client's class
    mix from Dir(alpha2 * p2). Clients are filled in order from the samples still unassigned: a draw of
    its size from its mix, where a class runs out the shortfall is redrawn over the classes left (the last
    clients may thus drift from their mix).
    """
    y = _check(labels, num_clients)
    _positive("alpha1", alpha1)
    _positive("alpha2", alpha2)
    rng = np.random.default_rng(seed)
    classes, left = np.unique(y, return_counts=True)
    prior = left / y.size
    share = rng.dirichlet(np.full(num_clients, alpha1 / num_clients))
    sizes = _apportion(share, y.size, 1, np.full(num_clients, y.size, dtype=np.int64))
    counts = np.zeros((num_clients, classes.size), dtype=np.int64)
    for k in range(num_clients):
        mix = rng.dirichlet(alpha2 * prior)
        while (need := int(sizes[k] - counts[k].sum())) > 0:
            weights = np.where(left > 0, mix, 0.0)
            if not weights.sum() > 0:
                weights = left.astype(np.float64)
            draw = np.minimum(rng.multinomial(need, weights / weights.sum()), left)
            counts[k] += draw
            left -= draw
    out: list[list[IndexArray]] = [[] for _ in range(num_clients)]
    for j, c in enumerate(classes):
        idx = rng.permutation(np.flatnonzero(y == c))
        for k, part in enumerate(np.split(idx, np.cumsum(counts[:, j])[:-1])):
            out[k].append(part)
    return _finish([np.concatenate(p) for p in out])


PARTITIONERS.register("iid")(iid)
PARTITIONERS.register("dirichlet")(dirichlet)
PARTITIONERS.register("shards")(shards)
PARTITIONERS.register("dual_dirichlet")(dual_dirichlet)


def partition(name: str, labels: npt.ArrayLike, num_clients: int, seed: int, **params: Any) -> list[IndexArray]:
    """Run the partitioner registered as ``name`` with its own ``params`` (e.g. ``alpha`` for dirichlet)."""
    return call_with_params(_KEY, name, PARTITIONERS.get(name), labels, num_clients, seed=seed, **params)


def split_train_test(indices: npt.ArrayLike, test_fraction: float, seed: int) -> tuple[IndexArray, IndexArray]:
    """Split one client's ``indices`` into disjoint sorted (train, test) parts whose union is ``indices``.

    The test part has ``round(n * test_fraction)`` samples, kept within 1..n-1 when ``test_fraction > 0``
    and the client has n >= 2 samples (so neither part is empty); it is empty when n == 1 or
    ``test_fraction == 0``.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ConfigError(f"dataset.test_fraction must be in [0, 1), got {test_fraction}")
    idx = np.asarray(indices, dtype=np.int64)
    n = idx.size
    n_test = 0 if n < 2 or test_fraction == 0 else min(max(round(n * test_fraction), 1), n - 1)
    perm = np.random.default_rng(seed).permutation(idx)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])
