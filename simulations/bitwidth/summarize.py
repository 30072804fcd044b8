"""Table and plots of the bitwidth simulation (``run.sh``'s output directory).

``fedhet report`` does not fit this grid: it keys a setting by ``fleet.speed`` (all three bitwidth mixes share the
normal speed fleet) and a row by ``strategy.name`` (the two ablations are ``prowd`` too). This script keys runs by
their directory, ``RUNS/<mix>/<variant>/s<seed>/metrics.jsonl``, and writes into ``OUT``:

- ``runs.csv``: every evaluation of every run (mix, variant, seed, version, virtual time, accuracy);
- ``table.md``: per mix and variant, accuracy of the global model after the last round and the best accuracy over
  the run, mean ± sample std (ddof = 1) over seeds; and the speed x bitwidth comparison at equal virtual time;
- ``accuracy_vs_round.png`` (the grid) and ``speed_x_bitwidth.png`` (FedCompass x ProWD against synchronous ProWD).

    python simulations/bitwidth/summarize.py RUNS [OUT]      (OUT defaults to simulations/bitwidth/results)
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

MIXES = {
    "int8_fp32_50": "50% Int8 / 50% FP32",
    "int8_fp32_80": "80% Int8 / 20% FP32",
    "int6_8_12_16": "Int6/8/12/16 at 30/30/20/20%",
}
VARIANTS = {
    "prowd": "ProWD (dequantizer + selective)",
    "deq_only": "dequantizer only (selective=false)",
    "sel_only": "selective only (dequantizer=false)",
    "grouped": "grouped averaging",
    "naive": "naive averaging",
}
STYLES = {
    "prowd": ("-", 2.5),
    "deq_only": ("--", 1.5),
    "sel_only": (":", 2.0),
    "grouped": ("-", 1.2),
    "naive": ("-", 1.2),
}
SPEED_MIX = "int6_8_12_16_exp"
SPEED_VARIANTS = {
    "compass_prowd": "FedCompass scheduler + ProWD aggregator",
    "sync_prowd": "synchronous ProWD (fraction 0.5)",
}

Run = list[dict[str, float]]


def load(root: Path) -> dict[tuple[str, str, int], Run]:
    runs = {}
    for path in sorted(root.glob("*/*/s*/metrics.jsonl")):
        mix, variant, seed = path.parts[-4], path.parts[-3], int(path.parts[-2][1:])
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if records:
            runs[(mix, variant, seed)] = records
    return runs


def mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def accuracy_at(run: Run, time: float) -> float:
    """Accuracy of the latest evaluation at or before virtual ``time``."""
    return [r["accuracy"] for r in run if r["virtual_time"] <= time + 1e-9][-1]


def time_to(run: Run, accuracy: float) -> float | None:
    """First virtual time an evaluation reaches ``accuracy``, None if never."""
    return next((r["virtual_time"] for r in run if r["accuracy"] >= accuracy - 1e-12), None)


def grid_table(runs: dict[tuple[str, str, int], Run]) -> list[str]:
    lines = [
        "| mix | aggregator | seeds | rounds | final acc. (%) | best acc. (%) | final acc. per seed (%) |",
        "|---|---|---|---|---|---|---|",
    ]
    for mix, mix_label in MIXES.items():
        for variant, label in VARIANTS.items():
            chosen = sorted((s, r) for (m, v, s), r in runs.items() if m == mix and v == variant)
            if not chosen:
                continue
            final = [r[-1]["accuracy"] * 100 for _, r in chosen]
            best = [max(x["accuracy"] for x in r) * 100 for _, r in chosen]
            rounds = sorted({int(r[-1]["version"]) for _, r in chosen})
            lines.append(
                f"| {mix_label} | {label} | {len(chosen)} | {'/'.join(map(str, rounds))} | {mean_std(final)} | "
                f"{mean_std(best)} | {', '.join(f'{x:.2f}' for x in final)} |"
            )
    return lines


def speed_table(runs: dict[tuple[str, str, int], Run]) -> list[str]:
    """Per seed: FedCompass x ProWD's last evaluation (time T, accuracy A), synchronous ProWD's accuracy at T and
    the virtual time it takes to reach A."""
    lines = [
        "| seed | FedCompass x ProWD: last eval. at (virtual s) | versions | its acc. (%) | sync ProWD acc. at "
        "that time (%) | sync ProWD time to that acc. (s) | sync ProWD acc. at its end (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    seeds = sorted(s for (m, v, s) in runs if m == SPEED_MIX and v == "compass_prowd")
    for seed in seeds:
        compass, sync = runs[(SPEED_MIX, "compass_prowd", seed)], runs.get((SPEED_MIX, "sync_prowd", seed))
        last = compass[-1]
        t, acc = last["virtual_time"], last["accuracy"]
        if sync is None:
            lines.append(f"| {seed} | {t:.1f} | {int(last['version'])} | {acc * 100:.2f} | — | — | — |")
            continue
        reach = time_to(sync, acc)
        reach_cell = f"{reach:.1f}" if reach is not None else f"not reached by {sync[-1]['virtual_time']:.0f}"
        lines.append(
            f"| {seed} | {t:.1f} | {int(last['version'])} | {acc * 100:.2f} | {accuracy_at(sync, t) * 100:.2f} | "
            f"{reach_cell} | {sync[-1]['accuracy'] * 100:.2f} ({sync[-1]['virtual_time']:.0f} s) |"
        )
    return lines


def plot_grid(runs: dict[tuple[str, str, int], Run], path: Path) -> None:
    fig, axes = plt.subplots(1, len(MIXES), figsize=(5 * len(MIXES), 4), sharey=True)
    for ax, (mix, mix_label) in zip(axes, MIXES.items(), strict=True):
        for variant, label in VARIANTS.items():
            chosen = [r for (m, v, _), r in sorted(runs.items()) if m == mix and v == variant]
            if not chosen:
                continue
            n = min(len(r) for r in chosen)
            versions = [chosen[0][i]["version"] for i in range(n)]
            acc = [[r[i]["accuracy"] * 100 for r in chosen] for i in range(n)]
            mean = [statistics.mean(a) for a in acc]
            std = [statistics.stdev(a) if len(a) > 1 else 0.0 for a in acc]
            style, width = STYLES[variant]
            (line,) = ax.plot(versions, mean, style, linewidth=width, label=label)
            ax.fill_between(
                versions,
                [m - s for m, s in zip(mean, std, strict=True)],
                [m + s for m, s in zip(mean, std, strict=True)],
                color=line.get_color(),
                alpha=0.15,
            )
        ax.set_title(mix_label)
        ax.set_xlabel("round")
        ax.set_ylim(30, 85)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy of the global model (%)")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("Fashion-MNIST, FedAvg CNN, 100 clients, 10 per round: mean ± std over 3 seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_speed(runs: dict[tuple[str, str, int], Run], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    styles = {0: "-", 1: "--", 2: ":"}
    colors = {"compass_prowd": "tab:red", "sync_prowd": "tab:blue"}
    for (mix, variant, seed), run in sorted(runs.items()):
        if mix != SPEED_MIX or variant not in SPEED_VARIANTS:
            continue
        ax.plot(
            [r["virtual_time"] for r in run],
            [r["accuracy"] * 100 for r in run],
            styles.get(seed, "-"),
            marker="o",
            markersize=3,
            color=colors[variant],
            label=f"{SPEED_VARIANTS[variant]}, seed {seed}",
        )
    ax.set_xlabel("virtual time (s)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xlim(0, 200)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Int6/8/12/16 mix, exponential speeds, 20 clients")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit(__doc__)
    runs = load(Path(argv[0]))
    out = Path(argv[1]) if len(argv) > 1 else Path(__file__).parent / "results"
    out.mkdir(parents=True, exist_ok=True)
    with (out / "runs.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["mix", "variant", "seed", "version", "virtual_time", "accuracy"])
        for (mix, variant, seed), run in sorted(runs.items()):
            for r in run:
                writer.writerow([mix, variant, seed, r["version"], f"{r['virtual_time']:.2f}", r["accuracy"]])
    text = ["## Bitwidth mixes (synchronous rounds)", "", *grid_table(runs), ""]
    if any(m == SPEED_MIX for m, _, _ in runs):
        text += ["## Speed x bitwidth (Int6/8/12/16, exponential speeds, 20 clients)", "", *speed_table(runs), ""]
        plot_speed(runs, out / "speed_x_bitwidth.png")
    (out / "table.md").write_text("\n".join(text))
    plot_grid(runs, out / "accuracy_vs_round.png")
    print("\n".join(text))


if __name__ == "__main__":
    main(sys.argv[1:])
