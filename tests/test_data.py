"""Tests of fedhet.data: Fashion-MNIST IDX loading, Synthetic(alpha, beta), partitioners, train/test split."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedhet.data import (
    DATASETS,
    PARTITIONERS,
    Dataset,
    dirichlet,
    load_dataset,
    load_fashion_mnist,
    make_synthetic,
    partition,
    shards,
    split_train_test,
)
from fedhet.data.fashion_mnist import read_idx
from fedhet.errors import ConfigError, DataError

FMNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
PARAMS: dict[str, dict[str, float]] = {
    "iid": {},
    "dirichlet": {"alpha": 0.5},
    "shards": {"classes_per_client": 2},
    "dual_dirichlet": {"alpha1": 10.0, "alpha2": 0.5},
}


# ---------------------------------------------------------------- Fashion-MNIST


def idx_bytes(arr: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes holding ``arr``."""
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_fmnist(root: Path, n_train: int = 5, n_test: int = 3, gz: bool = False) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        files = {
            f"{prefix}-images-idx3-ubyte": rng.integers(0, 256, (n, 28, 28)),
            f"{prefix}-labels-idx1-ubyte": np.arange(n) % 10,
        }
        for name, arr in files.items():
            data = idx_bytes(arr)
            if gz:
                (root / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (root / name).write_bytes(data)


@pytest.mark.skipif(not FMNIST_ROOT.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_debian_dir() -> None:
    ds = load_dataset("fashion_mnist")
    assert ds.x_train.shape == (60000, 1, 28, 28)
    assert ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert torch.bincount(ds.y_train).tolist() == [6000] * 10
    assert torch.bincount(ds.y_test).tolist() == [1000] * 10
    assert abs(float(ds.x_train.mean())) < 0.01 and abs(float(ds.x_train.std()) - 1.0) < 0.01


@pytest.mark.parametrize("gz", [False, True])
def test_idx_written_by_test_parses(tmp_path: Path, gz: bool) -> None:
    write_fmnist(tmp_path, gz=gz)
    ds = load_fashion_mnist(tmp_path)
    assert ds.x_train.shape == (5, 1, 28, 28) and ds.x_test.shape == (3, 1, 28, 28)
    assert ds.y_train.tolist() == [0, 1, 2, 3, 4] and ds.y_test.tolist() == [0, 1, 2]
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    raw = read_idx(tmp_path / name)
    assert raw.shape == (5, 28, 28)
    expected = (torch.from_numpy(raw.astype(np.float32)) / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(ds.x_train[:, 0], expected)


def test_idx_truncated_raises_naming_file(tmp_path: Path) -> None:
    write_fmnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="train-images-idx3-ubyte") as err:
        load_fashion_mnist(tmp_path)
    assert "truncated" in str(err.value)


def test_idx_truncated_gzip_raises_naming_file(tmp_path: Path) -> None:
    write_fmnist(tmp_path, gz=True)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-6])
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz"):
        load_fashion_mnist(tmp_path)


def test_idx_bad_magic_raises_naming_file(tmp_path: Path) -> None:
    write_fmnist(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(b"\x12\x34" + path.read_bytes()[2:])
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.*magic"):
        load_fashion_mnist(tmp_path)


def test_idx_label_count_and_range_checked(tmp_path: Path) -> None:
    write_fmnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(4)))
    with pytest.raises(DataError, match="4 labels for 5 images"):
        load_fashion_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(5, 10)))
    with pytest.raises(DataError, match=r"0\.\.9"):
        load_fashion_mnist(tmp_path)


