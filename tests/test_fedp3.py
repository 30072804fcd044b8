"""FedP3 and DP-FedP3: layer plans, pruning, the sparse encoding, per-layer aggregation, personal heads, DP-SGD."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant

from fedhet.clients.trainer import ClientState, ClientStates, LocalTrainer, PrivacyConfig, TrainConfig
from fedhet.codec import CodecError, decode, encode, encoded_size
from fedhet.errors import ConfigError
from fedhet.models import build_model
from fedhet.strategies.aggregators import WeightedMean
from fedhet.strategies.buffer import UpdateBuffer
from fedhet.strategies.fedavg import SyncScheduler
from fedhet.strategies.fedp3 import FedP3Planner, prune
from fedhet.strategies.layers import layer_names
from fedhet.strategies.staleness import StalenessWeighted
from fedhet.types import ClientInfo, ClientProfile, Result, Task

SHARED = ["0", "3", "7", "9"]  # the fedp3_cnn's shared layers; "11" is the head


def fedp3_weights() -> dict[str, torch.Tensor]:
    model = build_model("fedp3_cnn", (1, 28, 28), 10, seed=0)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def info(client_id: int, memory_bytes: int = 0) -> ClientInfo:
    return ClientInfo(client_id, ClientProfile(0.001, 1e6, memory_bytes=memory_bytes), 100)


def result(task_id: int, weights: dict[str, torch.Tensor], samples: int = 10) -> Result:
    return Result(task_id, task_id, 0, weights, samples, 1, 0.0, 0.0)


# ------------------------------------------------------------------------------------------------- planning


def test_layers_are_modules_in_state_dict_order() -> None:
    w = fedp3_weights()
    assert layer_names(w) == [*SHARED, "11"]
    layout = FedP3Planner().layout(w)
    assert layout.shared == tuple(SHARED) and layout.head == ("11.weight", "11.bias")


@pytest.mark.parametrize(("variant", "k"), [("lowerb", 1), ("opu2", 2), ("opu3", 3)])
def test_each_client_trains_k_consecutive_shared_layers_from_its_group(variant: str, k: int) -> None:
    w = fedp3_weights()
    planner = FedP3Planner(variant)
    for cid in range(8):
        plan = planner.plan(info(cid), w, version=0)
        expected = [SHARED[(cid % 4 + j) % 4] for j in range(k)]
        assert plan.train == {f"{layer}.{p}" for layer in expected for p in ("weight", "bias")}
        assert "11.weight" not in plan.weights and "11.bias" not in plan.weights  # the head never travels
        assert set(plan.weights) == {f"{layer}.{p}" for layer in SHARED for p in ("weight", "bias")}
        # the other shared layers' weights are pruned; biases travel dense
        assert plan.sparse == {f"{layer}.weight" for layer in SHARED if layer not in expected}
        for name in plan.train:
            assert plan.weights[name] is w[name]


def test_magnitude_pruning_keeps_the_largest_values_of_each_layer() -> None:
    w = fedp3_weights()
    plan = FedP3Planner("lowerb", keep_ratio=0.9).plan(info(0), w, 0)
    for name in plan.sparse:
        original, pruned = w[name], plan.weights[name]
        kept = pruned != 0
        assert int(kept.sum()) == math.ceil(0.9 * original.numel())
        assert torch.equal(pruned[kept], original[kept])
        assert original[~kept].abs().max() <= original[kept].abs().min()


def test_ordered_dropout_keeps_the_first_output_units() -> None:
    t = torch.randn(10, 4) + 5.0
    out = prune(t, 0.3, "ordered_dropout")
    assert torch.equal(out[:3], t[:3]) and not out[3:].any()
    with pytest.raises(ValueError, match="keep_ratio"):
        prune(t, 0.0)


def test_pruned_copy_is_shared_by_the_clients_of_a_version() -> None:
    w = fedp3_weights()
    planner = FedP3Planner("lowerb")
    a, b = planner.plan(info(0), w, 3), planner.plan(info(4), w, 3)
    assert a.weights["9.weight"] is b.weights["9.weight"]
    assert planner.plan(info(0), w, 4).weights["9.weight"] is not a.weights["9.weight"]


def test_budget_variant_fits_the_clients_memory() -> None:
    w = fedp3_weights()
    planner = FedP3Planner("budget")
    total = sum(v.numel() * 4 for v in w.values())
    assert len(planner.assigned_layers(info(0), w)[0]) == 4  # no limit: every shared layer
    assert len(planner.assigned_layers(info(0, memory_bytes=total), w)[0]) == 4
    # 95% of the model: pruning fc2 (4 MiB) saves enough, pruning only the small layers does not
    assert planner.assigned_layers(info(0, memory_bytes=int(total * 0.95)), w) == (("0", "3", "7"), 0.9)
    assert planner.assigned_layers(info(2, memory_bytes=int(total * 0.95)), w) == (("7",), 0.9)
    # a budget below one layer at keep 0.9 prunes the other layers harder, just enough
    small = 1_500_000
    layers, keep = planner.assigned_layers(info(0, memory_bytes=small), w)
    assert layers == ("0",) and 0.01 < keep < 0.9
    plan = planner.plan(info(0, memory_bytes=small), w, 0)
    held = encoded_size(plan.weights, "fp32", plan.sparse) + sum(w[n].numel() * 4 for n in ("11.weight", "11.bias"))
    assert held <= small * 1.01  # the codec's mask + values is what the footprint counts (plus its header)
    with pytest.raises(ValueError, match="client 1: a memory budget of 1000 bytes"):
        planner.assigned_layers(info(1, memory_bytes=1000), w)


def test_planner_refuses_bad_settings_and_models_without_shared_layers() -> None:
    for kwargs in ({"variant": "opu9"}, {"keep_ratio": 1.5}, {"pruning": "random"}, {"head_layers": 0}):
        with pytest.raises(ValueError):
            FedP3Planner(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one shared layer"):
        FedP3Planner().plan(info(0), {"0.weight": torch.ones(2, 2), "0.bias": torch.ones(2)}, 0)


# ---------------------------------------------------------------------------------------- sparse encoding


def test_sparse_encoding_round_trips_and_is_smaller() -> None:
    w = fedp3_weights()
    plan = FedP3Planner("lowerb").plan(info(0), w, 0)
    dense, sparse = encode(plan.weights), encode(plan.weights, "fp32", plan.sparse)
    assert len(sparse) == encoded_size(plan.weights, "fp32", plan.sparse) < len(dense)
    out = decode(sparse)
    for name, tensor in plan.weights.items():
        assert torch.equal(out[name], tensor)
    # 1024 x 1024 at keep 0.9: a bit per value plus 90% of the values, instead of 4 bytes per value
    only = {"9.weight": plan.weights["9.weight"]}
    saved = encoded_size(only, "fp32") - encoded_size(only, "fp32", frozenset(only))
    header_growth = len("sparse-fp32") - len("fp32")
    assert saved == 4 * 2**20 - (2**20 // 8 + math.ceil(0.9 * 2**20) * 4) - header_growth


def _corrupt(data: bytes, at: int, value: int) -> bytes:
    out = bytearray(data)
    out[at] = value
    return bytes(out)


def test_malformed_sparse_payloads_are_refused() -> None:
    t = {"w": torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0], [4.0, 0.0, 0.0]])}  # 9 values: 2 mask bytes
    data = encode(t, "fp32", frozenset({"w"}))
    header = int.from_bytes(data[:8], "little")
    mask_at = 8 + header
    assert decode(data)["w"].equal(t["w"])
    with pytest.raises(CodecError, match="padding bits"):
        decode(_corrupt(data, mask_at + 1, 0b10))  # a bit past element 9
    with pytest.raises(CodecError, match="mask marks 5 values"):
        decode(_corrupt(data, mask_at, data[mask_at] | 0b10))  # one more value marked than sent
    with pytest.raises(CodecError, match="not int64"):
        decode(encode({"w": torch.tensor([[1.0]])}, "fp32", frozenset({"w"})).replace(b'"float32"', b'"int64"  '))
    with pytest.raises(CodecError, match="does not hold"):
        encode(t, "fp32", frozenset({"x"}))


# ------------------------------------------------------------------------------------------- aggregation


def test_each_tensor_is_averaged_over_the_clients_that_sent_it() -> None:
    global_w = {"a.weight": torch.zeros(2), "b.weight": torch.zeros(2), "c.weight": torch.full((2,), 7.0)}
    buffer = UpdateBuffer()
    buffer.add(result(0, {"a.weight": torch.full((2,), 1.0), "b.weight": torch.full((2,), 2.0)}), 2.0)
    buffer.add(result(1, {"b.weight": torch.full((2,), 5.0)}), 1.0)
    out = WeightedMean().aggregate(global_w, buffer, 0)
    assert torch.equal(out["a.weight"], torch.full((2,), 1.0))  # only client 0 sent a
    torch.testing.assert_close(out["b.weight"], torch.full((2,), (2 * 2.0 + 5.0) / 3))  # normalised per tensor
    assert torch.equal(out["c.weight"], global_w["c.weight"])  # nobody trained c: unchanged
    # a checkpoint keeps the per-tensor weights
    restored = UpdateBuffer()
    restored.load_state_dict(buffer.state_dict())
    again = WeightedMean().aggregate(global_w, restored, 0)
    assert all(torch.equal(again[k], out[k]) for k in out)


def test_layer_count_weighting_counts_the_layers_of_an_update() -> None:
    scheduler = SyncScheduler(fraction=1.0, min_clients=1, weighting="layers")
    two = result(0, {"a.weight": torch.ones(1), "a.bias": torch.ones(1), "b.weight": torch.ones(1)})
    assert scheduler._weight(two) == 2.0
    with pytest.raises(ValueError, match="weighting"):
        SyncScheduler(weighting="layer")


def test_staleness_weighted_mixes_each_tensor_by_its_own_senders() -> None:
    global_w = {"a.weight": torch.zeros(1, dtype=torch.float64), "b.weight": torch.ones(1, dtype=torch.float64)}
    buffer = UpdateBuffer()
    buffer.add(result(0, {"a.weight": torch.full((1,), 4.0, dtype=torch.float64)}), 0.5)
    out = StalenessWeighted(alpha=1.0, staleness="constant").aggregate(global_w, buffer, 0)
    assert float(out["a.weight"]) == pytest.approx(0.5 * 0 + 0.5 * 4.0)
    assert float(out["b.weight"]) == 1.0


def test_a_bad_shape_folds_nothing_in() -> None:
    buffer = UpdateBuffer()
    buffer.add(result(0, {"a.weight": torch.ones(2)}), 1.0)
    with pytest.raises(ValueError, match="shape"):
        buffer.add(result(1, {"b.weight": torch.ones(3), "a.weight": torch.ones(5)}), 1.0)
    assert len(buffer) == 1 and set(next(iter(buffer.items()))[1].weighted_sum) == {"a.weight"}


# ------------------------------------------------------------------------------------------------ clients


def _task(task_id: int, client_id: int, plan_weights: dict[str, torch.Tensor], train: frozenset[str]) -> Task:
    return Task(task_id, client_id, 0, plan_weights, local_steps=3, train=train)


def test_client_trains_its_layers_and_head_and_keeps_the_head() -> None:
    torch.manual_seed(0)
    w = fedp3_weights()
    model = build_model("fedp3_cnn", (1, 28, 28), 10, seed=0)
    trainer = LocalTrainer(model, TrainConfig(lr=0.1, batch_size=8))
    states = ClientStates(w)
    plan = FedP3Planner("lowerb").plan(info(2), w, 0)  # client 2 trains layer 7
    task = _task(0, 2, dict(plan.weights), plan.train)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    state = states.get(2, task)
    assert set(state.tensors) == {"11.weight", "11.bias"}
    out = trainer.train(task, x, y, seed=0, state=state)
    assert set(out.weights) == {"7.weight", "7.bias"}  # only its layer goes back
    assert not torch.equal(out.weights["7.weight"], w["7.weight"])
    assert not torch.equal(state.tensors["11.weight"], w["11.weight"])  # the head trained and stayed home
    frozen = model.state_dict()
    assert torch.equal(frozen["9.weight"], plan.weights["9.weight"])  # a pruned layer stays as received
    head = state.tensors["11.weight"].clone()
    trainer.train(_task(1, 2, dict(plan.weights), plan.train), x, y, seed=0, state=states.get(2, task))
    assert not torch.equal(states.get(2, task).tensors["11.weight"], head)  # the next task starts from it
    with pytest.raises(ValueError, match="no values for"):
        trainer.train(task, x, y, seed=0)  # without its state the client has no head


def test_dp_epsilon_equals_an_offline_recomputation_with_opacus() -> None:
    w = fedp3_weights()
    model = build_model("fedp3_cnn", (1, 28, 28), 10, seed=0)
    privacy = PrivacyConfig(max_grad_norm=1.0, noise_multiplier=1.1, delta=1e-5)
    trainer = LocalTrainer(model, TrainConfig(lr=0.05, batch_size=8), privacy=privacy)
    plan = FedP3Planner("opu2").plan(info(1), w, 0)
    x, y = torch.randn(40, 1, 28, 28), torch.randint(0, 10, (40,))
    state = ClientState({k: w[k].clone() for k in ("11.weight", "11.bias")})
    other = FedP3Planner("lowerb").plan(info(3), w, 0)  # another client, other layers, the same model
    other_state = ClientState({k: w[k].clone() for k in ("11.weight", "11.bias")})
    steps = 0
    for task_id in range(3):
        task = Task(task_id, 1, 0, dict(plan.weights), local_epochs=1, train=plan.train)
        out = trainer.train(task, x, y, seed=task_id, state=state)
        steps += out.local_steps
        assert set(out.weights) == plan.train  # plain names: no "_module." prefix from Opacus's wrapper
        wrapper = trainer._per_sample
        mine = Task(10 + task_id, 3, 0, dict(other.weights), local_steps=2, train=other.train)
        assert set(trainer.train(mine, x, y, seed=0, state=other_state).weights) == other.train
        assert trainer._per_sample is wrapper  # attached once, never wrapped again
    offline = RDPAccountant()
    offline.history = [(1.1, 8 / 40, steps)]
    assert steps == 3 * 5
    assert state.epsilon(1e-5) == pytest.approx(offline.get_epsilon(1e-5), rel=1e-12)
    assert state.epsilon(1e-5) > 0


def test_dp_target_epsilon_is_met_after_the_planned_tasks() -> None:
    model = build_model("2nn", (1, 28, 28), 10, seed=0)
    privacy = PrivacyConfig(target_epsilon=4.0, delta=1e-5, planned_tasks=4)
    trainer = LocalTrainer(model, TrainConfig(lr=0.05, batch_size=10), privacy=privacy)
    w = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(50, 1, 28, 28), torch.randint(0, 10, (50,))
    state = ClientState()
    for task_id in range(4):
        trainer.train(Task(task_id, 0, 0, w, local_epochs=1), x, y, seed=0, state=state)
    assert 3.9 <= state.epsilon(1e-5) <= 4.0
    assert state.noise_multiplier > 0.5


def test_privacy_config_refuses_bad_values() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        PrivacyConfig(noise_multiplier=1.0, target_epsilon=2.0)
    with pytest.raises(ValueError, match="planned_tasks"):
        PrivacyConfig(target_epsilon=2.0)
    with pytest.raises(ValueError, match="delta"):
        PrivacyConfig(noise_multiplier=1.0, delta=0.0)


# ---------------------------------------------------------------------------------------------- end to end

E2E = [
    "dataset=synthetic",
    "model=2nn",
    "num_clients=8",
    "sim.max_versions=3",
    "sim.progress=false",
    "sim.personal_eval=true",
    "sim.finetune_epochs=2",
    "client.lr=0.05",
    "strategy.scheduler.local_epochs=1",
]


def _rows(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_fedp3_simulation_sends_fewer_bytes_and_logs_personal_accuracy(tmp_path: Path) -> None:
    from fedhet.cli import compose
    from fedhet.sim.runner import simulate

    simulate(compose([*E2E, "strategy=fedp3"]), tmp_path / "fedp3")
    fedavg = ["strategy=fedavg", "strategy.scheduler.fraction=1.0", "strategy.scheduler.min_clients=1"]
    simulate(compose([*E2E, *fedavg]), tmp_path / "full")
    fedp3, full = _rows(tmp_path / "fedp3"), _rows(tmp_path / "full")
    assert fedp3[-1]["version"] == 3 and 0.0 <= float(fedp3[-1]["personal_accuracy"]) <= 1.0  # type: ignore[arg-type]
    assert "epsilon" not in fedp3[-1]
    assert int(fedp3[-1]["bytes_up"]) < int(full[-1]["bytes_up"])  # type: ignore[call-overload]
    assert int(fedp3[-1]["bytes_down"]) < int(full[-1]["bytes_down"])  # type: ignore[call-overload]


def test_dp_fedp3_logs_each_clients_epsilon(tmp_path: Path) -> None:
    from fedhet.cli import compose
    from fedhet.sim.runner import simulate

    simulate(compose([*E2E, "strategy=fedp3", "privacy.enabled=true", "privacy.target_epsilon=8"]), tmp_path / "dp")
    rows = _rows(tmp_path / "dp")
    eps = rows[-1]["epsilon"]
    assert isinstance(eps, dict) and sorted(eps, key=int) == [str(c) for c in range(8)]
    assert all(0 < e <= 8.0 for e in eps.values())
    assert all(float(a) <= float(b) for a, b in zip(rows[1]["epsilon"].values(), eps.values(), strict=True))  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("strategy.planner.variant=opu9", "variant must be one of"),
        ("privacy.noise_multiplier=1.0", "exactly one of privacy.noise_multiplier"),
        ("dataset.partition.test_fraction=0", "sim.personal_eval needs held-out client data"),
    ],
)
def test_bad_fedp3_and_privacy_settings_are_config_errors(override: str, message: str) -> None:
    from fedhet.cli import compose
    from fedhet.sim.runner import validate

    overrides = [*E2E, "strategy=fedp3", "privacy.enabled=true", "privacy.target_epsilon=8", override]
    with pytest.raises(ConfigError, match=message):
        validate(compose(overrides))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["fleet=int8_fp32_50"], "train quantization-aware without DP-SGD"),
        (["strategy=fedbuff"], "fedbuff scheduler needs privacy.planned_tasks"),
    ],
)
def test_privacy_refuses_what_it_cannot_account_for(overrides: list[str], message: str) -> None:
    from fedhet.cli import compose
    from fedhet.sim.runner import validate

    base = ["privacy.enabled=true", "privacy.target_epsilon=4", "sim.progress=false"]
    with pytest.raises(ConfigError, match=message):
        validate(compose([*base, *overrides]))


def test_fedp3_refuses_aggregators_that_cannot_fold_partial_updates() -> None:
    from fedhet.cli import compose
    from fedhet.sim.runner import validate

    with pytest.raises(ConfigError, match="cannot fold"):
        validate(compose(["strategy=fedp3", "strategy.aggregator.name=grouped_mean"]))
    with pytest.raises(ConfigError, match="head_layers=1"):
        validate(compose(["strategy=fedp3", "strategy.planner.head_layers=2", "sim.personal_eval=true"]))


def test_sparse_entries_of_empty_tensors_and_absurd_shapes() -> None:
    empty = {"w": torch.zeros(0, 3)}
    assert decode(encode(empty, "fp32", frozenset({"w"})))["w"].shape == (0, 3)
    data = encode({"w": torch.zeros(0, 3)})
    huge = data.replace(b"[0,3]", b"[0,99999999999999999999]")
    with pytest.raises(CodecError, match="too large"):
        decode(_fix_header_length(huge))


def _fix_header_length(data: bytes) -> bytes:
    """``data`` with its 8-byte header length prefix recomputed after the header was edited."""
    header_end = data.index(b"]]") + 2
    return (header_end - 8).to_bytes(8, "little") + data[8:]


def test_packed_payloads_keep_pruned_tensors_packed() -> None:
    w = fedp3_weights()
    plan = FedP3Planner("lowerb").plan(info(0), w, 0)
    assert encoded_size(plan.weights, "int8", plan.sparse) == encoded_size(plan.weights, "int8")


def test_frozen_layers_travel_as_int8_everywhere() -> None:
    """frozen_bits=8: the pruned shared layers travel packed at int8, a quarter of their sparse-fp32 bytes (plus a
    scale per output channel), on the codec, the gRPC wire and Flower records alike, and the client receives the
    planned tensors bit for bit (the frozen ones planned on the int8 grid); the assigned layers stay exact fp32.
    Checkpoints keep the task's sparse_bits."""
    from fedhet.flower.records import from_array_record, parse_task, task_content, to_array_record
    from fedhet.runtime.checkpoint import task_from_state, task_state
    from fedhet.v1 import wire

    w = fedp3_weights()
    plan = FedP3Planner("opu2", frozen_bits=8).plan(info(0), w, 0)
    assert plan.sparse_bits == 8 and plan.sparse
    task = Task(3, 0, 0, plan.weights, local_epochs=1, train=plan.train, sparse=plan.sparse, sparse_bits=8)
    sparse_fp32 = encoded_size(plan.weights, "fp32", plan.sparse)
    int8 = encoded_size(plan.weights, "fp32", plan.sparse, 8)
    frozen = {n: plan.weights[n] for n in plan.sparse}
    expected = sum(t.numel() + 4 * t.shape[0] for t in frozen.values())  # a byte per value, a scale per channel
    data = encode(frozen, "fp32", plan.sparse, 8)
    header = 8 + int.from_bytes(data[:8], "little")
    assert len(data) == encoded_size(frozen, "fp32", plan.sparse, 8) == header + expected
    assert int8 < 0.4 * sparse_fp32
    for got in (
        decode(encode(plan.weights, "fp32", plan.sparse, 8)),
        wire.decode(*wire.encode(plan.weights, "fp32", plan.sparse, 8)),
        from_array_record(to_array_record(plan.weights, "fp32", plan.sparse, 8)),
        parse_task(task_content(task, "fp32"), client_id=0).task.weights,
    ):
        for name, tensor in plan.weights.items():
            assert torch.equal(got[name], tensor), name
    manifest, _ = wire.encode(plan.weights, "fp32", plan.sparse, 8)
    packed = {s.name for s in manifest.tensors if s.quant.bits == 8}
    assert packed == set(plan.sparse)
    assert task_from_state(task_state(task)).sparse_bits == 8
    assert task_from_state(task_state(task)[:9]).sparse_bits == 32  # a row from before sparse_bits
    with pytest.raises(ValueError, match="frozen_bits"):
        FedP3Planner("opu2", frozen_bits=3)
    with pytest.raises(ValueError, match="sparse_bits"):
        Task(0, 0, 0, {}, local_epochs=1, sparse_bits=5)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_frozen_layers_are_planned_on_the_grid_they_travel_at(bits: int) -> None:
    """Issue 18: the plan holds its frozen tensors already rounded to ``frozen_bits`` (per output channel, as the
    codec rounds them), once per version for every client, so the simulator's clients train on the values that the
    deployed and Flower clients decode; the codec's rounding of them again is exact."""
    from fedhet import quant
    from fedhet.flower.records import from_array_record, to_array_record
    from fedhet.v1 import wire

    w = fedp3_weights()
    planner = FedP3Planner("lowerb", frozen_bits=bits)
    plans = [planner.plan(info(c), w, 0) for c in range(4)]
    for plan in plans:
        assert plan.sparse and plan.sparse_bits == bits
        for name in plan.sparse:
            frozen = plan.weights[name]
            assert torch.equal(frozen, quant.fake_quantize(prune(w[name], 0.9), bits)), name
            assert torch.equal(quant.fake_quantize(frozen, bits), frozen), name  # on the grid
        for name in plan.train:
            assert plan.weights[name] is w[name]  # the assigned layers stay the global fp32 tensors
        for got in (
            decode(encode(plan.weights, "fp32", plan.sparse, bits)),
            wire.decode(*wire.encode(plan.weights, "fp32", plan.sparse, bits)),
            from_array_record(to_array_record(plan.weights, "fp32", plan.sparse, bits)),
        ):
            assert got.keys() == plan.weights.keys()
            for name, tensor in plan.weights.items():
                assert torch.equal(got[name], tensor), name
    # one rounded copy per version: clients freezing the same tensor share it
    assert plans[0].weights["3.weight"] is plans[2].weights["3.weight"]
    # fp32 frozen layers (the sparse encoding) stay the pruned values themselves
    assert torch.equal(FedP3Planner("lowerb").plan(info(0), w, 0).weights["3.weight"], prune(w["3.weight"], 0.9))


