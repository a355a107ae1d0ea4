"""``normbench report``: tables (method x batch size, mean with a 95% interval over seeds),
plots and the per-run CSV from run summaries (:mod:`normbench.report` does the work)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from normbench.cli.app import app, console, fail
from normbench.errors import UserError

EXAMPLE = ("Example: normbench report runs/sweeps/quick -f md,csv --per-run --plot runs/sweeps/quick/accuracy.svg")


@app.command(epilog=EXAMPLE)
def report(
    folder: Path = typer.Argument(..., metavar="DIR", help="A sweep folder or any folder of runs."),
    format_: List[str] = typer.Option([], "--format", "-f", help="Also write report.<format>, one of: md, csv, "
                                      "json (repeatable or a comma list, e.g. md,csv)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for the --format files and runs.csv "
                                       "(default DIR)."),
    per_run: bool = typer.Option(False, "--per-run", help="Also write runs.csv: one row per run (method, batch "
                                 "size, seed, status, every final figure with its unit in the column name, the "
                                 "config keys that differ)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw accuracy vs batch size to this file, in the "
                                        "format of its extension, one of: .png, .svg, .pdf; the other plots go "
                                        "beside it in the same format."),
    error: bool = typer.Option(False, "--error", help="Report test error (100 - accuracy, %) instead of accuracy."),
    metric: str = typer.Option("final", "--metric", help="Which test accuracy, one of: final (end of training), "
                               "best (best evaluation)."),
    small_batch: Optional[int] = typer.Option(None, "--small-batch", help="Batch effect: this batch size minus "
                                              "--ref-batch, paired by seed (default: the smallest batch)."),
    ref_batch: Optional[int] = typer.Option(None, "--ref-batch", help="Reference batch of the batch effect "
                                            "(default 32, or the largest batch when no run has 32)."),
) -> None:
    """Tables (method × batch size, mean with a 95% interval over seeds), plots and a per-run CSV
    from run summaries. Accuracies are in percent; every file names its units."""
    from normbench import report as rp

    try:
        formats = rp.parse_formats(format_)
        if metric not in rp.METRICS:
            raise UserError(f"--metric: got '{metric}'; allowed: {', '.join(rp.METRICS)}")
        ext = rp.plot_format(plot) if plot is not None else None
        runs = rp.collect(folder, warn=lambda m: typer.echo(f"normbench: warning: {m}", err=True))
        if not runs:
            raise UserError(f"report: no runs under {folder} (no summary.json found)")
        columns, plots_hook = rp.analysis_columns()
        result = rp.build_report(runs, metric=metric, error=error, extra_columns=columns,
                                 small_batch=small_batch, ref_batch=ref_batch)
        rp.render_terminal(result, console())
        written = rp.write_files(result, formats, out or folder) if formats else []
        if per_run:
            written.append(rp.write_per_run(runs, out or folder))
        if plot is not None:
            written.append(rp.plot(result, plot))
            curves = plot.with_name(f"accuracy_curves.{ext}")
            if curves == plot:
                curves = plot.with_name(f"accuracy_epochs.{ext}")
            written.append(rp.plot_curves(result, curves))
            if plots_hook is not None:
                summaries = [{**r.summary, "_dir": str(r.path), "_label": r.label, "_method": r.method}
                             for r in runs if r.summary]
                written += list(plots_hook(summaries, plot.parent, ext) or [])
    except UserError as err:
        fail(str(err))
        return
    for path in written:
        if path is not None:
            typer.echo(f"wrote {path}")
