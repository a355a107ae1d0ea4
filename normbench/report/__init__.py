"""`normbench report`: tables and plots from run folders (method × batch size, mean and 95%
interval over seeds).

One job per module; each imports only modules listed before it:
``styles`` (display names, plot styles), ``stats`` (t intervals, best-cell rule),
``summary_keys`` (what is read from a summary), ``methods`` (row keys and order), ``runs``
(reading run folders), ``tables`` (the table model), ``study`` (the study tables), ``plots``
(accuracy plots), ``analysis_plots`` (analysis plots), ``build`` (:func:`build_report`),
``render`` (terminal, md, csv, json). The names below are the command's entry points.
"""
from normbench.report.build import METRICS, analysis_columns, build_report
from normbench.report.plots import plot, plot_curves
from normbench.report.render import parse_formats, render_terminal, to_csv, to_markdown, write_files
from normbench.report.runs import collect

__all__ = ["METRICS", "analysis_columns", "build_report", "collect", "parse_formats", "plot", "plot_curves",
           "render_terminal", "to_csv", "to_markdown", "write_files"]
