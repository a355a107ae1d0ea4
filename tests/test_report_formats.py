"""`normbench report` for a reader: percent everywhere, a unit for every number (report.csv,
report.json), the per-run CSV, PNG/SVG/PDF plots by extension, display names in every plot."""
from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from normbench.cli import app
from normbench.report.build import analysis_columns, build_report
from normbench.report.render import to_csv, to_json, to_markdown
from normbench.report.runs import collect
from normbench.report.units import SUFFIXES, UNITS

from test_report import with_curve, with_summary, write_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def with_training_log(run: Path, records: list[tuple[float, float, float]]) -> Path:
    """A metrics.jsonl with (epoch, train/loss, train/acc) interval records and a test/acc per epoch."""
    lines = [{"step": 10 * i + 10, "epoch": e, "train/loss": loss, "train/acc": acc}
             for i, (e, loss, acc) in enumerate(records)]
    lines += [{"step": 100, "epoch": 2, "test/acc": 0.5, "test/loss": 1.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run


@pytest.fixture
def study(tmp_path) -> Path:
    """BN with the batch-statistics measurements (precise BN at batch 2 only), two GN variants
    (groups 8 and 16, the same display family), no norm + AGC with a diverged seed, and a run
    still training."""
    root = tmp_path / "runs"
    for seed in (0, 1):
        with_summary(write_run(root, "bn", 2, seed, acc=0.50 + 0.02 * seed),
                     test_acc_eval_mode=0.50 + 0.02 * seed, test_acc_train_mode=0.45, test_acc_precise_bn=0.48,
                     train_eval_gap=-0.05 - 0.02 * seed, dead_unit_frac=0.25)
        with_summary(write_run(root, "bn", 32, seed, acc=0.60), test_acc_eval_mode=0.60, test_acc_train_mode=0.59,
                     train_eval_gap=-0.01, dead_unit_frac=0.0)
        for groups, acc in ((8, 0.40), (16, 0.44)):
            for batch in (2, 32):
                with_curve(write_run(root, "gn", batch, seed, acc=acc, norm__groups=groups), {1: acc - 0.1, 2: acc})
    write_run(root, "none", 2, 0, acc=0.30, clip="agc", clip__agc_lambda=0.16)
    write_run(root, "none", 2, 1, status="diverged", clip="agc", clip__agc_lambda=0.16)
    running = root / "ln-b2-s0-running"
    running.mkdir()
    (running / "config.yaml").write_text("name: x\nseed: 0\nnorm: {kind: ln}\ntrain: {batch_size: 2}\n")
    (running / "metrics.jsonl").write_text("{}\n")
    return root


def report_of(root: Path):
    return build_report(collect(root), extra_columns=analysis_columns()[0])


# ----------------------------------------------------------------------------- units


def test_every_accuracy_a_person_reads_is_percent(study):
    report = report_of(study)
    md = to_markdown(report)
    assert "Units: accuracies in percent (%)" in md
    acc = report.tables[0]
    assert acc.unit == "percent" and acc.cell("bn", 2).mean == pytest.approx(51.0)
    assert "| BN | 51.00 ± 12.71 (n=2) |" in md  # 0.50 and 0.52 as percent, not 0.51
    dead = next(t for t in report.tables if t.key == "dead_unit_frac")
    assert dead.unit == "percent" and dead.cell("bn", 2).mean == pytest.approx(25.0)
    assert "## dead units, share of channels (%)" in md
    stats = next(t for t in report.tables if t.key == "batch_stats_accuracy")
    assert stats.cell("bn | precise", 2).mean == pytest.approx(48.0)
    for table in report.tables:  # accuracies in percent, their differences in points
        if "acc" in table.key or "accuracy" in table.key:
            assert table.unit == "percent", table.key
        for cell in table.cells.values():
            if table.unit == "percent":
                assert all(v == 0.0 or abs(v) > 1.0 for v in cell.values), (table.key, cell.values)


def test_csv_has_a_unit_for_every_row_and_json_a_units_map(study):
    report = report_of(study)
    rows = list(csv.DictReader(io.StringIO(to_csv(report))))
    assert rows and all(r["unit"] in UNITS for r in rows), {r["unit"] for r in rows}
    units = {r["table"]: r["unit"] for r in rows}
    assert units["test_accuracy"] == "percent" and units["batch_effect"] == "points"
    assert units["images_per_s"] == "img/s" and units["s_per_epoch"] == "seconds"
    assert units["train_eval_gap"] == "points" and units["dead_unit_frac"] == "percent"
    body = json.loads(to_json(report))
    assert body["units"] == {t["key"]: t["unit"] for t in body["tables"]}
    assert set(body["unit_meanings"]) == set(body["units"].values())
    cell = next(c for c in body["tables"][0]["cells"] if c["method"] == "bn" and c["batch_size"] == 2)
    assert cell["values"] == pytest.approx([50.0, 52.0])


def test_error_table_is_percent_too(study):
    acc = build_report(collect(study), error=True).tables[0]
    assert acc.unit == "percent" and acc.cell("bn", 32).mean == pytest.approx(40.0)


# ----------------------------------------------------------------------------- per-run CSV


def per_run(root: Path, out: Path) -> list[dict]:
    res = CliRunner().invoke(app, ["report", str(root), "--per-run", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert f"wrote {out / 'runs.csv'}" in res.output
    return list(csv.DictReader(io.StringIO((out / "runs.csv").read_text())))


def test_per_run_csv_has_one_row_per_run_with_units_in_the_column_names(study, tmp_path):
    with_training_log(next(study.glob("bn-b2-s0-*")), [(0.5, 2.0, 0.2), (1.2, 1.0, 0.5), (1.6, 0.8, 0.6),
                                                      (2.0, 0.6, 0.7)])
    rows = per_run(study, tmp_path / "out")
    assert len(rows) == len(collect(study)) == 15
    columns = list(rows[0])
    assert columns[:8] == ["run", "path", "status", "method", "name", "norm", "batch_size", "seed"]
    for column in ("final_test_acc_pct", "best_test_acc_pct", "test_acc_eval_mode_pct", "test_acc_train_mode_pct",
                   "test_acc_precise_bn_pct", "train_eval_gap_points", "wall_time_s", "images_per_s",
                   "dead_units_pct", "probe_beta_median", "train_loss_last_epoch_nats", "epoch_wall_time_s"):
        assert column in columns, column
    config_columns = [c for c in columns if c.startswith("config.")]
    # clip.agc_lambda: only the no-norm runs have it, all with 0.16; the seed, batch and log keys have their place
    assert config_columns == ["config.clip.mode", "config.norm.groups"]
    bn = next(r for r in rows if r["method"] == "bn" and r["batch_size"] == "2" and r["seed"] == "0")
    assert bn["name"] == "BN" and bn["status"] == "completed" and bn["norm"] == "bn"
    assert float(bn["final_test_acc_pct"]) == pytest.approx(50.0)
    assert float(bn["best_test_acc_pct"]) == pytest.approx(51.0)
    assert float(bn["test_acc_precise_bn_pct"]) == pytest.approx(48.0)
    assert float(bn["train_eval_gap_points"]) == pytest.approx(-5.0)
    assert float(bn["dead_units_pct"]) == pytest.approx(25.0)
    assert float(bn["epoch_wall_time_s"]) == pytest.approx(10.0) and bn["epochs"] == "2"  # 20 s over 2 epochs
    # the last epoch (after epoch 1.0): the records at 1.2, 1.6, 2.0
    assert float(bn["train_loss_last_epoch_nats"]) == pytest.approx(0.8)
    assert float(bn["train_acc_last_epoch_pct"]) == pytest.approx(60.0)
    assert bn["test_acc_precise_bn_pct"] and not next(
        r for r in rows if r["method"] == "bn" and r["batch_size"] == "32")["test_acc_precise_bn_pct"]
    groups = {(r["name"], r["config.norm.groups"]) for r in rows if r["norm"] == "gn"}
    assert groups == {("GN (groups=8)", "8"), ("GN (groups=16)", "16")}
    none = [r for r in rows if r["norm"] == "none"]
    assert {r["name"] for r in none} == {"no norm + AGC (λ 0.16)"} and {r["method"] for r in none} == {"none+agc"}
    assert sorted(r["status"] for r in none) == ["completed", "diverged"]
    assert next(r for r in none if r["status"] == "diverged")["final_test_acc_pct"] == ""
    running = next(r for r in rows if r["status"] == "running")
    assert running["name"] == "LN" and running["final_test_acc_pct"] == "" and running["seed"] == "0"
    methods = [r["method"] for r in rows]  # the report's row order: bn, ln, gn ..., none last
    assert methods.index("bn") < methods.index("ln") < methods.index("gn groups=16") < methods.index("none+agc")


def test_per_run_column_names_end_with_their_unit():
    from normbench.report.per_run import DERIVED, METRICS, column_units

    units = column_units()
    assert len(units) == len(METRICS) + len(DERIVED)
    for column, unit in units.items():
        assert unit in UNITS, (column, unit)
        assert column.endswith(SUFFIXES.get(unit, "")), (column, unit)
    assert all(not column.endswith(("_frac", "_acc")) for column in units)  # no fraction left


# ----------------------------------------------------------------------------- plot formats


@pytest.mark.parametrize("ext, magic", [("svg", None), ("pdf", b"%PDF"), ("png", PNG_MAGIC)])
def test_plots_in_the_format_of_the_extension(study, tmp_path, ext, magic):
    out = tmp_path / "fig"
    res = CliRunner().invoke(app, ["report", str(study), "--plot", str(out / f"accuracy.{ext}")])
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"{n}.{ext}" for n in ("accuracy", "accuracy_curves", "analysis_bn_gap")), names
    for path in out.iterdir():
        data = path.read_bytes()
        if ext == "svg":
            text = data.decode()
            assert text.lstrip().startswith(("<?xml", "<svg")) and "</svg>" in text, path
        else:
            assert data.startswith(magic), path
        assert f"wrote {path}" in res.output


@pytest.mark.parametrize("name", ["acc.jpg", "acc", "acc.svgz", "acc.png.txt"])
def test_unknown_plot_extension_is_one_line_and_exit_2(study, tmp_path, name):
    res = CliRunner().invoke(app, ["report", str(study), "--plot", str(tmp_path / name)])
    assert res.exit_code == 2, res.output
    assert res.output.count("\n") == 1 and res.output.startswith("normbench: error: --plot:"), res.output
    assert ".png, .svg, .pdf" in res.output and name in res.output
    assert not (tmp_path / name).exists()


def svg_texts(path: Path) -> list[str]:
    """The text elements of an SVG matplotlib wrote (text kept as text)."""
    import html

    return [html.unescape(t) for t in re.findall(r"<text[^>]*>([^<]*)</text>", path.read_text())]


def test_plots_name_methods_by_their_display_names(study, tmp_path):
    out = tmp_path / "fig"
    res = CliRunner().invoke(app, ["report", str(study), "--plot", str(out / "accuracy.svg")])
    assert res.exit_code == 0, res.output
    for name, labels in (("accuracy.svg", ("BN", "GN (groups=8)", "GN (groups=16)", "no norm + AGC (λ 0.16)")),
                         ("accuracy_curves.svg", ("GN (groups=8)", "GN (groups=16)"))):  # only GN logged curves
        texts = svg_texts(out / name)
        for label in labels:
            assert label in texts, (name, label, texts)
        assert not any(key in t for t in texts for key in ("gn groups=", "none+agc", "bn | ")), (name, texts)
    gap = svg_texts(out / "analysis_bn_gap.svg")
    assert "BN" in gap and "precise BN" in gap


def test_analysis_plots_keep_two_methods_with_one_display_family_apart(study, tmp_path, monkeypatch):
    """Two GN variants probed in lr mode: two lines in the probe plots, each named as in the tables."""
    from matplotlib.figure import Figure

    from normbench.report.analysis_plots import plots

    probe = {"probe/loss_range": 0.1, "probe/loss_min": 2.0, "probe/loss_max": 2.1, "probe/grad_pred": 0.5,
             "probe/grad_pred_min": 0.2, "probe/beta": 2.0}
    for run in study.glob("gn-*"):
        (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "epoch": s / 30, **probe}) + "\n"
                                                   for s in (3, 6)))
    runs = collect(study)
    figures = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: figures.append(self))
    summaries = [{**r.summary, "_dir": str(r.path), "_label": r.label, "_method": r.method} for r in runs if r.summary]
    paths = plots(summaries, tmp_path / "plots", "svg")
    assert {p.name for p in paths} == {"analysis_bn_gap.svg", "analysis_probe.svg", "analysis_probe_vs_batch.svg"}
    vs_batch = figures[-1]
    labels = {line.get_label() for ax in vs_batch.axes for line in ax.get_lines()}
    assert {"GN (groups=8)", "GN (groups=16)"} <= labels
    colours = {line.get_label(): line.get_color() for line in vs_batch.axes[0].get_lines()}
    assert colours["GN (groups=8)"] != colours["GN (groups=16)"]


