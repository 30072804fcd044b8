"""Bitwidth heterogeneity through the core: results carry the registered bitwidth, buffers keep bitwidths apart,
payloads shrink with the bitwidth, fleets draw exact mixes, and low-bitwidth clients train quantized."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from torch import nn

from fedhet import quant
from fedhet.cli import compose
from fedhet.clients.quantized import QuantizedTrainer
from fedhet.clients.trainer import LocalTrainer, TrainConfig
from fedhet.codec import encoded_size
from fedhet.config import FleetConfig
from fedhet.errors import ConfigError
from fedhet.metrics import MetricsWriter
from fedhet.runtime import Evaluation, StopRules
from fedhet.sim.executor import SequentialExecutor
from fedhet.sim.fleet import sample_profiles
from fedhet.sim.runner import validate
from fedhet.sim.simulator import SimConfig, Simulator
from fedhet.strategies import StateError, Strategy, UpdateBuffer
from fedhet.strategies.aggregators import WeightedMean
from fedhet.strategies.fedavg import SyncScheduler
from fedhet.strategies.planners import IdentityPlanner
from fedhet.strategies.prowd import BitwidthPlanner, GroupedMean
from fedhet.strategies.staleness import StalenessBuffer, StalenessWeighted
from fedhet.types import ClientInfo, ClientProfile, Result, Task
from tests.helpers import EchoExecutor


def client(cid: int, bits: int, seconds_per_sample: float = 0.01, bandwidth: float = 1e6) -> ClientInfo:
    return ClientInfo(cid, ClientProfile(seconds_per_sample, bandwidth, bitwidth=bits), num_samples=10)


def result(task: int, version: int, bits: int, value: float, samples: int = 10) -> Result:
    w = {"w": torch.full((3, 2), value), "count": torch.tensor(task)}
    return Result(task, task, version, w, samples, local_steps=1, train_seconds=0.0, loss=0.0, bitwidth=bits)


def sync_strategy(aggregator: GroupedMean | WeightedMean, planner: BitwidthPlanner | IdentityPlanner) -> Strategy:
    return Strategy(
        SyncScheduler(fraction=1.0, min_clients=1, round_timeout=1e9, local_steps=1, local_epochs=0),
        planner,
        aggregator,
    )


# ---------------------------------------------------------------------------------------------- strategy core


def test_result_bitwidth_is_the_registered_profiles_not_the_clients_claim() -> None:
    grouped = GroupedMean()
    strategy = sync_strategy(grouped, BitwidthPlanner())
    strategy.start({"w": torch.zeros(3, 2), "count": torch.tensor(0)}, 0.0)
    strategy.on_available(client(0, 8), 0.0)
    strategy.on_available(client(1, 32), 0.0)
    tasks = {t.client_id: t for t in strategy.on_tick(0.0)}
    claims = {0: 32, 1: 4}  # both lie about their bitwidth
    for cid, task in tasks.items():
        weights = {"w": torch.full((3, 2), float(cid + 1)), "count": torch.tensor(0)}
        strategy.on_result(Result(task.task_id, cid, 0, weights, 10, 1, 0.0, 0.0, bitwidth=claims[cid]), 0.0)
    assert strategy.version == 1
    assert sorted(grouped.models) == [8, 32]  # grouped by profile: 8-bit client 0, fp32 client 1
    assert torch.equal(grouped.models[8]["w"], torch.full((3, 2), 1.0))
    assert torch.equal(grouped.models[32]["w"], torch.full((3, 2), 2.0))


def test_grouped_models_survive_a_resume_and_each_group_still_receives_its_own() -> None:
    def strategy_after_one_round() -> tuple[Strategy, GroupedMean]:
        grouped = GroupedMean()
        strategy = sync_strategy(grouped, BitwidthPlanner())
        strategy.start({"w": torch.zeros(3, 2), "count": torch.tensor(0)}, 0.0)
        return strategy, grouped

    first, _ = strategy_after_one_round()
    for c in (client(0, 8), client(1, 32)):
        first.on_available(c, 0.0)
    for task in first.on_tick(0.0):
        weights = {"w": torch.full((3, 2), float(task.client_id + 1)), "count": torch.tensor(0)}
        first.on_result(Result(task.task_id, task.client_id, 0, weights, 10, 1, 0.0, 0.0), 0.0)
    resumed, grouped = strategy_after_one_round()
    resumed.load_state_dict(first.state_dict())
    assert sorted(grouped.models) == [8, 32]
    tasks = {t.client_id: t for c in (client(0, 8), client(1, 32)) for t in resumed.on_available(c, 1.0)}
    tasks.update({t.client_id: t for t in resumed.on_tick(1.0)})
    assert torch.equal(tasks[0].weights["w"], torch.full((3, 2), 1.0))  # the 8-bit group's model, not the top one
    assert torch.equal(tasks[1].weights["w"], torch.full((3, 2), 2.0))


def test_buffer_buckets_by_start_version_and_bitwidth() -> None:
    buf = UpdateBuffer()
    for r in [result(0, 0, 32, 1.0), result(1, 0, 8, 2.0), result(2, 1, 8, 3.0), result(3, 0, 8, 4.0)]:
        buf.add(r, float(r.num_samples))
    assert len(buf) == 4
    assert buf.keys() == {(0, 8), (0, 32), (1, 8)}
    assert buf.versions() == {0, 1}
    assert [(v, b.bitwidth, b.count) for v, b in buf.items()] == [(0, 8, 2), (0, 32, 1), (1, 8, 1)]
    assert buf.task_ids() == [1, 3, 0, 2]
    (_, low), (_, full), _ = buf.items()
    assert torch.equal(low.weighted_sum["w"], torch.full((3, 2), 60.0, dtype=torch.float64))
    assert torch.equal(full.weighted_sum["w"], torch.full((3, 2), 10.0, dtype=torch.float64))

    other = UpdateBuffer()
    other.add(result(4, 0, 8, 1.0), 1.0)  # joins (0, 8)
    other.add(result(5, 2, 4, 1.0), 1.0)  # a new bucket
    buf.absorb(other)
    assert len(other) == 0 and len(buf) == 6
    assert [(v, b.bitwidth, b.count) for v, b in buf.items()] == [(0, 8, 3), (0, 32, 1), (1, 8, 1), (2, 4, 1)]


def test_buffer_state_round_trips_and_loads_old_plain_version_keys() -> None:
    buf = UpdateBuffer()
    for r in [result(0, 0, 32, 1.0), result(1, 0, 8, 2.0), result(2, 3, 8, 3.0)]:
        buf.add(r, 2.0)
    state = buf.state_dict()
    assert set(state) == {"0:32", "0:8", "3:8"}
    loaded = UpdateBuffer()
    loaded.load_state_dict(state)
    assert [(v, b.bitwidth, b.count, b.task_ids) for v, b in loaded.items()] == [
        (v, b.bitwidth, b.count, b.task_ids) for v, b in buf.items()
    ]
    old = UpdateBuffer()
    old.load_state_dict({"5": state["0:8"]})  # checkpoints from before buckets had a bitwidth: fp32
    assert old.keys() == {(5, 32)}


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (["x"], "not '<version>:<bitwidth>'"),
        (["1:"], "not '<version>:<bitwidth>'"),
        (["1:8:2"], "not '<version>:<bitwidth>'"),
        (["1:33"], "bitwidth in 1..32"),
        (["-1:8"], "version must be >= 0"),
        (["2", "2:32"], "repeats the bucket"),
    ],
)
def test_buffer_state_refuses_bad_keys(keys: list[str], message: str) -> None:
    buf = UpdateBuffer()
    buf.add(result(0, 0, 32, 1.0), 1.0)
    row = buf.state_dict()["0:32"]
    with pytest.raises(StateError, match=message):
        UpdateBuffer().load_state_dict(dict.fromkeys(keys, row))


def test_buffer_state_refuses_inconsistent_entries() -> None:
    buf = UpdateBuffer()
    buf.add(result(0, 0, 32, 1.0), 1.0)
    row = buf.state_dict()["0:32"]
    for bad in ({**row, "count": 2}, {**row, "weight": 0.0}, {**row, "sum": {"w": [1.0]}}):
        with pytest.raises(StateError, match="update buffer entry"):
            UpdateBuffer().load_state_dict({"0:32": bad})


def mixed_and_plain(results: list[Result], buffer: type[UpdateBuffer]) -> tuple[UpdateBuffer, UpdateBuffer]:
    mixed, plain = buffer(), buffer()
    for r in results:
        mixed.add(r, float(r.num_samples))
        plain.add(replace(r, bitwidth=32), float(r.num_samples))
    return mixed, plain


def test_weighted_mean_does_not_depend_on_how_bitwidths_split_the_buckets() -> None:
    results = [result(0, 0, 8, 1.0, 10), result(1, 0, 32, 2.0, 30), result(2, 1, 4, 5.0, 20)]
    mixed, plain = mixed_and_plain(results, UpdateBuffer)
    start = {"w": torch.zeros(3, 2), "count": torch.tensor(0)}
    out, expected = WeightedMean().aggregate(start, mixed, 1), WeightedMean().aggregate(start, plain, 1)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out["w"], torch.full((3, 2), (10 + 60 + 100) / 60))


@pytest.mark.parametrize("gradient_based", [False, True])
def test_staleness_weighting_does_not_depend_on_how_bitwidths_split_the_buckets(gradient_based: bool) -> None:
    """Two bitwidths from one start version share that version's staleness and start weights."""
    results = [result(0, 0, 8, 1.0), result(1, 0, 32, 2.0), result(2, 1, 8, 3.0), result(3, 1, 32, 5.0)]
    v0 = {"w": torch.full((3, 2), 0.5), "count": torch.tensor(0)}
    v1 = {"w": torch.full((3, 2), 1.5), "count": torch.tensor(0)}
    outs = []
    for buf in mixed_and_plain(results, StalenessBuffer):
        aggregator = StalenessWeighted(alpha=0.5, staleness="polynomial", gradient_based=gradient_based)
        aggregator.load_state_dict({"start_weights": {"0": v0}})  # gradient-based: theta_0 kept
        outs.append(aggregator.aggregate(v1, buf, 1))
    torch.testing.assert_close(outs[0], outs[1])
    assert not torch.equal(outs[0]["w"], v1["w"])


