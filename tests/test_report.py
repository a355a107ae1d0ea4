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
from normbench.report import build_report, collect, parse_formats, plot, to_csv, to_markdown
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
        config[section][key] = value
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
    assert bn2.text == "55.00 ± 7.07 (n=2)"
    assert acc.cell("gn", 32).text == "88.00 (n=1)"
    assert acc.cell("gn", 8).missing and acc.cell("gn", 8).text == "missing"
    assert acc.cell("none+agc", 2).text == "diverged (2/2)"
    assert acc.cell("none+agc", 32).text == "70.00 (n=1) +1 div"
    assert acc.cell("none+agc", 8).text == "failed (1/2)"
    assert acc.cell("none+agc", 8).n_failed == 1 and acc.cell("none+agc", 8).n_running == 1
    # best per column: gn at batch 2, bn at 8 and 32
    assert acc.cell("gn", 2).best and not acc.cell("bn", 2).best
    assert acc.cell("bn", 8).best and acc.cell("bn", 32).best
    speed = report.tables[1]
    assert speed.cell("bn", 2).mean == pytest.approx(200.0)
    md = to_markdown(report)
    assert "| gn | **81.00 ± 1.41 (n=2)** \\* | missing | 88.00 (n=1) |" in md
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
    write_run(root, "gn", 4, 0, acc=0.70, norm__groups=8)
    write_run(root, "gn", 4, 0, acc=0.75, norm__groups=16)
    write_run(root, "bn", 4, 0, acc=0.60)
    report = build_report(collect(root), metric="best", error=True)
    acc = report.tables[0]
    assert acc.key == "test_error"
    assert acc.methods == ["bn", "gn groups=16", "gn groups=8"]
    assert acc.cell("gn groups=16", 4).mean == pytest.approx(24.0)  # best = 0.76 -> 24% error
    assert acc.cell("gn groups=16", 4).best  # lowest error


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
    assert cell["values"] == [80.0, 82.0] and cell["best"] is True
    assert png.read_bytes()[:8] == PNG_MAGIC

    empty = tmp_path / "empty"
    empty.mkdir()
    for args in (["report", str(empty)], ["report", str(tmp_path / "nope")],
                 ["report", str(runs_dir), "--format", "xls"], ["report", str(runs_dir), "--metric", "last"],
                 ["report", str(runs_dir), "--plot", str(tmp_path / "a.pdf")]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert res.output.count("\n") == 1 and res.output.startswith("normbench: error:"), res.output


def test_parse_formats():
    assert parse_formats(["md,csv", "json", "md"]) == ["md", "csv", "json"]
    with pytest.raises(UserError, match="allowed: md, csv, json"):
        parse_formats(["mdx"])


def test_plot_marks_diverged(runs_dir, tmp_path):
    report = build_report(collect(runs_dir), error=True)
    path = plot(report, tmp_path / "err.png")
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 10_000


def test_method_colours_depend_on_the_set_of_methods_not_their_order():
    from normbench.report import method_colours

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
    assert cell.text == "55.00 ± 7.07 (n=2) +1 no value"
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