def test_bn_gap_plot_draws_running_train_mode_and_precise_bn_accuracy(study, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from normbench.report.analysis_plots import plot_bn_gap

    figures = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: figures.append(self))
    summaries = [{**r.summary, "_dir": str(r.path), "_label": r.label} for r in collect(study) if r.summary]
    plot_bn_gap(summaries, tmp_path / "gap.svg", {})
    acc_ax = figures[-1].axes[1]
    assert acc_ax.get_title() == "running stats (eval) vs batch stats (train) vs precise BN"
    lines = {line.get_label(): line for line in acc_ax.get_lines()}
    assert set(lines) == {"BN, running stats (eval)", "BN, batch stats (train)", "BN, precise BN"}
    precise = lines["BN, precise BN"]
    assert list(precise.get_ydata()) == pytest.approx([48.0])  # batch 2 only: batch 32 has no precise BN
    assert round(float(precise.get_xdata()[0])) == 2
    assert list(lines["BN, running stats (eval)"].get_ydata()) == pytest.approx([51.0, 60.0])
    assert list(lines["BN, batch stats (train)"].get_ydata()) == pytest.approx([45.0, 59.0])
    legend = [t.get_text() for t in acc_ax.get_legend().get_texts()]
    assert legend == ["running stats (eval)", "batch stats (train)", "precise BN"]


