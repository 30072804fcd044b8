"""Small frozen value types shared by every part of fedhet.

Weights travel as ``Weights``: an ordered mapping from parameter/buffer name to a tensor, the same keys and
order as the model's ``state_dict()``; on the wire and on a server they are CPU tensors, in a simulation they live
on the executor's device. A chunk of clients trained together hands back its weights as :class:`StackedRow` mappings.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = ["DIVERGED", "ClientInfo", "ClientProfile", "Result", "StackedRow", "Task", "Weights"]

Weights = Mapping[str, torch.Tensor]

#: the loss of a result whose local training diverged (its weights hold NaN or Inf): NaN, which every runtime
#: refuses (``fedhet server``'s validation, :meth:`fedhet.runtime.RunDriver.result`), so the update is dropped and
#: its client asks for work again, in simulation as when deployed
DIVERGED = math.nan


class StackedRow(Mapping[str, torch.Tensor]):
    """Weights that are row ``row`` of ``stacks`` (name -> ``(clients, *shape)``), the weights of a chunk of clients
    trained together; every row of a chunk shares one ``stacks`` mapping, so the update buffer folds a chunk with
    one matrix-vector product per tensor. Reading a tensor gives a view of its row. ``norms`` (when given) holds
    each row's update norm against ``starts``, its task's start weights, computed for the chunk at once
    (:func:`fedhet.updates.update_norm` reads it, for that start, instead of a pass over the row)."""

    __slots__ = ("norms", "row", "stacks", "starts")

    def __init__(
        self,
        stacks: Mapping[str, torch.Tensor],
        row: int,
        norms: Sequence[float] | None = None,
        starts: Sequence[Mapping[str, torch.Tensor]] = (),
    ) -> None:
        self.stacks = stacks
        self.row = row
        self.norms = norms
        self.starts = starts

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.stacks[name][self.row]

    def __iter__(self) -> Iterator[str]:
        return iter(self.stacks)

    def __len__(self) -> int:
        return len(self.stacks)


@dataclass(frozen=True)
class ClientProfile:
    """What a client can do: its speed, the bitwidth it computes at, its memory and its link.

    Attributes:
        seconds_per_sample: local training time per sample (forward + backward), in seconds.
        bandwidth: link speed in bytes per second, used both ways.
        bitwidth: bits per weight the client computes and stores at (32 = fp32).
        memory_bytes: how many bytes of model the client can hold; 0 means no limit.
        availability: probability in (0, 1] that a task handed to the client comes back.
    """

    seconds_per_sample: float
    bandwidth: float
    bitwidth: int = 32
    memory_bytes: int = 0
    availability: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.seconds_per_sample) and self.seconds_per_sample > 0):
            raise ValueError(f"seconds_per_sample must be finite and > 0, got {self.seconds_per_sample}")
        if not (math.isfinite(self.bandwidth) and self.bandwidth > 0):
            raise ValueError(f"bandwidth must be finite and > 0 bytes/s, got {self.bandwidth}")
        if not 1 <= self.bitwidth <= 32:
            raise ValueError(f"bitwidth must be in 1..32, got {self.bitwidth}")
        if self.memory_bytes < 0:
            raise ValueError(f"memory_bytes must be >= 0 (0 = unlimited), got {self.memory_bytes}")
        if not 0.0 < self.availability <= 1.0:
            raise ValueError(f"availability must be in (0, 1], got {self.availability}")


@dataclass(frozen=True)
class ClientInfo:
    """A client as the server knows it.

    Attributes:
        client_id: unique id of the client in the run.
        profile: its speed, bitwidth, memory and link.
        num_samples: training samples it holds (reported; the data itself never leaves the client).
    """

    client_id: int
    profile: ClientProfile
    num_samples: int

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"client {self.client_id}: num_samples must be >= 1, got {self.num_samples}")


@dataclass(frozen=True)
class Task:
    """Work handed to one client.

    Attributes:
        task_id: unique per run; a result names the task it answers.
        client_id: the client that must run it.
        version: global model version the weights were taken from.
        weights: the model the client starts from (possibly planned: quantized, pruned).
        local_steps: number of local minibatch steps, or 0 when ``local_epochs`` is given.
        local_epochs: number of passes over the client's training shard, or 0 when ``local_steps`` is given.
        train: names of ``weights`` the client trains and sends back; empty means all of them. The client keeps
            whatever else its model holds (FedP3's personal head) and leaves the other received tensors frozen.
        sparse: names of ``weights`` that are pruned; they travel in the codec's sparse encoding.
        proximal_mu: FedProx's mu: the client adds ``mu/2 * ||w - w_start||^2`` to its loss over the tensors it
            trains (0 = plain local SGD).
        sparse_bits: bits the ``sparse`` tensors travel at in a float payload: 32 (the default) is the sparse
            encoding, a packed bitwidth packs them (FedP3's frozen layers at int8).
        train_all: the client trains every floating-point tensor it receives, not only ``train`` (FedP3's released
            code), and still sends back only ``train``.
    """

    task_id: int
    client_id: int
    version: int
    weights: Weights
    local_steps: int = 0
    local_epochs: int = 0
    train: frozenset[str] = frozenset()
    sparse: frozenset[str] = frozenset()
    proximal_mu: float = 0.0
    sparse_bits: int = 32
    train_all: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.proximal_mu) and self.proximal_mu >= 0):
            raise ValueError(f"task {self.task_id}: proximal_mu must be finite and >= 0, got {self.proximal_mu}")
        if self.sparse_bits not in (2, 4, 6, 8, 12, 16, 32):
            raise ValueError(
                f"task {self.task_id}: sparse_bits must be 2, 4, 6, 8, 12, 16 or 32, got {self.sparse_bits}"
            )
        if (self.local_steps > 0) == (self.local_epochs > 0):
            raise ValueError(
                f"task {self.task_id}: exactly one of local_steps ({self.local_steps}) "
                f"and local_epochs ({self.local_epochs}) must be > 0"
            )
        if self.train or self.sparse:  # (most tasks name none: no set of the weights' names for them)
            extra = (self.train | self.sparse) - set(self.weights)
            if extra:
                raise ValueError(f"task {self.task_id}: names tensors it does not carry: {sorted(extra)}")

    @property
    def trained(self) -> frozenset[str]:
        """Names the client sends back (and trains)."""
        return self.train or frozenset(self.weights)

    @property
    def optimized(self) -> frozenset[str]:
        """Names of the received tensors the client's optimiser updates: :attr:`trained`, or with ``train_all``
        every floating-point one."""
        if not self.train_all:
            return self.trained
        return frozenset(k for k, v in self.weights.items() if v.is_floating_point())

    def steps_for(self, num_samples: int, batch_size: int) -> int:
        """Local minibatch steps this task takes on a shard of ``num_samples`` with ``batch_size``."""
        if self.local_steps:
            return self.local_steps
        return self.local_epochs * max(1, math.ceil(num_samples / batch_size))


@dataclass(frozen=True)
class Result:
    """A client's answer to a task.

    Attributes:
        task_id: the task answered.
        client_id: who trained.
        version: the global version the client started from (copied from the task).
        weights: the trained model.
        num_samples: training samples the client holds (the weight of its update in a sample-weighted mean).
        local_steps: minibatch steps actually taken.
        train_seconds: measured wall time of local training, in seconds.
        loss: mean training loss over the local steps; NaN (:data:`DIVERGED`) when training diverged, and then the
            result is refused wherever it arrives.
        bitwidth: bits per weight the update was computed and stored at (32 = fp32). The server never trusts a
            client's value: :meth:`~fedhet.strategies.base.Strategy.on_result` sets it from the registered client's
            profile, and buffers and bitwidth-aware aggregators (ProWD, grouped averaging) group updates by it.
    """

    task_id: int
    client_id: int
    version: int
    weights: Weights
    num_samples: int
    local_steps: int
    train_seconds: float
    loss: float
    bitwidth: int = 32
