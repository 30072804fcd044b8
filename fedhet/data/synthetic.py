"""FedProx's Synthetic(alpha, beta) data (Li et al. 2020, "Federated Optimization in Heterogeneous Networks").

Client k draws u_k ~ N(0, alpha) and B_k ~ N(0, beta), where alpha and beta are *variances* (std
sqrt(alpha), sqrt(beta)); then W_k ~ N(u_k, 1) of shape (dim, num_classes), b_k ~ N(u_k, 1), v_k ~ N(B_k, 1)
of length dim, inputs x ~ N(v_k, Sigma) with Sigma diagonal, Sigma_jj = j^-1.2 (j = 1..dim), and labels
y = argmax(softmax(W_k^T x + b_k)). beta sets how much the clients' inputs differ. alpha, as in FedProx,
changes no label: u_k shifts every entry of W_k and b_k alike, adding the same amount to each class's logit.
Client sizes follow the FedProx code, lognormal(4, 2) + 50, capped at MAX_SAMPLES_PER_CLIENT.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedhet.data.base import DATASETS, Dataset, IndexArray
from fedhet.data.partition import split_train_test
from fedhet.errors import ConfigError

__all__ = ["MAX_SAMPLES_PER_CLIENT", "make_synthetic"]

# Cap on one client's sample count: lognormal(4, 2) has a heavy tail (about 1% of draws exceed 5000).
MAX_SAMPLES_PER_CLIENT = 5000


def _check(key: str, ok: bool, rule: str, value: float) -> None:
    if not ok:
        raise ConfigError(f"dataset.{key} must be {rule}, got {value}")


def make_synthetic(
    alpha: float = 1.0,
    beta: float = 1.0,
    num_clients: int = 30,
    dim: int = 60,
    num_classes: int = 10,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """Generate Synthetic(alpha, beta); deterministic for ``seed``.

    Each client's samples are split into its own train and held-out parts (``test_fraction`` held out);
    the train parts are concatenated in client order into ``x_train`` with ``natural_partition`` giving each
    client's indices, and the held-out parts make the global test set.
    """
    _check("alpha", math.isfinite(alpha) and alpha >= 0, ">= 0", alpha)
    _check("beta", math.isfinite(beta) and beta >= 0, ">= 0", beta)
    _check("num_clients", num_clients >= 1, ">= 1", num_clients)
    _check("dim", dim >= 1, ">= 1", dim)
    _check("num_classes", num_classes >= 2, ">= 2", num_classes)
    _check("test_fraction", 0.0 <= test_fraction < 1.0, "in [0, 1)", test_fraction)
    rng = np.random.default_rng(seed)
    sizes = np.minimum(rng.lognormal(4.0, 2.0, num_clients).astype(np.int64) + 50, MAX_SAMPLES_PER_CLIENT)
    u = rng.normal(0.0, math.sqrt(alpha), num_clients)
    big_b = rng.normal(0.0, math.sqrt(beta), num_clients)
    x_std = np.arange(1, dim + 1, dtype=np.float64) ** -0.6  # sqrt(Sigma_jj)
    xs_train, ys_train, xs_test, ys_test, parts = [], [], [], [], []
    offset = 0
    for k in range(num_clients):
        w = rng.normal(u[k], 1.0, (dim, num_classes))
        b = rng.normal(u[k], 1.0, num_classes)
        v = rng.normal(big_b[k], 1.0, dim)
        x = v + rng.standard_normal((int(sizes[k]), dim)) * x_std
        y = np.argmax(x @ w + b, axis=1)  # softmax is monotone, so the argmax of the logits
        train, test = split_train_test(np.arange(sizes[k]), test_fraction, seed=int(rng.integers(2**32)))
        xs_train.append(x[train])
        ys_train.append(y[train])
        xs_test.append(x[test])
        ys_test.append(y[test])
        parts.append(np.arange(offset, offset + train.size, dtype=np.int64))
        offset += train.size
    natural: tuple[IndexArray, ...] = tuple(parts)
    return Dataset(
        "synthetic",
        torch.from_numpy(np.concatenate(xs_train).astype(np.float32)),
        torch.from_numpy(np.concatenate(ys_train).astype(np.int64)),
        torch.from_numpy(np.concatenate(xs_test).astype(np.float32)),
        torch.from_numpy(np.concatenate(ys_test).astype(np.int64)),
        num_classes=num_classes,
        natural_partition=natural,
    )


DATASETS.register("synthetic")(make_synthetic)
