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
