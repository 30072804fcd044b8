"""The model zoo and local training."""

from __future__ import annotations

import pytest
import torch

from fedhet.clients.trainer import LocalTrainer, TrainConfig
from fedhet.models import MODELS, build_model, evaluate
from fedhet.types import Task


@pytest.mark.parametrize(
    ("name", "shape", "params"),
    [
        # conv 1->32 (5x5): 832; conv 32->64: 51,264; fc 3136->512: 1,606,144; fc 512->10: 5,130
        ("cnn", (1, 28, 28), 1_663_370),
        # 784*200+200 + 200*200+200 + 200*10+10
        ("2nn", (1, 28, 28), 199_210),
        ("logreg", (60,), 610),
    ],
)
def test_models_have_the_papers_sizes(name: str, shape: tuple[int, ...], params: int) -> None:
    model = build_model(name, shape, 10, seed=0)
    assert sum(p.numel() for p in model.parameters()) == params
    assert model(torch.zeros(4, *shape)).shape == (4, 10)


def test_model_init_is_seeded_and_leaves_the_global_generator_alone() -> None:
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    a = build_model("2nn", (1, 28, 28), 10, seed=1)
    assert torch.equal(torch.rand(1), before)
    b = build_model("2nn", (1, 28, 28), 10, seed=1)
    c = build_model("2nn", (1, 28, 28), 10, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.state_dict()["1.weight"], c.state_dict()["1.weight"])


def test_registry_refuses_duplicates_and_names_choices() -> None:
    with pytest.raises(ValueError, match="already registered"):
        MODELS.register("cnn")(lambda shape, classes: torch.nn.Linear(1, 1))
    with pytest.raises(KeyError, match="choose one of: 2nn, cnn, fedp3_cnn, logreg"):
        MODELS.get("resnet9000")


def _task(model: torch.nn.Module, **work: int) -> Task:
    return Task(3, 1, 0, {k: v.clone() for k, v in model.state_dict().items()}, **work)


def _separable(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 60, generator=generator)
    y = (x[:, 0] > 0).long()
    return x, y


def test_local_sgd_learns_and_reports_what_it_did() -> None:
    model = build_model("logreg", (60,), 10, seed=0)
    x, y = _separable()
    trainer = LocalTrainer(model, TrainConfig(lr=0.5, batch_size=8))
    task = _task(model, local_epochs=3)
    start = {k: v.clone() for k, v in task.weights.items()}
    result = trainer.train(task, x, y, seed=0)
    assert (result.task_id, result.client_id, result.version, result.num_samples) == (3, 1, 0, 64)
    assert result.local_steps == 3 * 8
    assert result.train_seconds > 0
    assert all(torch.equal(task.weights[k], start[k]) for k in start)  # the task's weights are not mutated
    model.load_state_dict(start)
    before, _ = evaluate(model, x, y)
    model.load_state_dict(result.weights)
    after, _ = evaluate(model, x, y)
    assert after > max(before, 0.9)


def test_training_depends_only_on_task_data_and_seed() -> None:
    model = build_model("logreg", (60,), 10, seed=0)
    x, y = _separable()
    trainer = LocalTrainer(model, TrainConfig(lr=0.1, batch_size=5))
    task = _task(model, local_steps=7)
    a = trainer.train(task, x, y, seed=1)
    trainer.train(_task(model, local_steps=2), x, y, seed=9)  # whatever ran in between
    b = trainer.train(task, x, y, seed=1)
    c = trainer.train(task, x, y, seed=2)
    assert a.local_steps == 7
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    assert not torch.equal(a.weights["1.weight"], c.weights["1.weight"])


@pytest.mark.parametrize(("key", "value"), [("lr", -0.1), ("batch_size", 0), ("momentum", 1.0), ("weight_decay", -1.0)])
def test_train_config_rejects_bad_values(key: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"client.{key}"):
        TrainConfig(**{key: value})  # type: ignore[arg-type]


def test_a_task_needs_exactly_one_kind_of_local_work() -> None:
    with pytest.raises(ValueError, match="exactly one of"):
        Task(0, 0, 0, {}, local_steps=1, local_epochs=1)
    with pytest.raises(ValueError, match="exactly one of"):
        Task(0, 0, 0, {})
    assert Task(0, 0, 0, {}, local_epochs=2).steps_for(num_samples=95, batch_size=10) == 20
