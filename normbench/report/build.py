"""The report as a whole: :func:`build_report` turns runs into the report's tables.

It groups runs by *method* (:mod:`normbench.report.methods`) and batch size, and produces:

* test accuracy (or error) in % at the end of training (``final``) or the best evaluation
  (``best``): mean ± half-width of the Student-t 95% interval over the completed seeds, with
  n; cells whose runs diverged, failed or are still running say so; a cell is marked best
  only when its interval lies above every other cell's in its column (:mod:`normbench.report.stats`);
* the study tables of :mod:`normbench.report.study`: the batch effect from paired seeds, the
  accuracies with running, batch and precise-BN statistics, the fixed-probe beta;
* training throughput (images/s) and seconds per epoch (wall time / epochs, with eval);
* one table per analysis column (:func:`analysis_columns`) that some run has.

Writers are in :mod:`normbench.report.render` (terminal, Markdown, CSV, JSON) and
:mod:`normbench.report.plots` (PNG, SVG or PDF).
"""
from __future__ import annotations

from typing import Callable, Optional

from normbench.errors import UserError
from normbench.report.analysis_plots import plots
from normbench.report.runs import Run
from normbench.report.study import COVERED_KEYS, study_tables
from normbench.report.summary_keys import probe_mode, summary_columns, summary_units, value
from normbench.report.tables import Report, make_table
from normbench.report.units import short

METRICS = ("final", "best")


def analysis_columns() -> tuple[list[tuple], Optional[Callable]]:
    """(summary key, header, scale, unit) for each analysis column
    (:func:`normbench.report.summary_keys.summary_columns`; ``summary_units`` gives scale and
    unit, named as in :mod:`normbench.report.units`: fractions become percent), and the hook
    that draws the analysis plots (:func:`normbench.report.analysis_plots.plots`)."""
    units = summary_units()
    columns = [(k, h, *units.get(k, (1.0, ""))) for k, h in summary_columns()]
    return columns, plots


def build_report(runs: list[Run], metric: str = "final", error: bool = False,
                 extra_columns: Optional[list[tuple]] = None, small_batch: Optional[int] = None,
                 ref_batch: Optional[int] = None) -> Report:
    """The accuracy table, the study tables of :mod:`normbench.report.study` (batch effect of
    ``small_batch`` against ``ref_batch``, batch-statistics accuracies, fixed probe), the
    throughput and s/epoch tables, plus one per ``extra_columns`` entry, ``(summary key,
    header[, scale, unit])``, that some run has (``analysis=True`` on those tables: files
    only, not the terminal; probe keys count lr-mode probes only)."""
    if metric not in METRICS:
        raise UserError(f"--metric: got '{metric}'; allowed: {', '.join(METRICS)}")
    if not runs:
        raise UserError("report: no runs found (no summary.json under the folder)")
    key = "final_test_acc" if metric == "final" else "best_test_acc"

    def acc(run: Run) -> Optional[float]:
        v = value(run.summary, key)
        if v is None:
            return None
        return 100.0 * (1.0 - v) if error else 100.0 * v

    what = "error" if error else "accuracy"
    which = "at the end of training" if metric == "final" else "best evaluation"
    side = "below" if error else "above"
    tables = [
        make_table(runs, f"test_{what}", f"Test {what} (%), {which}", "percent", acc, "min" if error else "max", 2,
                   True,
                   note="mean ± half-width of the 95% confidence interval of the mean over seeds (Student t, "
                        "n−1 degrees of freedom; n = runs averaged; n=1: no interval); a cell is marked best "
                        f"only when its interval lies entirely {side} the interval of every other cell in its "
                        "column (the next best included), so a column with overlapping leaders or a "
                        "single-seed cell has no mark; div = diverged runs, not in the mean; no value = "
                        "completed runs without the accuracy (named in a warning), not in the mean", required=True),
        *study_tables(runs, acc, what, small_batch, ref_batch),
        make_table(runs, "images_per_s", "Training throughput (img/s)", "img/s",
                   lambda r: value(r.summary, "images_per_s"), None, 0, False, with_std=False,
                   note="mean over seeds of the training-step throughput (evaluation excluded)"),
        make_table(runs, "s_per_epoch", "Seconds per epoch (wall time incl. evaluation)", "seconds",
                   lambda r: (value(r.summary, "wall_time_s") / value(r.summary, "epochs"))
                   if value(r.summary, "wall_time_s") and value(r.summary, "epochs") else None,
                   None, 1, False, with_std=False, note="wall time / epochs run, mean over seeds"),
    ]
    covered = COVERED_KEYS if any(t.key == "batch_stats_accuracy" for t in tables) else ()
    for col_key, header, *rest in extra_columns or []:
        scale, unit = rest if rest else (1.0, "")

        def get(r: Run, k=col_key, scale=scale) -> Optional[float]:
            v = value(r.summary, k)
            lr_probe = not k.startswith("probe_") or probe_mode(r.summary) == "lr"
            return None if v is None or not lr_probe else v * scale
        if col_key in covered or not any(get(r) is not None for r in runs):
            continue
        shown = f"the fraction × {scale:g}, in {unit}" if scale != 1.0 else f"in {unit}" if unit else ""
        table = make_table(runs, col_key, f"{header} ({short(unit)})" if unit else header, unit, get, None,
                           2 if unit in ("percent", "points") else 4, True,
                           note=f"summary key '{col_key}'{f' ({shown})' if shown else ''}, mean ± half-width of "
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
