"""``client.lr_decay``: a task that starts from global version ``v`` trains at ``lr * lr_decay ** v`` on every
sequential training path (SGD, FedProx, DP-SGD, quantization-aware); a bad decay is refused naming its key, in
simulation (``client.lr_decay``) and in ``fedhet client`` (``train.lr_decay``). The vectorized executor's
equivalence is in tests/test_vectorized.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedhet.cli import compose
from fedhet.clients.config import compose_client
from fedhet.clients.network import client_main
from fedhet.clients.quantized import QuantizedTrainer
from fedhet.clients.trainer import ClientState, LocalTrainer, PrivacyConfig, TrainConfig
from fedhet.errors import ConfigError
from fedhet.sim.runner import validate
from fedhet.types import Result, Task, Weights
from tests.test_client_trainer import data, model

LR = 0.1


def start() -> Weights:
    return {k: v.detach().clone() for k, v in model().state_dict().items()}


def assert_equal(a: Result, b: Result) -> None:
    assert a.weights.keys() == b.weights.keys()
    for key, value in a.weights.items():
        assert torch.equal(value, b.weights[key]), key


def test_one_step_at_version_3_with_decay_one_half_moves_the_weights_by_an_eighth_of_lr() -> None:
    x, y = data()
    weights = start()
    task = Task(task_id=1, client_id=0, version=3, weights=weights, local_steps=1)
    decayed = LocalTrainer(model(), TrainConfig(lr=LR, batch_size=len(x), lr_decay=0.5)).train(task, x, y, seed=0)
    reference = model()  # the step by hand: the full batch's mean-loss gradient at the start weights
    reference.load_state_dict(weights)
    nn.functional.cross_entropy(reference(x), y).backward()
    for name, param in reference.named_parameters():
        assert param.grad is not None
        torch.testing.assert_close(decayed.weights[name], weights[name] - LR / 8 * param.grad, rtol=0, atol=1e-7)
    undecayed = LocalTrainer(model(), TrainConfig(lr=LR / 8, batch_size=len(x))).train(task, x, y, seed=0)
    assert_equal(decayed, undecayed)


@pytest.mark.parametrize(
    ("momentum", "weight_decay", "mu"),
    [(0.0, 0.0, 0.0), (0.9, 1e-3, 0.0), (0.0, 0.0, 0.5)],
    ids=["sgd", "momentum", "fedprox"],
)
def test_every_version_trains_at_its_decayed_lr(momentum: float, weight_decay: float, mu: float) -> None:
    x, y = data()
    weights = start()
    decayed = LocalTrainer(model(), TrainConfig(LR, 8, momentum, weight_decay, lr_decay=0.9))
    for version in (0, 1, 7):
        task = Task(2, 0, version, weights, local_steps=5, proximal_mu=mu)
        plain = LocalTrainer(model(), TrainConfig(LR * 0.9**version, 8, momentum, weight_decay))
        assert_equal(decayed.train(task, x, y, 3), plain.train(task, x, y, 3))
    fixed = LocalTrainer(model(), TrainConfig(LR, 8, momentum, weight_decay)).train(task, x, y, 3)
    assert not torch.equal(fixed.weights["0.weight"], decayed.train(task, x, y, 3).weights["0.weight"])


def test_dp_sgd_trains_at_the_decayed_lr() -> None:
    x, y = data()
    task = Task(2, 0, 3, start(), local_steps=3)
    privacy = PrivacyConfig(noise_multiplier=1.0)
    decayed = LocalTrainer(model(), TrainConfig(lr=LR, batch_size=8, lr_decay=0.5), privacy=privacy)
    plain = LocalTrainer(model(), TrainConfig(lr=LR / 8, batch_size=8), privacy=privacy)
    assert_equal(decayed.train(task, x, y, 3, ClientState()), plain.train(task, x, y, 3, ClientState()))


def test_quantized_training_trains_at_the_decayed_lr() -> None:
    x, y = data()
    task = Task(2, 0, 3, start(), local_steps=3)
    decayed = QuantizedTrainer(model(), TrainConfig(lr=LR, batch_size=8, lr_decay=0.5)).train(task, x, y, 3, 8)
    plain = QuantizedTrainer(model(), TrainConfig(lr=LR / 8, batch_size=8)).train(task, x, y, 3, 8)
    fixed = QuantizedTrainer(model(), TrainConfig(lr=LR, batch_size=8)).train(task, x, y, 3, 8)
    assert_equal(decayed, plain)
    assert not torch.equal(decayed.weights["0.weight"], fixed.weights["0.weight"])


@pytest.mark.parametrize("bad", [0.0, 1.5, -0.5, math.nan, math.inf])
def test_a_bad_decay_is_refused_naming_client_lr_decay(bad: float) -> None:
    with pytest.raises(ValueError, match=rf"client\.lr_decay must be in \(0, 1\].*got {bad}"):
        TrainConfig(lr_decay=bad)


def test_the_decay_is_a_documented_key_of_simulation_and_of_fedhet_client(capsys: pytest.CaptureFixture[str]) -> None:
    assert compose([]).client.lr_decay == 1.0
    assert compose(["client.lr_decay=0.997"]).client.lr_decay == 0.997
    with pytest.raises(ConfigError, match=r"client\.lr_decay must be in \(0, 1\].*got 1.5"):
        validate(compose(["client.lr_decay=1.5"]))
    assert compose_client([]).train.lr_decay == 1.0
    assert compose_client(["train.lr_decay=0.997"]).train.lr_decay == 0.997
    assert client_main(["train.lr_decay=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.lr_decay must be in (0, 1]" in err[0] and "got 0.0" in err[0], err
