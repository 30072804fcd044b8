"""A Flower ClientApp that runs fedhet's client trainers on the task a message carries.

Each SuperNode is one fedhet client: its partition is ``partition-id`` of ``num-partitions`` in the node config
(what Flower's simulation engine sets, and what ``flower-supernode --node-config`` gives a real node), split by
fedhet's own partitioners, so node k trains on exactly the samples fedhet's simulator gives client k. A client of
bitwidth ``b`` < 32 trains with :class:`~fedhet.clients.quantized.QuantizedTrainer` and answers at ``int<b>``;
fp32 clients train with :class:`~fedhet.clients.trainer.LocalTrainer`, with DP-SGD (Opacus) when
``ClientAppSettings.privacy`` is set.

A task may carry part of the model (FedP3: its shared layers, the unassigned ones pruned, listed in the message's
``train`` and ``sparse`` names): the client trains the ``train`` tensors and its own ones (the personal head, which
never travels) and answers with the ``train`` tensors only. What a client keeps between its tasks, its
:class:`~fedhet.clients.trainer.ClientState` (own tensors, DP accountant), lives **per node process**: in the
:class:`FedhetClient` of the process, keyed by partition id (Flower's simulation engine and :class:`LocalGrid` keep
one such process for all their tasks). A SuperNode starts a fresh ClientApp process per message, so the state is
also written to the node's ``Context.state`` after every task (``fedhet-own``: the own tensors; ``fedhet-dp``: the
accountant's history) and read back by a process that does not hold it; the SuperNode keeps that context for the
run.

The app answers ``query`` (its profile), ``train`` (a fedhet task, or a round of a Flower strategy such as Flower's
``FedAvg``) and ``evaluate`` (accuracy on its held-out split). Speeds can be imposed per partition, as ``fedhet
client``'s ``profile.slowdown`` does: a task is padded with sleep to ``steps x batch x seconds_per_sample``, and
that is the training time the reply reports.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedhet import codec, quant
from fedhet.clients.personal import FineTune, personal_accuracy
from fedhet.clients.probe import measure_seconds_per_sample
from fedhet.clients.quantized import QuantizedTrainer
from fedhet.clients.trainer import (
    ClientState,
    ClientTrainer,
    LocalTrainer,
    PrivacyConfig,
    TrainConfig,
    check_max_layer_params,
    task_seed,
)
from fedhet.config import DatasetConfig, ModelConfig
from fedhet.data import client_splits, load_configured
from fedhet.flower.records import (
    RecordError,
    from_array_record,
    parse_task,
    profile_content,
    result_content,
    to_array_record,
)
from fedhet.models import build_model, dp_incompatible, evaluate
from fedhet.types import ClientProfile, Task

__all__ = ["ClientAppSettings", "FedhetClient", "load_state", "make_client_app", "node_partition", "save_state"]

OWN_KEY, DP_KEY = "fedhet-own", "fedhet-dp"  # a node's ClientState in its Context.state


@dataclass(frozen=True)
class ClientAppSettings:
    """What every node of a run shares; per-partition values are tuples indexed by partition id.

    Attributes:
        dataset: the run's dataset and partitioning (as ``fedhet simulate`` / ``fedhet client`` configure it).
        model: registered model name (``cnn``, ``2nn``, ``logreg``), or a :class:`~fedhet.config.ModelConfig`
            (a model of your own by import path).
        num_clients: partitions the dataset is split into (must match the node config's ``num-partitions``).
        seed: the run seed: data split, model init, minibatch order.
        train: local optimiser settings.
        seconds_per_sample: imposed speed per partition, seconds per sample (tasks are padded with sleep to it);
            empty: measure each node's speed at its first query and do not pace.
        bitwidths: bits per weight per partition (32 = fp32); empty: every client is fp32.
        bandwidth: the link speed clients report, bytes per second.
        encoding: how fp32 clients' floating-point results travel (``fp32``, ``fp16``, ``bf16``).
        minibatch_seed: ``task``: a task's minibatch order is drawn from (seed, task id), as in fedhet's simulator;
            ``round``: from (seed, partition, round = version + 1), as for a Flower strategy's rounds, so one
            experiment under fedhet's FedAvg and Flower's FedAvg trains on the same minibatches.
        local_epochs: epochs of a Flower strategy's round that names neither ``local-steps`` nor ``local-epochs``.
        threads: torch threads per node (0 = leave torch's default).
        privacy: DP-SGD settings of every client (None: plain SGD); fp32 clients only. Each client's epsilon at
            ``privacy.delta`` goes into its train replies' metrics (``epsilon``). With ``target_epsilon``, set
            ``planned_tasks`` to the tasks a client will run (with full participation: the versions).
        finetune_epochs: head fine-tuning epochs of the personalised accuracy a client with a personal head (FedP3)
            reports with each result.
        dp_compatible: the model's layers DP-SGD cannot train are replaced (``model.dp_compatible``); with
            ``privacy`` a model that has such layers needs it, here and in the ServerApp's settings.
    """

    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: str | ModelConfig = "cnn"
    num_clients: int = 10
    seed: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)
    seconds_per_sample: tuple[float, ...] = ()
    bitwidths: tuple[int, ...] = ()
    bandwidth: float = 1.0e7
    encoding: str = "fp32"
    minibatch_seed: str = "task"
    local_epochs: int = 1
    threads: int = 0
    privacy: PrivacyConfig | None = None
    finetune_epochs: int = 5
    dp_compatible: bool = False

    def __post_init__(self) -> None:
        if self.num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {self.num_clients}")
        for name in ("seconds_per_sample", "bitwidths"):
            values = getattr(self, name)
            if values and len(values) != self.num_clients:
                raise ValueError(f"{name} needs one value per partition ({self.num_clients}), got {len(values)}")
        if any(not s > 0 for s in self.seconds_per_sample):
            raise ValueError("seconds_per_sample values must be > 0")
        for bits in self.bitwidths:
            if bits != quant.FULL_PRECISION and bits not in quant.BITWIDTHS:
                raise ValueError(f"bitwidth {bits} is not one of {list(quant.BITWIDTHS)} or 32")
        if self.encoding not in codec.ENCODINGS:
            raise ValueError(f"encoding must be one of {sorted(codec.ENCODINGS)}, got {self.encoding!r}")
        if self.minibatch_seed not in ("task", "round"):
            raise ValueError(f"minibatch_seed must be task or round, got {self.minibatch_seed!r}")
        if self.local_epochs < 1:
            raise ValueError(f"local_epochs must be >= 1, got {self.local_epochs}")
        if self.privacy is not None and any(b != quant.FULL_PRECISION for b in self.bitwidths):
            raise ValueError("privacy (DP-SGD) trains fp32 clients only; bitwidths must all be 32")


def node_partition(context: Context, settings: ClientAppSettings) -> int:
    """The node's partition id (``partition-id`` of its node config), checked against the run's client count."""
    config = context.node_config
    partition, count = config.get("partition-id"), config.get("num-partitions", settings.num_clients)
    if not isinstance(partition, int) or isinstance(partition, bool):
        raise RecordError(f"node {context.node_id}: node config needs an integer partition-id, got {partition!r}")
    if count != settings.num_clients or not 0 <= partition < settings.num_clients:
        raise RecordError(
            f"node {context.node_id}: partition {partition} of {count} does not fit a run of "
            f"{settings.num_clients} clients"
        )
    return partition


class FedhetClient:
    """One process's fedhet client state: the dataset (loaded once), per thread one model and trainer shared by the
    partitions it serves in turn (Flower's simulation runs many nodes per worker), and per partition a measured
    speed and its :class:`~fedhet.clients.trainer.ClientState` (own tensors, DP accountant), kept in this process
    for the partition's next task. Pickles to its settings alone (Flower ships the ClientApp to its workers)."""

    def __init__(self, settings: ClientAppSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._local = threading.local()
        self._data: Any = None
        self._splits: list[tuple[np.ndarray, np.ndarray]] = []
        self._measured: dict[int, float] = {}
        self._initial: dict[str, torch.Tensor] = {}
        self.states: dict[int, ClientState] = {}  # partition id -> its state, in this process
        self._partition_locks: dict[int, threading.Lock] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"settings": self.settings}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["settings"])  # type: ignore[misc]

    def _load(self) -> None:
        with self._lock:
            if self._data is None:
                s = self.settings
                if s.threads:
                    torch.set_num_threads(s.threads)
                data = load_configured(s.dataset, s.num_clients, s.seed)
                self._splits = client_splits(s.dataset, data, s.num_clients, s.seed)
                initial = build_model(s.model, data.input_shape, data.num_classes, s.seed, s.dp_compatible)
                incompatible = dp_incompatible(initial)
                if s.privacy is not None and incompatible:
                    raise ValueError(
                        f"privacy: the model has layers DP-SGD cannot train ({incompatible}); set "
                        "dp_compatible=True in the ClientApp's and the ServerApp's settings"
                    )
                check_max_layer_params(initial, s.privacy.max_layer_params if s.privacy is not None else 0)
                self._initial = {k: v.detach().clone() for k, v in initial.state_dict().items()}
                self._data = data

    def samples(self, partition: int, held_out: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of a partition's training split (or its held-out split)."""
        self._load()
        index = torch.from_numpy(self._splits[partition][1 if held_out else 0])
        return self._data.x_train[index], self._data.y_train[index]

    def _model(self) -> torch.nn.Module:
        self._load()
        s = self.settings
        return build_model(s.model, self._data.input_shape, self._data.num_classes, s.seed, s.dp_compatible)

    def trainer(self) -> ClientTrainer:
        """This thread's trainer: fp32 (DP-SGD under privacy), and quantization-aware when a partition is below 32
        bits (the one :class:`~fedhet.clients.trainer.ClientTrainer` every client trains with)."""
        trainer: ClientTrainer | None = getattr(self._local, "trainer", None)
        if trainer is None:
            local = LocalTrainer(self._model(), self.settings.train, privacy=self.settings.privacy)
            low = any(b != quant.FULL_PRECISION for b in self.settings.bitwidths)
            quantized = QuantizedTrainer(self._model(), self.settings.train) if low else None
            trainer = self._local.trainer = ClientTrainer(local, quantized)
        return trainer

    def probe_trainer(self) -> LocalTrainer:
        """This thread's plain-SGD trainer for measuring speed (the fp32 one when it is not DP)."""
        if self.settings.privacy is None:
            return self.trainer().local
        trainer: LocalTrainer | None = getattr(self._local, "probe", None)
        if trainer is None:
            trainer = self._local.probe = LocalTrainer(self._model(), self.settings.train)
        return trainer

    def bitwidth(self, partition: int) -> int:
        return self.settings.bitwidths[partition] if self.settings.bitwidths else quant.FULL_PRECISION

    def profile(self, partition: int) -> tuple[ClientProfile, int]:
        """(profile, training samples) of a partition: the imposed speed, or one measured on first use."""
        x, y = self.samples(partition)
        if self.settings.seconds_per_sample:
            seconds = self.settings.seconds_per_sample[partition]
        else:
            if partition not in self._measured:  # plain SGD: a DP-SGD step costs more (impose speeds under DP)
                self._measured[partition] = measure_seconds_per_sample(self.probe_trainer(), x, y)
            seconds = self._measured[partition]
        profile = ClientProfile(seconds, self.settings.bandwidth, self.bitwidth(partition))
        return profile, len(x)

    def state(self, partition: int, task: Task | None = None, context: Context | None = None) -> ClientState:
        """The partition's :class:`~fedhet.clients.trainer.ClientState`: the one this process holds, else the one
        saved in the node's ``context`` (a fresh ClientApp process on a SuperNode), else a new one. Tensors of the
        model that ``task`` does not carry and the state does not hold yet (FedP3's head, at the partition's first
        such task) start from the initial model, as in fedhet's simulator."""
        self._load()
        state = self.states.get(partition)
        if state is None and context is not None:
            state = load_state(context, partition, self.settings.privacy)
        if state is None:
            state = ClientState()
        if task is not None:
            for name, value in self._initial.items():
                if name not in task.weights and name not in state.tensors:
                    state.tensors[name] = value.clone()
        self.states[partition] = state
        return state

    def personal_accuracy(self, partition: int, task: Task, state: ClientState) -> float | None:
        """The partition's personalised accuracy on ``task``'s model with its own head (FedP3), as ``fedhet client``
        measures it (:mod:`fedhet.clients.personal`); None when it keeps no head or holds no held-out samples."""
        own = {k: v for k, v in state.tensors.items() if k not in task.weights}
        held = self.samples(partition, held_out=True)
        if not own or not len(held[0]):
            return None
        model: torch.nn.Module | None = getattr(self._local, "personal_model", None)
        if model is None:
            model = self._local.personal_model = self._model()
        tune = FineTune(self.settings.finetune_epochs, self.settings.train.lr, self.settings.train.batch_size)
        seed = task_seed(self.settings.seed, task.task_id)
        return personal_accuracy(model, task.weights, own, self.samples(partition), held, tune, seed)

    def epsilon(self, partition: int) -> float:
        """The epsilon the partition has spent at ``privacy.delta`` (0 without DP or before its first task)."""
        state = self.states.get(partition)
        privacy = self.settings.privacy
        return state.epsilon(privacy.delta) if state is not None and privacy is not None else 0.0

    def _partition_lock(self, partition: int) -> threading.Lock:
        with self._lock:
            return self._partition_locks.setdefault(partition, threading.Lock())

    def train(self, content: RecordDict, partition: int, context: Context | None = None) -> RecordDict:
        """Run the task of a train message's ``content`` with the partition's state (saved into ``context`` too,
        when given); the reply's content."""
        spec = parse_task(content, partition, self.settings.local_epochs)
        task = spec.task
        x, y = self.samples(partition)
        seed, seeded = self.settings.seed, task
        if self.settings.minibatch_seed == "round" or not spec.fedhet_task:
            seed = int(np.random.SeedSequence([self.settings.seed, partition]).generate_state(1)[0])
            seeded = replace(task, task_id=task.version + 1)
        bits = self.bitwidth(partition)
        with self._partition_lock(partition):  # one task of a partition at a time: it updates the state
            state = self.state(partition, task, context)
            personal = self.personal_accuracy(partition, task, state) if spec.fedhet_task else None
            trainer = self.trainer()  # built on a thread's first task: not part of the training time it reports
            start = time.perf_counter()
            result = trainer.train(seeded, x, y, seed, bits, state)
            encoding = codec.encoding_for_bitwidth(bits, self.settings.encoding)
            seconds = time.perf_counter() - start
            if context is not None:
                save_state(context, partition, state)
        if math.isnan(result.loss):  # DIVERGED: an error reply, which the server app answers by asking again
            raise ValueError(f"task {task.task_id}: local training diverged (NaN or Inf); no update")
        if self.settings.seconds_per_sample:  # pace the task to the imposed speed
            target = result.local_steps * min(self.settings.train.batch_size, len(x))
            target_seconds = target * self.settings.seconds_per_sample[partition]
            time.sleep(max(0.0, target_seconds - seconds))
            seconds = max(seconds, target_seconds)
        result = replace(result, task_id=task.task_id, client_id=partition, version=task.version, train_seconds=seconds)
        if not spec.fedhet_task:
            encoding = "fp32"  # Flower's strategies aggregate numpy arrays
        epsilon = self.epsilon(partition) if self.settings.privacy is not None else None
        return result_content(result, encoding, spec.fedhet_task, epsilon, personal)

    def evaluate(self, content: RecordDict, partition: int, context: Context | None = None) -> RecordDict:
        """Accuracy and loss of the message's model on the partition's held-out split; tensors the message does not
        carry (FedP3's head) are the partition's own (personalised accuracy)."""
        spec = parse_task(content, partition, self.settings.local_epochs)
        x, y = self.samples(partition, held_out=True)
        model = self.trainer().local.model
        self._load()
        held = self.states.get(partition)
        if held is None and context is not None:
            held = load_state(context, partition, self.settings.privacy)
        own = held.tensors if held is not None else {}
        model.load_state_dict({**self._initial, **own, **spec.task.weights})
        accuracy, loss = evaluate(model, x, y) if len(x) else (0.0, 0.0)
        return RecordDict({"metrics": MetricRecord({"eval-acc": accuracy, "eval-loss": loss, "num-examples": len(x)})})


def make_client_app(settings: ClientAppSettings) -> ClientApp:
    """A Flower ClientApp running fedhet's trainers with ``settings``."""
    client = FedhetClient(settings)
    app = ClientApp()

    @app.query()
    def query(message: Message, context: Context) -> Message:
        partition = node_partition(context, settings)
        profile, samples = client.profile(partition)
        return Message(profile_content(profile, samples, partition), reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        partition = node_partition(context, settings)
        return Message(client.train(message.content, partition, context), reply_to=message)

    @app.evaluate()
    def evaluate_(message: Message, context: Context) -> Message:
        content = message.content
        if "config" not in content:
            content["config"] = ConfigRecord({"server-round": 0})
        return Message(client.evaluate(content, node_partition(context, settings), context), reply_to=message)

    return app


def save_state(context: Context, partition: int, state: ClientState) -> None:
    """Write ``state`` into the node's ``context.state`` (which a SuperNode keeps for the run)."""
    context.state[OWN_KEY] = to_array_record(state.tensors)
    history = list(state.accountant.history) if state.accountant is not None else []
    context.state[DP_KEY] = ConfigRecord(
        {
            "partition-id": partition,
            "accountant": state.accountant is not None,
            "noise-multiplier": float(state.noise_multiplier),
            "noise": [float(h[0]) for h in history],
            "sample-rate": [float(h[1]) for h in history],
            "steps": [int(h[2]) for h in history],
        }
    )


def load_state(context: Context, partition: int, privacy: PrivacyConfig | None) -> ClientState | None:
    """The partition's state saved in ``context.state`` by :func:`save_state` (None: none saved for it)."""
    own, dp = context.state.get(OWN_KEY), context.state.get(DP_KEY)
    if not isinstance(own, ArrayRecord) or not isinstance(dp, ConfigRecord) or dp.get("partition-id") != partition:
        return None
    state = ClientState(from_array_record(own))
    if dp.get("accountant") and privacy is not None:
        from opacus.accountants import RDPAccountant

        noise, rates, steps = dp.get("noise"), dp.get("sample-rate"), dp.get("steps")
        history: list[tuple[float, float, int]] = []
        lists = isinstance(noise, list) and isinstance(rates, list) and isinstance(steps, list)
        if lists and isinstance(noise, list) and isinstance(rates, list) and isinstance(steps, list):
            if len(noise) == len(rates) == len(steps):
                for n, r, k in zip(noise, rates, steps, strict=True):
                    if isinstance(n, float) and isinstance(r, float) and isinstance(k, int):
                        history.append((n, r, k))
            lists = len(history) == len(noise)
        if not lists:
            raise RecordError(f"context state {DP_KEY!r}: malformed accountant history")
        state.accountant = RDPAccountant()
        state.accountant.history = history
        noise_multiplier = dp.get("noise-multiplier")
        state.noise_multiplier = float(noise_multiplier) if isinstance(noise_multiplier, int | float) else 0.0
    return state
