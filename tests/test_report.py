"""`normbench report`: tables from hand-made summaries (means, stds, missing, diverged, running,
corrupt files), the md/csv/json files, the PNG plot and the one-line errors."""
from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

import pytest
from typer.testing import CliRunner

from normbench.cli import app
from normbench.report.build import build_report
from normbench.report.plots import plot
from normbench.report.render import parse_formats, to_csv, to_markdown
from normbench.report.runs import collect
from normbench.errors import UserError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(root: Path, kind: str, batch: int, seed: int, status: str = "completed", acc=None,
              clip: str = "none", ips: float = 1000.0, **config_extra) -> Path:
    """A run folder with a summary.json shaped like the engine's."""
    config = {"name": f"{kind}-b{batch}", "seed": seed, "model": {"arch": "resnet20", "width": 1.0},
              "norm": {"kind": kind, "groups": 8}, "clip": {"mode": clip}, "train": {"batch_size": batch, "epochs": 2},
              "optim": {"lr": 0.1}, "log": {"out_dir": str(root)}}
    for dotted, value in config_extra.items():
        section, key = dotted.split("__")
        config.setdefault(section, {})[key] = value
    run = root / f"{kind}{'+' + clip if clip != 'none' else ''}-b{batch}-s{seed}-{abs(hash(str(config))) % 10**8:08d}"
    run.mkdir(parents=True)
    summary = {"summary_version": 1, "status": status, "run_name": config["name"],
               "final_test_acc": acc if status == "completed" else None,
               "best_test_acc": (acc + 0.01) if acc is not None else None,
               "steps": 100, "epochs": 2.0, "wall_time_s": 20.0, "images_per_s": ips, "config": config}
    (run / "summary.json").write_text(json.dumps(summary))
    return run


@pytest.fixture
def runs_dir(tmp_path) -> Path:
    root = tmp_path / "sweep"
    write_run(root, "bn", 2, 0, acc=0.50, ips=100)
    write_run(root, "bn", 2, 1, acc=0.60, ips=300)
    write_run(root, "bn", 8, 0, acc=0.80)
    write_run(root, "bn", 32, 0, acc=0.90)
    write_run(root, "bn", 32, 1, acc=0.92)
    write_run(root, "gn", 2, 0, acc=0.80)
    write_run(root, "gn", 2, 1, acc=0.82)
    write_run(root, "gn", 32, 0, acc=0.88)  # seed 1 missing; gn b8 missing altogether
    write_run(root, "none", 2, 0, status="diverged", clip="agc")
    write_run(root, "none", 2, 1, status="diverged", clip="agc")
    write_run(root, "none", 32, 0, acc=0.70, clip="agc")
    write_run(root, "none", 32, 1, status="diverged", clip="agc")
    write_run(root, "none", 8, 0, status="failed", clip="agc")
    # a run still training: config.yaml + metrics, no summary yet
    running = root / "none+agc-b8-s1-running"
    running.mkdir()
    (running / "config.yaml").write_text(
        "name: x\nseed: 1\nnorm: {kind: none}\nclip: {mode: agc}\ntrain: {batch_size: 8}\nmodel: {arch: resnet20}\n")
    (running / "metrics.jsonl").write_text("{}\n")
    # a corrupt summary and an atomic-write temp file: skipped
    bad = root / "bad-run"
    bad.mkdir()
    (bad / "summary.json").write_text('{"status": "compl')
    (root / "gn-b2-s0-tmp").mkdir()
    (root / "gn-b2-s0-tmp" / ".summary.json.123.tmp").write_text("{")
    return root


def test_tables_means_stds_missing_and_marks(runs_dir):
    warnings = []
    runs = collect(runs_dir, warn=warnings.append)
    assert len(runs) == 14 and len(warnings) == 1 and "bad-run" in warnings[0]
    report = build_report(runs, metric="final")
    acc = report.tables[0]
    assert acc.methods == ["bn", "gn", "none+agc"]
    assert acc.batch_sizes == [2, 8, 32]
    bn2 = acc.cell("bn", 2)
    assert bn2.mean == pytest.approx(55.0) and bn2.std == pytest.approx(statistics.stdev([50.0, 60.0]))
    assert bn2.half == pytest.approx(12.7062 * statistics.stdev([50.0, 60.0]) / 2 ** 0.5, rel=1e-4)
    assert bn2.text == "55.00 ± 63.53 (n=2)"  # 95% t-interval, t(1) = 12.706
    assert acc.cell("gn", 32).text == "88.00 (n=1)"
    assert acc.cell("gn", 8).missing and acc.cell("gn", 8).text == "missing"
    assert acc.cell("none+agc", 2).text == "diverged (2/2)"
    assert acc.cell("none+agc", 32).text == "70.00 (n=1) +1 div"
    assert acc.cell("none+agc", 8).text == "failed (1/2)"
    assert acc.cell("none+agc", 8).n_failed == 1 and acc.cell("none+agc", 8).n_running == 1
    # no best mark anywhere: at batch 2 gn's higher mean has an interval that overlaps bn's;
    # batch 8 holds one cell, batch 32 single-seed cells (no interval)
    gn2, bn2ci = acc.cell("gn", 2).ci, acc.cell("bn", 2).ci
    assert gn2.mean > bn2ci.mean and gn2.lo < bn2ci.hi
    assert not any(c.best for c in acc.cells.values())
    speed = next(t for t in report.tables if t.key == "images_per_s")
    assert speed.cell("bn", 2).mean == pytest.approx(200.0)
    md = to_markdown(report)
    assert "| GN | 81.00 ± 12.71 (n=2) | missing | 88.00 (n=1) |" in md
    rows = list(csv.DictReader(io.StringIO(to_csv(report))))
    row = next(r for r in rows if r["table"] == "test_accuracy" and r["method"] == "bn" and r["batch_size"] == "2")
    assert float(row["mean"]) == pytest.approx(55.0) and row["n"] == "2" and row["best"] == "False"


