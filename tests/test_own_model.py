"""A model and a dataset of the user's, defined in a module outside the package: by import path
(``model._target_``, ``dataset._target_``) and by an installed package's entry points, simulated and deployed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from fedhet.config import ModelConfig
from fedhet.data import DatasetConfig, load_configured
from fedhet.errors import ConfigError, DataError
from fedhet.models import build_model
from fedhet.server.testing import spawn, wait_for_file

PLUGIN = textwrap.dedent(
    '''
    """A researcher's own model and data, outside fedhet."""
    import math

    import numpy as np
    import torch
    from torch import nn


    class Net(nn.Module):
        """Not an nn.Sequential, with BatchNorm and Tanh: beyond the vectorized executor's subset."""

        def __init__(self, input_shape, num_classes, hidden=32, activation=None):
            super().__init__()
            self.body = nn.Sequential(
                nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.BatchNorm1d(hidden), activation or nn.Tanh()
            )
            self.head = nn.Linear(hidden, num_classes)

        def forward(self, x):
            return self.head(self.body(x))


    def blobs(num_clients, seed, samples=600, classes=3):
        """Gaussian blobs in 20 dimensions, as numpy arrays."""
        rng = np.random.default_rng(seed)
        centers = rng.normal(size=(classes, 20)) * 3
        y = rng.integers(0, classes, samples)
        x = (centers[y] + rng.normal(size=(samples, 20))).astype(np.float32)
        cut = samples * 4 // 5
        return x[:cut], y[:cut], x[cut:], y[cut:]


    def not_data(num_clients):
        return "oops"
    '''
)

SMALL = ["num_clients=6", "dataset.partition.name=iid", "sim.max_versions=3", "sim.threads=1", "sim.progress=false"]
OWN = ["model._target_=my_fl.Net", "+model.kwargs.hidden=16", "dataset._target_=my_fl.blobs"]


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "my_fl.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def simulate(cwd: Path, overrides: list[str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "fedhet.cli", "simulate", *overrides]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, check=False)


def metrics(run_root: Path) -> list[dict[str, object]]:
    [path] = list(run_root.glob("runs/*/*/metrics.jsonl"))
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("executor", ["sequential", "vectorized"])
def test_fedhet_simulate_trains_a_model_and_data_defined_outside_the_package(plugin: Path, executor: str) -> None:
    done = simulate(plugin, [*OWN, *SMALL, f"sim.executor={executor}"])
    assert done.returncode == 0, done.stderr[-3000:]
    records = metrics(plugin)
    assert records[-1]["version"] == 3 and float(str(records[-1]["accuracy"])) > 0.6  # 3 blobs: chance is 1/3
    log = done.stdout + done.stderr
    assert "my_fl.blobs: 6 clients" in log and "my_fl.Net model" in log
    if executor == "vectorized":  # it says, once, why this model trains sequentially
        assert log.count("falls back to the sequential trainer: Net is not an nn.Sequential") == 1


def test_a_deployed_run_trains_the_same_own_model(plugin: Path) -> None:
    common = [*OWN, "dataset.partition.name=iid", "num_clients=2", "seed=0"]
    files = [f"server.port_file={plugin / 'port'}", f"server.state_dir={plugin / 'state'}"]
    settings = [
        "server.max_versions=2",
        "server.poll_timeout=0.5",
        "server.threads=1",
        "strategy.scheduler.fraction=1.0",
        "tracking.tensorboard=true",
    ]
    server = spawn("fedhet.server", [*common, "server.port=0", *files, *settings], plugin / "server.log", plugin)
    clients = []
    try:
        port = wait_for_file(plugin / "port", 60, server)
        for i in range(2):
            args = [*common, f"partition_id={i}", f"network.client_id={i}", f"network.server=127.0.0.1:{port}"]
            args += ["network.backoff_initial=0.2", "network.max_seconds=90", "threads=1"]
            clients.append(spawn("fedhet.clients.network", args, plugin / f"client{i}.log", plugin))
        assert [c.wait(timeout=120) for c in clients] == [0, 0], [c.text()[-2000:] for c in clients]
        assert server.wait(timeout=60) == 0, server.text()[-3000:]
    finally:
        for p in (*clients, server):
            p.kill()
    records = [json.loads(line) for line in (plugin / "state" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["version"] == 2 and float(records[-1]["accuracy"]) > 0.6
    assert records[-1]["train_loss"] > 0  # the clients' reported training loss, as in simulation
    recorded = yaml.safe_load((plugin / "state" / "config.yaml").read_text())  # what ran, for fedhet report
    assert recorded["model"]["_target_"] == "my_fl.Net" and recorded["model"]["kwargs"] == {"hidden": 16}
    assert list((plugin / "state" / "tensorboard").glob("events.out.tfevents.*"))
    log = server.text()  # where it listens, what to run, and a status line per version
    assert "waiting for clients: fedhet client network.server=127.0.0.1:" in log
    assert "version 2 at" in log and "updates applied" in log


def test_build_model_seeds_offers_the_shape_and_instantiates_nested_targets(plugin: Path) -> None:
    spec = ModelConfig(_target_="my_fl.Net", kwargs={"hidden": 8, "activation": {"_target_": "torch.nn.ReLU"}})
    one, two = build_model(spec, (20,), 3, seed=4), build_model(spec, (20,), 3, seed=4)
    layers = dict(one.named_modules())
    assert isinstance(layers["body.3"], nn.ReLU) and isinstance(layers["head"], nn.Linear)
    assert layers["head"].out_features == 3 and one.state_dict()["body.1.weight"].shape == (8, 20)
    assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), two.state_dict().values(), strict=True))
    dp = build_model(spec, (20,), 3, seed=4, dp_compatible=True)  # BatchNorm replaced for DP-SGD, as for ours
    assert not any(isinstance(m, nn.BatchNorm1d) for m in dp.modules())


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (ModelConfig(_target_="my_fl.Nope"), "model._target_: cannot import 'my_fl.Nope'"),
        (ModelConfig(_target_="Net"), "model._target_: 'Net' is not an import path"),
        (ModelConfig(_target_="builtins.dict"), "built a dict, not a torch.nn.Module"),
        (ModelConfig(_target_="my_fl.Net", kwargs={"hiden": 3}), "model.kwargs: .*'hiden'.*hidden"),
        (ModelConfig(name="resnet9000"), "model.name: unknown model 'resnet9000'; choose one of: 2nn, cnn"),
    ],
)
def test_a_bad_model_is_one_config_error_naming_the_key(plugin: Path, spec: ModelConfig, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_model(spec, (20,), 3, seed=0)


def test_a_bad_dataset_is_one_error_naming_it(plugin: Path) -> None:
    with pytest.raises(DataError, match="my_fl.not_data' returned a str"):
        load_configured(DatasetConfig(_target_="my_fl.not_data"), 2, 0)
    with pytest.raises(ConfigError, match="dataset.kwargs: .*'sample'"):
        load_configured(DatasetConfig(_target_="my_fl.blobs", kwargs={"sample": 5}), 2, 0)
    data = load_configured(DatasetConfig(_target_="my_fl.blobs", kwargs={"classes": 4}), 2, 0)
    assert data.num_classes == 4 and data.x_train.dtype == torch.float32 and data.name == "my_fl.blobs"


def test_an_installed_packages_entry_points_add_models_and_datasets(tmp_path: Path) -> None:
    """A package that declares ``[project.entry-points."fedhet.models"]`` (here: its installed metadata, written
    by hand) is usable by name, in a fresh process."""
    (tmp_path / "my_fl.py").write_text(PLUGIN)
    info = tmp_path / "my_fl-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-fl\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[fedhet.models]\nblobnet = my_fl:Net\n\n[fedhet.datasets]\nblobs = my_fl:blobs\n"
    )
    done = simulate(tmp_path, ["model=cnn", "model.name=blobnet", "dataset.name=blobs", *SMALL])
    assert done.returncode == 0, done.stderr[-3000:]
    assert metrics(tmp_path)[-1]["version"] == 3
    listed = simulate(tmp_path, ["model.name=nonet"])
    assert "unknown model 'nonet'; choose one of: 2nn, blobnet, cnn" in listed.stdout + listed.stderr


def test_the_readme_example_runs_as_written(tmp_path: Path) -> None:
    """README's "Your own model and data": its module and its command (made short: a few clients and versions),
    with the fedhet console command, from the directory that holds the module."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("## Your own model and data") :]
    (tmp_path / "my_fl.py").write_text(re.findall(r"```python\n(.*?)```", section, re.S)[0])
    command = re.findall(r"```bash\n(.*?)```", section, re.S)[0].split()
    assert command[:2] == [".venv/bin/fedhet", "simulate"]
    fedhet = str(Path(sys.executable).with_name("fedhet"))
    done = subprocess.run(
        [fedhet, *command[1:], *SMALL], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert metrics(tmp_path)[-1]["version"] == 3


def test_flower_apps_train_the_own_model_and_track_it(plugin: Path) -> None:
    """The same model and data through fedhet's Flower ClientApp and ServerApp (nodes in threads), with the
    training loss in the metrics and TensorBoard beside them, as in simulation and behind fedhet server."""
    pytest.importorskip("flwr")
    pytest.importorskip("tensorboard")
    from fedhet.clients.trainer import TrainConfig
    from fedhet.flower import (
        ClientAppSettings,
        DriverSettings,
        LocalGrid,
        ServerAppSettings,
        make_client_app,
        run_on_grid,
    )
    from fedhet.tracking import TrackingConfig

    model = ModelConfig(_target_="my_fl.Net", kwargs={"hidden": 16})
    data = DatasetConfig(_target_="my_fl.blobs")
    data.partition.name = "iid"
    client = ClientAppSettings(dataset=data, model=model, num_clients=3, seed=0, train=TrainConfig(lr=0.05))
    grid = LocalGrid(make_client_app(client), 3)
    strategy = {
        "scheduler": {"name": "fedavg", "fraction": 1.0, "min_clients": 3, "local_epochs": 1},
        "planner": {"name": "identity"},
        "aggregator": {"name": "weighted_mean"},
    }
    metrics = plugin / "flower" / "metrics.jsonl"
    settings = ServerAppSettings(
        strategy=strategy,
        dataset=data,
        model=model,
        num_clients=3,
        seed=0,
        driver=DriverSettings(max_versions=3, min_nodes=3),
        metrics_path=str(metrics),
        tracking=TrackingConfig(tensorboard=True),
    )
    try:
        summary = run_on_grid(grid, settings)
    finally:
        grid.close()
    assert summary.version == 3 and summary.accuracy is not None and summary.accuracy > 0.6
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert records[-1]["train_loss"] > 0
    assert list((metrics.parent / "tensorboard").glob("events.out.tfevents.*"))
