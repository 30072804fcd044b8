"""fedhet's ServerApp and ClientApp on a real Flower deployment: ``flower-superlink --insecure`` and two
``flower-supernode --insecure`` processes on loopback, the run submitted with ``flwr run --stream``.

The run is DP-FedP3 (FedAvg scheduling, LowerB layer assignment, DP-SGD). A SuperNode starts a fresh ClientApp
process for every message, so the growing epsilon each client reports shows its state (DP accountant, head) coming
back from the node's ``Context.state``. Slow (about a minute: every message starts a Python process that imports
torch): ``pytest -m slow tests/test_flower_superlink.py``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")
pytest.importorskip("opacus")

pytestmark = pytest.mark.slow

N = 2
VERSIONS = 3

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedhetloopback"
version = "1.0.0"
description = "fedhet on a loopback SuperLink"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedhet"

[tool.flwr.app.components]
serverapp = "fedhet_loopback:server_app"
clientapp = "fedhet_loopback:client_app"

[tool.flwr.app.config]
versions = 3
out = ""
"""

APP = """\
import json

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedhet.clients.trainer import PrivacyConfig, TrainConfig
from fedhet.config import DatasetConfig, PartitionConfig
from fedhet.flower import ClientAppSettings, DriverSettings, ServerAppSettings, make_client_app, run_on_grid

N = 2
DATA = DatasetConfig(name="synthetic", partition=PartitionConfig(name="natural"))
client_app = make_client_app(
    ClientAppSettings(
        dataset=DATA,
        model="2nn",
        num_clients=N,
        seed=0,
        train=TrainConfig(lr=0.05, batch_size=16),
        seconds_per_sample=(0.0001,) * N,
        privacy=PrivacyConfig(max_grad_norm=1.0, noise_multiplier=1.0),
    )
)
server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    strategy = {
        "scheduler": {"name": "fedavg", "fraction": 1.0, "min_clients": N, "local_epochs": 1},
        "planner": {"name": "fedp3", "variant": "lowerb"},
        "aggregator": {"name": "weighted_mean"},
    }
    driver = DriverSettings(
        max_versions=int(context.run_config["versions"]), min_nodes=N, node_wait=60, max_seconds=240
    )
    summary = run_on_grid(grid, ServerAppSettings(strategy, DATA, "2nn", N, 0, driver))
    out = {
        "reason": summary.reason,
        "version": summary.version,
        "results": summary.results,
        "refused": summary.refused,
        "failed": summary.failed,
        "clients": sorted(summary.clients),
        "epsilon": {str(c): e for c, e in summary.epsilon.items()},
    }
    with open(str(context.run_config["out"]), "w") as f:
        json.dump(out, f)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {seconds} s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop a process started here and the apps it started (its own process group)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_dp_fedp3_on_a_loopback_superlink_with_two_supernodes(tmp_path: Path) -> None:
    app, home = tmp_path / "app", tmp_path / "flwr"
    app.mkdir()
    home.mkdir()
    (app / "pyproject.toml").write_text(PYPROJECT)
    (app / "fedhet_loopback.py").write_text(APP)
    link = _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "FLWR_HOME": str(home)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), env.get("PYTHONPATH")]))
    processes: list[subprocess.Popen[bytes]] = []
    logs = []

    def start(name: str, *args: str) -> None:
        log = (tmp_path / f"{name}.log").open("wb")
        logs.append(log)
        command = [str(Path(bin_dir) / args[0]), *args[1:]]
        processes.append(
            subprocess.Popen(
                command, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        )

    try:
        start(
            "superlink",
            "flower-superlink",
            "--insecure",
            "--port",
            str(link),
            "--disable-runtime-dependency-installation",
        )
        _wait_for_port(link, 60)
        for i in range(N):
            start(
                f"supernode{i}",
                "flower-supernode",
                "--insecure",
                "--superlink",
                f"127.0.0.1:{link}",
                "--port",
                str(_free_port()),
                "--node-config",
                f"partition-id={i} num-partitions={N}",
            )
        out = tmp_path / "summary.json"
        run = subprocess.run(
            [str(Path(bin_dir) / "flwr"), "run", str(app), "loopback", "--stream", "--run-config", f"out='{out}'"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            timeout=400,
        )
        assert run.returncode == 0, run.stdout.decode()[-3000:] + run.stderr.decode()[-3000:]
        assert out.exists(), run.stdout.decode()[-3000:]
        summary = json.loads(out.read_text())
    finally:
        for process in reversed(processes):
            _stop(process)
        for log in logs:
            log.close()
    assert summary["reason"] == "max_versions" and summary["version"] == VERSIONS
    assert summary["failed"] == summary["refused"] == 0 and summary["results"] == N * VERSIONS
    assert summary["clients"] == list(range(N))
    for client in range(N):
        epsilons = summary["epsilon"][str(client)]
        assert len(epsilons) == VERSIONS and 0 < epsilons[0] < epsilons[1] < epsilons[2], epsilons