def test_interrupted_runs_are_named_not_running(tmp_path):
    """A run stopped by a signal (status interrupted, resumable) says so, apart from a live one."""
    write_run(tmp_path, "ln", 4, 0, status="interrupted")
    write_run(tmp_path, "ln", 4, 1, acc=0.40)
    write_run(tmp_path, "ln", 2, 0, status="interrupted")
    acc = build_report(collect(tmp_path), metric="final").tables[0]
    assert acc.cell("ln", 2).text == "interrupted" and acc.cell("ln", 2).n_running == 0
    assert acc.cell("ln", 4).text == "40.00 (n=1) +1 interrupted"


def test_error_best_metric_and_method_split(tmp_path):
    root = tmp_path / "runs"
    for seed, delta in ((0, -0.0001), (1, 0.0001)):  # two seeds each, tight intervals
        write_run(root, "gn", 4, seed, acc=0.70 + delta, norm__groups=8)
        write_run(root, "gn", 4, seed, acc=0.75 + delta, norm__groups=16)
        write_run(root, "bn", 4, seed, acc=0.60 + delta)
    report = build_report(collect(root), metric="best", error=True)
    acc = report.tables[0]
    assert acc.key == "test_error"
    assert acc.methods == ["bn", "gn groups=16", "gn groups=8"]
    assert acc.cell("gn groups=16", 4).mean == pytest.approx(24.0)  # best = 0.76 -> 24% error
    assert acc.cell("gn groups=16", 4).best  # lowest error


def test_a_row_trained_for_another_budget_names_its_budget_on_every_row(tmp_path):
    """Controls with BN at 18 epochs beside no-norm runs at 6: no row is left to look like the
    other protocol, though no two runs of one norm and batch differ in epochs."""
    write_run(tmp_path, "bn", 128, 0, acc=0.9, train__epochs=18)
    write_run(tmp_path, "none", 128, 0, acc=0.5, train__epochs=6)
    write_run(tmp_path, "frn", 2, 0, acc=0.6, train__epochs=6, norm__frn_activation="relu")
    report = build_report(collect(tmp_path))
    acc = report.tables[0]
    assert sorted(acc.methods) == ["bn epochs=18", "frn epochs=6", "none epochs=6"]
    labels = {r.method: r.label for r in report.runs}
    assert labels["bn epochs=18"] == "BN (epochs=18)"
    assert labels["none epochs=6"] == "no norm, no clipping (epochs=6)"
    assert labels["frn epochs=6"] == "FRN + ReLU (epochs=6)"
    one_budget = tmp_path / "one"
    write_run(one_budget, "bn", 128, 0, acc=0.9, train__epochs=6)
    write_run(one_budget, "none", 2, 0, acc=0.5, train__epochs=6)
    assert sorted(build_report(collect(one_budget)).tables[0].methods) == ["bn", "none"]


