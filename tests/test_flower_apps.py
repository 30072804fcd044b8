"""The fedhet ServerApp and ClientApp against each other and against Flower's own FedAvg, on Flower's Grid API.

These run the ClientApps in threads of the test process (:class:`fedhet.flower.LocalGrid`): the same ServerApp
logic, ClientApps and Flower messages as a SuperLink or the simulation engine, in seconds (the engine's Ray start
alone takes tens of seconds here; ``test_flower_simulation.py`` runs it). Speeds are imposed by the ClientApp,
scaled down (milliseconds per step).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp.strategy import FedAvg

from fedhet.clients.trainer import TrainConfig
from fedhet.config import DatasetConfig, PartitionConfig
from fedhet.data import load_configured
from fedhet.flower import (
    ClientAppSettings,
    DriverSettings,
    FedhetClient,
    GridDriver,
    LocalGrid,
    ServerAppSettings,
    make_client_app,
    run_on_grid,
)
from fedhet.flower.records import from_array_record, task_content, to_array_record
from fedhet.models import build_model, evaluate
from fedhet.runtime.checkpoint import CheckpointError
from fedhet.strategies import IdentityPlanner, Strategy, UpdateBuffer
from fedhet.strategies.fedasync import FedAsyncScheduler
from fedhet.strategies.staleness import StalenessWeighted
from fedhet.types import Task, Weights

N = 10
SYNTHETIC = DatasetConfig(name="synthetic", partition=PartitionConfig(name="natural"))
COMPASS = {
    "scheduler": {"name": "fedcompass", "q_min": 5, "q_max": 20},
    "planner": {"name": "identity"},
    "aggregator": {"name": "staleness_weighted"},
}
# ten clients, 10x apart from fastest to slowest: 0.5 ms to 5 ms per sample (8 to 80 ms per step of 16), slow enough
# that the imposed pace, not the threads' compute (slower when other processes load the machine), sets the speeds
SPEEDS = tuple(0.0005 * (1 + i) for i in range(N))


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _client(**changes: object) -> ClientAppSettings:
    settings = {
        "dataset": SYNTHETIC,
        "model": "logreg",
        "num_clients": N,
        "seed": 0,
        "train": TrainConfig(lr=0.05, batch_size=16),
    }
    return ClientAppSettings(**{**settings, **changes})


def _server(strategy: dict[str, object], versions: int, metrics: str = "", model: str = "logreg") -> ServerAppSettings:
    return ServerAppSettings(
        strategy=strategy,
        dataset=SYNTHETIC,
        model=model,
        num_clients=N,
        seed=0,
        driver=DriverSettings(max_versions=versions, min_nodes=N),
        metrics_path=metrics,
    )


def test_fedcompass_forms_groups_of_clients_of_different_speeds(tmp_path: Path) -> None:
    grid = LocalGrid(make_client_app(_client(seconds_per_sample=SPEEDS)), N)
    try:
        summary = run_on_grid(grid, _server(COMPASS, 30, str(tmp_path / "metrics.jsonl")))
    finally:
        grid.close()
    assert summary.reason == "max_versions" and summary.version == 30 and summary.failed == summary.refused == 0
    # after every client's first (ungrouped) task, groups aggregate several clients at once, fast and slow together
    grouped = [a for a in summary.aggregations if a.updates >= 3]
    assert len(grouped) >= 3, summary.aggregations
    assert any(set(a.clients) & {0, 1, 2} and set(a.clients) & {7, 8, 9} for a in grouped), summary.aggregations
    # Q from each client's measured speed, so that a group finishes together: fast clients get more local steps
    later = [a for a in summary.assignments if a.version >= N]
    assert len({a.local_steps for a in later}) >= 4
    # (a step's pace is the imposed seconds per sample times the client's minibatch, which the natural partition
    # makes unequal, and a client joining a group gets the steps that group's deadline leaves: the fastest client
    # against all the others is the comparison the schedule keeps; three against three failed a CI run, 13.0
    # against 15.7 steps)
    steps = {c: np.mean([a.local_steps for a in later if a.client_id == c]) for c in range(N)}
    assert steps[0] > np.mean([steps[c] for c in range(1, N)]) + 2, steps
    # it trains: well above chance (10 classes). On the real clock the groups' make-up varies with the machine's
    # timing, and so does accuracy after 30 versions: 0.40 to 0.87 seen on the 2-core machine
    assert summary.accuracy is not None and summary.accuracy > 0.3
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["version"] == 0 and rows[-1]["version"] == 30
    assert set(rows[-1]) >= {"version", "virtual_time", "wall_time", "accuracy", "loss", "bytes_up", "bytes_down"}
    assert rows[-1]["updates_applied"] == sum(a.updates for a in summary.aggregations)


def test_low_bitwidth_clients_train_quantized_and_upload_packed() -> None:
    bits = (4, 8) + (32,) * (N - 2)
    grid = LocalGrid(make_client_app(_client(bitwidths=bits, model="2nn")), N)
    strategy = {
        "scheduler": {"name": "fedavg", "fraction": 1.0, "min_clients": N},
        "planner": {"name": "bitwidth"},
        "aggregator": {"name": "weighted_mean"},
    }
    try:
        summary = run_on_grid(grid, _server(strategy, 2, model="2nn"))
    finally:
        grid.close()
    assert summary.version == 2 and summary.failed == summary.refused == 0
    assert {c: info.profile.bitwidth for c, info in summary.clients.items()} == dict(enumerate(bits))
    # a round moves 8 fp32 models and two packed ones (4- and 8-bit) each way
    fp32 = sum(v.numel() * 4 for v in build_model("2nn", (60,), 10, 0).state_dict().values())
    assert 2 * 8.3 * fp32 < summary.bytes_up < 2 * 8.45 * fp32
    assert 2 * 8.3 * fp32 < summary.bytes_down < 2 * 8.45 * fp32


def test_a_failing_client_is_asked_again_and_the_run_goes_on() -> None:
    bad = _client(seconds_per_sample=SPEEDS)
    grid = LocalGrid(make_client_app(bad), N)
    calls = {"n": 0}
    original = grid.client_app

    class Flaky:
        def __call__(self, message: object, context: object) -> object:
            calls["n"] += 1
            if calls["n"] == 15:
                raise RuntimeError("device fell over")
            return original(message, context)  # type: ignore[arg-type]

    grid.client_app = Flaky()  # type: ignore[assignment]
    try:
        summary = run_on_grid(grid, _server(COMPASS, 12))
    finally:
        grid.close()
    assert summary.version == 12 and summary.failed == 1


def test_fidelity_fedhet_fedavg_matches_flower_fedavg() -> None:
    """Same partition, seed, model and local training (the same ClientApp, minibatches drawn per round): fedhet's
    FedAvg through the fedhet ServerApp and Flower's own FedAvg reach the same test accuracy."""
    rounds = 8
    data = load_configured(SYNTHETIC, N, 0)
    model = build_model("logreg", data.input_shape, data.num_classes, 0)
    initial = {k: v.clone() for k, v in model.state_dict().items()}

    def accuracy(weights: dict[str, torch.Tensor]) -> float:
        model.load_state_dict(weights)
        with torch.no_grad():
            return evaluate(model, data.x_test, data.y_test)[0]

    client = _client(minibatch_seed="round", local_epochs=1)
    grid = LocalGrid(make_client_app(client), N)
    try:
        flower = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=N, min_available_nodes=N)
        history: dict[int, float] = {}

        def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            history[server_round] = accuracy(from_array_record(arrays))
            return MetricRecord({"accuracy": history[server_round]})

        result = flower.start(
            grid, to_array_record(initial), num_rounds=rounds, train_config=ConfigRecord(), evaluate_fn=central
        )
        flower_accuracy = accuracy(from_array_record(result.arrays))
        strategy = {
            "scheduler": {"name": "fedavg", "fraction": 1.0, "min_clients": N, "local_epochs": 1},
            "planner": {"name": "identity"},
            "aggregator": {"name": "weighted_mean"},
        }
        summary = run_on_grid(grid, _server(strategy, rounds))
    finally:
        grid.close()
    assert summary.version == rounds and summary.accuracy is not None
    print(f"after {rounds} rounds: fedhet FedAvg {summary.accuracy:.4f}, Flower FedAvg {flower_accuracy:.4f}")
    assert flower_accuracy > history[0] + 0.2  # both trained
    assert abs(summary.accuracy - flower_accuracy) <= 0.005