def test_missing_dir_and_file_name_path_and_package(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        load_dataset("fashion_mnist", root=missing)
    assert str(missing) in str(err.value) and "dataset-fashion-mnist" in str(err.value)
    write_fmnist(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.*dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


def test_registry_and_load_dataset_errors() -> None:
    assert DATASETS.names() == ["fashion_mnist", "synthetic"]
    assert PARTITIONERS.names() == ["dirichlet", "dual_dirichlet", "iid", "shards"]
    with pytest.raises(KeyError, match="unknown dataset"):
        load_dataset("mnist")
    with pytest.raises(ConfigError, match="bogus"):
        load_dataset("synthetic", bogus=1)


def test_dataset_validates() -> None:
    x, y = torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(DataError, match="y_train"):
        Dataset("d", x, y[:3], x, y, num_classes=2)
    with pytest.raises(DataError, match="x_test"):
        Dataset("d", x, y, x.double(), y, num_classes=2)
    with pytest.raises(DataError, match="labels"):
        Dataset("d", x, y + 2, x, y, num_classes=2)
    with pytest.raises(DataError, match="natural_partition"):
        Dataset("d", x, y, x, y, num_classes=2, natural_partition=(np.array([0, 1, 1, 3]),))


# ---------------------------------------------------------------- Synthetic


def test_synthetic_deterministic_and_partition_covers_train() -> None:
    a, b = make_synthetic(seed=3), make_synthetic(seed=3)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(make_synthetic(seed=4).y_train[:50], a.y_train[:50])
    assert a.input_shape == (60,) and a.num_classes == 10
    parts = a.natural_partition
    assert parts is not None and len(parts) == 30
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(a.x_train.shape[0]))
    # Each client held out about 20% of its own samples.
    n_test = a.x_test.shape[0]
    assert 0.18 < n_test / (n_test + a.x_train.shape[0]) < 0.22


def test_synthetic_beta_spreads_client_inputs() -> None:
    def spread(beta: float) -> float:
        ds = make_synthetic(alpha=0.0, beta=beta, num_clients=20, seed=1)
        assert ds.natural_partition is not None
        means = torch.stack([ds.x_train[p].mean(0) for p in ds.natural_partition])
        return float(means.mean(1).std())  # spread of the clients' B_k

    assert spread(0.0) < 0.5 < 2.0 < spread(25.0)


def test_synthetic_alpha_leaves_labels_unchanged() -> None:
    # u_k shifts every entry of W_k and b_k alike, so it adds the same amount to every class's logit: for one
    # seed the inputs are identical and the labels agree up to float rounding (as in FedProx's generator).
    low, high = make_synthetic(alpha=0.0, seed=2), make_synthetic(alpha=4.0, seed=2)
    assert torch.equal(low.x_train, high.x_train)
    assert float((low.y_train == high.y_train).float().mean()) > 0.99


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"alpha": -1.0}, "dataset.alpha"),
        ({"beta": -0.5}, "dataset.beta"),
        ({"num_clients": 0}, "num_clients"),
    ],
)
def test_synthetic_rejects_bad_config(kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        make_synthetic(**kwargs)


def test_synthetic_negative_alpha_message() -> None:
    with pytest.raises(ConfigError, match=r"^dataset\.alpha must be >= 0, got -1$"):
        load_dataset("synthetic", alpha=-1)


# ---------------------------------------------------------------- partitioners


def check_partition(parts: list[np.ndarray], n: int, num_clients: int) -> None:
    assert len(parts) == num_clients
    assert all(p.dtype == np.int64 and p.size > 0 for p in parts)
    flat = np.concatenate(parts)
    assert flat.size == n and np.array_equal(np.sort(flat), np.arange(n))


labels_strategy = st.lists(st.integers(0, 9), min_size=20, max_size=400).map(np.array)


@settings(max_examples=50, deadline=None)
@given(labels=labels_strategy, num_clients=st.integers(1, 20), seed=st.integers(0, 2**31))
def test_partitioners_cover_exactly(labels: np.ndarray, num_clients: int, seed: int) -> None:
    n_classes = np.unique(labels).size
    for name, params in PARAMS.items():
        if name == "shards":
            k = min(2, n_classes)
            if not n_classes <= num_clients * k <= labels.size:
                continue
            params = {"classes_per_client": k}
        parts = partition(name, labels, num_clients, seed=seed, **params)
        check_partition(parts, labels.size, num_clients)
        again = partition(name, labels, num_clients, seed=seed, **params)
        assert all(np.array_equal(p, q) for p, q in zip(parts, again, strict=True))


@settings(max_examples=50, deadline=None)
@given(
    labels=labels_strategy,
    num_clients=st.integers(1, 20),
    alpha=st.floats(0.01, 100.0),
    min_size=st.integers(1, 5),
    seed=st.integers(0, 2**31),
)
def test_dirichlet_min_size(labels: np.ndarray, num_clients: int, alpha: float, min_size: int, seed: int) -> None:
    if min_size * num_clients > labels.size:
        with pytest.raises(ConfigError, match="min_size"):
            dirichlet(labels, num_clients, alpha=alpha, seed=seed, min_size=min_size)
        return
    parts = dirichlet(labels, num_clients, alpha=alpha, seed=seed, min_size=min_size)
    check_partition(parts, labels.size, num_clients)
    assert min(p.size for p in parts) >= min_size


@settings(max_examples=50, deadline=None)
@given(
    labels=labels_strategy,
    num_clients=st.integers(1, 20),
    k=st.integers(1, 4),
    seed=st.integers(0, 2**31),
)
def test_shards_classes_per_client(labels: np.ndarray, num_clients: int, k: int, seed: int) -> None:
    n_classes = np.unique(labels).size
    if k > n_classes or not n_classes <= num_clients * k <= labels.size:
        with pytest.raises(ConfigError, match="classes_per_client"):
            shards(labels, num_clients, classes_per_client=k, seed=seed)
        return
    parts = shards(labels, num_clients, classes_per_client=k, seed=seed)
    check_partition(parts, labels.size, num_clients)
    assert all(np.unique(labels[p]).size <= k for p in parts)


BALANCED = np.repeat(np.arange(10), 500)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_partitioners_differ_by_seed(name: str) -> None:
    a = partition(name, BALANCED, 10, seed=0, **PARAMS[name])
    b = partition(name, BALANCED, 10, seed=1, **PARAMS[name])
    assert not all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))


