"""Writing a report out: a rich terminal rendering (the analysis tables go to files only),
Markdown, CSV (tidy: one row per table × method × batch, with its unit) and JSON, and the
``--format`` list that picks the files.

Units are named as in :mod:`normbench.report.units`: the ``unit`` column of ``report.csv`` is
the unit of that row's mean, interval, std and text (``n`` and ``n_*`` count runs);
``report.json`` gives each table's ``unit``, a ``units`` map (table key -> unit) and what each
unit used means (``unit_meanings``). Accuracies are in percent everywhere.
"""
from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

from normbench.errors import UserError, did_you_mean
from normbench.report.tables import Report
from normbench.report.units import meaning
from normbench.tracking import atomic_write, dumps_json

FORMATS = ("md", "csv", "json")


def render_terminal(report: Report, console=None) -> None:
    """The run counts and every table but the analysis ones, with their notes, on ``console``."""
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
    """``report.md``: every table with its title and note; the best cell in bold with a *."""
    lines = ["# normbench report", "",
             f"{len(report.runs)} runs; accuracy metric: {report.metric} "
             f"({'test error' if report.error else 'test accuracy'}). \\* = best in its column: its "
             "95% interval lies clear of every other cell's.", "",
             "Units: accuracies in percent (%) of the test images, differences of accuracies in percentage "
             "points; each table's unit is in its title (report.csv: the `unit` column).", ""]
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
    """``report.csv``: one row per table × method × batch size."""
    buf = io.StringIO()
    rows = _rows(report)
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["table"], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def to_json(report: Report) -> str:
    """``report.json``: every table with its cells (values and run folders included) and the runs."""
    body = {
        "metric": report.metric, "error": report.error, "n_runs": len(report.runs),
        "units": {t.key: t.unit for t in report.tables},
        "unit_meanings": {u: meaning(u) for u in dict.fromkeys(t.unit for t in report.tables) if meaning(u)},
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
                raise UserError(f"--format: got '{part}'{did_you_mean(part, FORMATS)}; allowed: {', '.join(FORMATS)}")
            if part not in out:
                out.append(part)
    return out


def write_files(report: Report, formats: list[str], out_dir: Path) -> list[Path]:
    """Write ``report.<fmt>`` into ``out_dir`` for each of ``formats``; the paths written."""
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
