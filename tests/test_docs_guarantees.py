"""Every guarantee of docs/deployment.md's "Guarantees and limits" names tests that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_guarantee_names_an_existing_test() -> None:
    text = (ROOT / "docs" / "deployment.md").read_text()
    section = text.split("## Guarantees and limits", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "`test_" in line]
    assert len(rows) >= 15
    for row in rows:
        module = None
        for name in re.findall(r"`([^`]*test_[^`]*)`", row.split("|")[-2]):
            if "::" in name:
                module, name = name.split("::")
            assert module is not None, row
            source = (ROOT / "tests" / module).read_text()
            assert re.search(rf"^def {re.escape(name)}\(", source, re.M), f"{module}::{name} named in the guide"