def test_iid_sizes_within_one() -> None:
    sizes = [p.size for p in partition("iid", np.zeros(1003, dtype=np.int64), 10, seed=0)]
    assert max(sizes) - min(sizes) <= 1


def mean_top_share(parts: list[np.ndarray]) -> float:
    """Mean over clients of the share of the client's most frequent class."""
    return float(np.mean([np.bincount(BALANCED[p]).max() / p.size for p in parts]))


def test_dirichlet_alpha_controls_skew() -> None:
    skewed = mean_top_share(dirichlet(BALANCED, 20, alpha=0.1, seed=0))
    uniform = mean_top_share(dirichlet(BALANCED, 20, alpha=1000.0, seed=0))
    assert skewed > 0.5 and uniform < 0.2


def test_dual_dirichlet_alpha2_controls_skew() -> None:
    skewed = mean_top_share(partition("dual_dirichlet", BALANCED, 20, seed=0, alpha1=2e4, alpha2=0.1))
    uniform = mean_top_share(partition("dual_dirichlet", BALANCED, 20, seed=0, alpha1=2e4, alpha2=1000.0))
    assert skewed > 0.5 and uniform < 0.2


@pytest.mark.parametrize(
    ("name", "num_clients", "params", "message"),
    [
        ("iid", 0, {}, r"num_clients must be >= 1, got 0"),
        ("iid", 5001, {}, r"num_clients \(5001\) exceeds the number of training samples \(5000\)"),
        ("dirichlet", 10, {"alpha": 0.0}, r"^dataset\.partition\.alpha must be > 0, got 0\.0$"),
        ("dirichlet", 10, {"alpha": 1.0, "min_size": 501}, r"dataset\.partition\.min_size"),
        ("dirichlet", 10, {}, r"dataset\.partition.*alpha"),
        ("shards", 10, {"classes_per_client": 0}, r"dataset\.partition\.classes_per_client"),
        ("shards", 10, {"classes_per_client": 11}, r"dataset\.partition\.classes_per_client"),
        ("dual_dirichlet", 10, {"alpha1": 1.0, "alpha2": -1.0}, r"dataset\.partition\.alpha2 must be > 0"),
        ("iid", 10, {"alpha": 1.0}, r"dataset\.partition.*alpha"),
    ],
)
def test_partition_bad_config(name: str, num_clients: int, params: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        partition(name, BALANCED, num_clients, seed=0, **params)


# ---------------------------------------------------------------- train/test split


@settings(max_examples=50, deadline=None)
@given(
    indices=st.lists(st.integers(0, 10**6), min_size=1, max_size=200, unique=True).map(np.array),
    test_fraction=st.floats(0.0, 0.99),
    seed=st.integers(0, 2**31),
)
def test_split_train_test_disjoint_and_covering(indices: np.ndarray, test_fraction: float, seed: int) -> None:
    train, test = split_train_test(indices, test_fraction, seed)
    assert np.intersect1d(train, test).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.sort(indices))
    assert train.size >= 1
    if indices.size >= 2 and test_fraction > 0:
        assert test.size >= 1
    again = split_train_test(indices, test_fraction, seed)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])


def test_split_train_test_rejects_bad_fraction() -> None:
    with pytest.raises(ConfigError, match="test_fraction"):
        split_train_test(np.arange(10), 1.0, seed=0)


def test_dual_dirichlet_alpha1_controls_client_sizes() -> None:
    """alpha1 scales a uniform prior over clients: alpha1 = N gives a flat Dirichlet (uneven sizes), a huge alpha1
    near-equal sizes."""
    flat = [p.size for p in partition("dual_dirichlet", BALANCED, 20, seed=0, alpha1=20.0, alpha2=1.0)]
    even = [p.size for p in partition("dual_dirichlet", BALANCED, 20, seed=0, alpha1=2e5, alpha2=1.0)]
    assert np.std(flat) > 5 * np.std(even)
