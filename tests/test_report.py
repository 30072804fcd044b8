"""``fedhet report``: loading run directories, time to target, the default target, the table and the plot."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedhet.errors import DataError
from fedhet.metrics import MetricsRecord
from fedhet.report import Run, default_target, load_runs, main, mean_curve, summarize, time_to_target
from fedhet.report.analysis import Summary, epsilon_points
from fedhet.report.output import plot_epsilon

#: (virtual seconds, accuracy) evaluations per (fleet, strategy, seed)
CURVES: dict[tuple[str, str, int], list[tuple[float, float]]] = {
    # normal fleet: fedavg bests 0.80, 0.75, 0.78 -> target 0.75, reached at 30, 24, 16 s
    ("normal", "fedavg", 0): [(0, 0.1), (10, 0.5), (20, 0.7), (30, 0.8)],
    ("normal", "fedavg", 1): [(0, 0.1), (12, 0.6), (24, 0.75), (36, 0.7)],
    ("normal", "fedavg", 2): [(0, 0.1), (8, 0.55), (16, 0.78), (24, 0.78)],
    # fedcompass reaches 0.75 at 10 and 12 s
    ("normal", "fedcompass", 0): [(0, 0.1), (5, 0.6), (10, 0.76), (15, 0.82)],
    ("normal", "fedcompass", 1): [(0, 0.1), (6, 0.7), (12, 0.8)],
    # exponential fleet: fedavg bests 0.60, 0.65 -> target 0.60, reached at 20 and 30 s
    ("exponential", "fedavg", 0): [(0, 0.1), (20, 0.6)],
    ("exponential", "fedavg", 1): [(0, 0.1), (15, 0.5), (30, 0.65)],
    # one fedcompass seed never gets there
    ("exponential", "fedcompass", 0): [(0, 0.1), (7, 0.62)],
    ("exponential", "fedcompass", 1): [(0, 0.1), (9, 0.55)],
}


def record(time: float, accuracy: float, version: int = 0) -> MetricsRecord:
    return MetricsRecord(version, time, 0.0, accuracy, 1.0, 0, 0, 0, 0)


def write_run(run_dir: Path, curve: list[tuple[float, float]], config: str | None) -> Path:
    run_dir.mkdir(parents=True)
    lines = [
        json.dumps(
            {
                "version": v,
                "virtual_time": t,
                "wall_time": 0.1 * v,
                "accuracy": a,
                "loss": 1.0,
                "bytes_up": 0,
                "bytes_down": 0,
                "updates_applied": v,
                "updates_dropped": 0,
            }
        )
        for v, (t, a) in enumerate(curve)
    ]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if config is not None:
        (run_dir / ".hydra").mkdir()
        (run_dir / ".hydra" / "config.yaml").write_text(config, encoding="utf-8")
    return run_dir


def config_yaml(strategy: str, fleet: str, seed: int) -> str:
    return f"""dataset:
  name: synthetic
  partition:
    name: natural
model:
  name: logreg
strategy:
  name: {strategy}
fleet:
  speed: {fleet}
  seconds_per_sample: 0.005