def test_cli_files_plot_and_errors(runs_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "out"
    png = tmp_path / "fig" / "acc.png"
    res = runner.invoke(app, ["report", str(runs_dir), "--format", "md,csv", "-f", "json", "--out", str(out),
                              "--plot", str(png)])
    assert res.exit_code == 0, res.output
    assert "Test accuracy (%)" in res.output and "diverged (2/2)" in res.output
    for name in ("report.md", "report.csv", "report.json"):
        assert (out / name).is_file()
    body = json.loads((out / "report.json").read_text())
    cell = next(c for c in body["tables"][0]["cells"] if c["method"] == "gn" and c["batch_size"] == 2)
    assert cell["values"] == [80.0, 82.0] and cell["best"] is False  # its interval overlaps bn's
    assert cell["ci95_half_width"] == pytest.approx(12.7062, rel=1e-4) and cell["name"] == "GN"
    assert png.read_bytes()[:8] == PNG_MAGIC

    empty = tmp_path / "empty"
    empty.mkdir()
    for args in (["report", str(empty)], ["report", str(tmp_path / "nope")],
                 ["report", str(runs_dir), "--format", "xls"], ["report", str(runs_dir), "--metric", "last"],
                 ["report", str(runs_dir), "--plot", str(tmp_path / "a.jpg")]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert res.output.count("\n") == 1 and res.output.startswith("normbench: error:"), res.output


def test_parse_formats():
    assert parse_formats(["md,csv", "json", "md"]) == ["md", "csv", "json"]
    with pytest.raises(UserError, match="allowed: md, csv, json"):
        parse_formats(["mdx"])


def test_plot_marks_diverged(runs_dir, tmp_path):
    """A cell whose runs all diverged or failed (no norm + AGC at batch 2 and 8) is a cross at
    its batch size, named in the legend; a cell with a completed run (batch 32) is not."""
    from normbench.report.plots import accuracy_figure

    report = build_report(collect(runs_dir), error=True)
    path = plot(report, tmp_path / "err.png")
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 10_000
    ax = accuracy_figure(report).axes[0]
    crosses = [list(line.get_xdata()) for line in ax.lines if line.get_marker() == "x" and len(line.get_xdata())]
    assert sorted(crosses) == [[2], [8]]
    assert "diverged / failed" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_method_colours_depend_on_the_set_of_methods_not_their_order():
    from normbench.report.plots import method_colours

    a = method_colours(["gn", "bn", "none+agc"])
    assert a == method_colours(["none+agc", "bn", "gn", "bn"])
    assert len(set(a.values())) == 3
    eleven = ["bn", "ghost_bn", "brn", "ln", "gn", "in", "ws_gn", "frn", "evonorm_s0", "nf", "none+agc"]
    assert len(set(method_colours(eleven).values())) == 11  # beyond tab10: tab20, no repeats


def test_analysis_tables_leave_out_methods_without_the_measurement(tmp_path):
    """A BN-only figure (the train/eval gap) lists BN, not GN rows full of dashes."""
    bn = write_run(tmp_path, "bn", 2, 0, acc=0.5)
    write_run(tmp_path, "gn", 2, 0, acc=0.4)
    summary = json.loads((bn / "summary.json").read_text())
    summary["train_eval_gap"] = -0.04
    (bn / "summary.json").write_text(json.dumps(summary))
    report = build_report(collect(tmp_path), extra_columns=[("train_eval_gap", "gap")])
    gap = next(t for t in report.tables if t.key == "train_eval_gap")
    assert gap.analysis and gap.methods == ["bn"] and gap.cell("bn", 2).mean == pytest.approx(-0.04)
    assert report.tables[0].methods == ["bn", "gn"]  # the accuracy table keeps every method


def edit_summary(run: Path, change) -> Path:
    """Rewrite a run's summary.json through ``change(summary) -> new content`` (any JSON)."""
    path = run / "summary.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    return path


def without(key):
    return lambda s: {k: v for k, v in s.items() if k != key}


def setting(dotted, value):
    def change(s):
        node = s
        *parents, last = dotted.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
        return s
    return change


def test_completed_run_without_accuracy_is_named_and_left_out_of_n(tmp_path):
    """Three completed seeds, one without final_test_acc: the mean is over two, the cell says
    n=2 and +1 no value, and one warning names the summary file and the run."""
    write_run(tmp_path, "bn", 8, 0, acc=0.5)
    write_run(tmp_path, "bn", 8, 1, acc=0.6)
    bad = edit_summary(write_run(tmp_path, "bn", 8, 2, acc=0.7), without("final_test_acc"))
    warnings = []
    runs = collect(tmp_path, warn=warnings.append)
    assert len(runs) == 3 and len(warnings) == 1
    assert str(bad) in warnings[0] and f"run {bad.parent.name} left out" in warnings[0]
    assert "final_test_acc is missing" in warnings[0] and "\n" not in warnings[0]
    cell = build_report(runs).tables[0].cell("bn", 8)
    assert cell.n == 2 and cell.mean == pytest.approx(55.0)
    assert cell.text == "55.00 ± 63.53 (n=2) +1 no value"
    best = build_report(runs, metric="best").tables[0].cell("bn", 8)
    assert best.n == 3  # the run still has its best accuracy
    edit_summary(bad.parent, setting("final_test_acc", None))
    warnings.clear()
    collect(tmp_path, warn=warnings.append)
    assert len(warnings) == 1 and "final_test_acc is null in a completed run" in warnings[0]

    res = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert f"normbench: warning: {bad}: final_test_acc is null" in res.output
    assert "(n=2) +1 no value" in res.output


def test_only_completed_runs_must_have_an_accuracy(tmp_path):
    write_run(tmp_path, "bn", 8, 0, status="diverged")  # final_test_acc null: as the engine writes it
    write_run(tmp_path, "bn", 8, 1, acc=0.5)
    warnings = []
    runs = collect(tmp_path, warn=warnings.append)
    assert warnings == [] and build_report(runs).tables[0].cell("bn", 8).text == "50.00 (n=1) +1 div"


MALFORMED = {  # a summary the report cannot use as a run: skipped, named
    "batch size is a word": (setting("config.train.batch_size", "eight"), 'train.batch_size is "eight"'),
    "batch size zero": (setting("config.train.batch_size", 0), "train.batch_size is 0"),
    "batch size a float": (setting("config.train.batch_size", 8.5), "train.batch_size is 8.5"),
    "no batch size": (lambda s: {**s, "config": {**s["config"], "train": {}}}, "train.batch_size is missing"),
    "summary is a list": (lambda s: [s], "an array, not a JSON object"),
    "summary is a number": (lambda s: 3, "a number, not a JSON object"),
    "config is null": (setting("config", None), "config is null"),
    "status is null": (setting("status", None), "status is null"),
    "unknown status": (setting("status", "done"), 'status is "done"'),
    "no status": (without("status"), "missing status/config"),
    "train is a list": (setting("config.train", [8]), "config.train is [8]"),
    "norm is a string": (setting("config.norm", "bn"), 'config.norm is "bn"'),
    "norm kind a number": (setting("config.norm.kind", 3), "norm.kind is 3"),
    "clip is a string": (setting("config.clip", "agc"), 'config.clip is "agc"'),
    "model is null": (setting("config.model", None), "config.model is null"),
    "seed is a word": (setting("config.seed", "one"), 'seed is "one"'),
}
BAD_VALUES = {  # a run kept, one value left out of its table, named
    "accuracy a string": ("final_test_acc", "0.7", 'final_test_acc is "0.7", not a number', "test accuracy"),
    "accuracy a bool": ("final_test_acc", True, "final_test_acc is true, not a number", "test accuracy"),
    "accuracy a dict": ("final_test_acc", {"acc": 0.7}, "final_test_acc is {", "test accuracy"),
    "throughput a string": ("images_per_s", "fast", 'images_per_s is "fast"', "throughput"),
    "wall time a list": ("wall_time_s", [1], "wall_time_s is [1]", "seconds-per-epoch"),
    "gap a string": ("train_eval_gap", "big", 'train_eval_gap is "big"', "'train_eval_gap'"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_summary_is_one_warning_and_left_out(tmp_path, case):
    change, words = MALFORMED[case]
    write_run(tmp_path, "bn", 8, 0, acc=0.5)
    bad = edit_summary(write_run(tmp_path, "bn", 8, 1, acc=0.7), change)
    warnings = []
    runs = collect(tmp_path, warn=warnings.append)
    assert len(warnings) == 1, warnings
    assert str(bad) in warnings[0] and words in warnings[0] and "\n" not in warnings[0]
    assert [r.path for r in runs] != [] and all(r.path != bad.parent for r in runs)
    cell = build_report(runs).tables[0].cell("bn", 8)
    assert cell.n == 1 and cell.runs == [str(runs[0].path)]


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_non_numeric_value_is_one_warning_and_left_out_of_its_table(tmp_path, case):
    key, value, words, table = BAD_VALUES[case]
    edit_summary(write_run(tmp_path, "bn", 8, 0, acc=0.5), setting("train_eval_gap", -0.02))
    bad = edit_summary(write_run(tmp_path, "bn", 8, 1, acc=0.7), setting(key, value))
    warnings = []
    runs = collect(tmp_path, warn=warnings.append)
    assert len(runs) == 2 and len(warnings) == 1, warnings
    assert str(bad) in warnings[0] and words in warnings[0] and table in warnings[0]
    assert f"run {bad.parent.name} left out of" in warnings[0] and "\n" not in warnings[0]
    report = build_report(runs, extra_columns=[("train_eval_gap", "gap")])
    n = {t.key: t.cell("bn", 8).n for t in report.tables}
    expected = {"final_test_acc": "test_accuracy", "images_per_s": "images_per_s", "wall_time_s": "s_per_epoch"}
    assert n[expected.get(key, key)] == 1
    assert n["test_accuracy"] == (1 if key == "final_test_acc" else 2)


def test_report_cli_over_every_malformed_summary_at_once(tmp_path):
    """No traceback from any of them, with every file and plot written: one warning per file."""
    good = write_run(tmp_path, "bn", 8, 0, acc=0.5)
    edit_summary(good, setting("train_eval_gap", -0.02))
    (good / "metrics.jsonl").write_text('{"step": 3, "probe/loss_range": 0.1, "probe/beta": 2.0}\n'
                                        '{"probe/loss_range": 0.2}\n["probe/"]\n"probe/"\n'
                                        '{"step": 5, "epoch": "x", "probe/loss_range": 0.3, "probe/beta": 1.0}\n')
    bad = []
    for i, case in enumerate(sorted(MALFORMED)):
        bad.append(edit_summary(write_run(tmp_path, "bn", 8, 10 + i, acc=0.6), MALFORMED[case][0]))
    for i, case in enumerate(sorted(BAD_VALUES)):
        key, value, _, _ = BAD_VALUES[case]
        bad.append(edit_summary(write_run(tmp_path, "gn", 8, 10 + i, acc=0.6), setting(key, value)))
    nan = write_run(tmp_path, "gn", 8, 99, acc=0.6)
    (nan / "summary.json").write_text((nan / "summary.json").read_text().replace('"final_test_acc": 0.6',
                                                                                 '"final_test_acc": NaN'))
    bad.append(nan / "summary.json")
    res = CliRunner().invoke(app, ["report", str(tmp_path), "-f", "md,csv,json", "--out", str(tmp_path / "out"),
                                   "--plot", str(tmp_path / "out" / "acc.png")])
    assert res.exit_code == 0 and res.exception is None, res.output
    assert "Traceback" not in res.output
    warnings = [line for line in res.output.splitlines() if line.startswith("normbench: warning:")]
    assert len(warnings) == len(bad)
    for path in bad:
        assert sum(str(path) in w for w in warnings) == 1, path
    assert "final_test_acc is NaN" in res.output
    assert (tmp_path / "out" / "acc.png").read_bytes()[:8] == PNG_MAGIC
    assert (tmp_path / "out" / "analysis_bn_gap.png").is_file()
    body = json.loads((tmp_path / "out" / "report.json").read_text())
    gn = next(c for c in body["tables"][0]["cells"] if c["method"] == "gn")
    assert gn["n"] == 3 and gn["text"].endswith("(n=3) +4 no value")  # a string, a bool, a dict, NaN
    assert (tmp_path / "out" / "analysis_probe.png").is_file()  # from the two probe records with a step


# ----------------------------------------------------------------------------- study tables and plots


def with_summary(run: Path, **values) -> Path:
    """Add summary keys (the analysis measurements) to a run written by write_run."""
    edit_summary(run, lambda s: {**s, **values})
    return run


def with_curve(run: Path, accs: dict) -> Path:
    """A metrics.jsonl with a training record and one test/acc record per epoch."""
    lines = [{"step": 1, "epoch": 0, "train/loss": 2.3}]
    lines += [{"epoch": e, "step": 10 * e, "test/acc": a, "test/loss": 1.0} for e, a in accs.items()]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run


def test_t_interval_matches_hand_computed_values():
    from normbench.report.stats import interval, t_quantile, t_two_sided_prob

    # two-sided 95% Student t quantiles, from printed tables
    for df, t in ((1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262), (29, 2.045), (120, 1.980)):
        assert t_quantile(df) == pytest.approx(t, abs=5e-4), df
    assert t_two_sided_prob(1.959964, 100000) == pytest.approx(0.95, abs=1e-4)
    # n=2: mean 55, s = 7.0711, half = 12.706 * s / sqrt(2) = 63.53
    ci = interval([50.0, 60.0])
    assert ci.mean == 55.0 and ci.n == 2 and ci.half == pytest.approx(63.531, abs=1e-3)
    # n=3: values 1, 2, 3: s = 1, half = 4.303 / sqrt(3) = 2.484
    assert interval([1.0, 2.0, 3.0]).half == pytest.approx(2.4843, abs=1e-3)
    assert interval([7.0]).half is None and interval([]) is None


def test_accuracy_cells_show_the_interval_and_single_seeds_none(tmp_path):
    for seed, acc in enumerate((0.80, 0.82, 0.84)):
        write_run(tmp_path, "gn", 8, seed, acc=acc)
    write_run(tmp_path, "bn", 8, 0, acc=0.9)
    report = build_report(collect(tmp_path))
    acc = report.tables[0]
    assert acc.cell("gn", 8).text == "82.00 ± 4.97 (n=3)"  # s = 2, 4.303 * 2 / sqrt(3) = 4.968
    assert acc.cell("bn", 8).text == "90.00 (n=1)"
    assert "95% confidence interval" in acc.note and "Student t" in acc.note and "entirely above" in acc.note
    assert "95% confidence interval" in to_markdown(report)


def test_best_mark_needs_an_interval_clear_of_every_other(tmp_path):
    # batch 2: bn 80/82 (81 ± 12.7) vs gn 70/71 (70.5 ± 6.35): higher mean, overlapping -> no mark
    # batch 8: bn 80.0/80.2 (80.1 ± 1.27) vs gn 70.0/70.2: clear -> bn marked
    # batch 32: as batch 8 plus ln 60/100 (80 ± 254): ln's interval reaches over bn's -> no mark
    for seed, (a, b) in enumerate(((0.80, 0.70), (0.82, 0.71))):
        write_run(tmp_path, "bn", 2, seed, acc=a)
        write_run(tmp_path, "gn", 2, seed, acc=b)
    for batch in (8, 32):
        for seed, (a, b) in enumerate(((0.800, 0.700), (0.802, 0.702))):
            write_run(tmp_path, "bn", batch, seed, acc=a)
            write_run(tmp_path, "gn", batch, seed, acc=b)
    write_run(tmp_path, "ln", 32, 0, acc=0.6)
    write_run(tmp_path, "ln", 32, 1, acc=1.0)
    acc = build_report(collect(tmp_path)).tables[0]
    assert acc.cell("bn", 2).mean > acc.cell("gn", 2).mean
    assert not acc.cell("bn", 2).best and not acc.cell("gn", 2).best
    assert acc.cell("bn", 8).best and not acc.cell("gn", 8).best
    assert not any(acc.cell(m, 32).best for m in ("bn", "gn", "ln"))
    err = build_report(collect(tmp_path), error=True).tables[0]  # lowest error, same rule
    assert err.cell("bn", 8).best and not err.cell("bn", 2).best
    assert "**80.10 ± 1.27 (n=2)** \\*" in to_markdown(build_report(collect(tmp_path)))


def test_batch_effect_pairs_only_seeds_present_at_both_batch_sizes(tmp_path):
    # bn: batch 2 seeds 0, 1, 2; batch 32 seeds 0, 1, 3 -> pairs 0 and 1 only
    for seed, acc in ((0, 0.50), (1, 0.56), (2, 0.10)):
        write_run(tmp_path, "bn", 2, seed, acc=acc)
    for seed, acc in ((0, 0.60), (1, 0.62), (3, 0.99)):
        write_run(tmp_path, "bn", 32, seed, acc=acc)
    write_run(tmp_path, "bn", 8, 0, acc=0.58)
    for seed in (0, 1):
        write_run(tmp_path, "gn", 2, seed, acc=0.40 + 0.01 * seed)
    write_run(tmp_path, "gn", 32, 0, acc=0.41)
    write_run(tmp_path, "gn", 32, 1, status="diverged")
    report = build_report(collect(tmp_path))
    effect = next(t for t in report.tables if t.key == "batch_effect")
    assert effect.batch_sizes == [2] and effect.column(2) == "b=2 − b=32"
    bn = effect.cell("bn", 2)
    assert bn.values == pytest.approx([-10.0, -6.0]) and bn.paired_seeds == [0, 1]
    # mean -8, s = 2.828, half = 12.706 * 2.828 / sqrt(2) = 25.41; seeds 2 and 3 unpaired
    assert bn.text == "-8.00 ± 25.41 (n=2) +2 unpaired"
    gn = effect.cell("gn", 2)
    assert gn.values == pytest.approx([-1.0]) and gn.text == "-1.00 (n=1) +1 div +1 unpaired"
    other = build_report(collect(tmp_path), small_batch=8, ref_batch=32)
    cell = next(t for t in other.tables if t.key == "batch_effect").cell("bn", 8)
    assert cell.values == pytest.approx([-2.0]) and cell.paired_seeds == [0]
    with pytest.raises(UserError, match="--ref-batch: no run has batch size 64"):
        build_report(collect(tmp_path), ref_batch=64)
    assert "| BN | -8.00 ± 25.41 (n=2) +2 unpaired |" in to_markdown(report)


def test_display_names_and_styles_in_tables(tmp_path):
    write_run(tmp_path, "none", 2, 0, acc=0.3, clip="agc", clip__agc_lambda=0.16)
    write_run(tmp_path, "none", 2, 0, acc=0.3, clip="none")
    write_run(tmp_path, "none", 2, 0, acc=0.3, clip="dynamic")
    write_run(tmp_path, "frn", 2, 0, acc=0.4, norm__frn_activation="relu")
    write_run(tmp_path, "frn", 2, 0, acc=0.4, norm__frn_activation="tlu")
    for kind in ("bn", "ghost_bn", "brn", "ln", "in", "ws_gn", "evonorm_s0", "nf"):
        write_run(tmp_path, kind, 2, 0, acc=0.5)
    runs = collect(tmp_path)
    md = to_markdown(build_report(runs))
    for name in ("BN", "Ghost BN (ghost 16)", "Batch Renorm", "LN", "IN", "WS + GN", "EvoNorm-S0", "NF-ResNet",
                 "no norm + AGC (λ 0.16)", "no norm, no clipping", "no norm + dynamic clipping", "FRN + ReLU",
                 "FRN + TLU"):
        assert f"\n| {name} | " in md, name
    assert "| none+agc |" not in md and "frn_activation" not in md
    from normbench.report.plots import method_styles

    style = method_styles(runs)
    assert len(style) == 13 and len(set(style.values())) == 13
    assert len({s.colour for s in style.values()}) == 13 and len({s.marker for s in style.values()}) == 13


def _lab(colour: str) -> tuple:
    """sRGB hex -> CIELAB (D65)."""
    lin = [(c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4)
           for c in (int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5))]
    xyz = [sum(w * c for w, c in zip(row, lin)) / n for row, n in (((0.4124, 0.3576, 0.1805), 0.95047),
                                                                    ((0.2126, 0.7152, 0.0722), 1.0),
                                                                    ((0.0193, 0.1192, 0.9505), 1.08883))]
    f = [v ** (1 / 3) if v > 0.008856 else 7.787 * v + 16 / 116 for v in xyz]
    return 116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])


def test_fixed_styles_differ_in_colour_and_marker():
    import itertools
    import math

    from normbench.report.styles import STYLES

    assert len({s.marker for s in STYLES.values()}) == len(STYLES)
    closest = min(math.dist(_lab(a.colour), _lab(b.colour)) for a, b in itertools.combinations(STYLES.values(), 2))
    assert closest >= 25.0  # no two methods in near-identical hues


def test_protocol_in_titles_is_read_from_the_summaries(tmp_path):
    from normbench.report.styles import protocol

    for batch, seeds in ((2, 4), (8, 4), (32, 2), (128, 2)):
        for seed in range(seeds):
            for kind in ("bn", "gn"):
                write_run(tmp_path, kind, batch, seed, acc=0.5, train__epochs=6)
    write_run(tmp_path, "gn", 32, 2, status="diverged", train__epochs=6)
    summaries = [r.summary for r in collect(tmp_path)]
    assert protocol(summaries) == "ResNet-20 / CIFAR-10, 6 epochs, 4/4/2/2 seeds at batch 2/8/32/128"
    write_run(tmp_path, "ln", 2, 0, acc=0.5, train__epochs=6)
    assert protocol([r.summary for r in collect(tmp_path)]).endswith(", 1–4/4/2/2 seeds at batch 2/8/32/128")


def test_curves_plot_is_written_from_the_metrics(tmp_path):
    from normbench.report.plots import curves

    runs_root = tmp_path / "runs"
    with_curve(write_run(runs_root, "bn", 2, 0, acc=0.5), {1: 0.30, 2: 0.50})
    with_curve(write_run(runs_root, "bn", 2, 1, acc=0.6), {1: 0.40, 2: 0.60})
    with_curve(write_run(runs_root, "gn", 2, 0, acc=0.5), {1: 0.20, 2: 0.50})
    with_curve(write_run(runs_root, "gn", 2, 1, acc=0.5), {1: 0.30})  # epoch 2 missing: not averaged
    with_curve(write_run(runs_root, "bn", 32, 0, acc=0.7), {1: 0.70})
    data = curves(build_report(collect(runs_root)).runs)
    assert [v for p in data[2]["bn"] for v in p] == pytest.approx([1, 35, 30, 40, 2, 55, 50, 60])
    assert [v for p in data[2]["gn"] for v in p] == pytest.approx([1, 25, 20, 30])
    assert [v for p in data[32]["bn"] for v in p] == pytest.approx([1, 70, 70, 70])
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["report", str(runs_root), "--plot", str(out / "accuracy.png")])
    assert res.exit_code == 0, res.output
    assert (out / "accuracy_curves.png").read_bytes()[:8] == PNG_MAGIC
    assert f"wrote {out / 'accuracy_curves.png'}" in res.output


