"""Training steps through :class:`fedhet.clients.graphed.GraphedSteps`: one optimiser reused across tasks (every
device), and on CUDA full minibatches replayed from a captured graph whose results equal eager steps'. The CUDA
tests run where a GPU is (the device machine: ``pytest tests/test_graphed.py``); on CPU they are skipped and the
reuse, key and fallback logic is tested through the same code."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch
from torch import nn

from fedhet import quant
from fedhet.clients.graphed import GraphedSteps
from fedhet.clients.quantized import QuantizedTrainer
from fedhet.clients.trainer import LocalTrainer, TrainConfig
from fedhet.models import build_model
from fedhet.types import Result, Task, Weights

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the device machine)")
SHAPE = (1, 28, 28)


def cnn() -> nn.Module:
    return build_model("cnn", SHAPE, 10, seed=0)


def data(n: int = 100, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=g), torch.randint(0, 10, (n,), generator=g)


def task(weights: Weights, task_id: int = 1, version: int = 0, steps: int = 7) -> Task:
    return Task(task_id=task_id, client_id=task_id, version=version, weights=weights, local_steps=steps)


def start() -> Weights:
    return {k: v.detach().clone() for k, v in cnn().state_dict().items()}


def assert_close(a: Result, b: Result, atol: float = 0.0) -> None:
    assert a.weights.keys() == b.weights.keys()
    for key, value in a.weights.items():
        torch.testing.assert_close(value, b.weights[key], rtol=0, atol=atol, msg=key)
    assert abs(a.loss - b.loss) <= max(atol, 1e-6) * 10


CONFIG = TrainConfig(lr=0.05, batch_size=32, momentum=0.9, weight_decay=1e-3)


def test_an_optimiser_reused_across_tasks_computes_what_a_fresh_one_does() -> None:
    """Momentum buffers zeroed in place for the next task give exactly torch's first step (a copy of the gradient)."""
    x, y = data()
    weights = start()
    shared = LocalTrainer(cnn(), CONFIG)
    shared.train(task(weights, 1), x, y, seed=0)  # leaves momentum in the buffers
    optimizer = shared.graphed.optimizer
    second = shared.train(task(weights, 2), x, y, seed=0)
    assert shared.graphed.optimizer is optimizer  # reused, not rebuilt
    fresh = LocalTrainer(cnn(), CONFIG).train(task(weights, 2), x, y, seed=0)
    assert_close(second, fresh)


def test_a_new_learning_rate_or_kernel_key_or_trained_set_starts_a_new_optimiser() -> None:
    model = cnn()
    steps = GraphedSteps(model, nn.functional.cross_entropy)
    params = list(model.parameters())
    first = steps.begin(params, 0.1, 0.9, 0.0, 32)
    assert steps.begin(params, 0.1, 0.9, 0.0, 32) is first
    assert steps.begin(params, 0.05, 0.9, 0.0, 32) is not first  # lr_decay's next version: another lr
    second = steps.optimizer
    assert steps.begin(params, 0.05, 0.9, 0.0, 32, extra=(4, 0)) is not second  # another bitwidth
    third = steps.optimizer
    assert steps.begin(params, 0.05, 0.9, 0.0, 16, extra=(4, 0)) is not third  # another minibatch size
    assert steps.begin(params[-2:], 0.05, 0.9, 0.0, 16, (4, 0)) is not steps.begin(params, 0.05, 0.9, 0.0, 16)


def test_step_before_begin_and_zero_warmup_are_refused() -> None:
    with pytest.raises(ValueError, match="warmup"):
        GraphedSteps(cnn(), nn.functional.cross_entropy, warmup=0)
    with pytest.raises(RuntimeError, match="before begin"):
        GraphedSteps(cnn(), nn.functional.cross_entropy).step(*data(4))


def test_no_capture_off_cuda() -> None:
    x, y = data()
    trainer = LocalTrainer(cnn(), CONFIG)
    trainer.train(task(start()), x, y, seed=0)
    assert trainer.graphed.captures == 0 and trainer.graphed.replays == 0


# ---------------------------------------------------------------------------------------------- CUDA


