"""What fedhet's Hydra commands (``simulate``, ``server``, ``client``) share: Hydra's own flags told apart from
overrides (a flag's value, such as ``job`` in ``--cfg job``, is not an override), Hydra's errors as one line that
names the key and, for a typo, what was meant, and ``--cfg`` / ``--info`` / ``--help`` for the commands that
compose with Hydra's compose API (``server``, ``client``).
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedhet.config import CONFIG_DIR
from fedhet.errors import ConfigError

__all__ = [
    "CommandLine",
    "SweepReport",
    "compose_command",
    "config_keys",
    "did_you_mean",
    "one_line",
    "parse_command_line",
    "to_yaml",
]

T = TypeVar("T")

# Hydra's flags (hydra/_internal/utils.py get_args_parser): those that take a value, one whose value is optional
VALUE_FLAGS = frozenset(
    {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd"}
    | {"--experimental-rerun"}
)
OPTIONAL_VALUE_FLAGS = frozenset({"--info", "-i"})
INFO_TOPICS = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")
SWITCHES = frozenset(
    {"--help", "-h", "--hydra-help", "--version", "--resolve", "--run", "-r", "--multirun", "-m"}
    | {"--shell-completion", "-sc"}
)
# flags that ask for information instead of a run
INFORMATIONAL = frozenset(
    {"--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help", "--version", "--shell-completion", "-sc"}
)


@dataclass
class CommandLine:
    """A command's arguments: Hydra's flags (with their values) and the overrides."""

    overrides: list[str] = field(default_factory=list)
    flags: dict[str, str | None] = field(default_factory=dict)

    @property
    def informational(self) -> bool:
        """Whether a flag asks for information (``--cfg``, ``--info``, ``--help`` ...) instead of a run."""
        return any(f in INFORMATIONAL for f in self.flags)

    def flag(self, *names: str) -> str | None:
        """The value of the first of ``names`` given (``""`` for a switch or a flag given without its value)."""
        for name in names:
            if name in self.flags:
                return self.flags[name] or ""
        return None


def parse_command_line(args: list[str], extra_switches: Iterable[str] = ()) -> CommandLine:
    """Split ``args`` into Hydra's flags and overrides; a flag Hydra does not know (nor ``extra_switches``) is a
    :class:`ConfigError` naming it."""
    switches = SWITCHES | set(extra_switches)
    line = CommandLine()
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, inline = arg.partition("=")
        if not arg.startswith("-") or arg.lstrip("-") == "" or _is_number(arg):
            line.overrides.append(arg)  # an override (or a negative number, which Hydra reads as a value)
        elif name in VALUE_FLAGS:
            if eq:
                line.flags[name] = inline
            elif i + 1 < len(args):
                line.flags[name] = args[i + 1]
                i += 1
            else:
                raise ConfigError(f"{name} needs a value")
        elif name in OPTIONAL_VALUE_FLAGS:
            if eq:
                line.flags[name] = inline
            elif i + 1 < len(args) and args[i + 1] in INFO_TOPICS:
                line.flags[name] = args[i + 1]
                i += 1
            else:
                line.flags[name] = None
        elif arg in switches:
            line.flags[arg] = None
        else:
            raise ConfigError(f"unknown option {arg}")
        i += 1
    return line


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def config_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a composed config (nodes and leaves), Hydra's own keys left out."""
    keys: list[str] = []
    if isinstance(cfg, DictConfig):
        for key in cfg:
            if not prefix and key == "hydra":
                continue
            path = f"{prefix}{key!s}"
            keys.append(path)
            keys.extend(config_keys(cfg._get_node(str(key)), f"{path}."))  # no interpolation resolved
    return keys


def did_you_mean(key: str, keys: Iterable[str]) -> str:
    """`` (did you mean a.b?)`` for the keys closest to ``key``: a typo of its last part among its siblings, else of
    the whole key; empty when none is close."""
    known = list(keys)
    parent, _, leaf = key.rpartition(".")
    siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == parent]
    close = [f"{parent}.{s}" if parent else s for s in difflib.get_close_matches(leaf, siblings, n=2, cutoff=0.75)]
    if not close:
        same_depth = [k for k in known if k.count(".") == key.count(".")]
        close = difflib.get_close_matches(key, same_depth, n=2, cutoff=0.85)
    close = [c for c in close if c != key]
    return f" (did you mean {' or '.join(close)}?)" if close else ""


