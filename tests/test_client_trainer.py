"""The one client trainer: a task trains at the client's bitwidth (fp32 with LocalTrainer, below 32 bits with
QuantizedTrainer) in simulation and in `fedhet client` alike; a bitwidth it cannot train at is refused up front."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedhet import quant
from fedhet.clients.network import client_main
from fedhet.clients.quantized import QuantizedTrainer
from fedhet.clients.trainer import ClientState, ClientTrainer, LocalTrainer, PrivacyConfig, TrainConfig
from fedhet.codec import decode, encode
from fedhet.types import Task

CONFIG = TrainConfig(lr=0.1, batch_size=8)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(24, 6, generator=g), torch.randint(0, 3, (24,), generator=g)


def task(weights: dict[str, torch.Tensor]) -> Task:
    return Task(task_id=2, client_id=0, version=0, weights=weights, local_steps=3)


def test_fp32_trains_with_the_local_trainer_exactly() -> None:
    x, y = data()
    start = model().state_dict()
    result = ClientTrainer(LocalTrainer(model(), CONFIG)).train(task(start), x, y, seed=4)
    plain = LocalTrainer(model(), CONFIG).train(task(start), x, y, seed=4)
    assert result.bitwidth == 32 and result.loss == plain.loss
    assert all(torch.equal(v, plain.weights[k]) for k, v in result.weights.items())


@pytest.mark.parametrize("bits", [4, 8])
def test_below_32_bits_trains_quantized_and_keeps_its_bitwidth(bits: int) -> None:
    x, y = data()
    start = model().state_dict()
    trainer = ClientTrainer(LocalTrainer(model(), CONFIG), QuantizedTrainer(model(), CONFIG))
    result = trainer.train(task(start), x, y, 4, bits, ClientState())
    alone = QuantizedTrainer(model(), CONFIG).train(task(start), x, y, 4, bits)
    assert result.bitwidth == bits and result.loss == alone.loss
    for name, tensor in result.weights.items():
        assert torch.equal(tensor, alone.weights[name])
        assert torch.equal(quant.fake_quantize(tensor, bits), tensor), name  # on the b-bit grid
    decoded = decode(encode(result.weights, f"int{bits}"))  # so its packed upload is exact
    assert all(torch.equal(decoded[k], v) for k, v in result.weights.items())


def test_bitwidths_it_cannot_train_at_are_refused() -> None:
    plain = ClientTrainer(LocalTrainer(model(), CONFIG))
    plain.check([32])
    with pytest.raises(ValueError, match=r"\[8\] bits need a QuantizedTrainer"):
        plain.check([32, 8])
    both = ClientTrainer(LocalTrainer(model(), CONFIG), QuantizedTrainer(model(), CONFIG))
    with pytest.raises(ValueError, match="unsupported bitwidth 7"):
        both.train(task(model().state_dict()), *data(), 0, 7)
    private = ClientTrainer(
        LocalTrainer(model(), CONFIG, privacy=PrivacyConfig(noise_multiplier=1.0)), QuantizedTrainer(model(), CONFIG)
    )
    private.check([32])
    with pytest.raises(ValueError, match=r"DP-SGD trains at 32 bits only; clients at \[4\] bits"):
        private.check([4])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["profile.bitwidth=7"], "profile.bitwidth must be 32 or one of 2, 4, 6, 8, 12, 16, got 7"),
        (["profile.bitwidth=1"], "profile.bitwidth must be 32 or one of"),
        (["profile.bitwidth=8", "privacy.enabled=true", "privacy.noise_multiplier=1.0"], "privacy.enabled needs"),
    ],
)
def test_client_bitwidth_errors_are_one_line(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert client_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedhet client: error: ") and message in err[0], err