def test_fedp3_simulation_with_int8_frozen_layers_sends_fewer_bytes(tmp_path: Path) -> None:
    from fedhet.cli import compose
    from fedhet.sim.runner import simulate

    lowerb = [*E2E, "strategy=fedp3", "strategy.planner.variant=lowerb"]  # the 2NN has two shared layers: one frozen
    simulate(compose(lowerb), tmp_path / "sparse")
    simulate(compose([*lowerb, "strategy.planner.frozen_bits=8"]), tmp_path / "int8")
    sparse, int8 = _rows(tmp_path / "sparse"), _rows(tmp_path / "int8")
    # half the clients freeze fc1 (784 x 200), half fc2 (200 x 200): their downloads shrink by 3.7x
    assert int(int8[-1]["bytes_down"]) < 0.7 * int(sparse[-1]["bytes_down"])  # type: ignore[call-overload]
    assert int(int8[-1]["bytes_up"]) == int(sparse[-1]["bytes_up"])  # type: ignore[call-overload]


def test_train_all_trains_every_received_layer_and_sends_back_only_its_own() -> None:
    """train_all (the released code): the client's frozen layers train too, but only its assigned layer goes back;
    the flag travels in Flower records and checkpoints (the gRPC header: the deployed DP test)."""
    from fedhet.flower.records import parse_task, task_content
    from fedhet.runtime.checkpoint import task_from_state, task_state

    w = fedp3_weights()
    plan = FedP3Planner("lowerb", train_all=True).plan(info(2), w, 0)
    assert plan.train_all and plan.train == {"7.weight", "7.bias"}
    task = Task(0, 2, 0, dict(plan.weights), local_epochs=1, train=plan.train, sparse=plan.sparse, train_all=True)
    assert task.optimized == frozenset(plan.weights) and task.trained == plan.train
    model = build_model("fedp3_cnn", (1, 28, 28), 10, seed=0)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    out = LocalTrainer(model, TrainConfig(lr=0.1, batch_size=8)).train(
        task, x, y, seed=0, state=ClientStates(w).get(2, task)
    )
    assert set(out.weights) == {"7.weight", "7.bias"}
    assert not torch.equal(model.state_dict()["9.weight"], plan.weights["9.weight"])  # the frozen layer trained
    assert parse_task(task_content(task, "fp32"), client_id=2).task.train_all
    assert not parse_task(task_content(replace(task, train_all=False), "fp32"), client_id=2).task.train_all
    assert task_from_state(task_state(task)).train_all
