"""Tables and plots from run folders: method × batch size, mean and 95% interval over seeds.

:func:`collect` reads every ``summary.json`` under a folder (a sweep's output folder or any
tree of loose runs). It tolerates what a live or broken sweep leaves behind: a run folder
with a ``config.yaml`` but no summary yet counts as *running*, and an unreadable summary is
skipped with a warning (the engine writes summaries atomically, so a torn one is corruption,
not a race); so is a malformed one, and a value it cannot average is a warning too.

:func:`build_report` groups runs by *method* (the norm kind, ``+clip mode`` when clipping is
on, plus any other config key that differs between runs of the same norm, clip and batch
size) and batch size, and produces :class:`Table` objects:

* test accuracy (or error) in % at the end of training (``final``) or the best evaluation
  (``best``): mean ± half-width of the Student-t 95% interval over the completed seeds, with
  n; cells whose runs diverged, failed or are still running say so; a cell is marked best
  only when its interval lies above every other cell's in its column (:mod:`normbench.report_stats`);
* the study tables of :mod:`normbench.report_study`: the batch effect from paired seeds, the
  accuracies with running, batch and precise-BN statistics, the fixed-probe beta;
* training throughput (images/s) and seconds per epoch (wall time / epochs, with eval);
* one table per extra summary key from :mod:`normbench.report_analysis` when it exists.

Writers: a rich terminal rendering, Markdown, CSV (tidy: one row per table × method ×
batch, with its unit), JSON, and the PNG plots of :mod:`normbench.report_plots`. Tables and
plots name methods as :mod:`normbench.display` does (BN, GN, no norm + AGC (λ 0.16), ...).
"""
from __future__ import annotations

import csv
import io
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from normbench.errors import UserError

FORMATS = ("md", "csv", "json")
METRICS = ("final", "best")
# Row order of the reference study; anything else follows alphabetically.
METHOD_ORDER = ("bn", "ghost_bn", "brn", "ln", "gn", "in", "ws_gn", "frn", "evonorm_s0", "nf", "none")
# Config keys that never make two runs different methods.
_IGNORED = ("name", "seed", "train.batch_size", "threads", "device", "data.root", "data.allow_download",
            "norm.kind", "clip.mode")
_IGNORED_PREFIXES = ("log.", "analysis.")


# ----------------------------------------------------------------------------- collecting runs


@dataclass
class Run:
    """One run folder: its summary (or None while it is running) and resolved config."""

    path: Path
    status: str  # completed | diverged | failed | interrupted | running
    config: dict
    summary: dict = field(default_factory=dict)
    method: str = ""  # the row key (registry names, e.g. "none+agc")
    label: str = ""  # its display name (normbench.display, e.g. "no norm + AGC (λ 0.16)")

    @property
    def batch_size(self) -> int:
        return int(self.config.get("train", {}).get("batch_size", 0))

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(_flatten(value, dotted))
        else:
            out[dotted] = value
    return out


def collect(folder: Path, warn: Callable[[str], None] = lambda m: None) -> list[Run]:
    """Every run under ``folder`` (summaries, and run folders still in progress).

    Nothing malformed ends in a traceback or goes unsaid: a summary that cannot be read or
    placed in a table (not a JSON object, unknown status, a config key of the wrong type) is
    left out with one ``warn`` line naming the file and the run; a value that cannot be
    averaged (a completed run without its accuracy, a metric that is not a finite number) is
    one line naming the file, the key, the run and the table it is left out of, whose n then
    counts only the runs averaged."""
    from normbench.tracking import read_summary

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"report: {folder} is not a folder")
    runs: list[Run] = []
    seen: set[Path] = set()
    from normbench.report_study import TABLE_OF

    extra = list(TABLE_OF) + [c[0] for c in analysis_columns()[0]]
    numeric = _NUMERIC_KEYS + tuple(dict.fromkeys(k for k in extra if k not in _NUMERIC_KEYS))
    for path in sorted(folder.rglob("summary.json")):
        try:
            summary = read_summary(path)
        except UserError as err:
            seen.add(path.parent)  # named as left out: not listed as running either
            warn(f"skipping {path}: {err}")
            continue
        if summary is None:
            continue
        seen.add(path.parent)
        problem = _run_problem(summary)
        if problem is not None:
            warn(f"skipping {path}: {problem}; run {path.parent.name} left out of the report")
            continue
        for line in _value_problems(summary, numeric, path.parent.name):
            warn(f"{path}: {line}")
        runs.append(Run(path.parent, summary["status"], summary["config"], summary))
    for path in sorted(folder.rglob("config.yaml")):
        if path.parent in seen or not (path.parent / "metrics.jsonl").exists() and not (path.parent / "checkpoint.pt").exists():
            continue  # a finished run, or a plain config file rather than a run folder
        try:
            config = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(config, dict) and isinstance(config.get("norm"), dict) and isinstance(config.get("train"), dict):
            problem = _config_problem(config)
            if problem is not None:
                warn(f"skipping {path}: {problem}; running run {path.parent.name} left out of the report")
                continue
            runs.append(Run(path.parent, "running", config))
    _assign_methods(runs)
    return runs


