"""A classic Flower ``NumPyClient`` joins a fedhet server, unchanged, through ``fedhet client``'s network loop.

:class:`NumPyClientTrainer` stands where ``fedhet client`` puts its :class:`~fedhet.clients.trainer.LocalTrainer`:
a fedhet task becomes one ``fit(parameters, config)`` call (``parameters`` in the model's state-dict order, ``config``
with ``server-round``, ``local-epochs``, ``local-steps`` and ``task-id``), and the returned arrays, example count and
``train_loss`` / ``loss`` metric become the result. Everything else is ``fedhet client``'s own loop
(:class:`~fedhet.clients.network.NetworkClient`): registration with a profile, long polls, chunked uploads,
heartbeats, reconnection with backoff, TLS and tokens.

From the command line (``fedhet client``'s keys for network, profile and partition)::

    python -m fedhet.flower.numpy_client --app my_flower_code:client_fn \\
        network.server=127.0.0.1:50051 network.client_id=3 partition_id=3 profile.seconds_per_sample=0.002

``--app`` names a ``NumPyClient`` instance, or a Flower ``client_fn(context)`` returning a ``NumPyClient`` (or the
``Client`` of ``NumPyClient.to_client()``); its Context carries ``partition-id`` and ``num-partitions`` as a
SuperNode's would. The profile's speed cannot be measured without fedhet's trainer: give
``profile.seconds_per_sample`` (or the client's ``get_properties`` answers ``seconds-per-sample``).
"""

from __future__ import annotations

import importlib
import logging
import math
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any, cast

import numpy as np
import torch
from flwr.app import Context, RecordDict
from flwr.client import NumPyClient
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from fedhet.clients.config import ClientRunConfig, NetworkConfig, compose_client
from fedhet.clients.network import NetworkClient
from fedhet.clients.trainer import LocalTrainer, TrainConfig
from fedhet.errors import ConfigError
from fedhet.threads import use_threads
from fedhet.types import ClientProfile, Result, Task

__all__ = ["NumPyClientTrainer", "join", "load_numpy_client", "main"]

log = logging.getLogger("fedhet.flower")

_LOSS_KEYS = ("train_loss", "train-loss", "loss")


class NumPyClientTrainer:
    """A Flower ``NumPyClient`` behind fedhet's trainer interface (``train(task, x, y, seed) -> Result``).

    The samples fedhet passes are ignored (the NumPyClient holds its own data); ``config.batch_size`` is only used
    to pace an emulated slower device. A reply whose arrays do not match the task's count and shapes is an error.
    """

    privacy = None  # a NumPyClient trains as it likes: fedhet's DP-SGD is not applied, and none is reported

    def __init__(self, client: NumPyClient, config: TrainConfig | None = None) -> None:
        self.client = client
        self.config = config or TrainConfig()

    def train(self, task: Task, x: torch.Tensor, y: torch.Tensor, seed: int, *args: Any, **kwargs: Any) -> Result:
        names = list(task.weights)
        parameters = [t.detach().cpu().numpy() for t in task.weights.values()]
        fit_config: dict[str, bool | bytes | float | int | str] = {
            "server-round": task.version + 1,
            "local-epochs": task.local_epochs,
            "local-steps": task.local_steps,
            "task-id": task.task_id,
            "seed": seed,
            # FedProx's mu under both keys Flower's FedProx strategies use (Message API; legacy NumPyClient API)
            "proximal-mu": task.proximal_mu,
            "proximal_mu": task.proximal_mu,
        }
        start = time.perf_counter()
        arrays, num_examples, metrics = self.client.fit(parameters, fit_config)
        seconds = time.perf_counter() - start
        if len(arrays) != len(names):
            raise ValueError(f"task {task.task_id}: fit returned {len(arrays)} arrays for {len(names)} tensors")
        weights: dict[str, torch.Tensor] = {}
        for name, array in zip(names, arrays, strict=True):
            ref = task.weights[name]
            value = torch.from_numpy(np.array(array, copy=True))
            if tuple(value.shape) != tuple(ref.shape):
                raise ValueError(
                    f"tensor {name!r}: fit returned shape {tuple(value.shape)}, expected {tuple(ref.shape)}"
                )
            weights[name] = value.to(ref.dtype)
        if int(num_examples) < 1:
            raise ValueError(f"task {task.task_id}: fit reported {num_examples} examples")
        loss = next((float(metrics[k]) for k in _LOSS_KEYS if k in metrics), 0.0)
        return Result(
            task_id=task.task_id,
            client_id=task.client_id,
            version=task.version,
            weights=weights,
            num_samples=int(num_examples),
            local_steps=task.steps_for(int(num_examples), self.config.batch_size),
            train_seconds=seconds,
            loss=loss if math.isfinite(loss) else 0.0,
        )


