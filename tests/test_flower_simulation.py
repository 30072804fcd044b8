"""FedCompass through Flower's simulation engine (``flwr.simulation.run_simulation``, Ray backend): ten
ClientApps of speeds 10x apart (imposed by the ClientApp, scaled down to milliseconds per step) form groups.

Slow: the engine starts a Ray cluster and one worker process per client first (about 25 s on two cores); the
same ServerApp and ClientApp run in seconds on the in-process grid in ``test_flower_apps.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("ray")

from flwr.simulation import run_simulation

from fedhet.clients.trainer import TrainConfig
from fedhet.config import DatasetConfig, PartitionConfig
from fedhet.flower import (
    ClientAppSettings,
    DriverSettings,
    RunSummary,
    ServerAppSettings,
    make_client_app,
    make_server_app,
)

N = 10
SYNTHETIC = DatasetConfig(name="synthetic", partition=PartitionConfig(name="natural"))


@pytest.mark.slow
def test_fedcompass_in_flowers_simulation_engine_forms_groups(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    client = ClientAppSettings(
        dataset=SYNTHETIC,
        model="logreg",
        num_clients=N,
        seed=0,
        train=TrainConfig(lr=0.05, batch_size=16),
        seconds_per_sample=tuple(0.0002 * (1 + i) for i in range(N)),
        threads=1,
    )
    strategy = {
        "scheduler": {"name": "fedcompass", "q_min": 5, "q_max": 20},
        "planner": {"name": "identity"},
        "aggregator": {"name": "staleness_weighted"},
    }
    server = ServerAppSettings(
        strategy=strategy,
        dataset=SYNTHETIC,
        model="logreg",
        num_clients=N,
        seed=0,
        driver=DriverSettings(max_versions=30, min_nodes=N),
        metrics_path=str(tmp_path / "metrics.jsonl"),
    )
    summaries: list[RunSummary] = []
    run_simulation(
        make_server_app(server, on_end=summaries.append),
        make_client_app(client),
        num_supernodes=N,
        backend_config={"client_resources": {"num_cpus": 0.2}, "init_args": {"num_cpus": 2}},
    )
    assert len(summaries) == 1
    summary = summaries[0]
    print([(a.version, a.updates, a.clients) for a in summary.aggregations])
    assert summary.reason == "max_versions" and summary.failed == summary.refused == 0
    assert sorted(summary.clients) == list(range(N))  # client id = the node's partition id
    grouped = [a for a in summary.aggregations if a.updates >= 3]
    assert len(grouped) >= 2, summary.aggregations
    assert any(set(a.clients) & {0, 1, 2} and set(a.clients) & {7, 8, 9} for a in grouped)
    assert len({a.local_steps for a in summary.assignments if a.version >= N}) >= 3
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["version"] == 30 and rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.2