# ---------------------------------------------------------------------------------------------- simulator


def run_one_client(tmp_path: Path, bits: int) -> tuple[Simulator, list[dict[str, float]], dict[str, torch.Tensor]]:
    start = {"w": torch.randn(64, 256, generator=torch.Generator().manual_seed(0)), "count": torch.tensor(0)}
    c = client(0, bits, seconds_per_sample=1e-4, bandwidth=1e4)
    path = tmp_path / f"metrics{bits}.jsonl"
    with MetricsWriter(path) as metrics:
        sim = Simulator(
            sync_strategy(WeightedMean(), IdentityPlanner()),
            [c],
            EchoExecutor(),
            lambda w, bits: Evaluation(0.0, 0.0),
            metrics,
            SimConfig(StopRules(1), batch_size=5),
            seed=0,
        )
        sim.run(start)
    return sim, [json.loads(line) for line in path.read_text().splitlines()], start


def test_payloads_travel_at_the_clients_bitwidth(tmp_path: Path) -> None:
    compute = 1 * 5 * 1e-4  # one local step of 5 samples
    sizes = {}
    for bits, encoding in [(4, "int4"), (8, "int8"), (32, "fp32")]:
        sim, records, start = run_one_client(tmp_path, bits)
        size = encoded_size(start, encoding)
        assert sim.bytes_down == sim.bytes_up == records[-1]["bytes_down"] == records[-1]["bytes_up"] == size
        assert records[-1]["virtual_time"] == pytest.approx(compute + 2 * size / 1e4)
        sizes[bits] = size
    assert sizes[4] < sizes[32] / 7.5  # ~1/8: 4 bits per weight plus one fp32 scale per output channel
    assert sizes[8] < sizes[32] / 3.8


