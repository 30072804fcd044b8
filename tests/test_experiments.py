"""The experiments of ``configs/experiment``: every job of every sweep composes to a valid run, and one command runs
an experiment's grid in parallel and ``fedhet report`` names its methods."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fedhet.config import CONFIG_DIR, RunConfig, compose_config, register_configs, to_typed
from fedhet.sim.runner import validate

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


def sweep_params(experiment: str) -> dict[str, list[str]]:
    """The experiment's ``hydra.sweeper.params``, each key's values in order."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"+experiment={experiment}"], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    assert isinstance(params, dict)
    return {str(key): str(value).split(",") for key, value in params.items()}


def test_the_experiments_are_the_papers_grids() -> None:
    assert EXPERIMENTS == ["bitwidth", "bitwidth_speed", "compass", "compass_2nn", "dp_fedp3", "fedp3", "fedp3_speed"]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_value_of_every_sweep_key_composes_to_a_valid_run(experiment: str) -> None:
    """Each value of each swept key, with the first value of the others: the grid's every option is a valid run."""
    params = sweep_params(experiment)
    first = {key: values[0] for key, values in params.items()}
    jobs = {tuple(sorted((first | {key: value}).items())) for key, values in params.items() for value in values}
    names: dict[str, str] = {}  # variant -> its strategy.name, the report's row name
    for job in sorted(jobs):
        overrides = [f"+experiment={experiment}", *(f"{key}={value}" for key, value in job)]
        cfg = to_typed(compose_config("config", overrides), RunConfig)
        validate(cfg)  # strategy names, keys and values, what the strategy needs of the data
        names[dict(job)["+variant"]] = cfg.strategy.name
    assert len(set(names.values())) == len(names), f"two variants share a row name: {names}"


def test_one_command_runs_an_experiments_grid_in_parallel_and_the_report_names_its_methods(tmp_path: Path) -> None:
    """FedCompass's experiment narrowed to one setting and seed (small data and model, 20 virtual seconds): its five
    methods run on Hydra's joblib launcher, and ``fedhet report`` makes one row per method, named as the paper."""
    fedhet = [sys.executable, "-m", "fedhet.cli"]
    narrow = "dataset=synthetic model=logreg seed=0 num_clients=4 fleet=normal dataset.partition.name=shards"
    sweep = tmp_path / "sweep"
    settings = ["sim.max_virtual_seconds=20", "sim.eval_interval=5", f"hydra.sweep.dir={sweep}"]
    run = subprocess.run(
        [*fedhet, "simulate", "-m", "+experiment=compass", *narrow.split(), *settings],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "joblib" in (sweep / "multirun.yaml").read_text()  # the experiment's launcher, in parallel
    assert len(list(sweep.glob("*/metrics.jsonl"))) == 5
    report = subprocess.run(
        [*fedhet, "report", str(sweep), "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120
    )
    assert report.returncode == 0, report.stderr
    rows = [line.split("|")[6].strip() for line in report.stdout.splitlines() if line.startswith("| synthetic")]
    assert rows == ["fedasync", "fedavg", "fedavg_c0.1", "fedbuff", "fedcompass"]
    assert (tmp_path / "out" / "accuracy_vs_time.png").stat().st_size > 10_000
