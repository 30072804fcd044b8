"""Table and plots of the FedP3 simulation (``run.sh``'s output directory, ``RUNS/<partition>/<variant>/s<seed>``).

Writes into ``OUT``:

- ``table.md``: per partition and variant, the mean personalised accuracy (each client's head fine-tuned on the
  global shared layers, accuracy on its own held-out split, mean over clients) at the last evaluation, the total
  bytes sent both ways and their ratio to full FedAvg's, the change in accuracy against FedAvg; DP-FedP3 against
  FedP3 OPU2 at the same round, with the largest epsilon any client reached; FedCompass x FedP3 against
  synchronous FedP3 OPU2 at equal virtual time;
- ``personal_accuracy.png``: personalised accuracy against rounds and against bytes communicated.

    python simulations/fedp3/summarize.py RUNS [OUT]      (OUT defaults to simulations/fedp3/results)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

PARTITIONS = {"dirichlet": "Dirichlet(0.5)", "shards": "5 classes per client"}
VARIANTS = {
    "fedavg": "FedAvg, full model",
    "lowerb": "FedP3 LowerB (1 layer), keep 0.9",
    "opu2": "FedP3 OPU2 (2 layers), keep 0.9",
    "opu3": "FedP3 OPU3 (3 layers), keep 0.9",
    "opu2_k50": "FedP3 OPU2, keep 0.5",
    "opu3_k50": "FedP3 OPU3, keep 0.5",
}
DP = {"dp1": 1.0, "dp4": 4.0, "dp8": 8.0}

Row = dict[str, Any]


def load(path: Path) -> list[Row]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def runs(root: Path) -> dict[tuple[str, str], list[Row]]:
    """(partition, variant) -> evaluations of seed 0 (the grid ran one seed)."""
    out = {}
    for path in sorted(root.glob("*/*/s0/metrics.jsonl")):
        out[(path.parts[-4], path.parts[-3])] = load(path)
    return out


def at_version(rows: list[Row], version: int) -> Row:
    return max((r for r in rows if r["version"] <= version), key=lambda r: r["version"])


def at_time(rows: list[Row], seconds: float) -> Row:
    return max((r for r in rows if r["virtual_time"] <= seconds), key=lambda r: r["virtual_time"])


def total_bytes(row: Row) -> int:
    return int(row["bytes_up"]) + int(row["bytes_down"])


def table(grid: dict[tuple[str, str], list[Row]]) -> str:
    lines = []
    for partition, title in PARTITIONS.items():
        base = grid.get((partition, "fedavg"))
        if base is None:
            continue
        ref = base[-1]
        lines += [
            f"### {title}, after {ref['version']} rounds",
            "",
            "| variant | personalised accuracy | vs FedAvg | GB sent (up + down) | vs FedAvg | up | down |",
            "|---|---|---|---|---|---|---|",
        ]
        for variant, name in VARIANTS.items():
            rows = grid.get((partition, variant))
            if rows is None:
                continue
            last = at_version(rows, ref["version"])
            acc, gain = 100 * last["personal_accuracy"], 100 * (last["personal_accuracy"] - ref["personal_accuracy"])
            ratio = total_bytes(last) / total_bytes(ref)
            lines.append(
                f"| {name} | {acc:.2f}% | {gain:+.2f} | {total_bytes(last) / 1e9:.2f} | {ratio:.1%} "
                f"({1 - ratio:.1%} fewer) | {last['bytes_up'] / 1e9:.2f} | {last['bytes_down'] / 1e9:.2f} |"
            )
        lines.append("")
    dp = {v: grid[("dirichlet", v)] for v in DP if ("dirichlet", v) in grid}
    if dp and ("dirichlet", "opu2") in grid:
        version = min(rows[-1]["version"] for rows in dp.values())
        plain = at_version(grid[("dirichlet", "opu2")], version)
        lines += [
            f"### DP-FedP3 (OPU2, C = 1, delta = 1e-5), Dirichlet(0.5), at round {version}",
            "",
            "| target epsilon (over 25 rounds) | personalised accuracy | largest client epsilon so far |",
            "|---|---|---|",
            f"| no DP (FedP3 OPU2) | {100 * plain['personal_accuracy']:.2f}% | - |",
        ]
        for variant, target in DP.items():
            if variant in dp:
                row = at_version(dp[variant], version)
                eps = max(row["epsilon"].values())
                lines.append(f"| {target:g} | {100 * row['personal_accuracy']:.2f}% | {eps:.2f} |")
        lines.append("")
    compass = grid.get(("dirichlet", "compass_opu2"))
    if compass and ("dirichlet", "opu2") in grid:
        sync = grid[("dirichlet", "opu2")]
        lines += [
            "### FedCompass scheduler x FedP3 OPU2 planning, Dirichlet(0.5), at equal virtual time",
            "",
            "| virtual seconds | FedCompass x FedP3: versions, personalised accuracy, GB | "
            "synchronous FedP3: rounds, personalised accuracy, GB |",
            "|---|---|---|",
        ]
        for row in compass[1:]:
            other = at_time(sync, row["virtual_time"])
            lines.append(
                f"| {row['virtual_time']:.0f} | {row['version']}, {100 * row['personal_accuracy']:.2f}%, "
                f"{total_bytes(row) / 1e9:.2f} | {other['version']}, {100 * other['personal_accuracy']:.2f}%, "
                f"{total_bytes(other) / 1e9:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(grid: dict[tuple[str, str], list[Row]], out: Path) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    for column, (partition, title) in enumerate(PARTITIONS.items()):
        for variant, name in VARIANTS.items():
            rows = grid.get((partition, variant))
            if rows is None:
                continue
            versions = [r["version"] for r in rows]
            accuracy = [100 * r["personal_accuracy"] for r in rows]
            axes[0][column].plot(versions, accuracy, marker="o", label=name)
            axes[1][column].plot([total_bytes(r) / 1e9 for r in rows], accuracy, marker="o", label=name)
        axes[0][column].set(title=title, xlabel="round", ylabel="personalised accuracy (%)")
        axes[1][column].set(title=title, xlabel="GB sent (up + down)", ylabel="personalised accuracy (%)")
        for ax in (axes[0][column], axes[1][column]):
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("FedP3 on Fashion-MNIST, 100 clients, full participation (seed 0)")
    fig.tight_layout()
    fig.savefig(out / "personal_accuracy.png", dpi=110)


def main() -> None:
    root = Path(sys.argv[1])
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).parent / "results"
    out.mkdir(parents=True, exist_ok=True)
    grid = runs(root)
    (out / "table.md").write_text(table(grid))
    plot(grid, out)
    print((out / "table.md").read_text())


if __name__ == "__main__":
    main()