def test_simulated_fleet_of_two_bitwidths_keeps_two_groups(tmp_path: Path) -> None:
    grouped = GroupedMean()
    clients = [client(0, 8), client(1, 32), client(2, 8)]
    with MetricsWriter(tmp_path / "metrics.jsonl") as metrics:
        sim = Simulator(
            sync_strategy(grouped, BitwidthPlanner()),
            clients,
            EchoExecutor(),
            lambda w, bits: Evaluation(0.0, 0.0),
            metrics,
            SimConfig(StopRules(1), batch_size=5),
            seed=0,
        )
        sim.run({"w": torch.zeros(4, 3), "count": torch.tensor(0)})
    assert sorted(grouped.models) == [8, 32]
    assert torch.equal(grouped.models[8]["w"], torch.full((4, 3), 2.0))  # mean of client 0 (+1) and client 2 (+3)
    assert torch.equal(grouped.models[32]["w"], torch.full((4, 3), 2.0))  # client 1 alone (+2)


def test_simulator_refuses_a_bitwidth_without_an_encoding(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path / "metrics.jsonl") as metrics, pytest.raises(ValueError, match="bitwidth 7"):
        Simulator(
            sync_strategy(WeightedMean(), IdentityPlanner()),
            [client(0, 7)],
            EchoExecutor(),
            lambda w, bits: Evaluation(0.0, 0.0),
            metrics,
            SimConfig(),
            seed=0,
        )