# Summary statuses the engine writes (a folder without a summary is "running").
STATUSES = ("completed", "diverged", "failed", "interrupted")
# Summary keys the report averages, and the table each one feeds.
_NUMERIC_KEYS = ("final_test_acc", "best_test_acc", "images_per_s", "wall_time_s", "epochs")
_TABLE_OF = {"final_test_acc": "the test accuracy table (--metric final)",
             "best_test_acc": "the test accuracy table (--metric best)",
             "images_per_s": "the throughput table", "wall_time_s": "the seconds-per-epoch table",
             "epochs": "the seconds-per-epoch table"}
# Keys every completed run has (the engine's final evaluation).
_REQUIRED_IF_COMPLETED = ("final_test_acc", "best_test_acc")


def _show(value: Any) -> str:
    """A value as it reads in the JSON file, on one line and at most 40 characters."""
    try:
        text = json.dumps(value, default=str)
    except ValueError:
        text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _config_problem(config: Any) -> Optional[str]:
    """Why a run's config cannot place it in a table (None when it can): the keys that make
    its row and column must be there with the types the engine writes."""
    if not isinstance(config, dict):
        return f"config is {_show(config)}, not a mapping"
    for section in ("norm", "train"):
        if not isinstance(config.get(section), dict):
            what = _show(config[section]) if section in config else "missing"
            return f"config.{section} is {what}, not a mapping"
    for section in ("clip", "model"):
        if section in config and not isinstance(config[section], dict):
            return f"config.{section} is {_show(config[section])}, not a mapping"
    kind = config["norm"].get("kind")
    if not isinstance(kind, str) or not kind:
        return f"norm.kind is {_show(kind) if 'kind' in config['norm'] else 'missing'}, not a scheme name"
    mode = config.get("clip", {}).get("mode", "none")
    if mode is not None and not isinstance(mode, str):
        return f"clip.mode is {_show(mode)}, not a mode name"
    batch = config["train"].get("batch_size")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        what = _show(batch) if "batch_size" in config["train"] else "missing"
        return f"train.batch_size is {what}, not a positive integer"
    seed = config.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        return f"seed is {_show(seed)}, not an integer"
    return None


def _run_problem(summary: dict) -> Optional[str]:
    """Why a summary cannot be a run of the report (None when it can)."""
    status = summary.get("status")
    if status not in STATUSES:
        return f"status is {_show(status)}, not one of {', '.join(STATUSES)}"
    return _config_problem(summary.get("config"))


def _value_problems(summary: dict, keys: tuple, run: str) -> list[str]:
    """One line per value the report cannot average: a completed run without its final or
    best accuracy, or any of ``keys`` that is there but not a finite number (null is "not
    measured" for the others). ``run`` names the run (its folder)."""
    from normbench.report_study import TABLE_OF

    out = []
    for key in keys:
        value = summary.get(key)
        table = _TABLE_OF.get(key) or TABLE_OF.get(key, f"the '{key}' table")
        if _is_number(value):
            continue
        if value is None:
            if key in _REQUIRED_IF_COMPLETED and summary.get("status") == "completed":
                what = "null" if key in summary else "missing"
                out.append(f"{key} is {what} in a completed run; run {run} left out of {table}")
            continue
        out.append(f"{key} is {_show(value)}, not a number; run {run} left out of {table}")
    return out


def base_method(config: dict) -> str:
    kind = str(config.get("norm", {}).get("kind", "?"))
    clip = config.get("clip", {}).get("mode", "none")
    return kind if clip in (None, "none") else f"{kind}+{clip}"


