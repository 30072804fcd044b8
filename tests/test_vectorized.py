"""The vectorized executor computes what the sequential one does (fp32), and falls back visibly."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedhet import quant
from fedhet.cli import compose
from fedhet.clients.quantized import INT8_NEVER, QuantizedTrainer, bf16_is_native
from fedhet.clients.trainer import LocalTrainer, TrainConfig
from fedhet.errors import ConfigError
from fedhet.metrics import MetricsWriter, read_metrics
from fedhet.models import build_model
from fedhet.runtime import Evaluation, StopRules
from fedhet.sim import layers, vectorized
from fedhet.sim.executor import SequentialExecutor
from fedhet.sim.layers import LowRank, compile_model
from fedhet.sim.runner import simulate, validate
from fedhet.sim.simulator import SimConfig, Simulator
from fedhet.sim.vectorized import VectorizedExecutor
from fedhet.strategies import Strategy, buffer
from fedhet.strategies.aggregators import WeightedMean
from fedhet.strategies.fedasync import FedAsyncScheduler
from fedhet.strategies.fedavg import SyncScheduler
from fedhet.strategies.planners import IdentityPlanner
from fedhet.strategies.staleness import StalenessWeighted
from fedhet.types import ClientInfo, ClientProfile, Result, StackedRow, Task, Weights
from fedhet.updates import update_norm

SHAPE = (1, 12, 12)


def data(num_clients: int = 7) -> tuple[torch.Tensor, torch.Tensor, dict[int, np.ndarray]]:
    """Random inputs; shards of uneven sizes (13..43 samples) so last minibatches differ and get padded."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(400, *SHAPE, generator=generator)
    y = torch.randint(0, 10, (400,), generator=generator)
    sizes = [13 + 5 * i for i in range(num_clients)]
    starts = np.cumsum([0, *sizes])
    return x, y, {i: np.arange(starts[i], starts[i] + sizes[i]) for i in range(num_clients)}


def tasks_for(model: nn.Module, num_clients: int) -> list[Task]:
    """Two start versions, and a mix of local epochs and of (different) local step counts beyond one epoch."""
    v0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(1)
    v1 = {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in v0.items()}
    return [
        Task(i, i, i % 2, v1 if i % 2 else v0, local_epochs=1 if i % 3 == 0 else 0, local_steps=4 * i if i % 3 else 0)
        for i in range(num_clients)
    ]


def assert_same(expected: list[Result], actual: list[Result], atol: float = 1e-4) -> None:
    """Equal up to fp32 summation order: with one thread oneDNN reduces the CNN's first-convolution weight
    gradients in another order than the batched path does, and after a task's steps 7 of its 800 weights (~0.2)
    differ by up to 3e-5."""
    assert [(r.task_id, r.client_id, r.version, r.num_samples, r.local_steps) for r in actual] == [
        (r.task_id, r.client_id, r.version, r.num_samples, r.local_steps) for r in expected
    ]
    for e, a in zip(expected, actual, strict=True):
        assert list(a.weights) == list(e.weights)
        for key in e.weights:
            assert a.weights[key].shape == e.weights[key].shape
            torch.testing.assert_close(a.weights[key], e.weights[key], rtol=1e-4, atol=atol)
        assert a.loss == pytest.approx(e.loss, rel=1e-4, abs=1e-5)


def run_both(
    model_name: str,
    config: TrainConfig,
    batch_size: int,
    unfold: bool = False,
    mu: Sequence[float] = (),
    versions: Sequence[int] = (),
) -> tuple[list[Result], list[Result], VectorizedExecutor]:
    """The sequential and the vectorized executor's results for :func:`tasks_for`'s tasks (FedProx's mu per task
    from ``mu``, and each task's start version from ``versions``, when given)."""
    x, y, shards = data()
    model = build_model(model_name, SHAPE, 10, seed=0)
    tasks = tasks_for(model, len(shards))
    if mu:
        tasks = [replace(t, proximal_mu=m) for t, m in zip(tasks, mu, strict=True)]
    if versions:
        tasks = [replace(t, version=v) for t, v in zip(tasks, versions, strict=True)]
    expected = SequentialExecutor(LocalTrainer(model, config), x, y, shards, seed=5).run(tasks)
    trainer = LocalTrainer(build_model(model_name, SHAPE, 10, seed=0), config)
    executor = VectorizedExecutor(trainer, x, y, shards, seed=5, batch_size=batch_size)
    if unfold:  # the CUDA path (per-client convolutions as unfold + bmm), checked here on the CPU
        executor.layers, _ = compile_model(trainer.model, 4, unfold=True)
    return expected, executor.run(tasks), executor


