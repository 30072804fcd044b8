"""The examples run as written and print their results."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[1] / "examples"


def test_flower_both_at_once_prints_flowers_and_fedhets_fedavg_accuracy() -> None:
    pytest.importorskip("flwr")
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "flower_both_at_once.py")], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = dict(re.findall(r"(Flower|fedhet)'s FedAvg: test accuracy ([0-9.]+)%", done.stdout))
    assert set(found) == {"Flower", "fedhet"}, done.stdout
    assert float(found["fedhet"]) > 60 and abs(float(found["Flower"]) - float(found["fedhet"])) <= 0.5
    guide = (Path(__file__).parents[1] / "docs" / "coming_from_flower.md").read_text()
    assert "run_simulation(" not in guide  # the guide shows Flower's current API only
