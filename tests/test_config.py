"""Every shipped config composes and validates; bad input exits with one clear line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedhet.cli import CONFIG_DIR, GROUPS, compose
from fedhet.config import RunConfig
from fedhet.sim.runner import validate

SHIPPED = [(group, path.stem) for group in GROUPS for path in sorted((CONFIG_DIR / group).glob("*.yaml"))]


def test_every_group_ships_options() -> None:
    assert {group for group, _ in SHIPPED} == set(GROUPS)


@pytest.mark.parametrize(("group", "option"), SHIPPED, ids=[f"{g}={o}" for g, o in SHIPPED])
def test_every_shipped_config_composes_and_validates(group: str, option: str) -> None:
    overrides = [f"{group}={option}"]
    if (group, option) == ("dataset", "synthetic"):
        overrides += ["model=logreg", "num_clients=30"]
    cfg = compose(overrides)
    assert isinstance(cfg, RunConfig)
    assert getattr(cfg, group).name if group != "fleet" else cfg.fleet.speed
    validate(cfg)


def test_default_config_is_the_documented_one() -> None:
    cfg = compose([])
    assert (cfg.num_clients, cfg.dataset.name, cfg.dataset.partition.name, cfg.dataset.partition.alpha) == (
        100,
        "fashion_mnist",
        "dirichlet",
        0.5,
    )
    assert (cfg.model.name, cfg.strategy.name, cfg.fleet.speed) == ("cnn", "fedavg", "normal")


def test_public_keys_override() -> None:
    cfg = compose(
        [
            "strategy=fedavg",
            "dataset=fashion_mnist",
            "model=2nn",
            "fleet=exponential",
            "num_clients=7",
            "seed=3",
        ]
    )
    assert (cfg.model.name, cfg.fleet.speed, cfg.num_clients, cfg.seed) == ("2nn", "exponential", 7, 3)


def test_typed_schema_rejects_a_wrong_type() -> None:
    with pytest.raises(Exception, match="num_clients"):
        compose(["num_clients=many"])


def fedhet(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedhet.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


BAD_INPUTS = [
    (["strategy=nope"], "strategy=nope: unknown strategy; choose one of: "),
    (["client.lr=-0.1"], "client.lr must be > 0, got -0.1"),
    (["dataset.partition.alpha=0"], "dataset.partition.alpha must be > 0"),
    (["num_clients=70000"], "num_clients (70000) exceeds"),
    (["dataset.root=/nonexistent/fmnist"], "/nonexistent/fmnist"),
    (["num_clients=many"], "num_clients"),
    (["strategy.scheduler.fraction=2"], "strategy.fraction must be in (0, 1]"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS, ids=[a[0] for a, _ in BAD_INPUTS])
def test_bad_input_exits_nonzero_with_one_clear_line(args: list[str], message: str, tmp_path: Path) -> None:
    done = fedhet("simulate", *args, "sim.progress=false", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert message in lines[0]
    assert "Traceback" not in done.stderr + done.stdout


def test_missing_dataset_names_the_debian_package(tmp_path: Path) -> None:
    done = fedhet("simulate", "dataset.root=/nonexistent/fmnist", cwd=tmp_path)
    assert "apt-get install -y dataset-fashion-mnist" in done.stderr


def test_multirun_sweeps_write_one_metrics_file_per_job(tmp_path: Path) -> None:
    done = fedhet(
        "simulate",
        "-m",
        "dataset=synthetic",
        "model=logreg",
        "num_clients=30",
        "seed=0,1",
        "sim.max_versions=2",
        "sim.progress=false",
        "strategy.scheduler.fraction=0.5",
        f"hydra.sweep.dir={tmp_path}/sweep",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    files = sorted((tmp_path / "sweep").glob("*/metrics.jsonl"))
    assert [f.parent.name for f in files] == ["0", "1"]
    for job, file in enumerate(files):
        assert f"seed={job}" in (file.parent / ".hydra" / "overrides.yaml").read_text()
    assert files[0].read_text() != files[1].read_text()