def _assign_methods(runs: list[Run]) -> None:
    """Label = base method, plus ``key=value`` for every config key that differs between runs
    sharing the base method and batch size (seeds aside): such runs are different methods.
    A key absent from a run (an older or partial config) is not a difference."""
    flat = [_flatten(r.config) for r in runs]
    groups: dict[tuple, list[int]] = {}
    for i, run in enumerate(runs):
        groups.setdefault((base_method(run.config), run.batch_size), []).append(i)
    varying: dict[str, set[str]] = {}
    for (base, _), members in groups.items():
        keys = set().union(*(flat[i].keys() for i in members))
        for key in keys:
            if key in _IGNORED or key.startswith(_IGNORED_PREFIXES):
                continue
            values = {json.dumps(flat[i][key], sort_keys=True, default=str) for i in members if key in flat[i]}
            if len(values) > 1:
                varying.setdefault(base, set()).add(key)
    from normbench.display import method_label

    for i, run in enumerate(runs):
        base = base_method(run.config)
        keys = [k for k in sorted(varying.get(base, ())) if k in flat[i]]
        run.method = " ".join([base, *(f"{k.split('.')[-1]}={_short(flat[i][k])}" for k in keys)])
        run.label = method_label(run.config, [(k, flat[i][k]) for k in keys])
    labels: dict[str, set[str]] = {}
    for run in runs:
        labels.setdefault(run.label, set()).add(run.method)
    for run in runs:  # two methods that the display name does not tell apart keep their key too
        if len(labels[run.label]) > 1:
            run.label = f"{run.label} [{run.method}]"


def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _method_sort_key(method: str) -> tuple:
    kind = method.split("+")[0].split(" ")[0]
    rank = METHOD_ORDER.index(kind) if kind in METHOD_ORDER else len(METHOD_ORDER)
    return rank, kind, method


# ----------------------------------------------------------------------------- tables


@dataclass
class CellStat:
    """One method × batch cell: the values of its completed runs and how many did not complete."""

    values: list[float] = field(default_factory=list)
    n_diverged: int = 0
    n_failed: int = 0
    n_running: int = 0
    n_interrupted: int = 0  # stopped by a signal, resumable (a sweep run again continues it)
    n_nodata: int = 0  # completed runs that lack the value
    runs: list[str] = field(default_factory=list)
    best: bool = False
    text: str = "missing"

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> Optional[float]:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> Optional[float]:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    @property
    def ci(self):
        """:class:`normbench.report_stats.Interval` (mean, 95% half-width, n), or None."""
        from normbench.report_stats import interval

        return interval(self.values)

    @property
    def half(self) -> Optional[float]:
        """Half-width of the 95% Student-t interval of the mean (None below two values)."""
        ci = self.ci
        return None if ci is None else ci.half

    @property
    def missing(self) -> bool:
        return not self.runs


@dataclass
class Table:
    """A method × batch-size table of one quantity."""

    key: str
    title: str
    unit: str
    methods: list[str]
    batch_sizes: list[int]
    cells: dict[tuple[str, int], CellStat]
    better: Optional[str] = None  # "max" | "min" | None (no best marked)
    digits: int = 2
    with_std: bool = True
    note: str = ""
    analysis: bool = False  # an extra table from normbench.report_analysis (written to files only)
    labels: dict[str, str] = field(default_factory=dict)  # row key -> display name
    column_names: dict[int, str] = field(default_factory=dict)  # column -> header (default b=N)

    def cell(self, method: str, batch: int) -> CellStat:
        return self.cells.get((method, batch)) or CellStat()

    def label(self, method: str) -> str:
        return self.labels.get(method, method)

    def column(self, batch: int) -> str:
        return self.column_names.get(batch, f"b={batch}")


@dataclass
class Report:
    tables: list[Table]
    runs: list[Run]
    metric: str
    error: bool
    skipped: list[str] = field(default_factory=list)


def _fmt(value: Optional[float], digits: int) -> str:
    if value is None or value != value:
        return "—"
    return f"{value:.{digits}f}"


def _cell_text(stat: CellStat, digits: int, with_std: bool, required: bool = False) -> str:
    """``required``: every completed run should have the value (the accuracy table), so those
    without it are counted in the text ("+1 no value") and named by a warning in collect."""
    if stat.missing:
        return "missing"
    no_value = stat.n_nodata if required else 0
    if not stat.values:
        if no_value:
            return "no value" + (f" ({no_value}/{len(stat.runs)})" if len(stat.runs) > 1 else "")
        if stat.n_diverged:
            return "diverged" + (f" ({stat.n_diverged}/{len(stat.runs)})" if len(stat.runs) > 1 else "")
        if stat.n_failed:
            return "failed" + (f" ({stat.n_failed}/{len(stat.runs)})" if len(stat.runs) > 1 else "")
        if stat.n_running:
            return "running"
        if stat.n_interrupted:
            return "interrupted"
        return "—"
    text = _fmt(stat.mean, digits)
    if with_std and stat.half is not None:
        text += f" ± {_fmt(stat.half, digits)}"
    if with_std:
        text += f" (n={stat.n})"
    extra = [f"{k} {what}" for k, what in ((stat.n_diverged, "div"), (stat.n_failed, "failed"),
                                             (stat.n_running, "running"), (stat.n_interrupted, "interrupted"),
                                             (no_value, "no value")) if k]
    if extra:
        text += " +" + ", +".join(extra)
    return text


