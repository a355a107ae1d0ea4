"""The table model and how a table is made: a :class:`Table` of one quantity, method (row) ×
batch size (column), of :class:`CellStat` cells (the values of a cell's completed runs, the
counts of those that did not complete, its text), and the :class:`Report` that holds the
tables.

:func:`make_table` fills a table from runs: mean ± half-width of the Student-t 95% interval
over the completed seeds, with n; cells whose runs diverged, failed or are still running say
so; a cell is marked best only when its interval lies clear of every other cell's in its
column (:func:`normbench.report.stats.best_index`).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable, Optional

from normbench.report.methods import method_sort_key
from normbench.report.runs import Run
from normbench.report.stats import best_index, interval


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
        """:class:`normbench.report.stats.Interval` (mean, 95% half-width, n), or None."""
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
    analysis: bool = False  # an analysis-column table (written to files only, not the terminal)
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


def fmt(value: Optional[float], digits: int) -> str:
    if value is None or value != value:
        return "—"
    return f"{value:.{digits}f}"


def cell_text(stat: CellStat, digits: int, with_std: bool, required: bool = False) -> str:
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
    text = fmt(stat.mean, digits)
    if with_std and stat.half is not None:
        text += f" ± {fmt(stat.half, digits)}"
    if with_std:
        text += f" (n={stat.n})"
    extra = [f"{k} {what}" for k, what in ((stat.n_diverged, "div"), (stat.n_failed, "failed"),
                                             (stat.n_running, "running"), (stat.n_interrupted, "interrupted"),
                                             (no_value, "no value")) if k]
    if extra:
        text += " +" + ", +".join(extra)
    return text


def make_table(runs: list[Run], key: str, title: str, unit: str, get: Callable[[Run], Optional[float]],
               better: Optional[str], digits: int, completed_only: bool, with_std: bool = True, note: str = "",
               required: bool = False) -> Table:
    """A table of ``get(run)`` (None: no value) by method and batch size. ``better`` ("max",
    "min" or None) marks a best cell per column; ``completed_only``: only completed runs are
    averaged (else diverged and interrupted ones too, where they have the value)."""
    methods = sorted({r.method for r in runs}, key=method_sort_key)
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
        stat.text = cell_text(stat, digits, with_std, required)
    if better:
        for batch in batches:
            column = [cells[(m, batch)] for m in methods if (m, batch) in cells and cells[(m, batch)].values]
            pick = best_index([c.ci for c in column], better)
            if pick is not None:
                column[pick].best = True
    return Table(key, title, unit, methods, batches, cells, better, digits, with_std, note)
