"""The table a sweep prints when it ends: one row per method and batch size (its cells differ
only in seed), with the seeds done, the final test accuracy in percent (one seed: its value;
more: mean and range) and how the cells stand.

The runs are read as ``normbench report`` reads them (:func:`normbench.report.runs.collect`,
rows named by :func:`normbench.report.methods.assign_methods`), limited to the cells the
sweep's manifest (``sweep.json``) lists."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Optional

from normbench.progress_eta import percent
from normbench.sweep.plan import MANIFEST

COLUMNS = ("method", "batch", "seeds done", "test acc", "status")


@dataclass
class ResultRow:
    """The cells of one method at one batch size."""

    method: str
    batch: int
    statuses: list[str] = field(default_factory=list)  # one per cell with a run folder
    accs: list[float] = field(default_factory=list)  # final test accuracy (fraction) of each completed cell

    @property
    def done(self) -> int:
        return sum(1 for s in self.statuses if s == "completed")

    def acc_text(self) -> str:
        if not self.accs:
            return "-"
        if len(self.accs) == 1:
            return percent(self.accs[0])
        return f"{percent(fmean(self.accs))} ({100 * min(self.accs):.2f}–{100 * max(self.accs):.2f})"

    def status_text(self) -> str:
        counts: dict[str, int] = {}
        for s in self.statuses:
            counts[s] = counts.get(s, 0) + 1
        if len(counts) == 1:
            return next(iter(counts))
        return ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))

    def cells(self) -> tuple[str, ...]:
        return (self.method, str(self.batch), f"{self.done}/{len(self.statuses)}", self.acc_text(), self.status_text())


@dataclass
class SweepResults:
    rows: list[ResultRow]
    not_started: int  # cells of the manifest without a run folder yet


def manifest_run_dirs(out_dir: Path) -> Optional[list[Path]]:
    """The run folders ``sweep.json`` lists (None without a readable manifest)."""
    try:
        cells = json.loads((Path(out_dir) / MANIFEST).read_text())["cells"]
        return [Path(c["run_dir"]).resolve() for c in cells]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def sweep_results(out_dir: Path) -> Optional[SweepResults]:
    """The results of the sweep in ``out_dir`` (None without a manifest there)."""
    from normbench.report.methods import assign_methods, method_sort_key
    from normbench.report.runs import collect

    wanted = manifest_run_dirs(out_dir)
    if wanted is None:
        return None
    listed = set(wanted)
    runs = [r for r in collect(Path(out_dir)) if Path(r.path).resolve() in listed]
    assign_methods(runs)
    rows: dict[tuple[str, int], ResultRow] = {}
    for run in runs:
        row = rows.setdefault((run.label or run.method, run.batch_size), ResultRow(run.label or run.method,
                                                                               run.batch_size))
        row.statuses.append(run.status)
        acc = run.summary.get("final_test_acc")
        if run.status == "completed" and isinstance(acc, (int, float)) and acc == acc:
            row.accs.append(float(acc))
    order = {(r.label or r.method): method_sort_key(r.method) for r in runs}
    ordered = sorted(rows.values(), key=lambda row: (order[row.method], -row.batch))
    seen = {Path(r.path).resolve() for r in runs}
    return SweepResults(ordered, sum(1 for d in wanted if d not in seen))


TITLE = "results: final test accuracy (mean and range over seeds)"


def plain_table(results: SweepResults) -> str:
    """The table as aligned plain text."""
    lines = [tuple(COLUMNS)] + [row.cells() for row in results.rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    text = [TITLE] + ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    if results.not_started:
        text.append(f"{results.not_started} cell(s) not started")
    return "\n".join(text)


def rich_table(results: SweepResults):
    """The table as a rich Table."""
    from rich.table import Table

    table = Table(title=TITLE, title_justify="left")
    for col in COLUMNS:
        table.add_column(col, justify="right" if col in ("batch", "seeds done", "test acc") else "left")
    for row in results.rows:
        table.add_row(*row.cells())
    if results.not_started:
        table.caption = f"{results.not_started} cell(s) not started"
    return table