# ---------------------------------------------------------------------------------------------- fleet


def test_fleet_draws_an_exact_seeded_bitwidth_mix() -> None:
    mix = FleetConfig(bitwidths=[8, 32], bitwidth_fractions=[0.8, 0.2])
    profiles = sample_profiles(mix, 50, seed=3)
    bits = [p.bitwidth for p in profiles]
    assert bits.count(8) == 40 and bits.count(32) == 10
    assert bits == [p.bitwidth for p in sample_profiles(mix, 50, seed=3)]
    assert bits != [p.bitwidth for p in sample_profiles(mix, 50, seed=4)]
    plain = sample_profiles(FleetConfig(), 50, seed=3)
    assert [replace(p, bitwidth=32) for p in profiles] == plain  # the mix leaves speeds and links as they were
    four = sample_profiles(FleetConfig(bitwidths=[6, 8, 12, 16], bitwidth_fractions=[0.3, 0.3, 0.2, 0.2]), 10, 0)
    assert sorted(p.bitwidth for p in four) == [6, 6, 6, 8, 8, 8, 12, 12, 16, 16]
    assert {p.bitwidth for p in sample_profiles(FleetConfig(bitwidth=4), 5, 0)} == {4}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"bitwidths": [8, 32], "bitwidth_fractions": [1.0]}, "fleet.bitwidth_fractions must give one fraction"),
        ({"bitwidths": [8, 32], "bitwidth_fractions": [0.5, 0.4]}, "fleet.bitwidth_fractions must be >= 0 and sum"),
        ({"bitwidths": [8, 32], "bitwidth_fractions": [1.5, -0.5]}, "fleet.bitwidth_fractions must be >= 0 and sum"),
        ({"bitwidths": [7, 32], "bitwidth_fractions": [0.5, 0.5]}, "fleet.bitwidths must hold only"),
        ({"bitwidths": [8, 8], "bitwidth_fractions": [0.5, 0.5]}, "fleet.bitwidths lists a bitwidth twice"),
        ({"bitwidth": 7}, "fleet.bitwidth must be one of"),
    ],
)
def test_fleet_refuses_bad_bitwidth_mixes(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FleetConfig(**changes).validate()  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("option", "bitwidths", "fractions"),
    [
        ("int8_fp32_50", [8, 32], [0.5, 0.5]),
        ("int8_fp32_80", [8, 32], [0.8, 0.2]),
        ("int6_8_12_16", [6, 8, 12, 16], [0.3, 0.3, 0.2, 0.2]),
    ],
)
def test_shipped_bitwidth_fleets_are_the_normal_fleet_plus_the_mix(
    option: str, bitwidths: list[int], fractions: list[float]
) -> None:
    cfg = compose([f"fleet={option}"])
    validate(cfg)
    assert (list(cfg.fleet.bitwidths), list(cfg.fleet.bitwidth_fractions)) == (bitwidths, fractions)
    normal = asdict(compose(["fleet=normal"]).fleet)
    assert {**asdict(cfg.fleet), "bitwidths": [], "bitwidth_fractions": []} == normal