def test_curves_legend_names_every_method_inside_the_figure(tmp_path):
    """Eight methods at one batch size: a one-panel figure whose legend must wrap to fit."""
    from normbench.report.plots import curves_figure

    kinds = ("bn", "gn", "ln", "in", "frn", "ws_gn", "nf", "none")
    for kind in kinds:
        with_curve(write_run(tmp_path, kind, 2, 0, acc=0.5, clip="agc" if kind == "none" else "none"),
                   {1: 0.3, 2: 0.5})
    report = build_report(collect(tmp_path))
    fig = curves_figure(report)
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    (legend,) = fig.legends
    assert len(legend.get_texts()) == len(kinds)
    box, frame = legend.get_window_extent(renderer), fig.bbox
    assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
    panel = fig.axes[0].get_tightbbox(renderer)
    assert box.y1 <= panel.y0  # below the panel's axis label, not over it


def test_no_curves_plot_from_runs_evaluated_once(tmp_path):
    """One-epoch runs have a point each, no curve: no accuracy_curves file, no 'wrote' line."""
    for kind in ("bn", "gn"):
        with_curve(write_run(tmp_path / "runs", kind, 2, 0, acc=0.5, train__epochs=1), {1: 0.5})
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["report", str(tmp_path / "runs"), "--plot", str(out / "accuracy.png")])
    assert res.exit_code == 0, res.output
    assert (out / "accuracy.png").is_file() and not (out / "accuracy_curves.png").exists()
    assert "accuracy_curves" not in res.output


