"""FedProx (Li et al. 2020): each client minimises ``F_k(w) + mu/2 * ||w - w_t||^2`` from the global model ``w_t``.
The trainer is checked against that objective written out with autograd; the scheduler hands every task its mu."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import client

from fedhet.clients.trainer import ClientState, LocalTrainer, PrivacyConfig, TrainConfig, minibatches, task_seed
from fedhet.errors import ConfigError
from fedhet.models import build_model
from fedhet.runtime.checkpoint import task_from_state, task_state
from fedhet.strategies import build_strategy
from fedhet.types import Task


def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return torch.randn(50, 60, generator=generator), torch.randint(0, 10, (50,), generator=generator)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_local_training_minimises_the_proximal_objective(momentum: float) -> None:
    x, y = data()
    model = build_model("2nn", (60,), 10, seed=0)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    mu, config = 0.7, TrainConfig(lr=0.1, batch_size=8, momentum=momentum)
    task = Task(4, 0, 0, start, local_steps=12, proximal_mu=mu)
    result = LocalTrainer(copy.deepcopy(model), config).train(task, x, y, seed=9)

    # the reference: F_k(w) + mu/2 ||w - w_t||^2 through autograd, the trainer's minibatches, torch's SGD
    reference = copy.deepcopy(model)
    reference.load_state_dict(start)
    optimizer = torch.optim.SGD(reference.parameters(), lr=config.lr, momentum=momentum)
    generator = torch.Generator().manual_seed(task_seed(9, 4))
    for idx in minibatches(len(x), config.batch_size, 12, generator):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(reference(x[idx]), y[idx])
        loss = loss + mu / 2 * sum(((p - start[n]) ** 2).sum() for n, p in reference.named_parameters())
        loss.backward()
        optimizer.step()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(result.weights[name], value, rtol=1e-5, atol=1e-6)
    plain = LocalTrainer(copy.deepcopy(model), config).train(Task(4, 0, 0, start, local_steps=12), x, y, seed=9)
    assert not torch.allclose(plain.weights["1.weight"], result.weights["1.weight"])


def test_the_pull_applies_under_dp_sgd_too() -> None:
    """Opacus noises the data's gradient; the proximal term (no data in it) is added after, so a strong pull keeps
    a DP client near its start."""
    x, y = data()
    model = build_model("2nn", (60,), 10, seed=0)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    privacy = PrivacyConfig(max_grad_norm=1.0, noise_multiplier=1.0)
    moved = []
    for mu in (0.0, 5.0):
        trainer = LocalTrainer(copy.deepcopy(model), TrainConfig(lr=0.1, batch_size=8), privacy=privacy)
        task = Task(1, 0, 0, start, local_steps=20, proximal_mu=mu)
        result = trainer.train(task, x, y, seed=2, state=ClientState({}))
        moved.append(float(torch.linalg.vector_norm(result.weights["1.weight"] - start["1.weight"])))
    assert moved[1] < moved[0] / 2, moved


def test_the_scheduler_hands_every_task_its_mu_and_checkpoints_keep_it() -> None:
    spec = {
        "scheduler": {"name": "fedavg", "min_clients": 2, "proximal_mu": 0.05},
        "planner": {"name": "identity"},
        "aggregator": {"name": "weighted_mean"},
    }
    strategy = build_strategy(spec, seed=0)
    strategy.start({"w": torch.zeros(3)}, 0.0)
    for c in range(4):
        strategy.on_available(client(c), 0.0)
    tasks = strategy.on_tick(0.0)
    assert tasks and all(t.proximal_mu == 0.05 for t in tasks)
    assert task_from_state(task_state(tasks[0])).proximal_mu == 0.05
    assert task_from_state(task_state(tasks[0])[:8]).proximal_mu == 0.0  # a row from before FedProx
    for bad in (-0.1, float("inf")):
        with pytest.raises(ConfigError, match="proximal_mu"):
            build_strategy({**spec, "scheduler": {"name": "fedavg", "proximal_mu": bad}}, seed=0)
    with pytest.raises(ValueError, match="proximal_mu"):
        Task(0, 0, 0, {"w": torch.zeros(3)}, local_steps=1, proximal_mu=float("nan"))
