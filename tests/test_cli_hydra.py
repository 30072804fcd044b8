"""fedhet's commands as Hydra apps: Hydra's flags pass through (``--cfg``, ``-c``, ``--info``, ``--help``), errors are
one line naming the key with what was meant, and a sweep's bad value fails only its own run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

TINY = ["dataset=synthetic", "model=logreg", "num_clients=5", "sim.max_versions=1", "sim.progress=false"]
TINY += ["sim.threads=1"]


def fedhet(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "fedhet.cli", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.parametrize("flag", [["--cfg", "job"], ["-c", "job"], ["--cfg=job"]])
def test_simulate_prints_its_composed_config_for_cfg_job(tmp_path: Path, flag: list[str]) -> None:
    done = fedhet(tmp_path, "simulate", *flag, "client.lr=0.125", "model=2nn")
    assert done.returncode == 0, done.stderr
    cfg = yaml.safe_load(done.stdout)
    assert cfg["client"]["lr"] == 0.125 and cfg["model"]["name"] == "2nn"
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_simulate_help_lists_groups_and_keys_as_fedhet(tmp_path: Path) -> None:
    done = fedhet(tmp_path, "simulate", "--help")
    assert done.returncode == 0
    assert done.stdout.startswith("fedhet simulate:") and "powered by Hydra" not in done.stdout
    assert "strategy: compass_prowd, fedadagrad" in done.stdout and "max_versions: 60" in done.stdout


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["client.lrr=0.1"], "client.lrr: no such key (did you mean client.lr?)"),
        (["strategy.scheduler.fractoin=0.2"], "(did you mean strategy.scheduler.fraction?)"),
        (["model=cnnn"], "model=cnnn: unknown model (did you mean cnn?); choose one of: 2nn, cnn, fedp3_cnn"),
        (["--cfgg", "job"], "unknown option --cfgg"),
    ],
)
def test_a_mistake_is_one_line_naming_it(tmp_path: Path, args: list[str], line: str) -> None:
    done = fedhet(tmp_path, "simulate", *args)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and line in done.stderr, done.stderr


def test_an_option_file_from_a_search_path_is_a_choice(tmp_path: Path) -> None:
    (tmp_path / "mine" / "model").mkdir(parents=True)
    (tmp_path / "mine" / "model" / "wide.yaml").write_text("name: 2nn\n")
    done = fedhet(tmp_path, "simulate", "--cfg", "job", "model=wide", f"hydra.searchpath=[file://{tmp_path / 'mine'}]")
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)["model"]["name"] == "2nn"


@pytest.mark.parametrize("command", ["server", "client"])
def test_server_and_client_take_cfg_info_and_help(tmp_path: Path, command: str) -> None:
    shown = fedhet(tmp_path, command, "--cfg", "job", "seed=7")
    assert shown.returncode == 0, shown.stderr
    assert yaml.safe_load(shown.stdout)["seed"] == 7
    helped = fedhet(tmp_path, command, "--help")
    assert helped.returncode == 0 and "Keys and their defaults" in helped.stdout and "num_clients:" in helped.stdout
    info = fedhet(tmp_path, command, "--info")
    assert info.returncode == 0 and f"{command}.yaml" in info.stdout
    typo = fedhet(tmp_path, command, "seeed=3")
    assert typo.returncode == 2 and "seeed: no such key (did you mean seed?)" in typo.stderr
    assert typo.stderr.count("\n") == 1
    flag = fedhet(tmp_path, command, "--multirun")
    assert flag.returncode == 2 and "--multirun is a flag of fedhet simulate" in flag.stderr


@pytest.mark.parametrize(
    "launcher", [[], ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]], ids=["basic", "joblib"]
)
@pytest.mark.parametrize("values", ["0.05,-1,0.1", "-1,0.05,0.1"], ids=["bad-middle", "bad-first"])
def test_a_bad_value_fails_only_its_own_run_in_a_sweep(tmp_path: Path, launcher: list[str], values: str) -> None:
    if launcher:
        pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    done = fedhet(tmp_path, "simulate", "-m", *launcher, f"client.lr={values}", *TINY)
    assert done.returncode == 1, done.stderr[-3000:]
    [sweep] = list(tmp_path.glob("multirun/*/*"))
    bad = values.split(",").index("-1")
    for job in range(3):
        ran = (sweep / str(job) / "metrics.jsonl").exists()
        assert ran == (job != bad), job
        assert (sweep / str(job) / "fedhet.log").exists()  # the job's log is named for fedhet, not cli
    reason = (sweep / str(bad) / "error.txt").read_text()
    assert "client.lr=-1" in reason and "client.lr must be > 0" in reason
    assert "1 of 3 jobs failed" in done.stderr and "Traceback" not in done.stderr
