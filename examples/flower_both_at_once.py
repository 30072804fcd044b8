"""fedhet's ClientApp under Flower's own FedAvg, and fedhet's FedAvg (a fedhet ServerApp strategy) on the same
Flower Grid: ten nodes, FedProx's Synthetic(1, 1) split by client, logistic regression, eight rounds. Prints the
test accuracy each reaches.

    python examples/flower_both_at_once.py

The nodes run in threads of this process (``fedhet.flower.LocalGrid``: a Flower ``Grid`` carrying the same
messages a SuperLink would, in seconds); on a SuperLink the same two apps run under ``flwr run``
(docs/coming_from_flower.md, "On a SuperLink").
"""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAvg

from fedhet.clients.trainer import TrainConfig
from fedhet.config import DatasetConfig, PartitionConfig
from fedhet.data import load_configured
from fedhet.flower import (
    ClientAppSettings,
    DriverSettings,
    LocalGrid,
    ServerAppSettings,
    from_array_record,
    make_client_app,
    run_on_grid,
    to_array_record,
)
from fedhet.models import build_model, evaluate

NODES, ROUNDS = 10, 8
data = DatasetConfig(name="synthetic", partition=PartitionConfig(name="natural"))
client_app = make_client_app(
    ClientAppSettings(
        dataset=data,
        model="logreg",
        num_clients=NODES,
        seed=0,
        train=TrainConfig(lr=0.05, batch_size=16),
        minibatch_seed="round",  # minibatches drawn per (seed, partition, round): the same under both strategies
    )
)
fedhet_fedavg = ServerAppSettings(
    strategy={
        "scheduler": {"name": "fedavg", "fraction": 1.0, "min_clients": NODES, "local_epochs": 1},
        "planner": {"name": "identity"},
        "aggregator": {"name": "weighted_mean"},
    },
    dataset=data,
    model="logreg",
    num_clients=NODES,
    seed=0,
    driver=DriverSettings(max_versions=ROUNDS, min_nodes=NODES),
)


def main() -> None:
    test = load_configured(data, NODES, 0)
    model = build_model("logreg", test.input_shape, test.num_classes, 0)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    grid = LocalGrid(client_app, NODES)
    try:
        flower = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=NODES, min_available_nodes=NODES)
        result = flower.start(grid, to_array_record(initial), num_rounds=ROUNDS, train_config=ConfigRecord())
        summary = run_on_grid(grid, fedhet_fedavg)
    finally:
        grid.close()
    model.load_state_dict(from_array_record(result.arrays))
    with torch.no_grad():
        flower_accuracy = evaluate(model, test.x_test, test.y_test)[0]
    print(f"after {ROUNDS} rounds on {NODES} Flower nodes running fedhet's ClientApp:")
    print(f"  Flower's FedAvg: test accuracy {flower_accuracy:.2%}")
    print(f"  fedhet's FedAvg: test accuracy {summary.accuracy:.2%} ({summary.version} versions)")


if __name__ == "__main__":
    main()
