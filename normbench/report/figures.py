"""What every plot of the report shares: the figure, the batch-size axis, the file formats
(``--plot`` picks one by its extension: ``.png``, ``.svg`` or ``.pdf``) and the writer.

Every plot of one ``normbench report --plot FILE`` call is written in FILE's format: the
accuracy plot to FILE, the others beside it under their own names with the same extension.
SVG keeps its text as text (method names can be searched and edited), PDF embeds TrueType
fonts. Matplotlib is imported only when a figure is drawn.
"""
from __future__ import annotations

import io
from pathlib import Path

from normbench.errors import UserError
from normbench.tracking import atomic_write

PLOT_FORMATS = ("png", "svg", "pdf")


def plot_format(path: Path) -> str:
    """The format of a ``--plot`` file from its extension; anything else is a UserError."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in PLOT_FORMATS:
        allowed = ", ".join(f".{f}" for f in PLOT_FORMATS)
        raise UserError(f"--plot: got '{path}'; give a file name ending in one of {allowed}")
    return suffix


def check_plot_path(path: Path) -> Path:
    """``path`` once its format is known and its folder exists (created when missing)."""
    path = Path(path)
    plot_format(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--plot: cannot create {path.parent}: {err.strerror}") from None
    return path


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` to ``path`` (atomically) in the format its extension names."""
    from matplotlib import rc_context

    path = Path(path)
    buf = io.BytesIO()
    with rc_context({"svg.fonttype": "none", "pdf.fonttype": 42}):
        fig.savefig(buf, format=plot_format(path))
    atomic_write(path, buf.getvalue())
    return path


def batch_axis(ax, batches: list[int]) -> None:
    """Log2 batch-size x axis from the largest batch on the left to the smallest on the right,
    as in Wu & He (2018); shared by every plot of the report."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches)
    ax.set_xticklabels([str(b) for b in batches])
    ax.minorticks_off()
    if batches:
        ax.set_xlim(max(batches) * 1.25, min(batches) / 1.25)
    ax.set_xlabel("batch size (images per step)")


def figure_legend(fig, handles: list, labels: list, max_cols: int = 6, fontsize: float = 8,
                  above: float = 0.03) -> float:
    """A legend across the bottom of ``fig``, ``above`` (a figure fraction) the bottom edge to
    leave room for a footnote, in the most columns (at most ``max_cols``) whose row still fits
    the figure's width; returns the figure fraction up to the legend's top, for
    :func:`title_and_layout`'s ``bottom``."""
    renderer = fig.canvas.get_renderer()
    for ncol in range(max(1, min(len(handles), max_cols)), 0, -1):
        legend = fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, above), ncol=ncol,
                            fontsize=fontsize, frameon=False)
        box = legend.get_window_extent(renderer)
        if box.width <= 0.98 * fig.bbox.width or ncol == 1:
            return above + box.height / fig.bbox.height + 0.01
        legend.remove()
    return above


def title_and_layout(fig, title: str, fontsize: float = 10, bottom: float = 0.0):
    """Give ``fig`` its suptitle and ``tight_layout`` (the panels above ``bottom``, a figure
    fraction kept for a legend), then lower the panels by as much as their titles still run
    into it (on a tall figure the plain layout leaves too little room for a two-line title);
    returns the title."""
    text = fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    renderer = fig.canvas.get_renderer()
    panels_top = max((ax.get_tightbbox(renderer).y1 for ax in fig.axes if ax.get_visible()), default=0.0)
    overlap = panels_top - (text.get_window_extent(renderer).y0 - 0.05 * fig.dpi)  # and 0.05 in apart
    if overlap > 0:
        fig.subplots_adjust(top=fig.subplotpars.top - overlap / fig.bbox.height)
    return text


def figure(rows: int, cols: int, width: float, height: float, dpi: int = 150, **kw):
    """A matplotlib figure (Agg, no pyplot state) and its ``rows`` × ``cols`` grid of axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False, **kw)
