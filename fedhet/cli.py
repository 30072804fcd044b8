"""The ``fedhet`` command: ``simulate``, ``server``, ``client`` and ``report``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from fedhet.commandline import SweepReport, config_keys, one_line, parse_command_line
from fedhet.config import CONFIG_DIR, RunConfig, compose_config, compose_typed, register_configs, to_typed
from fedhet.errors import ConfigError, DataError

__all__ = ["CONFIG_DIR", "compose", "main"]

log = logging.getLogger("fedhet")

GROUPS = ("dataset", "model", "strategy", "fleet")

USAGE = """usage: fedhet simulate [KEY=VALUE ...]       run one simulation (Hydra overrides)
       fedhet simulate -m KEY=A,B [KEY=VALUE ...]  run a sweep (Hydra multirun)
       fedhet simulate -m +experiment=NAME          run a paper's experiment (configs/experiment)

       fedhet server [KEY=VALUE ...]                  serve a federation over gRPC (configs/server.yaml)
       fedhet client [KEY=VALUE ...]                  join one as a device (configs/client.yaml)
       fedhet report RUN_OR_SWEEP_DIR [--metric M] [--axis time|rounds] [--target ACC]
                                                      tabulate progress to target with 95% CIs, plot it

Config groups: dataset, model, strategy, fleet; main keys: num_clients, seed.
Examples: fedhet simulate strategy=fedavg fleet=exponential num_clients=1000
          fedhet simulate -m fleet=homogeneous,normal seed=0,1,2"""


def _error(message: str) -> int:
    print(f"fedhet: error: {message}", file=sys.stderr)
    return 2


def compose(overrides: list[str]) -> RunConfig:
    """The typed run config for ``overrides`` (what ``fedhet simulate`` would run)."""
    register_configs()
    return compose_typed("config", RunConfig, overrides)


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def _simulate_job(cfg: DictConfig) -> float | None:
    from fedhet.sim.runner import simulate

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        summary = simulate(to_typed(cfg, RunConfig), run_dir)
    except (ConfigError, DataError) as error:
        if hydra_cfg.mode != RunMode.MULTIRUN:
            raise SystemExit(_error(str(error))) from None
        # in a sweep a bad value fails its own job only: the reason in one line, the next job runs
        overrides = " ".join(hydra_cfg.overrides.task)
        (run_dir / "error.txt").write_text(f"{overrides}: {error}\n")
        log.error("job %s (%s) failed: %s", hydra_cfg.job.num, overrides, error)
        return None
    return summary.final.accuracy


def simulate_command(args: list[str]) -> int:
    try:
        line = parse_command_line(args)
    except ConfigError as error:
        return _error(f"{error}; see fedhet simulate --help")
    sweep = line.flag("--multirun", "-m") is not None
    if sweep and line.informational:
        return _error("-m runs a sweep; --cfg, --info and --help describe one run: give one or the other")
    searched = line.flag("--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn") is not None
    if not (line.informational or sweep or searched):  # a run: check it first, in one line
        try:
            from fedhet.sim.runner import validate

            validate(compose(line.overrides))  # before Hydra sets up a run directory
        except (ConfigError, DataError) as error:
            return _error(str(error))
        except (HydraException, OmegaConfBaseException) as error:
            return _error(one_line(error, config_keys(compose_config("config", []))))
    register_configs()
    sys.argv = ["fedhet simulate", *args]
    SweepReport.failed = []
    try:
        _simulate_job()
    except SystemExit as stop:
        return int(stop.code or 0) if not isinstance(stop.code, str) else _error(stop.code)
    return 1 if SweepReport.failed else 0


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
