"""The ``fedhet`` command: ``simulate``, ``server``, ``client`` and ``report``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from fedhet.config import CONFIG_DIR, RunConfig, compose_typed, register_configs, to_typed
from fedhet.errors import ConfigError, DataError

__all__ = ["CONFIG_DIR", "compose", "main"]

log = logging.getLogger("fedhet")

GROUPS = ("dataset", "model", "strategy", "fleet")

USAGE = """usage: fedhet simulate [KEY=VALUE ...]       run one simulation (Hydra overrides)
       fedhet simulate -m KEY=A,B [KEY=VALUE ...]  run a sweep (Hydra multirun)

       fedhet server [KEY=VALUE ...]                  serve a federation over gRPC (configs/server.yaml)
       fedhet client [KEY=VALUE ...]                  join one as a device (configs/client.yaml)
       fedhet report RUN_OR_SWEEP_DIR [--target ACC]  plot accuracy against time, tabulate time to target

Config groups: dataset, model, strategy, fleet; main keys: num_clients, seed.
Examples: fedhet simulate strategy=fedavg fleet=exponential num_clients=1000
          fedhet simulate -m fleet=homogeneous,normal seed=0,1,2"""


def _error(message: str) -> int:
    print(f"fedhet: error: {message}", file=sys.stderr)
    return 2


def _group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def _check_group_choices(overrides: list[str]) -> None:
    """Reject ``group=name`` for a name with no config file, in one line (Hydra's own message is a page)."""
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and key.lstrip("+~") in GROUPS:
            group = key.lstrip("+~")
            options = _group_options(group)
            for choice in value.split(","):
                if choice not in options:
                    raise ConfigError(f"{group}={choice}: unknown {group}; choose one of: {', '.join(options)}")


def compose(overrides: list[str]) -> RunConfig:
    """The typed run config for ``overrides`` (what ``fedhet simulate`` would run)."""
    register_configs()
    return compose_typed("config", RunConfig, overrides)


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def _simulate_job(cfg: DictConfig) -> float:
    from fedhet.sim.runner import simulate

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = simulate(to_typed(cfg, RunConfig), run_dir)
    except (ConfigError, DataError) as error:
        raise SystemExit(_error(str(error))) from None
    return summary.final.accuracy


def simulate_command(args: list[str]) -> int:
    multirun = any(a in ("-m", "--multirun") for a in args)
    overrides = [a for a in args if not a.startswith("-")]
    try:
        _check_group_choices(overrides)
        if not multirun:
            from fedhet.sim.runner import validate

            validate(compose(overrides))  # fail fast, in one line, before Hydra sets up a run directory
    except (ConfigError, DataError) as error:
        return _error(str(error))
    except (HydraException, OmegaConfBaseException) as error:
        return _error(str(error).strip().splitlines()[0])
    register_configs()
    sys.argv = ["fedhet simulate", *args]
    try:
        _simulate_job()
    except SystemExit as stop:
        return int(stop.code or 0) if not isinstance(stop.code, str) else _error(stop.code)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "simulate":
        return simulate_command(rest)
    if command == "server":
        from fedhet.server import main as server_main

        return server_main(rest)
    if command == "client":
        from fedhet.clients.network import client_main

        return client_main(rest)
    if command == "report":
        from fedhet.report import main as report_main

        return report_main(rest)
    return _error(f"unknown command {command!r}; see fedhet --help")


if __name__ == "__main__":
    sys.exit(main())
