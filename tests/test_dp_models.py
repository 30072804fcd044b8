"""DP-SGD trains any model a user brings: layers it cannot train per sample (BatchNorm) are replaced by Opacus's
validator (GroupNorm) in every instance of the run's model, and the replacement is logged. A deployed client
with DP refuses such a model in one line unless told the server's model is DP-compatible too."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from torch import nn

from fedhet.cli import compose
from fedhet.clients.config import compose_client
from fedhet.clients.network import build_client
from fedhet.errors import ConfigError
from fedhet.models import MODELS, build_model, dp_incompatible
from fedhet.sim.runner import simulate

NAME = "test_bn_mlp"


def bn_mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(input_shape[-1], 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, num_classes)
    )


if NAME not in MODELS:  # a user's own model, registered as a user would
    MODELS.register(NAME)(bn_mlp)

SMALL = ["dataset=synthetic", f"model.name={NAME}", "num_clients=4", "seed=0", "sim.progress=false", "sim.threads=1"]


def test_the_replacement_is_the_same_in_every_instance() -> None:
    plain, fixed = build_model(NAME, (60,), 10, 0), build_model(NAME, (60,), 10, 0, dp_compatible=True)
    assert dp_incompatible(plain) == "BatchNorm1d at '2'" and dp_incompatible(fixed) == ""
    again = build_model(NAME, (60,), 10, 0, dp_compatible=True)
    assert all((a == b).all() for a, b in zip(fixed.state_dict().values(), again.state_dict().values(), strict=True))


def test_a_simulation_with_dp_trains_a_batchnorm_model_and_says_what_it_replaced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    overrides = [*SMALL, "sim.max_versions=2", "privacy.enabled=true", "privacy.noise_multiplier=1.0"]
    with caplog.at_level(logging.WARNING):
        summary = simulate(compose(overrides), tmp_path)
    assert summary.final.version == 2 and summary.final.epsilon
    assert any("BatchNorm1d at '2' replaced by GroupNorm" in r.getMessage() for r in caplog.records), caplog.text


def test_a_deployed_dp_client_refuses_a_batchnorm_model_unless_told_in_one_line() -> None:
    overrides = [f"model.name={NAME}", "num_clients=4", "privacy.enabled=true", "privacy.noise_multiplier=1.0"]
    with pytest.raises(ConfigError, match=r"BatchNorm1d at '2'.*model.dp_compatible=true") as error:
        build_client(compose_client([*overrides, "profile.seconds_per_sample=0.001"]))
    assert "\n" not in str(error.value)
    client = build_client(compose_client([*overrides, "model.dp_compatible=true", "profile.seconds_per_sample=0.001"]))
    client.channel.close()


def test_flower_apps_train_a_batchnorm_model_with_dp_once_both_sides_are_dp_compatible() -> None:
    pytest.importorskip("flwr")
    from fedhet.clients.trainer import PrivacyConfig
    from fedhet.config import DatasetConfig, PartitionConfig
    from fedhet.flower import (
        ClientAppSettings,
        DriverSettings,
        LocalGrid,
        ServerAppSettings,
        make_client_app,
        run_on_grid,
    )

    data = DatasetConfig(name="synthetic", partition=PartitionConfig(name="natural"))
    fedavg = {
        "scheduler": {"name": "fedavg", "fraction": 1.0, "min_clients": 3},
        "planner": {"name": "identity"},
        "aggregator": {"name": "weighted_mean"},
    }
    common = {"dataset": data, "model": NAME, "num_clients": 3, "seed": 0, "dp_compatible": True}
    client = ClientAppSettings(**common, privacy=PrivacyConfig(noise_multiplier=1.0), threads=1)  # type: ignore[arg-type]
    server = ServerAppSettings(fedavg, **common, driver=DriverSettings(max_versions=2, min_nodes=3))  # type: ignore[arg-type]
    grid = LocalGrid(make_client_app(client), 3)
    try:
        summary = run_on_grid(grid, server)
    finally:
        grid.close()
    assert summary.version == 2 and summary.failed == summary.refused == 0 and summary.epsilon