_MISSING = re.compile(r"Could not find '([^'/]+)/([^']+)'")
_OVERRIDE = re.compile(r"Could not (?:override|append to config)[^']*'([^']+)'")
_NOISE = ("full_key:", "object_type=", "reference_type=", "Config search path", "provider=", "Set the environment")


def one_line(error: BaseException, keys: Iterable[str] = ()) -> str:
    """One line for a Hydra or OmegaConf error (theirs span lines): the key, the reason and, for an unknown key or
    option, the close ones."""
    text = str(error).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    missing = _MISSING.search(text)
    if missing:
        group, choice = missing.groups()
        header = f"Available options in '{group}':"
        listed = lines[lines.index(header) + 1 :] if header in lines else []
        options = [o for o in listed if not o.startswith(_NOISE)]
        hint = did_you_mean(choice, options)
        return f"{group}={choice}: unknown {group}{hint}; choose one of: {', '.join(options)}"
    override = _OVERRIDE.search(text)
    if override:
        key = override.group(1)
        reason = next((line for line in lines[1:] if not line.startswith(("To append", *_NOISE))), "no such key")
        if "not in struct" in reason or reason == "no such key":
            return f"{key}: no such key{did_you_mean(key, keys)} (to add one, write +{key}=...)"
        return f"{key}: {reason}"
    kept = [line for line in lines if not line.startswith(_NOISE)]
    return "; ".join(kept) if kept else type(error).__name__


def to_yaml(typed: Any) -> str:
    """A typed config as YAML (what ``--cfg job`` prints)."""
    return OmegaConf.to_yaml(OmegaConf.structured(typed))


def compose_command(
    command: str, usage: str, args: list[str], compose: Callable[[list[str]], T], extra_switches: Iterable[str] = ()
) -> T | int:
    """The typed config of ``fedhet <command> ARGS`` (``compose`` composes and validates it), or the exit status
    when there is nothing to run: ``--help`` (the usage and every key with its default), ``--cfg job`` (the
    composed config), ``--info`` (where the config comes from), or an error, printed as one line."""

    def error(message: str) -> int:
        print(f"fedhet {command}: error: {message}", file=sys.stderr)
        return 2

    try:
        line = parse_command_line(args, extra_switches)
    except ConfigError as problem:
        return error(f"{problem}; see fedhet {command} --help")
    if line.flag("--help", "-h") is not None:
        print(f"{usage}\n\nKeys and their defaults (configs/{command}.yaml; set any with KEY=VALUE):\n")
        print(to_yaml(compose([])), end="")
        return 0
    ignored = [f for f in line.flags if f not in {"--cfg", "-c", "--info", "-i", *extra_switches}]
    if ignored:
        return error(f"{ignored[0]} is a flag of fedhet simulate (a Hydra app), not of fedhet {command}")
    try:
        cfg = compose(line.overrides)
    except ConfigError as problem:
        return error(str(problem))
    except (HydraException, OmegaConfBaseException) as problem:
        return error(one_line(problem, config_keys(OmegaConf.structured(compose([])))))
    shown = line.flag("--cfg", "-c")
    if shown is not None:
        if shown not in ("job", "all"):
            return error(f"--cfg {shown or '(no value)'}: fedhet {command} has one config, shown by --cfg job")
        print(to_yaml(cfg), end="")
        return 0
    if line.flag("--info", "-i") is not None:
        print(f"config: {CONFIG_DIR / f'{command}.yaml'} (groups: {', '.join(_groups())})")
        return 0
    return cfg


def _groups() -> list[str]:
    return sorted(
        f"{d.name} ({', '.join(sorted(p.stem for p in d.glob('*.yaml')))})"
        for d in CONFIG_DIR.iterdir()
        if d.is_dir()
        if any(d.glob("*.yaml"))
    )


class SweepReport(Callback):
    """Hydra callback (``configs/config.yaml``): at the end of a sweep, one line for the jobs that failed (each
    left an ``error.txt`` in its directory); ``fedhet simulate -m`` then exits with status 1."""

    failed: ClassVar[list[str]] = []

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        SweepReport.failed = []

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        errors = sorted(sweep.glob("*/error.txt"), key=lambda p: (len(p.parent.name), p.parent.name))
        SweepReport.failed = [f"job {p.parent.name}: {p.read_text().strip()}" for p in errors]
        if errors:
            jobs = sum(1 for p in sweep.iterdir() if p.is_dir() and (p / ".hydra").is_dir())
            print(f"fedhet: {len(errors)} of {jobs} jobs failed (the others completed):", file=sys.stderr)
            for line in SweepReport.failed:
                print(f"  {line}", file=sys.stderr)