@pytest.mark.parametrize("model_name", ["cnn", "2nn", "logreg"])
@pytest.mark.parametrize("batch_size", [3, 16], ids=["chunks-of-3", "one-chunk"])
def test_fp32_results_equal_the_sequential_executors(model_name: str, batch_size: int) -> None:
    expected, actual, executor = run_both(model_name, TrainConfig(lr=0.05, batch_size=8), batch_size)
    assert_same(expected, actual)
    assert (executor.vectorized_tasks, executor.fallback_tasks) == (len(expected), 0)


@pytest.mark.parametrize("model_name", ["cnn", "2nn"])
@pytest.mark.parametrize("bits", [32, 4])
@pytest.mark.parametrize("starts", ["one", "two"])
def test_a_rows_update_norm_is_the_norm_of_its_result(
    monkeypatch: pytest.MonkeyPatch, model_name: str, bits: int, starts: str
) -> None:
    """The norm bound reads a chunk row's update norm from the chunk (computed for every row at once: a block of
    rows at a time, a low-rank weight's from its factors): the norm a pass over that result alone gives, against
    its own task's start weights (one start for the chunk, or two start versions in it), after a low-bit client's
    result is rounded to its grid. Up to float rounding: the dense weights are the start plus the factors' product
    rounded to fp32."""
    monkeypatch.setattr(vectorized, "_NORM_BLOCK_BYTES", 3 * 4 * 800)  # a few rows per block of the largest tensors
    x, y, shards = data()
    model = build_model(model_name, SHAPE, 10, seed=0)
    tasks = tasks_for(model, len(shards))
    if starts == "one":
        tasks = [replace(t, version=0, weights=tasks[0].weights) for t in tasks]
    config = TrainConfig(lr=0.05, batch_size=8)
    low_bit = dict.fromkeys(shards, bits) if bits < 32 else None
    quantized = QuantizedTrainer(build_model(model_name, SHAPE, 10, seed=0), config) if low_bit else None
    executor = VectorizedExecutor(
        LocalTrainer(model, config), x, y, shards, seed=5, batch_size=4, quantized=quantized, bitwidths=low_bit
    )
    results = executor.run(tasks)
    assert executor.fallback_tasks == 0
    for task, result in zip(tasks, results, strict=True):
        assert isinstance(result.weights, StackedRow) and result.weights.norms is not None
        alone = {k: v.clone() for k, v in result.weights.items()}  # a plain mapping: its norm is computed
        assert update_norm(alone, task.weights) > 0
        assert update_norm(result.weights, task.weights) == pytest.approx(update_norm(alone, task.weights), rel=1e-4)
        other = {k: v + 1 for k, v in task.weights.items()}  # another start: the row's norm is not for it
        assert update_norm(result.weights, other) == update_norm(alone, other)


