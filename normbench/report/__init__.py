"""`normbench report`: tables and plots from run folders (method × batch size, mean and 95%
interval over seeds), and the per-run CSV.

One job per module; each imports only modules listed before it:
``units`` (the unit names), ``styles`` (display names, plot styles), ``stats`` (t intervals,
best-cell rule), ``summary_keys`` (what is read from a summary), ``methods`` (row keys and
order), ``runs`` (reading run folders), ``tables`` (the table model), ``study`` (the study
tables), ``figures`` (figure, batch axis, PNG/SVG/PDF files), ``plots`` (accuracy plots),
``analysis_plots`` (analysis plots), ``build`` (:func:`build_report`), ``render`` (terminal,
md, csv, json), ``per_run`` (``runs.csv``). The names below are the command's entry points.
"""
from normbench.report.build import METRICS, analysis_columns, build_report
from normbench.report.figures import PLOT_FORMATS, check_plot_path, plot_format
from normbench.report.per_run import to_per_run_csv, write_per_run
from normbench.report.plots import plot, plot_curves
from normbench.report.render import parse_formats, render_terminal, to_csv, to_markdown, write_files
from normbench.report.runs import collect

__all__ = ["METRICS", "PLOT_FORMATS", "analysis_columns", "build_report", "check_plot_path", "collect",
           "parse_formats", "plot", "plot_curves", "plot_format", "render_terminal", "to_csv", "to_markdown",
           "to_per_run_csv", "write_files", "write_per_run"]
