"""DP-FedP3 with ``privacy.max_layer_params``: only small layers train under DP-SGD, the large ones keep the values the
server sent, the head trains inside the DP steps, and the evaluation's fine-tuned head never reaches training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedhet.clients.personal import FineTune, personal_accuracy
from fedhet.clients.trainer import (
    ClientState,
    ClientStates,
    LocalTrainer,
    PrivacyConfig,
    TrainConfig,
    layer_sizes,
    private_names,
)
from fedhet.errors import ConfigError
from fedhet.sim.personal import PersonalEvaluator
from fedhet.types import Task

HEAD = ("4.weight", "4.bias")


def mlp() -> nn.Module:
    """Layers of 80 (``0``), 1,088 (``2``) and 195 (``4``, the head) parameters."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 3))


def data(n: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=generator)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def shared_task(weights: dict[str, torch.Tensor], task_id: int = 0) -> Task:
    """A FedP3-like task: every layer but the head travels and trains; the head is the client's own."""
    sent = {k: v.clone() for k, v in weights.items() if k not in HEAD}
    return Task(task_id, 0, 0, sent, local_steps=6, train=frozenset(sent))


def trainer(max_layer_params: int, noise: float = 1.0, lr: float = 0.5) -> LocalTrainer:
    privacy = PrivacyConfig(noise_multiplier=noise, max_layer_params=max_layer_params)
    return LocalTrainer(mlp(), TrainConfig(lr=lr, batch_size=20), privacy=privacy)


def own(weights: dict[str, torch.Tensor]) -> ClientState:
    return ClientState({k: weights[k].clone() for k in HEAD})


def test_layer_sizes_and_the_names_dp_trains() -> None:
    model = mlp()
    assert layer_sizes(model) == {"0": 80, "2": 1088, "4": 195}
    names = [n for n, _ in model.named_parameters()]
    assert private_names(model, names, 400) == {"0.weight", "0.bias", *HEAD}
    assert private_names(model, names, 0) == set(names)
    assert private_names(model, ["2.weight", "4.bias"], 200) == {"4.bias"}


def test_large_layers_keep_the_received_values_and_small_ones_train_under_dp() -> None:
    weights = mlp().state_dict()
    task, state = shared_task(weights), own(weights)
    out = trainer(400).train(task, *data(), seed=0, state=state)
    assert set(out.weights) == task.trained  # the frozen layer goes back too: the value the server sent
    assert torch.equal(out.weights["2.weight"], weights["2.weight"])
    assert torch.equal(out.weights["2.bias"], weights["2.bias"])
    assert not torch.equal(out.weights["0.weight"], weights["0.weight"])
    assert not torch.equal(state.tensors["4.weight"], weights["4.weight"])  # the head trained (with noise)
    assert state.accountant is not None and state.epsilon(1e-5) > 0


def test_a_head_larger_than_the_bound_stays_at_its_value() -> None:
    weights = mlp().state_dict()
    state = own(weights)
    out = trainer(100).train(shared_task(weights), *data(), seed=0, state=state)
    assert torch.equal(state.tensors["4.weight"], weights["4.weight"])
    assert torch.equal(out.weights["2.weight"], weights["2.weight"])
    assert not torch.equal(out.weights["0.weight"], weights["0.weight"])


def test_without_the_bound_every_layer_trains_as_before() -> None:
    weights = mlp().state_dict()
    out = trainer(0).train(shared_task(weights), *data(), seed=0, state=own(weights))
    assert not torch.equal(out.weights["2.weight"], weights["2.weight"])


def test_the_head_is_noised_with_the_shared_layers() -> None:
    """Were the head trained beside DP-SGD without noise, its change would not grow with the noise multiplier."""
    weights = mlp().state_dict()

    def head_change(noise: float) -> float:
        state = own(weights)
        trainer(400, noise=noise, lr=0.01).train(shared_task(weights), *data(), seed=0, state=state)
        return float((state.tensors["4.weight"] - weights["4.weight"]).norm())

    assert head_change(100.0) > 20 * head_change(1e-3)


def test_a_bound_that_leaves_nothing_to_train_is_refused_at_the_task() -> None:
    weights = mlp().state_dict()
    with pytest.raises(ValueError, match=r"privacy.max_layer_params=50 leaves client 0 no layer to train"):
        trainer(50).train(shared_task(weights), *data(), seed=0, state=own(weights))


@pytest.mark.parametrize(("value", "message"), [(-1, "must be >= 0 parameters"), (1.5, "must be an integer")])
def test_bad_bounds_are_refused_naming_the_value(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=f"privacy.max_layer_params {message}.*{value}"):
        PrivacyConfig(noise_multiplier=1.0, max_layer_params=value)


def test_the_evaluations_fine_tuned_head_never_feeds_back_into_training() -> None:
    weights = mlp().state_dict()
    x, y = data()
    states = ClientStates(weights)
    task = shared_task(weights)
    trainer(400).train(task, x, y, seed=0, state=states.get(0, task))
    kept = {k: v.clone() for k, v in states.own_tensors(0).items()}
    split = {0: (np.arange(40), np.arange(40, 60))}
    evaluate = PersonalEvaluator(mlp(), x, y, split, states, epochs=20, lr=0.5, batch_size=10)
    global_weights = {**task.weights, **kept}
    evaluate(global_weights)
    tune = FineTune(20, 0.5, 10)
    personal_accuracy(mlp(), task.weights, states.own_tensors(0), (x[:40], y[:40]), (x[40:], y[40:]), tune, 0)
    assert all(torch.equal(states.own_tensors(0)[k], kept[k]) for k in HEAD)  # measuring kept nothing
    # the next task starts from the kept (DP-trained) head: the same result as a run that never measured
    after = trainer(400).train(shared_task(weights, 1), x, y, seed=0, state=states.get(0, task))
    fresh = ClientState({k: v.clone() for k, v in kept.items()})
    unmeasured = trainer(400).train(shared_task(weights, 1), x, y, seed=0, state=fresh)
    assert all(torch.equal(after.weights[k], unmeasured.weights[k]) for k in after.weights)