def test_the_server_app_checkpoints_and_resumes_through_the_run_core(tmp_path: Path) -> None:
    """A run stopped at version 3 (its ServerApp process gone) resumes from its checkpoint: the strategy's model,
    version and counters continue, metrics append, and a fresh run refuses the used state directory."""
    fedavg = {
        "scheduler": {"name": "fedavg", "fraction": 1.0, "min_clients": N},
        "planner": {"name": "identity"},
        "aggregator": {"name": "weighted_mean"},
    }
    metrics = tmp_path / "metrics.jsonl"

    def run(versions: int, resume: bool) -> object:
        settings = _server(fedavg, versions, str(metrics))
        driver = DriverSettings(max_versions=versions, min_nodes=N, state_dir=str(tmp_path / "state"), resume=resume)
        grid = LocalGrid(make_client_app(_client()), N)
        try:
            return run_on_grid(grid, ServerAppSettings(**{**settings.__dict__, "driver": driver}))
        finally:
            grid.close()

    first = run(3, resume=False)
    with pytest.raises(CheckpointError, match="holds a run"):
        run(6, resume=False)
    second = run(6, resume=True)
    assert first.version == 3 and second.version == 6 and second.reason == "max_versions"  # type: ignore[attr-defined]
    # counters go on from the checkpoint (a round handed out just before the stop is lost: its nodes ask again)
    assert second.results > first.results and second.bytes_up > first.bytes_up  # type: ignore[attr-defined]
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    versions = [r["version"] for r in rows]
    assert versions[0] == 0 and versions[-1] == 6 and versions == sorted(versions)  # no second version 0
    at_three = rows[versions.index(3)]
    assert rows[-1]["updates_applied"] > at_three["updates_applied"] > 0  # a failed task may thin a round
    assert rows[-1]["virtual_time"] > at_three["virtual_time"]


