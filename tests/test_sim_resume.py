"""A simulation checkpoints through the run core and a later run of the same config goes on from it: the resumed
run ends exactly where an uninterrupted one does (tasks in flight, clients' kept heads and DP accountants
included), its metrics go on from the checkpoint, and a checkpoint of another config is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedhet.cli import compose
from fedhet.errors import ConfigError
from fedhet.sim.runner import simulate

SMALL = ["dataset=synthetic", "model=2nn", "num_clients=6", "seed=0", "sim.progress=false", "sim.threads=1"]
SMALL += ["sim.checkpoint_every=2"]


def lines(run_dir: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "strategy",
    [
        ["strategy=fedavg", "strategy.scheduler.fraction=0.5"],
        ["strategy=fedcompass"],  # tasks in flight across the checkpoint
        ["strategy=fedp3", "privacy.enabled=true", "privacy.noise_multiplier=1.0"],  # heads and accountants
    ],
)
def test_a_resumed_simulation_ends_where_an_uninterrupted_one_does(strategy: list[str], tmp_path: Path) -> None:
    whole = simulate(compose([*SMALL, *strategy, "sim.max_versions=6"]), tmp_path / "whole")
    simulate(compose([*SMALL, *strategy, "sim.max_versions=3"]), tmp_path / "first")
    assert (tmp_path / "first" / "checkpoint.safetensors").is_file()
    resumed = simulate(
        compose([*SMALL, *strategy, "sim.max_versions=6", f"sim.resume={tmp_path / 'first'}"]), tmp_path / "second"
    )
    assert resumed.final.version == whole.final.version == 6
    assert resumed.final.accuracy == whole.final.accuracy and resumed.final.loss == whole.final.loss
    assert resumed.final.virtual_time == whole.final.virtual_time
    assert (
        resumed.final.bytes_up == whole.final.bytes_up and resumed.final.updates_applied == whole.final.updates_applied
    )
    if whole.final.epsilon is not None:  # the accountants' histories, restored, give the same epsilons
        assert resumed.final.epsilon == pytest.approx(whole.final.epsilon, rel=1e-6)
    versions = [r["version"] for r in lines(tmp_path / "second")]
    assert versions == sorted(versions) and versions[0] == 0 and versions.count(3) == 1


def test_a_checkpoint_of_another_config_is_refused_in_one_line(tmp_path: Path) -> None:
    simulate(compose([*SMALL, "sim.max_versions=1"]), tmp_path / "first")
    cfg = compose([*SMALL, "seed=1", "sim.max_versions=2", f"sim.resume={tmp_path / 'first'}"])
    with pytest.raises(ConfigError, match=r"sim.resume: .* whose seed differ") as error:
        simulate(cfg, tmp_path / "second")
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="sim.resume: no checkpoint at"):
        simulate(compose([*SMALL, f"sim.resume={tmp_path / 'nowhere'}"]), tmp_path / "third")