num_clients: 30
seed: {seed}
hydra_like_value: ${{hydra:runtime.output_dir}}
"""


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """A sweep directory laid out like Hydra's, with the exponential fleet's jobs one level deeper."""
    root = tmp_path / "sweep"
    for number, (fleet, strategy, seed) in enumerate(CURVES):
        parent = root / "more" if fleet == "exponential" else root
        write_run(
            parent / f"{number}_fleet={fleet},seed={seed}",
            CURVES[fleet, strategy, seed],
            config_yaml(strategy, fleet, seed),
        )
    return root


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_time_to_target_is_the_first_evaluation_at_or_above_target() -> None:
    records = [(0.0, 0.1), (4.5, 0.69), (9.0, 0.7), (13.5, 0.9), (18.0, 0.6)]
    assert time_to_target(records, 0.7) == 9.0  # equality counts
    assert time_to_target(records, 0.8) == 13.5
    assert time_to_target(records, 0.05) == 0.0
    assert time_to_target(records, 0.95) is None
    assert time_to_target([], 0.5) is None


def run_of(strategy: str, accuracies: list[float], times: list[float] | None = None, seed: int = 0) -> Run:
    """A run with the given accuracies, evaluated at ``times`` (default 0, 1, 2, ... s)."""
    times = times or [float(i) for i in range(len(accuracies))]
    records = [record(t, a, i) for i, (t, a) in enumerate(zip(times, accuracies, strict=True))]
    return Run(Path("m.jsonl"), strategy, "normal", 10, "iid", "synthetic", "logreg", seed, records)


def test_default_target_is_the_lowest_best_accuracy_of_fedavg_runs() -> None:
    runs = [run_of("fedavg", [0.2, 0.8, 0.7]), run_of("fedavg", [0.3, 0.75]), run_of("fedcompass", [0.1, 0.5])]
    assert default_target(runs) == 0.75  # the fedcompass run's 0.5 does not count
    assert default_target([*runs[2:], run_of("fedbuff", [0.9])]) == 0.5  # no fedavg: every run counts


def test_load_runs_finds_nested_runs_and_reads_their_config(sweep: Path) -> None:
    runs = load_runs(sweep)
    assert len(runs) == len(CURVES)
    assert {(r.fleet, r.strategy, r.seed) for r in runs} == set(CURVES)
    run = next(r for r in runs if (r.fleet, r.strategy, r.seed) == ("normal", "fedavg", 1))
    assert (run.dataset, run.model, run.partition, run.num_clients) == ("synthetic", "logreg", "natural", 30)
    assert [(r.virtual_time, r.accuracy) for r in run.records] == CURVES["normal", "fedavg", 1]
    single = load_runs(run.path.parent)  # a run directory on its own
    assert [r.path for r in single] == [run.path]


def test_run_without_config_is_labelled_unknown(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_run(tmp_path / "run", [(0, 0.1), (5, 0.4)], config=None)
    with caplog.at_level(logging.WARNING, logger="fedhet.report"):
        (run,) = load_runs(tmp_path)
    assert (run.strategy, run.fleet, run.dataset, run.num_clients, run.seed) == (
        "unknown",
        "unknown",
        "unknown",
        None,
        None,
    )
    assert "config.yaml" in caplog.text


def test_empty_metrics_file_is_skipped_with_a_warning(sweep: Path, caplog: pytest.LogCaptureFixture) -> None:
    empty = sweep / "99_empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="fedhet.report"):
        runs = load_runs(sweep)
    assert len(runs) == len(CURVES)
    assert "99_empty" in caplog.text and "skipping" in caplog.text


def test_malformed_metrics_line_names_file_and_line(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run", [(0, 0.1)], config_yaml("fedavg", "normal", 0))
    with (run_dir / "metrics.jsonl").open("a", encoding="utf-8") as f:
        f.write('{"version": 1, "virtual_time": 3.0,\n')
    with pytest.raises(DataError, match=r"run/metrics\.jsonl:2: malformed"):
        load_runs(tmp_path)


def test_summaries_per_setting_and_strategy(sweep: Path) -> None:
    summaries = summarize(load_runs(sweep))
    keyed = {(s.setting.fleet, s.strategy): s for s in summaries}
    assert list(keyed) == [
        ("exponential", "fedavg"),
        ("exponential", "fedcompass"),
        ("normal", "fedavg"),
        ("normal", "fedcompass"),
    ]
    assert keyed["normal", "fedavg"].target == 0.75
    assert keyed["normal", "fedavg"].times == (30.0, 24.0, 16.0)
    assert keyed["normal", "fedcompass"].times == (10.0, 12.0)
    assert keyed["normal", "fedavg"].relative_time == pytest.approx((70 / 3) / 11)
    assert keyed["exponential", "fedcompass"].target == 0.6
    assert keyed["exponential", "fedcompass"].times == (7.0, None)
    assert keyed["exponential", "fedavg"].relative_time == pytest.approx(25 / 7)


def test_report_table_numbers_and_files(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code, stdout, stderr = run_main([str(sweep), "--out", str(out)], capsys)
    assert code == 0, stderr
    rows = {
        tuple(c.strip() for c in line.strip("|").split("|")[3:6]): line
        for line in stdout.splitlines()
        if "| synthetic" in line
    }
    cells = {key: [c.strip() for c in line.strip("|").split("|")[6:]] for key, line in rows.items()}
    # seeds, target %, time to target (s), final accuracy (%), GB sent, time / fedcompass, bytes / fedavg; each
    # mean ± the half-width of the 95% confidence interval: t(0.975, n - 1) * sample std / sqrt(n)
    assert cells["normal", "30", "fedavg"] == [
        "3",
        "75.00",
        "23.33 ± 17.45",
        "76.00 ± 13.14",
        "0 ± 0",
        "2.12",
        "—",
    ]
    assert cells["normal", "30", "fedcompass"] == [
        "2",
        "75.00",
        "11.00 ± 12.71",
        "81.00 ± 12.71",
        "0 ± 0",
        "1.00",
        "—",
    ]
    assert cells["exponential", "30", "fedavg"] == [
        "2",
        "60.00",
        "25.00 ± 63.53",
        "62.50 ± 31.77",
        "0 ± 0",
        "3.57",
        "—",
    ]
    assert cells["exponential", "30", "fedcompass"] == [
        "2",
        "60.00",
        "7.00 (1/2 reached)",
        "58.50 ± 44.47",
        "0 ± 0",
        "1.00",
        "—",
    ]
    assert stdout.splitlines()[0].startswith("| dataset | model | partition | fleet | clients | strategy |")
    report = (out / "report.md").read_text(encoding="utf-8")
    assert all(line in report for line in rows.values())
    png = (out / "accuracy_vs_time.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert str(out / "report.md") in stdout
    assert not (out / "accuracy_vs_epsilon.png").exists()  # no private run: no privacy plot


def test_explicit_target_overrides_the_default_and_out_defaults_to_input(
    sweep: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, stdout, _ = run_main([str(sweep), "--target", "0.8"], capsys)
    assert code == 0
    normal_fedavg = next(line for line in stdout.splitlines() if "| normal | 30 | fedavg |" in line)
    assert "| 80.00 | 30.00 (1/3 reached) |" in normal_fedavg
    assert (sweep / "report.md").is_file() and (sweep / "accuracy_vs_time.png").stat().st_size > 0


def test_mean_curve_holds_each_seed_between_evaluations() -> None:
    a = run_of("fedavg", [0.2, 0.6], times=[0.0, 10.0])
    b = run_of("fedavg", [0.4, 0.5], times=[0.0, 5.0], seed=1)
    curve = mean_curve([a, b])
    assert curve.times.tolist() == [0.0, 5.0, 10.0]
    np.testing.assert_allclose(curve.mean, [0.3, 0.35, 0.55])  # b's last value is held after 5 s
    np.testing.assert_allclose(curve.low, [0.2, 0.2, 0.5])
    np.testing.assert_allclose(curve.high, [0.4, 0.5, 0.6])


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda d: [str(d / "nonexistent")], "no such file or directory"),
        (lambda d: [str(d / "bad")], "metrics.jsonl:2: malformed metrics line"),
        (lambda d: [str(d / "norun")], "no metrics.jsonl"),
        (lambda d: [str(d / "bad"), "--target", "75"], "fraction in (0, 1]"),
        (lambda d: [], "RUN_OR_SWEEP_DIR"),
    ],
)
def test_bad_input_returns_2_with_one_line(
    make_args: Callable[[Path], list[str]], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = write_run(tmp_path / "bad", [(0, 0.1)], config_yaml("fedavg", "normal", 0))
    with (bad / "metrics.jsonl").open("a", encoding="utf-8") as f:
        f.write("not json\n")
    (tmp_path / "norun").mkdir()
    code, stdout, stderr = run_main(make_args(tmp_path), capsys)
    assert code == 2
    assert stdout == ""
    assert len(stderr.splitlines()) == 1 and stderr.startswith("fedhet: error: ")
    assert message in stderr


def test_metrics_files_are_strict_json_and_non_finite_numbers_read_back_as_nan(tmp_path: Path) -> None:
    from fedhet.metrics import MetricsWriter, read_metrics

    record = MetricsRecord(1, 2.0, 3.0, float("nan"), float("inf"), 10, 20, 1, 0, epsilon={"0": float("inf")})
    with MetricsWriter(tmp_path / "metrics.jsonl") as writer:
        writer.write(record)

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    line = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=refuse)
    assert line["accuracy"] is None and line["loss"] is None and line["epsilon"] == {"0": None}
    back = read_metrics(tmp_path / "metrics.jsonl")[0]
    assert np.isnan(back.accuracy) and np.isnan(back.loss) and back.epsilon is not None and np.isnan(back.epsilon["0"])


def config_text(lr: float, seed: int, bits: str = "[32]", threads: int = 1) -> str:
    return (
        "dataset: {name: fashion_mnist, partition: {name: dirichlet}}\nmodel: {name: cnn}\n"
        "strategy: {name: fedavg, scheduler: {fraction: 0.1}}\n"
        f"fleet: {{speed: normal, bitwidths: {bits}}}\nclient: {{lr: {lr}}}\nsim: {{threads: {threads}}}\n"
        f"num_clients: 10\nseed: {seed}\n"
    )


def test_runs_that_differ_in_any_key_are_separate_rows_named_by_that_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    curve = [(0, 0.1), (10, 0.8)]
    write_run(tmp_path / "a", curve, config_text(0.05, seed=0))
    write_run(tmp_path / "b", curve, config_text(0.5, seed=0, threads=4))  # threads: how, not what, it ran
    write_run(tmp_path / "c", curve, config_text(0.5, seed=0, bits="[32, 8]"))
    write_run(tmp_path / "d", curve, config_text(0.05, seed=1))
    write_run(tmp_path / "e", curve, config_text(0.05, seed=1))  # the same run twice: not a second seed
    assert main([str(tmp_path), "--target", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "separated by: client.lr\n" in out  # a fleet's bitwidths are part of its setting
    rows = {
        (cells[4].strip(), cells[6].strip()): cells[7].strip()
        for cells in (line.split("|") for line in out.splitlines() if line.startswith("| fashion_mnist"))
    }
    assert rows == {
        ("normal", "fedavg (client.lr=0.05)"): "3 runs, 2 seeds",
        ("normal", "fedavg (client.lr=0.5)"): "1",
        ("normal, 32/8 bits", "fedavg"): "1",
    }
    assert "labelled by the keys in which they differ: client.lr." in (tmp_path / "report.md").read_text()


def test_a_server_runs_recorded_config_labels_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    write_run(state, [(0, 0.1), (5, 0.5)], None)
    (state / "config.yaml").write_text(
        "dataset: {name: synthetic, partition: {name: natural}}\nmodel: {name: logreg}\n"
        "strategy: {name: fedbuff}\nserver: {port: 5051, max_versions: 3}\nnum_clients: 30\nseed: 4\n"
    )
    [run] = load_runs(state)
    assert (run.dataset, run.model, run.strategy, run.num_clients, run.seed) == (
        "synthetic",
        "logreg",
        "fedbuff",
        30,
        4,
    )
    assert run.config == {"server.max_versions": "3"}  # the port is how it ran, not what


def metrics_line(version: int, accuracy: float, **extra: object) -> str:
    line = {
        "version": version,
        "virtual_time": 10.0 * version,
        "wall_time": 0.0,
        "accuracy": accuracy,
        "loss": 1.0,
        "bytes_up": 1_000_000_000 * version,
        "bytes_down": 500_000_000 * version,
        "updates_applied": version,
        "updates_dropped": 0,
    }
    return json.dumps(line | extra)


def test_metric_axis_bytes_and_epsilon_columns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """ProWD's mean over bitwidths, FedP3's personalised accuracy, rounds as the axis, GB sent against FedAvg's, and
    the largest epsilon of a private run."""
    config = "dataset: {{name: d, partition: {{name: p}}}}\nmodel: {{name: m}}\nstrategy: {{name: {}}}\n"
    config += "fleet: {{speed: normal, bitwidths: [4, 32], bitwidth_fractions: [0.5, 0.5]}}\nnum_clients: 4\n"
    lines = {  # (strategy, seed): lines
        ("fedavg", 0): [
            metrics_line(0, 0.1, accuracy_by_bitwidth={"4": 0.1}, personal_accuracy=0.2),
            metrics_line(1, 0.8, accuracy_by_bitwidth={"4": 0.4}, personal_accuracy=0.7),
        ],
        ("prowd", 0): [
            metrics_line(0, 0.1, accuracy_by_bitwidth={"4": 0.1}, personal_accuracy=0.2, epsilon={"0": 0.5}),
            metrics_line(1, 0.7, accuracy_by_bitwidth={"4": 0.7}, personal_accuracy=0.9, epsilon={"0": 1, "1": 3}),
        ],
    }
    for (strategy, seed), text in lines.items():
        run = tmp_path / "sweep" / strategy
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "config.yaml").write_text(config.format(strategy) + f"seed: {seed}\n")
        (run / "metrics.jsonl").write_text("\n".join(text) + "\n")
        if strategy == "prowd":  # a half-size run: a quarter of the bytes
            (run / "metrics.jsonl").write_text("\n".join(text).replace("1000000000", "250000000") + "\n")
    args = [str(tmp_path / "sweep"), "--out", str(tmp_path / "out")]
    assert main([*args, "--metric", "bitwidth_mean", "--axis", "rounds"]) == 0
    out = capsys.readouterr().out
    table = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("|")]
    header = [c.strip() for c in table[0]]
    assert header[8:11] == ["rounds to target", "final bitwidth_mean (%)", "GB sent"]
    assert header[11:] == ["epsilon", "rounds / fedcompass", "bytes / fedavg"]
    rows = {cells[5].strip(): [c.strip() for c in cells[3:]] for cells in table[2:]}
    # fedavg: (0.8 + 0.4) / 2 = 0.6 at round 1, the target; prowd: (0.7 + 0.7) / 2 = 0.7, also reached at round 1
    assert rows["fedavg"][0] == "normal, 4/32 bits at 50/50%"
    assert rows["fedavg"][4:] == ["60.00", "1.00", "60.00", "1.5", "—", "—", "1.00"]
    assert rows["prowd"][4:] == ["60.00", "1.00", "70.00", "0.75", "3.00", "—", "0.50"]
    assert (tmp_path / "out" / "bitwidth_mean_vs_rounds.png").stat().st_size > 10_000
    assert (tmp_path / "out" / "bitwidth_mean_vs_epsilon.png").stat().st_size > 10_000
    assert "![bitwidth_mean vs epsilon](bitwidth_mean_vs_epsilon.png)" in (tmp_path / "out" / "report.md").read_text()
    assert main([*args, "--metric", "personal_accuracy"]) == 0
    rows = {
        c[5].strip(): c[9].strip()
        for c in (line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines())
        if c and c[0].strip() == "d"
    }
    assert rows == {"fedavg": "70.00", "prowd": "90.00"}


def test_epsilon_points_put_private_rows_by_epsilon_and_leave_out_what_has_no_place(tmp_path: Path) -> None:
    """Each row's final value (mean, 95% CI) against its mean largest epsilon; rows without DP have none; a row
    mixing private and non-private seeds, or with an infinite epsilon, is left out; the plot draws them all."""
    [setting] = {run_of("fedavg", [0.5]).setting}

    def row(name: str, finals: tuple[float, ...], epsilons: tuple[float | None, ...]) -> Summary:
        n = len(finals)
        return Summary(setting, name, 0.5, (None,) * n, finals, (1.0,) * n, epsilons, None, None, tuple(range(n)))

    summaries = [
        row("eps8", (0.70, 0.74, 0.72), (8.0, 7.9, 8.1)),
        row("no dp", (0.80, 0.82), (None, None)),
        row("eps1", (0.50, 0.52), (1.0, 0.98)),
        row("mixed", (0.6, 0.6), (1.0, None)),
        row("unbounded", (0.7,), (float("inf"),)),
        row("almost no noise", (0.83, 0.85), (1.9e8, 1.9e8)),  # a level line in the plot, above EPSILON_AXIS_LIMIT
    ]
    points = epsilon_points(summaries)
    assert [p.strategy for p in points] == ["eps1", "eps8", "almost no noise", "no dp"]
    eps1, eps8, _, plain = points
    assert eps1.epsilon == pytest.approx(0.99) and eps1.value == pytest.approx(0.51)
    assert eps8.epsilon == pytest.approx(8.0) and eps8.value == pytest.approx(0.72)
    assert eps8.half_width == pytest.approx(4.302653 * 0.02 / 3**0.5, rel=1e-5)  # t(0.975, 2) * sd / sqrt(n)
    assert plain.epsilon is None and plain.value == pytest.approx(0.81)
    plot_epsilon(points, tmp_path / "privacy.png", "personal_accuracy")
    assert (tmp_path / "privacy.png").read_bytes().startswith(b"\x89PNG")