def join(
    client: NumPyClient,
    net: NetworkConfig,
    profile: ClientProfile,
    num_samples: int,
    config: TrainConfig | None = None,
    slowdown: float = 1.0,
) -> int:
    """Run ``client`` as one client of a fedhet server until the run ends; returns ``fedhet client``'s exit status
    (0: the run ended, 1: the server stayed unreachable, 2: credentials refused)."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    trainer = NumPyClientTrainer(client, config)
    # NetworkClient only calls train() and reads config.batch_size: a NumPyClientTrainer provides both
    x = torch.empty(num_samples, 0)
    y = torch.zeros(num_samples, dtype=torch.int64)
    network = NetworkClient(net, cast(LocalTrainer, trainer), x, y, profile, slowdown=slowdown)
    return network.run()


def load_numpy_client(spec: str, context: Context) -> NumPyClient:
    """The NumPyClient ``module:attribute`` names: an instance, or a ``client_fn(context)`` returning one (or its
    ``to_client()`` wrapper)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"--app must be module:attribute, got {spec!r}")
    try:
        target = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"--app {spec}: {error}") from None
    if callable(target) and not isinstance(target, NumPyClient):
        target = target(context)
    target = getattr(target, "numpy_client", target)  # NumPyClient.to_client() wraps the NumPyClient
    if not isinstance(target, NumPyClient):
        raise ConfigError(f"--app {spec} is not a NumPyClient (nor a client_fn returning one): {type(target)}")
    return target


def _num_samples(client: NumPyClient, given: int) -> int:
    if given:
        return given
    properties: Mapping[str, Any] = client.get_properties({})
    for key in ("num-examples", "num_examples", "num-samples", "num_samples"):
        if isinstance(properties.get(key), int):
            return int(properties[key])
    raise ConfigError("give --num-samples N (or answer num-examples from the client's get_properties)")


USAGE = """usage: python -m fedhet.flower.numpy_client --app MODULE:ATTR [--num-samples N] [KEY=VALUE ...]

Runs a Flower NumPyClient as one client of a fedhet server; KEY=VALUE are fedhet client's keys (network.*,
profile.*, partition_id, num_clients, seed, train.batch_size)."""


def main(argv: list[str]) -> int:
    """Command line entry; returns the exit status."""
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    app, samples, overrides = "", 0, []
    args = iter(argv)
    for arg in args:
        if arg == "--app":
            app = next(args, "")
        elif arg == "--num-samples":
            samples = int(next(args, "0"))
        else:
            overrides.append(arg)
    try:
        if not app:
            raise ConfigError("--app MODULE:ATTR is required")
        cfg: ClientRunConfig = compose_client(overrides)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
        context = Context(
            run_id=0,
            node_id=cfg.network.client_id,
            node_config={"partition-id": cfg.partition_id, "num-partitions": cfg.num_clients},
            state=RecordDict(),
            run_config={},
        )
        client = load_numpy_client(app, context)
        properties = client.get_properties({})
        seconds = cfg.profile.seconds_per_sample or float(properties.get("seconds-per-sample", 0.0))
        if not seconds > 0:
            raise ConfigError("set profile.seconds_per_sample (a NumPyClient's speed cannot be measured)")
        prof = cfg.profile
        profile = ClientProfile(seconds * prof.slowdown, prof.bandwidth, prof.bitwidth, prof.memory_bytes)
        num_samples = _num_samples(client, samples)
    except (ConfigError, ValueError, HydraException, OmegaConfBaseException) as error:
        print(f"fedhet.flower.numpy_client: error: {str(error).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    use_threads(cfg.threads, "threads")
    return join(client, cfg.network, profile, num_samples, TrainConfig(**asdict(cfg.train)), prof.slowdown)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
