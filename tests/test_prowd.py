"""ProWD and its baselines: grouping, planning, dequantizer, selective aggregation, state, configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from fedhet import quant
from fedhet.strategies import AGGREGATORS, PLANNERS, StateError, UpdateBuffer, build_strategy
from fedhet.strategies.aggregators import WeightedMean
from fedhet.strategies.prowd import (
    BitwidthPlanner,
    DequantizerBlock,
    GroupedMean,
    GroupedModels,
    ProgressiveDequantizer,
    ProWD,
    group_updates,
    selective_mask,
)
from fedhet.types import ClientInfo, ClientProfile, Result, Weights

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "strategy"


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))


def weights(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {k: torch.randn(v.shape, generator=g) * scale for k, v in model().state_dict().items()}
    out["steps"] = torch.tensor(seed)
    return out


def buffer(groups: dict[int, list[Weights]], keep: bool = True) -> UpdateBuffer:
    """Updates of several bitwidths, all from version 0: the buffer keys its buckets by (version, bitwidth), and
    keeps each update apart (as the strategy builder has ProWD's scheduler do) unless ``keep`` is false."""
    buf = UpdateBuffer(keep_updates=keep)
    task = 0
    for bits, members in groups.items():
        for w in members:
            result = Result(task, task, 0, w, 10 + task, local_steps=1, train_seconds=1, loss=0, bitwidth=bits)
            buf.add(result, 1.0)
            task += 1
    return buf


def client(cid: int, bits: int) -> ClientInfo:
    return ClientInfo(cid, ClientProfile(seconds_per_sample=0.01, bandwidth=1e6, bitwidth=bits), num_samples=10)


def test_group_updates_averages_per_bitwidth() -> None:
    a, b, c = weights(1), weights(2), weights(3)
    groups = group_updates(buffer({32: [a, b], 8: [c]}))
    assert [(g.bitwidth, g.count, g.weight) for g in groups] == [(8, 1, 1.0), (32, 2, 2.0)]
    torch.testing.assert_close(groups[1].mean["1.weight"], ((a["1.weight"] + b["1.weight"]) / 2).double())
    assert int(groups[1].mean["steps"]) == 3  # integer tensors: the plain sum, averaged later


def test_prowd_without_its_parts_is_the_naive_mean() -> None:
    start = weights(0)
    buf = buffer({8: [quant.quantize_weights(weights(1), 8)], 32: [weights(2), weights(3)]})
    naive = WeightedMean().aggregate(start, buf, 0)
    plain = ProWD(dequantizer=False, selective=False).aggregate(start, buf, 0)
    for k, v in naive.items():
        torch.testing.assert_close(plain[k], v)


def test_selective_mask_drops_disagreeing_elements() -> None:
    reference = torch.tensor([1.0, 1.0, -1.0, -1.0, 0.5, 2.0])
    update = torch.tensor([0.8, 1.2, 1.0, -0.9, -0.7, 1.5])
    mask = selective_mask(update, reference)
    assert mask.tolist() == [True, True, False, True, False, True]
    assert bool(selective_mask(update, torch.zeros(6)).all())  # no reference: keep everything


def test_selective_mask_of_a_stack_of_models_is_each_tensor_masked_alone() -> None:
    """One optimisation over uploads x a model's tensors gives the masks of masking each tensor of each upload
    apart; a zero segment (tensor) is kept whole."""
    torch.manual_seed(7)
    sizes = [50, 3, 0, 200, 20]
    reference = torch.randn(sum(sizes))
    updates = reference + 1.5 * torch.randn(4, sum(sizes))
    updates[1, 53:253] = 0.0
    together = selective_mask(updates, reference, sizes=sizes)
    for row, update in zip(together, updates, strict=True):
        for part, u, r in zip(row.split(sizes), update.split(sizes), reference.split(sizes), strict=True):
            assert torch.equal(part, selective_mask(u, r))
    assert bool(together[1, 53:253].all()) and not bool(together.all())
    with pytest.raises(ValueError, match="add up"):
        selective_mask(updates, reference, sizes=[3])


def test_selective_aggregation_masks_only_low_groups() -> None:
    start = {k: torch.zeros_like(v) for k, v in weights(0).items()}
    high = {k: torch.ones_like(v) for k, v in start.items()}
    low = {k: torch.where(torch.arange(v.numel()).reshape(v.shape) % 2 == 0, 1.0, -1.0) for k, v in start.items()}
    high["steps"], low["steps"] = torch.tensor(4), torch.tensor(2)
    prowd = ProWD(dequantizer=False, selective=True)
    out = prowd.aggregate(start, buffer({8: [low], 32: [high]}), 0)
    w = out["1.weight"].reshape(-1)
    assert torch.equal(w[0::2], torch.ones_like(w[0::2]))  # agreeing elements: mean of 1 and 1
    # disagreeing low elements dropped: each element is the mean of the updates that keep it, the high one's 1
    # (not (1 + 0) / 2, which would shrink the step wherever a low group disagrees)
    assert torch.equal(w[1::2], torch.ones_like(w[1::2]))
    assert prowd.last_masks[8] == pytest.approx(0.5, abs=0.05)
    assert int(out["steps"]) == 3
    # a round with no high group has no reference of its own: the last round's, from another global model, is not
    # used, and the low update is applied whole
    out = prowd.aggregate(start, buffer({8: [low]}), 1)
    assert torch.equal(out["1.weight"], low["1.weight"]) and prowd.last_masks == {}


def test_untrained_dequantizer_is_the_identity() -> None:
    chain = ProgressiveDequantizer([4, 8, 32])
    w = quant.quantize_weights(weights(5), 4)
    lifted = chain.lift(w, 4)
    for k, v in w.items():
        assert torch.equal(lifted[k], v)
    with pytest.raises(ValueError, match="not a level"):
        chain.lift(w, 6)
    with pytest.raises(ValueError, match="ending at 32"):
        ProgressiveDequantizer([8, 4, 32])


def test_block_evaluates_each_distinct_value_once_with_the_per_weight_result() -> None:
    """A block's MLP runs on the distinct values of weight / channel max and gathers: the residuals equal those of
    evaluating it on every weight, on a grid (few values) and off it (every value distinct)."""
    torch.manual_seed(4)
    block = DequantizerBlock(4, 8, hidden=8)
    for p in block.parameters():
        nn.init.normal_(p, std=1.0)
    for w in (quant.fake_quantize(torch.randn(16, 3, 5, 5), 4), torch.randn(16, 3, 5, 5), torch.randn(7)):
        flat = w.reshape(len(w), -1) if w.dim() > 1 else w.reshape(1, -1)
        u = flat / flat.abs().amax(dim=1, keepdim=True)
        features = torch.stack([u, torch.full_like(u, float(w.dim() <= 1)), torch.full_like(u, 0.25)], dim=-1)
        residual = block.out(torch.tanh(block.hidden(features))).squeeze(-1)
        expected = (flat + residual * quant.channel_scales(flat, 4)).reshape(w.shape)
        torch.testing.assert_close(block(w, 0.25), expected, rtol=1e-6, atol=1e-7)
    on_grid = block.positions({"w": quant.fake_quantize(torch.randn(64, 300), 4)}, {"w": 0.5})
    assert on_grid.values.numel() <= 8 * (2 * quant.qmax(4) + 1)  # 15 grid points, each a few ulps apart
    # a whole model in one pass: tensors sharing values (here the same tensor twice) keep their own depth and kind
    grid = quant.fake_quantize(torch.randn(16, 3, 5, 5), 4)
    model = {"conv": grid, "same": grid.clone(), "bias": torch.randn(16), "off": torch.randn(5, 9)}
    depths = {"conv": 0.0, "same": 0.4, "bias": 0.6, "off": 1.0}
    together = block.lift(block.positions(model, depths))
    for name, w in model.items():
        torch.testing.assert_close(together[name], block(w, depths[name]), rtol=1e-6, atol=1e-7)
    assert not torch.equal(together["conv"], together["same"])
    lifted = block(torch.randn(8, 4), 0.5)
    lifted.sum().backward()
    assert all(p.grad is not None for p in block.parameters())


def test_block_corrections_are_unbounded_unless_capped() -> None:
    """The paper's residual is unbounded; max_correction = 0.5 keeps each weight inside its quantization bin."""
    w = quant.fake_quantize(torch.randn(6, 20), 4)
    step = w.abs().amax(dim=1, keepdim=True) / quant.qmax(4)
    free, capped = DequantizerBlock(4, 8), DequantizerBlock(4, 8, max_correction=0.5)
    torch.manual_seed(3)
    for p in free.parameters():
        nn.init.normal_(p, std=5.0)
    capped.load_state_dict(free.state_dict())
    assert float(((free(w, 0.5) - w).abs() / step).max().detach()) > 1.0
    assert bool(((capped(w, 0.5) - w).abs() <= step / 2 + 1e-6).all())
    with pytest.raises(ValueError, match="max_correction"):
        DequantizerBlock(4, 8, max_correction=0.0)


def test_each_upload_is_lifted_and_masked_apart() -> None:
    """Per upload (the paper): a low upload agreeing with the high update on every other element only loses those
    elements, another agreeing everywhere is kept whole, so every element moves by 1. On their group's mean
    (per_upload false) the odd elements average to 0 and drag the step down to 1/3 there."""
    start = {k: torch.zeros_like(v) for k, v in weights(0).items()}
    high = {k: torch.ones_like(v) for k, v in start.items()}
    half = {k: torch.where(torch.arange(v.numel()).reshape(v.shape) % 2 == 0, 1.0, -1.0) for k, v in start.items()}
    agree = {k: torch.ones_like(v) for k, v in start.items()}
    for w in (high, half, agree):
        w["steps"] = torch.tensor(3)
    uploads = {8: [half, agree], 32: [high]}
    each = ProWD(dequantizer=False, selective=True)
    w = each.aggregate(start, buffer(uploads), 0)["1.weight"].reshape(-1)
    torch.testing.assert_close(w, torch.ones_like(w))
    assert each.last_masks[8] == pytest.approx(0.75, abs=0.03)  # half of one upload and all of the other
    grouped = ProWD(dequantizer=False, selective=True, per_upload=False)
    assert not grouped.needs_updates and each.needs_updates
    w = grouped.aggregate(start, buffer(uploads, keep=False), 0)["1.weight"].reshape(-1)
    torch.testing.assert_close(w[1::2], torch.full_like(w[1::2], 1 / 3))
    with pytest.raises(ValueError, match="apart"):
        each.aggregate(start, buffer(uploads, keep=False), 0)


def test_dequantizer_learns_from_every_high_upload() -> None:
    """Each high upload is a training pair: the steps cycle over both, so the block differs from one trained on the
    first alone."""
    uploads = [{"w": torch.randn(16, 32, generator=torch.Generator().manual_seed(s)) * 0.1} for s in (1, 2)]
    trained = []
    for members in (uploads, uploads[:1]):
        prowd = ProWD(chain=[4, 32], distill_weight=0.0, dequantizer_steps=4, selective=False)
        prowd.lowest_seen = 4
        prowd.aggregate({"w": torch.zeros(16, 32)}, buffer({32: members}), 0)
        trained.append(torch.cat([p.detach().reshape(-1) for p in prowd.dequantizer.parameters()]))
    assert not torch.equal(trained[0], trained[1])


def test_reconstruction_training_reduces_the_error() -> None:
    """Laplace-distributed weights: E[w | q(w)] lies nearer zero than the bin centre, which a block can learn."""
    torch.manual_seed(0)
    target = {"w": torch.distributions.Laplace(0.0, 1.0).sample((64, 256)) * 0.1}
    low = quant.quantize_weights(target, 4)
    prowd = ProWD(chain=[4, 32], distill_weight=0.0, dequantizer_steps=60, lr=0.05, selective=False)
    before = float((low["w"] - target["w"]).pow(2).mean())
    prowd.lowest_seen = 4  # 4-bit clients took part earlier
    buf = buffer({32: [target]})
    prowd.aggregate({"w": torch.zeros(64, 256)}, buf, 0)
    lifted = prowd.dequantizer.lift(low, 4)
    after = float((lifted["w"] - target["w"]).detach().pow(2).mean())
    assert after < before * 0.97


def test_distillation_needs_the_server_buffer_and_uses_it() -> None:
    start = weights(0)
    buf = buffer({8: [quant.quantize_weights(weights(1), 8)], 32: [weights(2)]})
    with pytest.raises(ValueError, match="attach"):
        ProWD().aggregate(start, buf, 0)
    prowd = ProWD(dequantizer_steps=3)
    with pytest.raises(ValueError, match="empty"):
        prowd.attach(model(), torch.zeros(0, 12))
    prowd.attach(model(), torch.randn(16, 12))
    before = [p.clone() for p in prowd.dequantizer.parameters()]
    out = prowd.aggregate(start, buf, 0)
    assert set(out) == set(start) and all(torch.isfinite(v.double()).all() for v in out.values())
    changed = [not torch.equal(a, b) for a, b in zip(before, prowd.dequantizer.parameters(), strict=True)]
    assert any(changed)


def test_planner_quantizes_to_each_clients_bitwidth_once_per_version() -> None:
    planner = BitwidthPlanner()
    w = weights(7)
    four = planner.plan(client(0, 4), w, 3)
    assert planner.plan(client(1, 4), w, 3) is four  # shared by the clients of one bitwidth
    assert torch.equal(four.weights["1.weight"], quant.fake_quantize(w["1.weight"], 4))
    full = planner.plan(client(2, 32), w, 3)
    assert torch.equal(full.weights["1.weight"], w["1.weight"])
    assert planner.plan(client(0, 4), weights(8), 4) is not four  # a new version is planned afresh
    with pytest.raises(ValueError, match="bitwidth 3"):
        planner.plan(client(3, 3), w, 4)


def test_grouped_mean_keeps_groups_apart() -> None:
    start = weights(0)
    low, high = quant.quantize_weights(weights(1), 8), weights(2)
    agg = GroupedMean()
    out = agg.aggregate(start, buffer({8: [low], 32: [high]}), 0)
    assert isinstance(out, GroupedModels)
    torch.testing.assert_close(out["1.weight"], high["1.weight"])  # the fp32 group's own mean
    planner = BitwidthPlanner()
    torch.testing.assert_close(planner.plan(client(0, 8), out, 1).weights["1.weight"], low["1.weight"])
    torch.testing.assert_close(planner.plan(client(1, 32), out, 1).weights["1.weight"], high["1.weight"])
    torch.testing.assert_close(
        planner.plan(client(2, 4), out, 1).weights["1.weight"], quant.fake_quantize(high["1.weight"], 4)
    )
    restored = GroupedMean()
    restored.load_state_dict(agg.state_dict())
    assert set(restored.models) == {8, 32}
    with pytest.raises(StateError):
        restored.load_state_dict({"models": {"5": {}}} | {})


def test_prowd_state_round_trip_and_validation() -> None:
    prowd = ProWD(chain=[8, 32], distill_weight=0.0)
    prowd.aggregate(weights(0), buffer({8: [quant.quantize_weights(weights(1), 8)], 32: [weights(2)]}), 0)
    state = prowd.state_dict()
    again = ProWD(chain=[8, 32])
    again.load_state_dict(state)
    for a, b in zip(prowd.dequantizer.parameters(), again.dequantizer.parameters(), strict=True):
        assert torch.equal(a, b)
    assert set(again.reference) == set(prowd.reference)
    with pytest.raises(StateError, match="chain"):
        ProWD(chain=[4, 8, 32]).load_state_dict(state)
    assert again.lowest_seen == 8
    with pytest.raises(StateError, match="keys"):
        again.load_state_dict({"dequantizer": {}})
    with pytest.raises(StateError, match="lowest"):
        again.load_state_dict(state | {"lowest_seen": 4})


@pytest.mark.parametrize("bad", [{"hidden": 0}, {"lr": -1.0}, {"mask_threshold": 1.0}, {"high_bitwidth": 7}])
def test_bad_arguments_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ProWD(**bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("prowd*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_build(path: Path) -> None:
    spec = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    assert isinstance(spec, dict)
    strategy = build_strategy({str(k): v for k, v in spec.items()}, seed=0)
    assert isinstance(strategy.planner, BitwidthPlanner)
    if getattr(strategy.aggregator, "needs_updates", False):  # ProWD per upload: the round's updates kept apart
        assert strategy.scheduler.keep_updates  # type: ignore[attr-defined]
    assert "bitwidth" in PLANNERS and {"prowd", "grouped_mean"} <= set(AGGREGATORS.names())