def test_a_low_rank_changes_norm_is_exact_and_never_negative() -> None:
    """From the factors' Gram matrices in float64: equal to the dense change's norm, and 0 (not a negative number
    whose root is NaN, which the norm bound would refuse) for a step the next one undoes."""
    generator = torch.Generator().manual_seed(0)
    g, h = torch.randn(3, 2, 40, generator=generator), torch.randn(3, 2, 30, generator=generator)
    base = torch.zeros(40, 30)
    low = LowRank(base, g, h, 0.1, base)
    dense = (low.dense() - base).double().reshape(3, -1)
    torch.testing.assert_close(low.update_squares(), (dense**2).sum(1), rtol=1e-5, atol=0)
    undone = LowRank(base, torch.cat([g, -g], 1) * 1e3, torch.cat([h, h], 1), 0.1, base)
    assert torch.equal(undone.update_squares(), torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("model_name", ["cnn", "2nn"])
def test_momentum_and_weight_decay_follow_torch_sgd(model_name: str) -> None:
    config = TrainConfig(lr=0.05, batch_size=8, momentum=0.9, weight_decay=1e-3)
    expected, actual, _ = run_both(model_name, config, batch_size=4)
    assert_same(expected, actual)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fedprox_pull_follows_the_sequential_trainer(momentum: float) -> None:
    """FedProx's mu differs per task (0 for some) and tasks start from two versions (stacked start weights)."""
    config = TrainConfig(lr=0.05, batch_size=8, momentum=momentum)
    mu = [0.0, 0.5, 2.0, 0.0, 0.5, 2.0, 1.0]
    expected, actual, executor = run_both("cnn", config, batch_size=4, mu=mu)
    assert_same(expected, actual)
    assert executor.fallback_tasks == 0


@pytest.mark.parametrize("model_name", ["cnn", "2nn", "logreg"])
@pytest.mark.parametrize(
    ("momentum", "mu"), [(0.0, ()), (0.9, (0.0, 0.5, 2.0, 0.0, 0.5, 2.0, 1.0))], ids=["sgd", "momentum-fedprox"]
)
def test_lr_decay_follows_each_tasks_start_version(model_name: str, momentum: float, mu: Sequence[float]) -> None:
    """Tasks of one chunk start from different versions (as under async schedulers), so each client steps at its
    own ``lr * lr_decay ** version``; tasks sharing start weights but not a version take the per-client lr too."""
    config = TrainConfig(lr=0.05, batch_size=8, momentum=momentum, lr_decay=0.8)
    versions = [0, 5, 2, 3, 4, 1, 6]
    expected, actual, executor = run_both(model_name, config, batch_size=4, mu=mu, versions=versions)
    assert_same(expected, actual)
    assert executor.fallback_tasks == 0


def test_lr_decay_on_the_low_rank_path_with_shared_start_weights() -> None:
    """Every client of a chunk starts from the same weights: at one version the linear weights stay low-rank at
    the decayed lr; at different versions they train at each client's own lr."""
    x, y, shards = data()
    model = build_model("2nn", SHAPE, 10, seed=0)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    config = TrainConfig(lr=0.05, batch_size=8, lr_decay=0.5)
    for versions in ([3] * len(shards), list(range(len(shards)))):
        tasks = [Task(i, i, v, start, local_epochs=1) for i, v in enumerate(versions)]
        expected = SequentialExecutor(LocalTrainer(model, config), x, y, shards, seed=5).run(tasks)
        assert_same(expected, VectorizedExecutor(LocalTrainer(model, config), x, y, shards, seed=5).run(tasks))


def test_a_strong_proximal_pull_keeps_the_update_near_its_start() -> None:
    config = TrainConfig(lr=0.05, batch_size=8)
    x, y, shards = data()
    model = build_model("2nn", SHAPE, 10, seed=0)
    plain = [replace(t, local_steps=20, local_epochs=0) for t in tasks_for(model, len(shards))]
    pulled = [replace(t, proximal_mu=10.0) for t in plain]
    for executor in (SequentialExecutor, VectorizedExecutor):
        free = executor(LocalTrainer(model, config), x, y, shards, seed=5).run(plain)
        held = executor(LocalTrainer(model, config), x, y, shards, seed=5).run(pulled)
        for task, a, b in zip(plain, free, held, strict=True):
            moved = [
                float(torch.linalg.vector_norm(r.weights[k] - task.weights[k])) for r in (a, b) for k in ["1.weight"]
            ]
            assert moved[1] < moved[0] / 2, (executor.__name__, task.task_id, moved)


def test_the_cuda_convolution_path_is_exact_too() -> None:
    expected, actual, _ = run_both("cnn", TrainConfig(lr=0.05, batch_size=8), batch_size=4, unfold=True)
    assert_same(expected, actual)


def test_bf16_stays_close_to_fp32() -> None:
    x, y, shards = data()
    model = build_model("cnn", SHAPE, 10, seed=0)
    tasks = tasks_for(model, len(shards))
    config = TrainConfig(lr=0.05, batch_size=8)
    fp32 = VectorizedExecutor(LocalTrainer(model, config), x, y, shards, seed=5).run(tasks)
    bf16 = VectorizedExecutor(LocalTrainer(model, config), x, y, shards, seed=5, precision="bf16").run(tasks)
    for a, b in zip(fp32, bf16, strict=True):
        for key in a.weights:
            torch.testing.assert_close(b.weights[key], a.weights[key], rtol=0.05, atol=0.02)
    with pytest.raises(ValueError, match="precision"):
        VectorizedExecutor(LocalTrainer(model, config), x, y, shards, seed=5, precision="fp8")


def test_an_unsupported_model_falls_back_to_the_sequential_trainer_visibly(caplog: pytest.LogCaptureFixture) -> None:
    x, y, shards = data(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(144, 16), nn.Tanh(), nn.Linear(16, 10))
    tasks = tasks_for(model, 3)
    expected = SequentialExecutor(LocalTrainer(model, TrainConfig()), x, y, shards, seed=5).run(tasks)
    with caplog.at_level(logging.WARNING, logger="fedhet.sim.vectorized"):
        executor = VectorizedExecutor(LocalTrainer(model, TrainConfig()), x, y, shards, seed=5)
        actual = executor.run(tasks)
    assert "Tanh" in caplog.text and "falls back" in caplog.text
    assert (executor.vectorized_tasks, executor.fallback_tasks) == (0, 3)
    assert_same(expected, actual, atol=0.0)


def test_a_task_that_does_not_fit_the_model_falls_back_alone(caplog: pytest.LogCaptureFixture) -> None:
    x, y, shards = data(4)
    model = build_model("2nn", SHAPE, 10, seed=0)
    tasks = tasks_for(model, 4)
    odd: Weights = {k: v.double() for k, v in tasks[2].weights.items()}  # fp64 weights: not the model's dtype
    tasks[2] = Task(2, 2, tasks[2].version, odd, local_steps=tasks[2].local_steps)
    config = TrainConfig(lr=0.05, batch_size=8)
    expected = SequentialExecutor(LocalTrainer(model, config), x, y, shards, seed=5).run(tasks)
    executor = VectorizedExecutor(LocalTrainer(build_model("2nn", SHAPE, 10, seed=0), config), x, y, shards, seed=5)
    with caplog.at_level(logging.WARNING, logger="fedhet.sim.vectorized"):
        actual = executor.run(tasks)
    assert "task 2 runs sequentially" in caplog.text
    assert (executor.vectorized_tasks, executor.fallback_tasks) == (3, 1)
    assert_same(expected, actual)


def test_batch_size_follows_the_memory_budget_not_the_client_count() -> None:
    x, y, shards = data()
    trainer = LocalTrainer(build_model("cnn", SHAPE, 10, seed=0), TrainConfig(batch_size=8))
    small = VectorizedExecutor(trainer, x, y, shards, seed=0, memory_bytes=1)
    large = VectorizedExecutor(trainer, x, y, shards, seed=0, memory_bytes=1 << 30)
    assert small.batch_size == 1
    assert 100 < large.batch_size <= 128  # on a CPU larger chunks only write results to more fresh memory


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_rank_weights_become_dense_in_blocks(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """``base - lr * u^T v`` per client, blocks of clients with a short last block (bf16: up to its rounding)."""
    monkeypatch.setattr(layers, "_DENSE_BLOCK_BYTES", 3 * 20 * 30 * 2)  # 3 clients a block in bf16
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(20, 30, generator=generator)
    u, v = torch.randn(11, 5, 20, generator=generator), torch.randn(11, 5, 30, generator=generator)
    expected = base - 0.1 * torch.bmm(u.transpose(1, 2), v)
    low_rank = LowRank(base, u.to(dtype), v.to(dtype), 0.1, base.to(dtype))
    actual = low_rank.dense()
    assert actual.dtype == torch.float32 and actual.shape == (11, 20, 30)
    tolerance = 1e-5 if dtype == torch.float32 else 0.05
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance)


def test_bf16_2nn_with_shared_start_weights_stays_close_to_fp32() -> None:
    """The low-rank path (every client of a chunk starts from the same weights) in bf16 against fp32."""
    x, y, shards = data()
    model = build_model("2nn", SHAPE, 10, seed=0)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tasks = [Task(i, i, 0, start, local_epochs=1) for i in range(len(shards))]
    config = TrainConfig(lr=0.05, batch_size=8)
    expected = SequentialExecutor(LocalTrainer(model, config), x, y, shards, seed=5).run(tasks)
    fp32 = VectorizedExecutor(LocalTrainer(model, config), x, y, shards, seed=5).run(tasks)
    assert_same(expected, fp32)
    bf16 = VectorizedExecutor(LocalTrainer(model, config), x, y, shards, seed=5, precision="bf16").run(tasks)
    for a, b in zip(fp32, bf16, strict=True):
        for key in a.weights:
            torch.testing.assert_close(b.weights[key], a.weights[key], rtol=0.05, atol=0.02)


def test_a_simulation_with_the_vectorized_executor_matches_the_sequential_one(tmp_path: Path) -> None:
    overrides = [
        "dataset=synthetic",
        "model=logreg",
        "num_clients=30",
        "sim.max_versions=3",
        "sim.progress=false",
        "strategy.scheduler.fraction=0.5",
    ]
    finals = []
    for executor in ("sequential", "vectorized"):
        cfg = compose([*overrides, f"sim.executor={executor}"])
        simulate(cfg, tmp_path / executor)
        finals.append(read_metrics(tmp_path / executor / "metrics.jsonl"))
    sequential, vectorized = finals
    assert [r.version for r in vectorized] == [r.version for r in sequential]
    assert [r.virtual_time for r in vectorized] == pytest.approx([r.virtual_time for r in sequential])
    assert [r.accuracy for r in vectorized] == pytest.approx([r.accuracy for r in sequential], abs=1e-3)


def test_chunks_of_unequal_clients_arrive_together_and_are_folded_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clients of unequal speeds: each chunk is computed from the tasks that arrive next, so the update buffer folds
    every chunk once, whole (not a part of it at each result while later chunks wait)."""
    folds: list[bool] = []  # whether each chunk folded held all its rows
    fold_into = buffer._Chunk.fold_into

    def recorded(chunk: buffer._Chunk, bucket: buffer.Bucket) -> None:
        folds.append(chunk.complete())
        fold_into(chunk, bucket)

    monkeypatch.setattr(buffer._Chunk, "fold_into", recorded)
    x, y, shards = data()
    config = TrainConfig(lr=0.05, batch_size=8)
    model = build_model("2nn", SHAPE, 10, seed=0)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    executor = VectorizedExecutor(LocalTrainer(model, config), x, y, shards, 5, batch_size=2)
    # the larger a client's shard the faster it is: clients arrive in the reverse of their ids
    clients = [ClientInfo(c, ClientProfile(1.0 / (c + 1) ** 2, 1e12), len(s)) for c, s in shards.items()]
    strategy = Strategy(SyncScheduler(fraction=1.0, min_clients=1), IdentityPlanner(), WeightedMean())
    with MetricsWriter(tmp_path / "metrics.jsonl") as metrics:
        evaluate = lambda w, bits: Evaluation(0.0, 0.0)  # noqa: E731
        Simulator(strategy, clients, executor, evaluate, metrics, SimConfig(StopRules(2), batch_size=8), 0).run(initial)
    assert strategy.updates_applied == 2 * len(clients)
    assert folds == [True] * 8  # 2 rounds of chunks of 2, 2, 2 and 1 clients


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["sim.executor=threads"], "sim.executor must be one of"),
        (["sim.precision=fp16"], "sim.precision must be one of"),
        (["sim.precision=bf16"], "needs sim.executor=vectorized"),
        (["sim.norm_bound=-1"], r"sim.norm_bound must be finite and >= 0"),
        (["sim.norm_bound=inf"], r"sim.norm_bound must be finite and >= 0"),
        (["sim.norm_action=drop"], r"sim.norm_action must be one of reject, clip, got 'drop'"),
    ],
)
def test_executor_settings_are_checked_before_the_run(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(compose(overrides))


def assert_same_on_grid(expected: list[Result], actual: list[Result], model_name: str) -> None:
    """Low-bit results (of :func:`quantized_run`'s tasks for ``model_name``) equal up to fp32 summation order, which
    quantized training amplifies: a weight on a rounding boundary tips to the neighbouring grid point, the next steps
    see another model, and over a task's steps the trajectories part. (On an AVX-512 CPU, starting the sequential
    trainer from weights perturbed by 1e-7 moves a CNN task's update by 11%, while every weight of some tasks stays
    within a step on another CPU.) So a low-bit result is compared by its update from the task's start: it differs
    from the reference's by at most 20% of the reference's norm (a 10% change of the learning rate moves a task's
    update by 13-46% at 4 and 8 bits), and the losses agree; fp32 results are compared weight by weight."""
    assert [(r.task_id, r.bitwidth, r.local_steps) for r in actual] == [
        (r.task_id, r.bitwidth, r.local_steps) for r in expected
    ]
    starts = tasks_for(build_model(model_name, SHAPE, 10, seed=0), len(expected))

    def flat(weights: Weights) -> torch.Tensor:
        return torch.cat([v.reshape(-1).double() for v in weights.values()])

    for e, a in zip(expected, actual, strict=True):
        if e.bitwidth == quant.FULL_PRECISION:
            assert_same([e], [a])
            continue
        start = flat(starts[e.task_id].weights)
        want, got = flat(e.weights) - start, flat(a.weights) - start
        apart = float((got - want).norm())
        assert apart <= 0.2 * float(want.norm()) + 1e-6, (
            f"task {e.task_id}: update off by {apart / float(want.norm()):.0%}"
        )
        assert a.loss == pytest.approx(e.loss, rel=1e-3)


def quantized_run(
    model_name: str,
    bits: dict[int, int],
    int8_min_macs: int | None = None,
    momentum: float = 0.0,
    low_bit_weights: bool = False,
    result_rounding: str = "nearest",
    local_steps: int = 0,
) -> tuple[list[Result], list[Result], VectorizedExecutor]:
    """The sequential and the vectorized executor's results for clients at ``bits`` (32 where not named), every
    task ``local_steps`` steps long when given."""
    x, y, shards = data(len(bits))
    config = TrainConfig(
        lr=0.05, batch_size=8, momentum=momentum, low_bit_weights=low_bit_weights, result_rounding=result_rounding
    )
    model = build_model(model_name, SHAPE, 10, seed=0)
    tasks = tasks_for(model, len(bits))
    if local_steps:
        tasks = [replace(t, local_steps=local_steps, local_epochs=0) for t in tasks]
    quantized = QuantizedTrainer(model, config, int8_min_macs=int8_min_macs)
    sequential = SequentialExecutor(LocalTrainer(model, config), x, y, shards, 5, quantized=quantized, bitwidths=bits)
    expected = sequential.run(tasks)
    trainer = LocalTrainer(build_model(model_name, SHAPE, 10, seed=0), config)
    quantized = QuantizedTrainer(trainer.model, config, int8_min_macs=int8_min_macs)
    executor = VectorizedExecutor(trainer, x, y, shards, 5, batch_size=3, quantized=quantized, bitwidths=bits)
    return expected, executor.run(tasks), executor


@pytest.mark.parametrize(("model_name", "momentum", "fleet"), [("cnn", 0.0, 5), ("2nn", 0.9, 8)])
def test_low_bit_clients_train_quantization_aware_vectorized(model_name: str, momentum: float, fleet: int) -> None:
    """A mixed 32/8/4/2-bit fleet: every client vectorized, each result on its bitwidth's grid and equal to the
    sequential quantized trainer's (on its fake-quantization path, forced where integer GEMMs pay)."""
    bits = dict(enumerate([32, 8, 4, 2, 8, 32, 4, 4][:fleet]))
    expected, actual, executor = quantized_run(model_name, bits, int8_min_macs=INT8_NEVER, momentum=momentum)
    assert (executor.vectorized_tasks, executor.fallback_tasks) == (len(bits), 0)
    assert [r.bitwidth for r in actual] == list(bits.values())
    assert_same_on_grid(expected, actual, model_name)
    start = build_model(model_name, SHAPE, 10, seed=0).state_dict()
    for result in actual:
        for key, value in result.weights.items():
            assert torch.equal(quant.fake_quantize(value, result.bitwidth), value)  # on its grid
            assert not torch.equal(value, quant.fake_quantize(start[key], result.bitwidth))  # and trained


@pytest.mark.parametrize(
    ("model_name", "momentum", "int8_min_macs"),
    [("2nn", 0.9, 0), ("cnn", 0.0, 0), ("2nn", 0.0, 172_800), ("cnn", 0.9, 2_000_000)],
)
def test_clients_on_integer_gemms_train_vectorized(model_name: str, momentum: float, int8_min_macs: int) -> None:
    """Where the quantized trainer takes its int8 path (every layer it can at ``int8_min_macs`` 0; else chosen by
    the minibatch's size, so that a task's short last minibatches take the fake path: the 2NN's first layer from 6
    samples, the CNN's second convolution from 2 and first Linear from 7), a mixed 32/8/4/2-bit fleet trains
    vectorized, and each result is the sequential quantized trainer's: the same integer kernels per client.

    Three steps (the short minibatches of clients 0 and 1 among them): the low-bit updates agree to 1e-5 (measured
    0 with bf16 gradient factors on an AVX-512 BF16 CPU; up to 4e-7 with fp32 factors on an AVX2 one, where the fp32
    products of the two executors sum in other orders), where the fake-quantized path is 0.6-30% away from a 4- or
    8-bit update. Over more steps an fp32 difference that small can move a 4-bit weight across a grid boundary,
    after which the tasks part by percent, so a longer task cannot tell the paths apart."""
    bits = dict(enumerate([32, 8, 4, 2, 8, 32, 4]))
    expected, actual, executor = quantized_run(
        model_name, bits, int8_min_macs=int8_min_macs, momentum=momentum, local_steps=3
    )
    assert (executor.vectorized_tasks, executor.fallback_tasks) == (len(bits), 0)
    _, fake, _ = quantized_run(model_name, bits, int8_min_macs=INT8_NEVER, momentum=momentum, local_steps=3)
    starts = tasks_for(build_model(model_name, SHAPE, 10, seed=0), len(bits))

    def update(result: Result) -> torch.Tensor:
        weights, start = result.weights, starts[result.task_id].weights
        return torch.cat([(weights[k] - start[k]).reshape(-1).double() for k in start])

    for e, a, f in zip(expected, actual, fake, strict=True):
        assert (a.task_id, a.bitwidth, a.local_steps) == (e.task_id, e.bitwidth, e.local_steps)
        if e.bitwidth == quant.FULL_PRECISION:
            assert_same([e], [a])
            continue
        want = update(e)
        assert float((update(a) - want).norm()) <= 1e-5 * float(want.norm()), f"task {e.task_id}"
        assert a.loss == pytest.approx(e.loss, rel=1e-5)
        if e.bitwidth in (4, 8):  # the int8 path is what makes them equal
            assert float((update(f) - want).norm()) > 1e-3 * float(want.norm()), f"task {e.task_id}"


def test_stacked_rounding_equals_rounding_each_tensor() -> None:
    generator = torch.Generator().manual_seed(3)
    for shape in [(5, 16, 3, 3, 3), (5, 10, 40), (5, 10), (5,)]:
        stack = torch.randn(shape, generator=generator)
        for bits in (2, 4, 8, 12):
            expected = torch.stack([quant.fake_quantize(w, bits) for w in stack])
            assert torch.equal(quant.fake_quantize_stacked(stack, bits), expected)


def test_bf16_on_a_cpu_without_bf16_instructions_says_it_is_slower(caplog: pytest.LogCaptureFixture) -> None:
    x, y, shards = data(2)
    trainer = LocalTrainer(build_model("2nn", SHAPE, 10, seed=0), TrainConfig())
    with caplog.at_level(logging.WARNING, logger="fedhet.sim.vectorized"):
        VectorizedExecutor(trainer, x, y, shards, seed=5, precision="bf16")
    warned = "emulated and slower than fp32" in caplog.text
    assert warned == (not bf16_is_native(torch.device("cpu")))


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_a_low_bit_client_whose_training_diverges_says_so_in_both_executors(rounding: str) -> None:
    """Client 1's samples hold NaN, so its training diverges: neither executor raises (the run goes on), its result
    carries the DIVERGED loss that every runtime refuses, and the other clients' results are as without it."""
    bits = {0: 4, 1: 4, 2: 2, 3: 32}
    x, y, shards = data(len(bits))
    x = x.clone()
    x[shards[1]] = math.nan
    config = TrainConfig(lr=0.05, batch_size=8, result_rounding=rounding)
    model = build_model("2nn", SHAPE, 10, seed=0)
    tasks = tasks_for(model, len(bits))
    quantized = QuantizedTrainer(model, config, int8_min_macs=INT8_NEVER)
    sequential = SequentialExecutor(LocalTrainer(model, config), x, y, shards, 5, quantized=quantized, bitwidths=bits)
    expected = sequential.run(tasks)
    trainer = LocalTrainer(build_model("2nn", SHAPE, 10, seed=0), config)
    quantized = QuantizedTrainer(trainer.model, config, int8_min_macs=INT8_NEVER)
    executor = VectorizedExecutor(trainer, x, y, shards, 5, batch_size=4, quantized=quantized, bitwidths=bits)
    actual = executor.run(tasks)
    assert executor.fallback_tasks == 0
    for results in (expected, actual):
        assert [math.isnan(r.loss) for r in results] == [False, True, False, False]
    healthy = [0, 2, 3]
    assert_same_on_grid([expected[i] for i in healthy], [actual[i] for i in healthy], "2nn")


def test_a_diverged_result_is_a_dropped_update_and_the_simulation_finishes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A 4-bit client whose training diverges every time (NaN samples) on the vectorized executor: its updates are
    refused as ``fedhet server`` refuses them (loss NaN), counted as dropped, and the others' make the versions."""
    x, y, shards = data(4)
    x = x.clone()
    x[shards[2]] = math.nan
    config = TrainConfig(lr=0.05, batch_size=8)
    model = build_model("2nn", SHAPE, 10, seed=0)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer = LocalTrainer(model, config)
    quantized = QuantizedTrainer(model, config, int8_min_macs=INT8_NEVER)
    bits = dict.fromkeys(shards, 4)
    executor = VectorizedExecutor(trainer, x, y, shards, 5, batch_size=4, quantized=quantized, bitwidths=bits)
    clients = [ClientInfo(c, ClientProfile(0.01 * (c + 1), 1e12, bitwidth=4), len(s)) for c, s in shards.items()]
    strategy = Strategy(FedAsyncScheduler(local_steps=2), IdentityPlanner(), StalenessWeighted(alpha=0.5))
    with MetricsWriter(tmp_path / "metrics.jsonl") as metrics:
        evaluate = lambda w, bits: Evaluation(0.0, 0.0)  # noqa: E731
        sim = Simulator(strategy, clients, executor, evaluate, metrics, SimConfig(StopRules(6), batch_size=8), 0)
        with caplog.at_level(logging.WARNING, logger="fedhet.sim.simulator"):
            summary = sim.run(initial)
    assert summary.failure is None and summary.reason == "max_versions" and strategy.version == 6
    dropped = [r.getMessage() for r in caplog.records if "update dropped" in r.getMessage()]
    assert dropped and all(m.startswith("client 2: update dropped: the result of task") for m in dropped)
    assert all(m.endswith("has loss NaN: its local training diverged") for m in dropped)
    assert all(torch.isfinite(v).all() for v in strategy.global_weights.values())
    last = read_metrics(tmp_path / "metrics.jsonl")[-1]
    assert last.updates_dropped == len(dropped) and last.updates_applied == 6