# ----------------------------------------------------------------------------- help


@pytest.mark.parametrize("command, choices", [("report", ("md, csv, json", ".png, .svg, .pdf", "final", "best")),
                                              ("analyze", ("auto, cpu, cuda",))])
def test_help_lists_choices_and_ends_with_an_example(command, choices):
    res = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    for words in choices:
        assert words in text, words
    lines = [line.strip(" │") for line in res.output.strip().splitlines() if line.strip(" │")]
    assert lines[-1].startswith(f"Example: normbench {command} "), lines[-3:]


def test_analyze_prints_percent_and_points(capsys):
    from normbench.cli.analyze import print_analysis

    print_analysis({"run_name": "bn-b2", "norm": "bn", "batch_size": 2, "analyzed_step": 10,
                    "test_acc_eval_mode": 0.7121, "test_acc_train_mode": 0.6898, "train_eval_gap": -0.0223,
                    "test_acc_precise_bn": 0.7049, "precise_bn_images": 10000, "precise_bn_batch_size": 500,
                    "dead_unit_frac": 0.125, "dead_units_by_layer": {"blocks.0.act": 0.5}, "summary_updated": True})
    out = capsys.readouterr().out
    for text in ("71.21%", "68.98%", "-2.23 pts", "70.49%", "12.50%", "% of channels", "50.00%"):
        assert text in out, (text, out)
    assert "0.7121" not in out and "0.125" not in out


def test_a_tall_figure_keeps_its_rows_below_its_two_line_title():
    """Six rows of panels (the lr-mode probe plot of a six-batch study): the suptitle sits
    above every panel's title."""
    from normbench.report.figures import figure, title_and_layout

    fig, axes = figure(6, 3, 15.0, 21.6)
    for row in axes:
        for ax in row:
            ax.set_title("batch 128: gradient predictiveness, ||g_s - g||")
            ax.set_xlabel("epoch")
    text = title_and_layout(fig, "landscape probe along each training step (lr mode)\nResNet-20 / CIFAR-10, 1 epoch")
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    title = text.get_window_extent(renderer)
    assert all(title.y0 >= ax.get_tightbbox(renderer).y1 for row in axes for ax in row)