@cuda
@pytest.mark.parametrize("bits", [32, 8, 4])
def test_captured_steps_equal_eager_steps(bits: int) -> None:
    """Two tasks (the second reuses the graph), 100 samples at batch 32: three full minibatches an epoch replayed
    and the 4-sample remainder run eagerly (never captured, though it comes right after the warm-up), against every
    step eager (cuda_graphs false)."""
    x, y = data()
    weights = start()
    results = {}
    for graphs in (True, False):
        config = replace(CONFIG, cuda_graphs=graphs)
        trainer = QuantizedTrainer(cnn(), config, "cuda") if bits < 32 else LocalTrainer(cnn(), config, "cuda")
        train = trainer.train if isinstance(trainer, LocalTrainer) else _at(trainer, bits)
        results[graphs] = [train(task(weights, i, steps=9), x, y, 0) for i in (1, 2)]
        steps = trainer._trainer.graphed if isinstance(trainer, QuantizedTrainer) else trainer.graphed
        if graphs:
            assert steps.captures == 1  # one capture serves both tasks
            assert steps.replays == 2 * 9 - 3 - 2 * 2  # 9 steps a task: 3 eager warm-ups, 2 remainders a task eager
        else:
            assert steps.captures == 0
    for captured, eager in zip(results[True], results[False], strict=True):
        if bits == 32:
            assert_close(captured, eager, atol=1e-6)
        else:
            assert_on_grid_close(captured, eager, bits)


def assert_on_grid_close(a: Result, b: Result, bits: int) -> None:
    """Results on a ``bits``-bit grid whose fp32 masters differ by float rounding (a captured graph's kernels need not
    sum in eager's order): equal, except where a master weight sat on a rounding boundary and went the other way,
    which moves it by one step of its channel; such flips are rare (at most 0.1% of a tensor's weights)."""
    assert a.weights.keys() == b.weights.keys()
    for key, value in a.weights.items():
        other = b.weights[key]
        step = quant.channel_scales(other, bits)
        gap = (value - other).reshape(step.shape[0], -1).abs()
        flipped = gap > 1e-6
        assert bool((gap[flipped.any(dim=1)] <= step[flipped.any(dim=1)] * 1.001 + 1e-6).all()), (key, float(gap.max()))
        assert int(flipped.sum()) <= max(1, value.numel() // 1000), (key, int(flipped.sum()), value.numel())
    assert abs(a.loss - b.loss) <= 1e-4


def _at(trainer: QuantizedTrainer, bits: int):  # type: ignore[no-untyped-def]
    return lambda t, x, y, seed: trainer.train(t, x, y, seed, bits)


@cuda
def test_a_new_version_with_lr_decay_recaptures() -> None:
    x, y = data()
    trainer = LocalTrainer(cnn(), replace(CONFIG, lr_decay=0.9), "cuda")
    weights = start()
    trainer.train(task(weights, 1, version=0), x, y, seed=0)
    trainer.train(task(weights, 2, version=0), x, y, seed=0)
    assert trainer.graphed.captures == 1
    trainer.train(task(weights, 3, version=1), x, y, seed=0)
    assert trainer.graphed.captures == 2


class _Syncing(nn.Module):
    """A user's model whose forward reads a value back to the host: no graph can hold that."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = cnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.inner(x)
        return out * (1.0 if float(out.abs().max()) < 1e6 else 0.5)


@cuda
def test_a_step_that_cannot_be_captured_runs_eagerly_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    x, y = data()
    weights = {f"inner.{k}": v for k, v in start().items()}
    results = []
    for graphs in (True, False):
        trainer = LocalTrainer(_Syncing(), replace(CONFIG, cuda_graphs=graphs), "cuda")
        with caplog.at_level(logging.WARNING, logger="fedhet.clients.graphed"):
            results.append(trainer.train(task(weights, steps=9), x, y, seed=0))
            trainer.train(task(weights, 2, steps=9), x, y, seed=0)
        assert trainer.graphed.captures == 0
    assert sum("capture of the training step failed" in r.message for r in caplog.records) == 1
    assert_close(results[0], results[1], atol=1e-6)