def _value(summary: dict, key: str) -> Optional[float]:
    node: Any = summary
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, (int, float)) or not math.isfinite(node):
        return None
    return float(node)


def _table(runs: list[Run], key: str, title: str, unit: str, get: Callable[[Run], Optional[float]],
           better: Optional[str], digits: int, completed_only: bool, with_std: bool = True, note: str = "",
           required: bool = False) -> Table:
    methods = sorted({r.method for r in runs}, key=_method_sort_key)
    batches = sorted({r.batch_size for r in runs})
    cells: dict[tuple[str, int], CellStat] = {}
    for run in runs:
        stat = cells.setdefault((run.method, run.batch_size), CellStat())
        stat.runs.append(str(run.path))
        value = get(run)
        usable = run.status == "completed" or (not completed_only and run.status in ("diverged", "interrupted"))
        if value is not None and usable:
            stat.values.append(value)
        elif run.status == "diverged":
            stat.n_diverged += 1
        elif run.status == "failed":
            stat.n_failed += 1
        elif run.status == "running":
            stat.n_running += 1
        elif run.status == "interrupted":
            stat.n_interrupted += 1
        elif run.status == "completed":
            stat.n_nodata += 1  # completed without this value (e.g. an analysis that was off)
    for stat in cells.values():
        stat.text = _cell_text(stat, digits, with_std, required)
    if better:
        from normbench.report_stats import best_index

        for batch in batches:
            column = [cells[(m, batch)] for m in methods if (m, batch) in cells and cells[(m, batch)].values]
            pick = best_index([c.ci for c in column], better)
            if pick is not None:
                column[pick].best = True
    return Table(key, title, unit, methods, batches, cells, better, digits, with_std, note)


def analysis_columns() -> tuple[list[tuple], Optional[Callable]]:
    """(summary key, header, scale, unit) for each column of normbench.report_analysis (its
    ``summary_units`` gives scale and unit: fractions become percent), and its plots() hook."""
    try:
        from normbench import report_analysis  # noqa: F401 - written by the analysis work
    except ImportError:
        return [], None
    units = getattr(report_analysis, "summary_units", lambda: {})()
    columns = [(k, h, *units.get(k, (1.0, ""))) for k, h in getattr(report_analysis, "summary_columns", lambda: [])()]
    return columns, getattr(report_analysis, "plots", None)