# ---------------------------------------------------------------------------------------- configs and paths

E2E = [
    "dataset=synthetic",
    "model=2nn",
    "num_clients=6",
    "sim.max_versions=2",
    "sim.progress=false",
    "sim.personal_eval=true",
    "sim.finetune_epochs=1",
    "client.lr=0.05",
    "strategy=fedp3",
    "strategy.scheduler.local_epochs=1",
    "privacy.enabled=true",
    "privacy.target_epsilon=8",
]


def test_the_simulator_trains_only_the_small_layers(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from fedhet.cli import compose
    from fedhet.runtime import assemble, run_spec
    from fedhet.sim.runner import MODEL_FILE, privacy_config, simulate

    # the 2nn's layers on Synthetic have 12,200 / 40,200 / 2,010 parameters: the second keeps its initial value
    cfg = compose([*E2E, "privacy.max_layer_params=20000"])
    config = privacy_config(cfg)
    assert config is not None and config.max_layer_params == 20000
    simulate(cfg, tmp_path)
    initial = assemble(run_spec(cfg, True), "cpu").initial
    final = load_file(tmp_path / MODEL_FILE)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["version"] == 2 and all(e > 0 for e in rows[-1]["epsilon"].values())
    assert torch.equal(final["3.weight"], initial["3.weight"]) and torch.equal(final["3.bias"], initial["3.bias"])
    assert not torch.equal(final["1.weight"], initial["1.weight"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("privacy.max_layer_params=-5", "privacy.max_layer_params must be >= 0 parameters .*got -5"),
        ("privacy.max_layer_params=1000", "privacy.max_layer_params=1000 freezes layers a client must train"),
    ],
)
def test_the_simulator_refuses_bad_bounds_at_start(tmp_path: Path, override: str, message: str) -> None:
    from fedhet.cli import compose
    from fedhet.sim.runner import simulate

    with pytest.raises(ConfigError, match=message):
        simulate(compose([*E2E, override]), tmp_path)


def test_fedhet_client_carries_the_bound() -> None:
    from fedhet.clients.config import compose_client, privacy_of

    base = ["privacy.enabled=true", "privacy.noise_multiplier=1.0"]
    config = privacy_of(compose_client([*base, "privacy.max_layer_params=16384"]))
    assert config is not None and config.max_layer_params == 16384
    with pytest.raises(ConfigError, match="privacy.max_layer_params must be >= 0 parameters.*got -1"):
        compose_client([*base, "privacy.max_layer_params=-1"])


def test_a_flower_client_app_trains_only_the_small_layers_and_refuses_a_bound_that_freezes_all() -> None:
    pytest.importorskip("flwr")
    from fedhet.clients.trainer import TrainConfig
    from fedhet.config import DatasetConfig, PartitionConfig
    from fedhet.flower import ClientAppSettings, DriverSettings, GridDriver, LocalGrid, make_client_app
    from fedhet.flower.clientapp import FedhetClient, load_state
    from fedhet.models import build_model
    from fedhet.strategies import build_strategy

    torch.set_num_threads(1)
    data = DatasetConfig(name="synthetic", partition=PartitionConfig(name="natural"))
    common: dict[str, object] = {"dataset": data, "model": "2nn", "num_clients": 4, "seed": 0}
    common["train"] = TrainConfig(lr=0.05, batch_size=16)
    # the 2nn on Synthetic: layers 1 (12,200), 3 (40,200) and the head 5 (2,010); LowerB gives odd clients layer 3
    privacy = PrivacyConfig(noise_multiplier=1.0, max_layer_params=20000)
    settings = ClientAppSettings(**common, privacy=privacy)  # type: ignore[arg-type]
    fedp3 = {
        "scheduler": {"name": "fedavg", "fraction": 1.0, "min_clients": 4, "local_epochs": 1},
        "planner": {"name": "fedp3", "variant": "lowerb"},
        "aggregator": {"name": "weighted_mean"},
    }
    initial = {k: v.detach().clone() for k, v in build_model("2nn", (60,), 10, 0).state_dict().items()}
    strategy = build_strategy(fedp3, 0)
    grid = LocalGrid(make_client_app(settings), 4)
    try:
        summary = GridDriver(grid, strategy, initial, DriverSettings(max_versions=2, min_nodes=4, max_seconds=60)).run()
    finally:
        grid.close()
    assert summary.version == 2 and summary.failed == summary.refused == 0
    final = strategy.global_weights
    assert torch.equal(final["3.weight"], initial["3.weight"]) and torch.equal(final["3.bias"], initial["3.bias"])
    assert not torch.equal(final["1.weight"], initial["1.weight"])
    for partition, node in enumerate(grid.node_ids):
        state = load_state(grid.contexts[node], partition, privacy)
        assert state is not None and not torch.equal(state.tensors["5.weight"], initial["5.weight"])
    frozen_all = ClientAppSettings(**common, privacy=PrivacyConfig(noise_multiplier=1.0, max_layer_params=100))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="privacy.max_layer_params=100 freezes layers"):
        FedhetClient(frozen_all)._load()
