"""A classic Flower NumPyClient joins a fedhet server on loopback, next to a native ``fedhet client``."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from fedhet.metrics import read_metrics
from fedhet.server.testing import Process, spawn, wait_for_file

VERSIONS = 3
COMMON = ["num_clients=2", "seed=0", "dataset=synthetic", "model=logreg"]

# What a Flower user already has: a NumPyClient written against Flower's API, training with plain PyTorch.
USER_CODE = """
import numpy as np
import torch
from flwr.app import Context
from flwr.client import NumPyClient

from fedhet.config import DatasetConfig, PartitionConfig
from fedhet.data import client_splits, load_configured

FITS = []


class LogReg(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.add_module("0", torch.nn.Flatten())
        self.add_module("1", torch.nn.Linear(60, 10))

    def forward(self, x):
        return self._modules["1"](self._modules["0"](x))


class FlowerClient(NumPyClient):
    def __init__(self, partition, partitions):
        config = DatasetConfig(name="synthetic", partition=PartitionConfig(name="natural"))
        data = load_configured(config, partitions, 0)
        index = torch.from_numpy(client_splits(config, data, partitions, 0)[partition][0])
        self.x, self.y = data.x_train[index], data.y_train[index]
        self.net = LogReg()

    def get_properties(self, config):
        return {"num-examples": len(self.x)}

    def get_parameters(self, config):
        return [v.numpy() for v in self.net.state_dict().values()]

    def fit(self, parameters, config):
        keys = self.net.state_dict().keys()
        self.net.load_state_dict({k: torch.tensor(v) for k, v in zip(keys, parameters)})
        optimizer = torch.optim.SGD(self.net.parameters(), lr=0.05)
        losses = []
        for _ in range(int(config["local-epochs"]) or 1):
            for i in range(0, len(self.x), 16):
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(self.net(self.x[i : i + 16]), self.y[i : i + 16])
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
        print("flower fit round", config["server-round"], "loss", np.mean(losses), flush=True)
        return self.get_parameters({}), len(self.x), {"train_loss": float(np.mean(losses))}


def client_fn(context: Context):
    return FlowerClient(context.node_config["partition-id"], context.node_config["num-partitions"]).to_client()
"""


def _client_args(port: str, i: int) -> list[str]:
    return [
        *COMMON,
        f"partition_id={i}",
        f"network.client_id={i}",
        f"network.server=127.0.0.1:{port}",
        "profile.seconds_per_sample=0.001",
        "network.backoff_initial=0.2",
        "network.reconnect_timeout=30",
        "network.max_seconds=90",
        "threads=1",
    ]


def test_a_numpy_client_trains_in_a_fedhet_run(tmp_path: Path) -> None:
    (tmp_path / "my_flower_client.py").write_text(textwrap.dedent(USER_CODE))
    server_args = [
        *COMMON,
        "strategy.scheduler.fraction=1.0",
        "strategy.scheduler.min_clients=2",
        "server.port=0",
        f"server.port_file={tmp_path / 'port'}",
        f"server.state_dir={tmp_path / 'state'}",
        f"server.max_versions={VERSIONS}",
        "server.poll_timeout=1.0",
        "server.heartbeat_seconds=0.2",
        "server.shutdown_grace=5.0",
        "server.threads=1",
    ]
    server = spawn("fedhet.server", server_args, tmp_path / "server.log", tmp_path)
    clients: list[Process] = []
    try:
        port = wait_for_file(tmp_path / "port", 60, server)
        native = spawn("fedhet.clients.network", _client_args(port, 0), tmp_path / "native.log", tmp_path)
        flower_args = ["--app", "my_flower_client:client_fn", *_client_args(port, 1)]
        flower = spawn("fedhet.flower.numpy_client", flower_args, tmp_path / "flower.log", tmp_path)
        clients = [native, flower]
        codes = [c.wait(timeout=120) for c in clients]
        assert server.wait(timeout=30) == 0, server.text()[-3000:]
    finally:
        for p in (*clients, server):
            p.kill()
    assert codes == [0, 0], f"native:\n{clients[0].text()[-2000:]}\nflower:\n{clients[1].text()[-2000:]}"
    fits = [line for line in clients[1].text().splitlines() if line.startswith("flower fit round")]
    assert [int(line.split()[3]) for line in fits] == list(range(1, VERSIONS + 1))
    rows = read_metrics(tmp_path / "state" / "metrics.jsonl")
    assert rows[-1].version == VERSIONS and rows[-1].updates_applied == 2 * VERSIONS
    assert rows[-1].accuracy > rows[0].accuracy + 0.2