def build_report(runs: list[Run], metric: str = "final", error: bool = False,
                 extra_columns: Optional[list[tuple]] = None, small_batch: Optional[int] = None,
                 ref_batch: Optional[int] = None) -> Report:
    """The accuracy table, the study tables of :mod:`normbench.report_study` (batch effect of
    ``small_batch`` against ``ref_batch``, batch-statistics accuracies, fixed probe), the
    throughput and s/epoch tables, plus one per ``extra_columns`` entry, ``(summary key,
    header[, scale, unit])``, that some run has (``analysis=True`` on those tables: files
    only, not the terminal; probe keys count lr-mode probes only)."""
    from normbench.report_study import COVERED_KEYS, probe_mode, study_tables

    if metric not in METRICS:
        raise UserError(f"--metric: got '{metric}'; allowed: {', '.join(METRICS)}")
    if not runs:
        raise UserError("report: no runs found (no summary.json under the folder)")
    key = "final_test_acc" if metric == "final" else "best_test_acc"

    def acc(run: Run) -> Optional[float]:
        v = _value(run.summary, key)
        if v is None:
            return None
        return 100.0 * (1.0 - v) if error else 100.0 * v

    what = "error" if error else "accuracy"
    which = "at the end of training" if metric == "final" else "best evaluation"
    side = "below" if error else "above"
    tables = [
        _table(runs, f"test_{what}", f"Test {what} (%), {which}", "%", acc, "min" if error else "max", 2, True,
               note="mean ± half-width of the 95% confidence interval of the mean over seeds (Student t, "
                    "n−1 degrees of freedom; n = runs averaged; n=1: no interval); a cell is marked best "
                    f"only when its interval lies entirely {side} the interval of every other cell in its "
                    "column (the next best included), so a column with overlapping leaders or a "
                    "single-seed cell has no mark; div = diverged runs, not in the mean; no value = "
                    "completed runs without the accuracy (named in a warning), not in the mean", required=True),
        *study_tables(runs, acc, what, small_batch, ref_batch),
        _table(runs, "images_per_s", "Training throughput (images/s)", "img/s",
               lambda r: _value(r.summary, "images_per_s"), None, 0, False, with_std=False,
               note="mean over seeds of the training-step throughput (evaluation excluded)"),
        _table(runs, "s_per_epoch", "Seconds per epoch (wall time incl. evaluation)", "s",
               lambda r: (_value(r.summary, "wall_time_s") / _value(r.summary, "epochs"))
               if _value(r.summary, "wall_time_s") and _value(r.summary, "epochs") else None,
               None, 1, False, with_std=False, note="wall time / epochs run, mean over seeds"),
    ]
    covered = COVERED_KEYS if any(t.key == "batch_stats_accuracy" for t in tables) else ()
    for col_key, header, *rest in extra_columns or []:
        scale, unit = rest if rest else (1.0, "")

        def get(r: Run, k=col_key, scale=scale) -> Optional[float]:
            v = _value(r.summary, k)
            lr_probe = not k.startswith("probe_") or probe_mode(r.summary) == "lr"
            return None if v is None or not lr_probe else v * scale
        if col_key in covered or not any(get(r) is not None for r in runs):
            continue
        table = _table(runs, col_key, f"{header} ({unit})" if unit else header, unit, get, None,
                       2 if unit else 4, True,
                       note=f"summary key '{col_key}'{f' in {unit}' if unit else ''}, mean ± half-width of "
                            "the 95% t-interval over completed seeds; — = not measured; methods with no "
                            "measured value are left out" + ("; lr-mode probes only" if col_key.startswith(
                                "probe_") else ""))
        table.methods = [m for m in table.methods if any(table.cell(m, b).values for b in table.batch_sizes)]
        table.analysis = True
        tables.append(table)
    labels = {r.method: r.label or r.method for r in runs}
    for table in tables:
        table.labels = table.labels or labels
    return Report(tables, runs, metric, error)


# ----------------------------------------------------------------------------- writers