# ---------------------------------------------------------------------------------------------- executor


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def _grid_distance(w: torch.Tensor, bits: int) -> float:
    """Largest distance, in quantization steps, of an element of ``w`` from its output channel's ``bits``-bit grid."""
    flat = w.reshape(w.shape[0], -1) if w.dim() >= 2 else w.reshape(1, -1)
    step = flat.abs().amax(dim=1, keepdim=True) / quant.qmax(bits)
    q = flat / step
    return float((q - q.round()).abs().max())


def test_low_bitwidth_clients_train_quantized_and_fp32_clients_plainly() -> None:
    config = TrainConfig(lr=0.1, batch_size=8)
    model = _tiny_model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)
    shards = {0: torch.arange(0, 20).numpy(), 1: torch.arange(20, 40).numpy()}
    executor = SequentialExecutor(
        LocalTrainer(model, config), x, y, shards, seed=0, quantized=QuantizedTrainer(model, config), bitwidths={0: 8}
    )
    tasks = [Task(0, 0, 0, start, local_steps=3), Task(1, 1, 0, start, local_steps=3)]
    low, full = executor.run(tasks)
    assert (low.bitwidth, full.bitwidth) == (8, 32)
    for name, w in low.weights.items():
        assert _grid_distance(w, 8) < 1e-3, name  # on the 8-bit grid of each output channel
        assert not torch.equal(w, start[name])  # and trained
    assert max(_grid_distance(w, 8) for w in full.weights.values()) > 0.05  # fp32 weights are not on it
    plain = SequentialExecutor(LocalTrainer(_tiny_model(), config), x, y, shards, seed=0).run(tasks[1:])[0]
    for name, w in full.weights.items():
        assert torch.equal(w, plain.weights[name])  # fp32 clients train exactly as before


def test_executor_needs_a_quantized_trainer_for_low_bitwidth_clients() -> None:
    model = _tiny_model()
    x, y = torch.zeros(4, 6), torch.zeros(4, dtype=torch.int64)
    shards = {0: torch.arange(4).numpy()}
    with pytest.raises(ValueError, match=r"\[4\] bits need a QuantizedTrainer"):
        SequentialExecutor(LocalTrainer(model, TrainConfig()), x, y, shards, 0, bitwidths={0: 4, 1: 32})
    with pytest.raises(ValueError, match="unsupported bitwidth 7"):
        SequentialExecutor(
            LocalTrainer(model, TrainConfig()), x, y, shards, 0, QuantizedTrainer(model, TrainConfig()), {0: 7}
        )


def test_prowd_runs_end_to_end_on_a_mixed_bitwidth_fleet(tmp_path: Path) -> None:
    """The runner gives low-bitwidth clients the quantized trainer and ProWD its server buffer."""
    from fedhet.cli import compose
    from fedhet.metrics import read_metrics
    from fedhet.sim.runner import simulate

    overrides = [
        "strategy=prowd",
        "fleet=int8_fp32_50",
        "dataset=synthetic",
        "model=logreg",
        "num_clients=30",
        "sim.max_versions=2",
        "sim.progress=false",
        "strategy.scheduler.fraction=0.5",
    ]
    simulate(compose(overrides), tmp_path)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert records[-1].version == 2 and records[-1].updates_applied > 0
