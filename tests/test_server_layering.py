"""The import rules of DESIGN.md: the server never imports the simulator or the clients' trainers; the client's
network loop never imports the server, the simulator or the strategies."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# fedhet.config (shared config schemas) imports the fleet schema from fedhet.sim.fleet: a dataclass, no simulator
ALLOWED_SIM = {"fedhet.sim.fleet"}


def loaded_by(module: str) -> list[str]:
    code = f"import sys, json, {module}; print(json.dumps(sorted(m for m in sys.modules if m.startswith('fedhet'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return list(json.loads(out.stdout))


@pytest.mark.parametrize("module", ["fedhet.server", "fedhet.server.app"])
def test_the_server_imports_neither_the_simulator_nor_client_code(module: str) -> None:
    loaded = loaded_by(module)
    assert not [m for m in loaded if m.startswith("fedhet.sim.") and m not in ALLOWED_SIM]
    assert not [m for m in loaded if m.startswith("fedhet.clients")]


def test_the_client_loop_imports_neither_server_simulator_nor_strategies() -> None:
    loaded = loaded_by("fedhet.clients.network")
    assert not [m for m in loaded if m.startswith(("fedhet.server", "fedhet.strategies"))]
    assert not [m for m in loaded if m.startswith("fedhet.sim.") and m not in ALLOWED_SIM]


def test_only_the_server_and_the_network_loop_import_the_wire_modules() -> None:
    loaded = loaded_by("fedhet.strategies, fedhet.clients.trainer, fedhet.codec, fedhet.sim.runner")
    assert "fedhet.sim.runner" in loaded
    assert not [m for m in loaded if m.startswith("fedhet.v1")]


def test_no_server_or_wire_code_unpickles() -> None:
    """Checkpoints, the log and payloads go through safetensors, JSON and protobuf only."""
    root = Path(__file__).resolve().parents[1]
    sources = [
        *sorted((root / "fedhet" / "server").glob("*.py")),
        root / "fedhet" / "v1" / "wire.py",
        root / "clients" / "network.py",
    ]
    for path in sources:
        text = path.read_text()
        for banned in ("import pickle", "pickle.", "torch.load", "marshal.", "dill", "cloudpickle"):
            assert banned not in text, f"{path.name} uses {banned}"