class FailsOnTask(StalenessWeighted):
    """The staleness-weighted mix, failing on any update of task ``task_id`` (an aggregator with a bug)."""

    def __init__(self, task_id: int) -> None:
        super().__init__()
        self.task_id = task_id

    def aggregate(self, global_weights: Weights, updates: UpdateBuffer, version: int) -> dict[str, torch.Tensor]:
        if self.task_id in updates.task_ids():
            raise ValueError(f"cannot mix task {self.task_id}")
        return super().aggregate(global_weights, updates, version)


def test_a_result_the_strategy_fails_on_is_refused_and_the_run_goes_on() -> None:
    grid = LocalGrid(make_client_app(_client(seconds_per_sample=SPEEDS)), N)
    model = build_model("logreg", (60,), 10, 0)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    strategy = Strategy(FedAsyncScheduler(local_steps=5), IdentityPlanner(), FailsOnTask(task_id=3))
    try:
        summary = GridDriver(grid, strategy, initial, DriverSettings(max_versions=15, min_nodes=N)).run()
    finally:
        grid.close()
    assert summary.reason == "max_versions" and summary.version == 15
    assert summary.refused == summary.failed == 1  # task 3's reply: refused, its node asked again
    assert summary.results == len(summary.aggregations) == 15 and all(a.updates == 1 for a in summary.aggregations)
    assert strategy.updates_applied == 15 and strategy.updates_dropped == 0


def test_a_diverged_task_is_an_error_reply_not_an_update() -> None:
    """A 4-bit partition whose training diverges (lr 1e38: NaN weights) answers its train message with an error
    (Flower's 'no result': the server app asks the node again), as `fedhet client` sends nothing."""
    client = FedhetClient(_client(bitwidths=(4,) * N, train=TrainConfig(lr=1e38, batch_size=16)))
    model = build_model("logreg", (60,), 10, 0).state_dict()
    task = Task(7, 0, 0, model, local_epochs=1)
    with pytest.raises(ValueError, match="task 7: local training diverged"):
        client.train(task_content(task, "int4"), partition=0)


@pytest.mark.parametrize("action", ["reject", "clip"])
def test_an_update_over_the_norm_bound_is_refused_or_clipped_as_a_server_does(action: str) -> None:
    """The Flower driver applies the run's norm bound (``DriverSettings.norm_bound``) as ``fedhet server`` does:
    with a bound far below every honest update, ``reject`` refuses each (no version comes out, the nodes are asked
    again until the run's time is up) and ``clip`` scales each onto the bound (FedAsync's mix then moves the model by
    at most the bound a version)."""
    grid = LocalGrid(make_client_app(_client(seconds_per_sample=SPEEDS)), N)
    model = build_model("logreg", (60,), 10, 0)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    strategy = Strategy(FedAsyncScheduler(local_steps=5), IdentityPlanner(), StalenessWeighted())
    bound = 1e-3
    settings = DriverSettings(
        max_versions=3, max_seconds=3.0, min_nodes=N, retry_after=0.05, norm_bound=bound, norm_action=action
    )
    try:
        summary = GridDriver(grid, strategy, initial, settings).run()
    finally:
        grid.close()
    moved = torch.cat([(strategy.global_weights[k] - initial[k]).reshape(-1) for k in initial]).norm()
    if action == "reject":
        assert summary.reason == "max_seconds" and summary.version == 0 and summary.results == 0
        assert summary.refused >= N and summary.clipped == 0 and float(moved) == 0.0
    else:
        assert summary.reason == "max_versions" and summary.version == 3 and summary.refused == 0
        assert summary.clipped == summary.results == 3
        assert 0 < float(moved) <= 3 * bound * (1 + 1e-5)
