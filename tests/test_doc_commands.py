"""Every ``fedhet simulate``, ``server`` and ``client`` command in the README and the guides composes as written:
each is run with ``--cfg job`` (a sweep with the first of each key's values), which checks every key, option and
value the run would use, without training. The commands whose whole run matters run in full elsewhere (the README's
own-model example: ``test_own_model.py``; the certificate recipe: ``test_grpc_tls.py``; a sweep of a bad value:
``test_cli_hydra.py``; the Flower example: ``test_examples.py``)."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "simulations").rglob("*.md"))]
PLUGINS = {"hydra/sweeper=optuna": "hydra_plugins.hydra_optuna_sweeper"}  # optional Hydra plugins


def commands() -> list[tuple[str, list[str]]]:
    found = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), re.S):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                words = shlex.split(line.split(" #")[0].rstrip(" &"))
                # (fedhet report reads runs a command before it made: test_report.py and test_experiments.py)
                if len(words) > 1 and words[0] in ("fedhet", ".venv/bin/fedhet") and words[1] != "report":
                    found.append((f"{doc.name}: {line.strip()}", words[1:]))
    return found


def single_run(args: list[str]) -> list[str]:
    """A sweep's first run: ``-m`` dropped and each comma-separated value list cut to its first value."""
    if "-m" not in args:
        return args
    out = []
    for arg in args:
        if arg == "-m":
            continue
        key, sep, value = arg.partition("=")
        out.append(f"{key}={value.split(',')[0]}" if sep and not key.startswith("hydra") else arg)
    return out


COMMANDS = commands()


def test_the_docs_show_commands_of_every_kind() -> None:
    kinds = {args[0] for _, args in COMMANDS}
    assert kinds == {"simulate", "server", "client"} and len(COMMANDS) >= 12


@pytest.mark.parametrize(("where", "args"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_a_documented_command_composes_as_written(where: str, args: list[str], tmp_path: Path) -> None:
    for needed, module in PLUGINS.items():
        if needed in args and importlib.util.find_spec(module) is None:
            pytest.skip(f"{needed} needs an optional Hydra plugin")
    readme = (ROOT / "README.md").read_text()  # the README's own module, for its own-model command
    section = readme[readme.index("## Your own model and data") :]
    (tmp_path / "my_fl.py").write_text(re.findall(r"```python\n(.*?)```", section, re.S)[0])
    run = single_run([a.replace("$i", "0") for a in args])
    done = subprocess.run(
        [sys.executable, "-m", "fedhet.cli", run[0], "--cfg", "job", *run[1:]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"{where}\n{done.stderr[-2000:]}"
