"""``normbench report``: tables (method x batch size, mean with a 95% interval over seeds) and
plots from run summaries (:mod:`normbench.report` does the work)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from normbench.cli.app import app, console, fail
from normbench.errors import UserError


@app.command()
def report(
    folder: Path = typer.Argument(..., metavar="DIR", help="A sweep folder or any folder of runs."),
    format_: List[str] = typer.Option([], "--format", "-f", help="Also write report.md / .csv / .json: md, csv, "
                                      "json (repeatable or a comma list)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for the --format files (default DIR)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw accuracy vs batch size to this PNG file."),
    error: bool = typer.Option(False, "--error", help="Report test error (100 - accuracy) instead of accuracy."),
    metric: str = typer.Option("final", "--metric", help="final (end of training) or best (best evaluation)."),
    small_batch: Optional[int] = typer.Option(None, "--small-batch", help="Batch effect: this batch size minus "
                                              "--ref-batch, paired by seed (default: the smallest batch)."),
    ref_batch: Optional[int] = typer.Option(None, "--ref-batch", help="Reference batch of the batch effect "
                                            "(default 32, or the largest batch when no run has 32)."),
) -> None:
    """Tables (method × batch size, mean with a 95% interval over seeds) and plots from run summaries."""
    from normbench import report as rp

    try:
        formats = rp.parse_formats(format_)
        if metric not in rp.METRICS:
            raise UserError(f"--metric: got '{metric}'; allowed: {', '.join(rp.METRICS)}")
        if plot is not None and plot.suffix.lower() != ".png":
            raise UserError(f"--plot: got '{plot}'; give a file name ending in .png")
        runs = rp.collect(folder, warn=lambda m: typer.echo(f"normbench: warning: {m}", err=True))
        if not runs:
            raise UserError(f"report: no runs under {folder} (no summary.json found)")
        columns, plots_hook = rp.analysis_columns()
        result = rp.build_report(runs, metric=metric, error=error, extra_columns=columns,
                                 small_batch=small_batch, ref_batch=ref_batch)
        rp.render_terminal(result, console())
        written = rp.write_files(result, formats, out or folder) if formats else []
        if plot is not None:
            written.append(rp.plot(result, plot))
            from normbench.report.plots import plot_curves

            curves = plot.parent / "accuracy_curves.png"
            written.append(plot_curves(result, curves if curves != plot else plot.with_name("accuracy_epochs.png")))
            if plots_hook is not None:
                summaries = [{**r.summary, "_dir": str(r.path)} for r in runs if r.summary]
                written += list(plots_hook(summaries, plot.parent) or [])
    except UserError as err:
        fail(str(err))
        return
    for path in written:
        if path is not None:
            typer.echo(f"wrote {path}")