def test_fixed_probe_table_leaves_out_lr_mode_runs(tmp_path):
    from normbench.report.analysis_plots import probe_runs

    fixed = {"probe_mode": "fixed", "probe_count": 20, "probe_beta_mean": 1.0}
    for seed, beta in ((0, 10.0), (1, 12.0)):
        with_summary(write_run(tmp_path, "bn", 8, seed, acc=0.5, analysis__probe_mode="fixed"),
                     probe_beta_median=beta, probe_linearity_median=1.0, **fixed)
    with_summary(write_run(tmp_path, "gn", 8, 0, acc=0.5, analysis__probe_mode="fixed"),
                 probe_beta_median=3.0, probe_linearity_median=0.9, **fixed)
    lr = [with_summary(write_run(tmp_path, kind, 8, 5, acc=0.5, analysis__probe_mode="lr"),
                       probe_beta_median=999.0, probe_beta_mean=999.0, probe_count=4) for kind in ("bn", "ln")]
    probe = {"probe/loss_range": 0.1, "probe/loss_min": 2.0, "probe/loss_max": 2.1, "probe/grad_pred": 0.5,
             "probe/grad_pred_min": 0.2, "probe/beta": 2.0}
    for run in lr:
        (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "epoch": s / 30, **probe}) + "\n"
                                                   for s in (3, 6)))
    fixed_dir = next(p for p in tmp_path.iterdir() if p.name.startswith("gn-b8"))
    (fixed_dir / "metrics.jsonl").write_text(json.dumps({"step": 3, "epoch": 0.1, **probe}) + "\n")
    runs = collect(tmp_path)
    report = build_report(runs, extra_columns=[("probe_beta_mean", "probe beta (mean)")])
    beta = next(t for t in report.tables if t.key == "probe_beta_fixed")
    assert beta.methods == ["bn", "gn"]  # ln probed in lr mode only
    assert beta.cell("bn", 8).values == [10.0, 12.0] and beta.cell("bn", 8).text == "11.00 ± 12.71 (n=2)"
    assert beta.cell("gn", 8).values == [3.0]
    lin = next(t for t in report.tables if t.key == "probe_linearity_fixed")
    assert lin.cell("gn", 8).values == [0.9]
    lr_table = next(t for t in report.tables if t.key == "probe_beta_mean")
    assert lr_table.cell("bn", 8).values == [999.0] and lr_table.methods == ["bn", "ln"]
    rows = probe_runs([{**r.summary, "_dir": str(r.path)} for r in runs])
    assert sorted(rows[8]) == ["BN", "LN"]  # the lr-mode probe plots leave the fixed-mode gn run out
    from normbench.report.analysis_plots import plots

    paths = plots([{**r.summary, "_dir": str(r.path)} for r in runs], tmp_path / "plots")
    assert (tmp_path / "plots" / "analysis_probe_fixed.png") in paths


