"""What a run says about its data: which dataset, where its files are, how it is split among clients."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["DatasetConfig", "PartitionConfig"]


@dataclass
class PartitionConfig:
    """How training samples are split among clients.

    Attributes:
        name: ``iid``, ``dirichlet``, ``shards`` (k classes per client) or ``dual_dirichlet``; ``natural`` keeps a
            dataset's own per-client split (Synthetic).
        alpha: Dirichlet concentration over labels (> 0; smaller is more skewed). For ``dual_dirichlet``, alpha2.
        alpha1: ``dual_dirichlet`` only: concentration of client sizes (0 = the number of clients, as in FedCompass).
        classes_per_client: ``shards`` only: classes per client (k).
        test_fraction: fraction of each client's samples held out as its own test split.
    """

    name: str = "dirichlet"
    alpha: float = 0.5
    alpha1: float = 0.0
    classes_per_client: int = 2
    test_fraction: float = 0.2


@dataclass
class DatasetConfig:
    """Which data, where it lives and how it is partitioned.

    Attributes:
        name: registered dataset (``fashion_mnist``, ``synthetic``, or one an installed package declares in the
            ``fedhet.datasets`` entry-point group).
        _target_: the import path of a function (or class) of your own that returns the data (``my_pkg.data.load``):
            a :class:`~fedhet.data.Dataset`, or ``(x_train, y_train, x_test, y_test)`` as tensors or arrays (inputs
            float, labels integers from 0). It is called with ``kwargs`` and with ``num_clients``, ``seed``, ``root``,
            ``alpha`` and ``beta`` where its signature names them; set, it is the dataset and ``name`` is ignored.
        kwargs: keyword arguments of that function.
        root: directory of the data files (Fashion-MNIST: the Debian package's IDX files).
        alpha, beta: Synthetic(alpha, beta) heterogeneity of models and of inputs.
        partition: how samples are split among clients.
    """

    name: str = "fashion_mnist"
    _target_: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)
    root: str = "/usr/share/datasets/fashion-mnist"
    alpha: float = 1.0
    beta: float = 1.0
    partition: PartitionConfig = field(default_factory=PartitionConfig)

    @property
    def label(self) -> str:
        """What names the dataset in logs and reports: its import path, else its registered name."""
        return self._target_ or self.name
