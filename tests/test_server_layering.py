"""The import rules of docs/DESIGN.md, checked on what each part really loads (transitively), with no exceptions:

- the three runtimes (``fedhet.sim``, ``fedhet.server``, ``fedhet.flower``) never import one another; each sits
  on the run core (``fedhet.runtime``);
- the run core imports no runtime and no wire code;
- the config schemas import no runtime, no run core, no strategy and no client;
- strategies are pure: no runtime, no run core, no client, no wire, no gRPC;
- a client (its trainers and its network loop) imports no runtime, no run core and no strategy;
- only the gRPC server and the client's network loop (and Flower's NumPyClient adapter, which runs a Flower client
  as a fedhet client over it) import the wire modules.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

RUNTIMES = ("fedhet.sim", "fedhet.server", "fedhet.flower")


def loaded_by(module: str) -> list[str]:
    names = "sorted(m for m in sys.modules if m.startswith(('fedhet', 'grpc')))"
    code = f"import sys, json, {module}; print(json.dumps({names}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return list(json.loads(out.stdout))


def within(loaded: list[str], *packages: str) -> list[str]:
    return [m for m in loaded if any(m == p or m.startswith(p + ".") for p in packages)]


@pytest.mark.parametrize(
    ("module", "runtime"),
    [
        ("fedhet.sim.runner", "fedhet.sim"),
        ("fedhet.server.app", "fedhet.server"),
        ("fedhet.flower.serverapp", "fedhet.flower"),
    ],
)
def test_a_runtime_imports_no_other_runtime(module: str, runtime: str) -> None:
    loaded = loaded_by(module)
    assert "fedhet.runtime" in loaded
    assert not within(loaded, *(r for r in RUNTIMES if r != runtime))


def test_the_run_core_imports_no_runtime_and_no_wire() -> None:
    loaded = loaded_by("fedhet.runtime")
    assert not within(loaded, *RUNTIMES, "fedhet.v1", "grpc")


def test_the_config_schemas_import_no_runtime_core_strategy_or_client() -> None:
    loaded = loaded_by("fedhet.config")
    assert not within(loaded, *RUNTIMES, "fedhet.runtime", "fedhet.strategies", "fedhet.clients", "fedhet.v1")


def test_strategies_are_pure() -> None:
    loaded = loaded_by("fedhet.strategies")
    assert not within(loaded, *RUNTIMES, "fedhet.runtime", "fedhet.clients", "fedhet.v1", "grpc")


@pytest.mark.parametrize("module", ["fedhet.clients.network", "fedhet.clients.trainer", "fedhet.clients.personal"])
def test_a_client_imports_no_runtime_core_or_strategy(module: str) -> None:
    loaded = loaded_by(module)
    assert not within(loaded, *RUNTIMES, "fedhet.runtime", "fedhet.strategies")


def test_only_the_server_and_the_network_loop_import_the_wire_modules() -> None:
    loaded = loaded_by(
        "fedhet.strategies, fedhet.clients.trainer, fedhet.codec, fedhet.sim.runner, fedhet.flower.serverapp"
    )
    assert "fedhet.sim.runner" in loaded
    assert not within(loaded, "fedhet.v1")


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