def render_terminal(report: Report, console=None) -> None:
    from rich.console import Console
    from rich.table import Table as RichTable

    console = console or Console(width=None if sys.stdout.isatty() else 200)
    counts: dict[str, int] = {}
    for run in report.runs:
        counts[run.status] = counts.get(run.status, 0) + 1
    console.print(f"{len(report.runs)} runs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())),
                  highlight=False)
    extra = [t for t in report.tables if t.analysis]
    for table in report.tables:
        if table.analysis:
            continue
        console.print(f"\n[bold]{_escape(table.title)}[/]")
        rt = RichTable()
        rt.add_column("method", style="bold")
        for batch in table.batch_sizes:
            rt.add_column(table.column(batch), justify="right")
        for method in table.methods:
            row = []
            for batch in table.batch_sizes:
                c = table.cell(method, batch)
                text = c.text + (" *" if c.best else "")
                style = ("bold green" if c.best else "red" if not c.values and (c.n_diverged or c.n_failed)
                         else "dim" if c.missing or not c.values else "")
                row.append(f"[{style}]{_escape(text)}[/]" if style else _escape(text))
            rt.add_row(_escape(table.label(method)), *row)
        console.print(rt)
        console.print(f"[dim]{_escape(table.note)}[/]")
    if extra:
        console.print(f"[dim]{len(extra)} analysis table(s) ({', '.join(_escape(t.title) for t in extra)}) "
                      "go to the --format files[/]")


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def to_markdown(report: Report) -> str:
    lines = [f"# normbench report", "",
             f"{len(report.runs)} runs; accuracy metric: {report.metric} "
             f"({'test error' if report.error else 'test accuracy'}). \\* = best in its column: its "
             "95% interval lies clear of every other cell's.", ""]
    for table in report.tables:
        lines += [f"## {table.title}", "", f"_{table.note}_", ""]
        lines.append("| method | " + " | ".join(table.column(b) for b in table.batch_sizes) + " |")
        lines.append("|---|" + "---:|" * len(table.batch_sizes))
        for method in table.methods:
            cells = []
            for batch in table.batch_sizes:
                c = table.cell(method, batch)
                cells.append(f"**{c.text}** \\*" if c.best else c.text)
            lines.append(f"| {table.label(method)} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _rows(report: Report) -> list[dict]:
    rows = []
    for table in report.tables:
        for method in table.methods:
            for batch in table.batch_sizes:
                c = table.cell(method, batch)
                ci = c.ci
                rows.append({"table": table.key, "method": method, "name": table.label(method),
                             "batch_size": batch, "column": table.column(batch), "unit": table.unit,
                             "mean": c.mean, "ci95_half_width": c.half, "ci95_low": ci and ci.lo,
                             "ci95_high": ci and ci.hi, "std": c.std, "n": c.n, "n_diverged": c.n_diverged,
                             "n_failed": c.n_failed,
                             "n_running": c.n_running, "n_interrupted": c.n_interrupted, "missing": c.missing, "best": c.best, "text": c.text})
    return rows


def to_csv(report: Report) -> str:
    buf = io.StringIO()
    rows = _rows(report)
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["table"], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def to_json(report: Report) -> str:
    body = {
        "metric": report.metric, "error": report.error, "n_runs": len(report.runs),
        "tables": [{
            "key": t.key, "title": t.title, "unit": t.unit, "note": t.note, "methods": t.methods,
            "names": [t.label(m) for m in t.methods], "batch_sizes": t.batch_sizes,
            "columns": [t.column(b) for b in t.batch_sizes],
            "cells": [{"method": m, "name": t.label(m), "batch_size": b, "mean": t.cell(m, b).mean,
                       "ci95_half_width": t.cell(m, b).half, "std": t.cell(m, b).std,
                       **({"paired_seeds": t.cell(m, b).paired_seeds} if hasattr(t.cell(m, b), "paired_seeds") else {}),
                       "n": t.cell(m, b).n, "values": t.cell(m, b).values, "n_diverged": t.cell(m, b).n_diverged,
                       "n_failed": t.cell(m, b).n_failed, "n_running": t.cell(m, b).n_running, "n_interrupted": t.cell(m, b).n_interrupted,
                       "missing": t.cell(m, b).missing, "best": t.cell(m, b).best, "text": t.cell(m, b).text,
                       "runs": t.cell(m, b).runs}
                      for m in t.methods for b in t.batch_sizes]}
            for t in report.tables],
        "runs": [{"path": str(r.path), "status": r.status, "method": r.method, "name": r.label,
                  "batch_size": r.batch_size, "seed": r.seed} for r in report.runs],
    }
    from normbench.tracking import dumps_json

    return dumps_json(body, indent=2) + "\n"


def parse_formats(items: list[str]) -> list[str]:
    """``["md,csv", "json"]`` -> ``["md", "csv", "json"]``; anything else is a UserError."""
    out: list[str] = []
    for item in items:
        for part in item.split(","):
            part = part.strip().lower()
            if not part:
                continue
            if part not in FORMATS:
                from normbench.errors import did_you_mean

                raise UserError(f"--format: got '{part}'{did_you_mean(part, FORMATS)}; allowed: {', '.join(FORMATS)}")
            if part not in out:
                out.append(part)
    return out


def write_files(report: Report, formats: list[str], out_dir: Path) -> list[Path]:
    from normbench.tracking import atomic_write

    writers = {"md": to_markdown, "csv": to_csv, "json": to_json}
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out: cannot create {out_dir}: {err.strerror}") from None
    written = []
    for fmt in formats:
        path = Path(out_dir) / f"report.{fmt}"
        atomic_write(path, writers[fmt](report).encode())
        written.append(path)
    return written


# ----------------------------------------------------------------------------- plot


def method_colours(methods: list[str]) -> dict[str, str]:
    """A colour per method key (``bn``, ``none+agc``, ``gn groups=16``): its family's fixed
    colour (:data:`normbench.display.STYLES`), the first of a family in report order taking
    it; every plot of one report gives a method one colour."""
    from normbench.display import assign_styles

    ordered = sorted(dict.fromkeys(methods), key=_method_sort_key)
    return {m: s.colour for m, s in assign_styles((m, m.split(" ")[0]) for m in ordered).items()}


def plot(report: Report, path: Path) -> Path:
    """Accuracy (or error) against batch size: :func:`normbench.report_plots.plot_accuracy`."""
    from normbench.report_plots import plot_accuracy

    return plot_accuracy(report, path)