def test_batch_statistics_table_and_units_in_csv(tmp_path):
    for seed in (0, 1):
        with_summary(write_run(tmp_path, "bn", 2, seed, acc=0.5 + 0.01 * seed),
                     test_acc_eval_mode=0.5 + 0.01 * seed, test_acc_train_mode=0.45, test_acc_precise_bn=0.52,
                     train_eval_gap=-0.05 - 0.01 * seed)
        with_summary(write_run(tmp_path, "bn", 32, seed, acc=0.6), test_acc_eval_mode=0.6,
                     test_acc_train_mode=0.58, train_eval_gap=-0.02)
        write_run(tmp_path, "gn", 2, seed, acc=0.4)
    from normbench.report.build import analysis_columns

    report = build_report(collect(tmp_path), extra_columns=analysis_columns()[0])
    stats = next(t for t in report.tables if t.key == "batch_stats_accuracy")
    assert stats.methods == ["bn | eval", "bn | train", "bn | precise"]
    assert stats.label("bn | train") == "BN: batch statistics (train mode)"
    assert stats.cell("bn | eval", 2).mean == pytest.approx(50.5)
    assert stats.cell("bn | train", 2).mean == pytest.approx(45.0)
    assert stats.cell("bn | precise", 2).mean == pytest.approx(52.0) and stats.cell("bn | precise", 32).text == "—"
    keys = [t.key for t in report.tables]
    assert "test_acc_train_mode" not in keys and "train_eval_gap" in keys  # the stats table shows them
    gap = next(t for t in report.tables if t.key == "train_eval_gap")
    assert gap.unit == "points" and gap.cell("bn", 2).mean == pytest.approx(-5.5)
    md = to_markdown(report)
    assert "| BN: precise-BN statistics | 52.00 ± 0.00 (n=2) | — |" in md
    rows = list(csv.DictReader(io.StringIO(to_csv(report))))
    assert {"unit", "name", "ci95_half_width", "ci95_low", "ci95_high"} <= set(rows[0])
    units = {r["table"]: r["unit"] for r in rows}
    assert units["test_accuracy"] == "percent" and units["batch_effect"] == "points"
    assert units["batch_stats_accuracy"] == "percent" and units["train_eval_gap"] == "points"
    row = next(r for r in rows if r["table"] == "test_accuracy" and r["method"] == "bn" and r["batch_size"] == "2")
    assert row["name"] == "BN" and float(row["ci95_low"]) == pytest.approx(50.5 - 12.7062 * 0.5, abs=1e-3)


def test_bn_gap_plot_draws_precise_bn_only_when_measured(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from normbench.report.analysis_plots import plots

    figures = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: figures.append(self))

    def bn(batch, seed, **extra):
        run = write_run(tmp_path / f"set{len(extra)}", "bn", batch, seed, acc=0.6)
        return {**json.loads((run / "summary.json").read_text()), "_dir": str(run), "train_eval_gap": -0.03,
                "test_acc_eval_mode": 0.6, "test_acc_train_mode": 0.57, **extra}

    plots([bn(2, 0), bn(32, 0)], tmp_path / "a")
    titles = [ax.get_title() for ax in figures[-1].axes]
    assert "running stats (eval) vs batch stats (train)" in titles and not any("precise" in t for t in titles)
    plots([bn(2, 0, test_acc_precise_bn=0.59), bn(32, 0, test_acc_precise_bn=0.61)], tmp_path / "b")
    titles = [ax.get_title() for ax in figures[-1].axes]
    assert "running stats (eval) vs batch stats (train) vs precise BN" in titles
    lines = [line.get_label() for ax in figures[-1].axes for line in ax.get_lines()]
    assert "BN, precise BN" in lines
