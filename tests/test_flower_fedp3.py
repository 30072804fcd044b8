"""FedP3 (pruned sub-models, personal heads) and DP-SGD through the fedhet ServerApp and ClientApp on Flower's Grid.

The ClientApps run in threads of the test process (:class:`fedhet.flower.LocalGrid`). Every message is recorded on
its way, so the tests see what travels: the task's shared layers (the unassigned ones pruned, in the codec's sparse
encoding), never the personal head; replies with only the assigned layers; each DP client's epsilon.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("opacus")

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp

from fedhet.clients.trainer import PrivacyConfig, TrainConfig
from fedhet.config import DatasetConfig, PartitionConfig
from fedhet.flower import ClientAppSettings, DriverSettings, GridDriver, LocalGrid, make_client_app
from fedhet.flower.clientapp import load_state
from fedhet.flower.records import CODEC_STYPE_PREFIX, array_record_nbytes, sparse_names
from fedhet.models import build_model
from fedhet.strategies import build_strategy
from fedhet.strategies.fedp3 import FedP3Planner

N = 4
SYNTHETIC = DatasetConfig(name="synthetic", partition=PartitionConfig(name="natural"))
FEDP3 = {
    "scheduler": {"name": "fedavg", "fraction": 1.0, "min_clients": 1, "local_epochs": 1, "local_steps": 0},
    "planner": {"name": "fedp3", "variant": "lowerb"},
    "aggregator": {"name": "weighted_mean"},
}
HEAD = ("5.weight", "5.bias")  # 2nn: layers 1 and 3 shared, 5 (the classifier) personal
LAYERS = {"1": ("1.weight", "1.bias"), "3": ("3.weight", "3.bias")}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _settings(**changes: Any) -> ClientAppSettings:
    settings: dict[str, Any] = {
        "dataset": SYNTHETIC,
        "model": "2nn",
        "num_clients": N,
        "seed": 0,
        "train": TrainConfig(lr=0.05, batch_size=16),
    }
    return ClientAppSettings(**{**settings, **changes})


class Recorder:
    """Calls a ClientApp (or a fresh one per message, as a SuperNode's ClientApp processes are) and keeps every
    train message and reply, with the partition it went to."""

    def __init__(self, app: Callable[[], ClientApp]) -> None:
        self.app = app
        self.fixed = app()
        self.fresh = False
        self.train: list[tuple[int, Message, Message]] = []

    def __call__(self, message: Message, context: Context) -> Message:
        app = self.app() if self.fresh else self.fixed
        reply = app(message, context)
        if message.metadata.message_type == "train":
            partition = context.node_config["partition-id"]
            assert isinstance(partition, int)
            self.train.append((partition, message, reply))
        return reply


def _run(
    settings: ClientAppSettings, versions: int, fresh: bool = False, min_clients: int = 1
) -> tuple[Any, Recorder, LocalGrid]:
    recorder = Recorder(lambda: make_client_app(settings))
    recorder.fresh = fresh
    grid = LocalGrid(recorder.fixed, N)
    grid.client_app = recorder  # type: ignore[assignment]
    model = build_model("2nn", (60,), 10, 0)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    scheduler = {**FEDP3["scheduler"], "min_clients": min_clients}
    strategy = build_strategy({**FEDP3, "scheduler": scheduler}, 0)
    try:
        summary = GridDriver(
            grid, strategy, initial, DriverSettings(max_versions=versions, min_nodes=N, max_seconds=60)
        ).run()
    finally:
        grid.close()
    return summary, recorder, grid


def _arrays(message: Message) -> ArrayRecord:
    record = message.content["arrays"]
    assert isinstance(record, ArrayRecord)
    return record


def test_fedp3_uploads_only_the_assigned_layers_and_the_head_never_travels() -> None:
    summary, recorder, grid = _run(_settings(), versions=3)
    assert summary.reason == "max_versions" and summary.version == 3
    assert summary.failed == summary.refused == 0 and summary.results >= 3
    initial = build_model("2nn", (60,), 10, 0).state_dict()
    for partition, message, reply in recorder.train:
        sent, back = _arrays(message), _arrays(reply)
        config = message.content["config"]
        assert isinstance(config, ConfigRecord)
        # lowerb: client i trains shared layer i mod 2, the other shared layer comes pruned, the head stays home
        assigned = LAYERS["1" if partition % 2 == 0 else "3"]
        other = LAYERS["3" if partition % 2 == 0 else "1"]
        assert list(sent) == [*LAYERS["1"], *LAYERS["3"]]
        assert config["train"] == list(assigned) and config["sparse"] == [other[0]]
        assert sparse_names(sent) == {other[0]} and sent[other[0]].stype == CODEC_STYPE_PREFIX + "sparse-fp32"
        assert list(back) == list(assigned)
        assert not set(HEAD) & (set(sent) | set(back))
    # the pruned layer travels at its pruned size (FedP3's keep ratio 0.9: a bitmask and 90% of the values)
    sizes = [len(_arrays(m)["3.weight"].data) for p, m, _ in recorder.train if p % 2 == 0]
    assert all(s < 0.95 * 200 * 200 * 4 for s in sizes)
    # every head trained at its client and none reached the server: the global head is the initial one
    for partition, node in enumerate(grid.node_ids):
        state = load_state(grid.contexts[node], partition, None)
        assert state is not None and set(state.tensors) == set(HEAD)
        assert not torch.equal(state.tensors["5.weight"], initial["5.weight"])
    planner = FedP3Planner("lowerb")
    assert planner.layout(initial).head == HEAD
    # what travels down per task: the shared layers, one of them pruned, and never the head
    shared = sum(initial[n].numel() * 4 for names in LAYERS.values() for n in names)
    down = [array_record_nbytes(_arrays(m)) for _, m, _ in recorder.train]
    assert all(d < shared for d in down) and summary.bytes_down == sum(down)
    assert summary.bytes_up == sum(array_record_nbytes(_arrays(r)) for _, _, r in recorder.train)


def test_dp_fedp3_reports_growing_epsilon_and_keeps_state_across_fresh_client_processes() -> None:
    """Each message runs in a fresh ClientApp (a SuperNode starts one process per message): the head and the DP
    accountant come back from the node's Context.state, so epsilon keeps growing over the client's tasks."""
    privacy = PrivacyConfig(max_grad_norm=1.0, noise_multiplier=1.0, delta=1e-5)
    summary, recorder, grid = _run(_settings(privacy=privacy), versions=3, fresh=True, min_clients=N)
    assert summary.version == 3 and summary.failed == summary.refused == 0
    assert set(summary.epsilon) == set(range(N))
    for partition, node in enumerate(grid.node_ids):
        epsilons = summary.epsilon[partition]
        assert len(epsilons) == 3 and 0 < epsilons[0] < epsilons[1] < epsilons[2], epsilons
        state = load_state(grid.contexts[node], partition, privacy)
        assert state is not None and state.accountant is not None
        assert state.epsilon(privacy.delta) == pytest.approx(epsilons[-1])
        taken = sum(_steps(reply) for p, _, reply in recorder.train if p == partition)
        assert sum(steps for _, _, steps in state.accountant.history) == taken  # one accountant step per DP step
    for _, _, reply in recorder.train:
        metrics = reply.content["metrics"]
        assert isinstance(metrics, MetricRecord) and metrics["epsilon"] > 0


def _steps(reply: Message) -> int:
    metrics = reply.content["metrics"]
    assert isinstance(metrics, MetricRecord)
    steps = metrics["local-steps"]
    assert isinstance(steps, int)
    return steps


def test_the_server_takes_only_trained_tensors_of_the_right_shape_and_finite() -> None:
    from fedhet.flower.records import RecordError
    from fedhet.flower.serverapp import _check_update
    from fedhet.types import Task

    weights = {k: v for k, v in build_model("2nn", (60,), 10, 0).state_dict().items() if k not in HEAD}
    task = Task(1, 0, 0, weights, local_epochs=1, train=frozenset(LAYERS["1"]), sparse=frozenset({"3.weight"}))
    _check_update({n: weights[n] for n in LAYERS["1"]}, task)
    _check_update({"1.bias": weights["1.bias"]}, task)  # a subset: averaged over the updates that carry it
    bad: list[dict[str, torch.Tensor]] = [
        {},
        {**{n: weights[n] for n in LAYERS["1"]}, "3.bias": weights["3.bias"]},  # a layer it did not train
        {"1.bias": weights["1.bias"], "5.bias": torch.zeros(10)},  # the head
        {"1.bias": torch.zeros(201)},
        {"1.bias": weights["1.bias"].double()},
        {"1.bias": torch.full((200,), float("nan"))},
    ]
    for update in bad:
        with pytest.raises(RecordError):
            _check_update(update, task)
    whole = Task(2, 0, 0, weights, local_epochs=1)
    _check_update(dict(weights), whole)
    with pytest.raises(RecordError, match="missing"):
        _check_update({n: weights[n] for n in LAYERS["1"]}, whole)
