"""The report's plots: accuracy against batch size, and test accuracy against epoch, as PNG,
SVG or PDF (by the file's extension; :mod:`normbench.report.figures`).

* :func:`plot_accuracy`: GN-paper style (Wu & He 2018, Fig. 1): test accuracy (or error)
  against the batch size on a log2 axis running from the largest batch on the left to the
  smallest on the right, one line per method, the mean over seeds with its 95% t-interval as
  error bars and every seed as a faint dot; an × on the top edge where a method's runs all
  diverged or failed.
* :func:`plot_curves` (``accuracy_curves.png`` beside it): one panel per batch size, one line
  per method: at each epoch the mean over the completed seeds of the ``test/acc`` records in
  their ``metrics.jsonl`` (the epochs every seed of the cell evaluated), and the band between
  the lowest and the highest seed (``accuracy_curves.svg`` beside an SVG, and so on); not
  drawn when no method was evaluated at two epochs or more.

Every plot names a method by its display name and draws it in its fixed colour and marker
(:mod:`normbench.report.styles`); titles carry the protocol read from the summaries
(:func:`normbench.report.styles.protocol`). The figure and batch-axis helpers live in
:mod:`normbench.report.figures`, shared with :mod:`normbench.report.analysis_plots`.
Matplotlib is imported only when a plot is drawn.
"""
from __future__ import annotations

import json
from pathlib import Path
from statistics import fmean
from typing import Optional

from normbench.report.figures import (batch_axis, check_plot_path, figure, figure_legend, save_figure,
                                      title_and_layout)
from normbench.report.methods import method_sort_key
from normbench.report.styles import assign_styles, protocol, style_key

__all__ = ["accuracy_figure", "curves", "curves_figure", "epoch_accuracies", "method_colours", "method_styles", "plot",
           "plot_accuracy", "plot_curves", "title_protocol"]


def method_styles(runs) -> dict:
    """A style per method key of ``runs`` (report order), by its display family."""
    first: dict[str, object] = {}
    for run in runs:
        first.setdefault(run.method, run)
    return assign_styles((m, style_key(first[m].config)) for m in sorted(first, key=method_sort_key))


def method_colours(methods: list[str]) -> dict[str, str]:
    """A colour per method key (``bn``, ``none+agc``, ``gn groups=16``): its family's fixed
    colour (:data:`normbench.report.styles.STYLES`), the first of a family in report order taking
    it; every plot of one report gives a method one colour."""
    ordered = sorted(dict.fromkeys(methods), key=method_sort_key)
    return {m: s.colour for m, s in assign_styles((m, m.split(" ")[0]) for m in ordered).items()}


def title_protocol(runs) -> str:
    label = {id(r.summary): r.label or r.method for r in runs if r.summary}
    return protocol([r.summary for r in runs if r.summary], group=lambda s: label[id(s)])


def plot_accuracy(report, path: Path) -> Path:
    """Accuracy (or error) against batch size, written to ``path``; see the module docstring."""
    path = check_plot_path(path)
    return save_figure(accuracy_figure(report), path)


def accuracy_figure(report):
    """The figure of :func:`plot_accuracy`: a line per method, a cross at the top edge for a
    cell whose runs all diverged or failed."""
    from matplotlib.lines import Line2D
    from matplotlib.transforms import blended_transform_factory

    table = report.tables[0]
    fig, axes = figure(1, 1, 10.0, 5.4)
    ax = axes[0][0]
    style = method_styles(report.runs)
    top_edge = blended_transform_factory(ax.transData, ax.transAxes)
    any_diverged, seen = False, []
    for i, method in enumerate(table.methods):
        colour, marker = style[method]
        dodge = 2.0 ** (0.035 * (i - (len(table.methods) - 1) / 2))  # methods side by side at each batch
        xs, ys, es = [], [], []
        for batch in table.batch_sizes:
            c = table.cell(method, batch)
            if c.values:
                xs.append(batch * dodge)
                ys.append(c.mean)
                es.append(c.half or 0.0)
                seen += c.values
                ax.plot([batch * dodge] * c.n, c.values, linestyle="none", marker=marker, color=colour,
                        alpha=0.3, markersize=3)
            elif c.n_diverged or c.n_failed:
                any_diverged = True
                ax.plot([batch], [0.97], marker="x", color=colour, markersize=9, mew=2,
                        transform=top_edge, clip_on=False, linestyle="none")
        if xs:
            ax.errorbar(xs, ys, yerr=es if any(es) else None, color=colour, marker=marker, markersize=6,
                        linewidth=1.8, capsize=3, label=table.label(method))
        else:
            ax.plot([], [], color=colour, marker="x", linestyle="none",
                    label=f"{table.label(method)} (no completed run)")
    batch_axis(ax, table.batch_sizes)
    if seen:  # the seeds set the range; an interval wider than it runs off the axes
        lo, hi = min(seen), max(seen)
        pad = max(2.0, 0.08 * (hi - lo))
        ax.set_ylim(max(0.0, lo - pad), min(100.0, hi + pad))
    what = "error" if report.error else "accuracy"
    ax.set_ylabel(f"test {what} (%)")
    ax.set_title(f"test {what} ({report.metric}) vs batch size\n{title_protocol(report.runs)}", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if any_diverged:
        handles.append(Line2D([], [], color="0.3", marker="x", linestyle="none", mew=2))
        labels.append("diverged / failed")
    if handles:
        ax.legend(handles, labels, fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.text(0.99, 0.005, "lines: mean over seeds; error bars: 95% t-interval of the mean (none at n=1); "
             "dots: seeds", ha="right", va="bottom", fontsize=7, color="0.4")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    return fig


def plot(report, path: Path) -> Path:
    """Accuracy (or error) against batch size: :func:`plot_accuracy`."""
    return plot_accuracy(report, path)


# ----------------------------------------------------------------------------- curves


def epoch_accuracies(run_dir: Path) -> dict[float, float]:
    """epoch -> test accuracy (%) from a run's ``metrics.jsonl`` (the last record of an epoch
    wins); records that are not JSON objects with a numeric epoch and accuracy are skipped."""
    out: dict[float, float] = {}
    try:
        text = (Path(run_dir) / "metrics.jsonl").read_text()
    except (OSError, UnicodeDecodeError):
        return out
    for line in text.splitlines():
        if '"test/acc"' not in line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict):
            continue
        epoch, acc = rec.get("epoch"), rec.get("test/acc")
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) and v == v for v in (epoch, acc)):
            out[float(epoch)] = 100.0 * float(acc)
    return out


def curves(runs) -> dict[int, dict[str, list[tuple[float, float, float, float]]]]:
    """batch -> method -> [(epoch, mean, min, max) over the completed seeds], at the epochs
    that every seed of the cell has."""
    per: dict[int, dict[str, list[dict]]] = {}
    for run in runs:
        if run.status != "completed":
            continue
        acc = epoch_accuracies(run.path)
        if acc:
            per.setdefault(run.batch_size, {}).setdefault(run.method, []).append(acc)
    out: dict[int, dict[str, list]] = {}
    for batch, methods in per.items():
        for method, seeds in methods.items():
            epochs = sorted(set.intersection(*(set(s) for s in seeds)))
            if epochs:
                out.setdefault(batch, {})[method] = [
                    (e, fmean(s[e] for s in seeds), min(s[e] for s in seeds), max(s[e] for s in seeds))
                    for e in epochs]
    return out


def plot_curves(report, path: Path) -> Optional[Path]:
    """Test accuracy against epoch, one panel per batch size, written to ``path``; None when no
    method has a curve (two or more evaluations: a study of one-epoch runs has only points)."""
    path = check_plot_path(path)
    fig = curves_figure(report)
    return None if fig is None else save_figure(fig, path)


def curves_figure(report):
    """The figure of :func:`plot_curves` (None without data): a panel per batch size, a line
    per method named by its display name."""
    from matplotlib.ticker import MaxNLocator

    data = curves(report.runs)
    if not any(len(pts) > 1 for methods in data.values() for pts in methods.values()):
        return None
    batches = sorted(data)
    cols = min(len(batches), 4)
    rows = (len(batches) + cols - 1) // cols
    fig, axes = figure(rows, cols, 4.2 * cols + 1.0, 3.6 * rows + 0.9, sharey=True)  # one accuracy scale
    style = method_styles(report.runs)
    label = {r.method: r.label or r.method for r in report.runs}
    handles: dict[str, object] = {}
    for i, batch in enumerate(batches):
        ax = axes[i // cols][i % cols]
        for method in sorted(data[batch], key=method_sort_key):
            pts = data[batch][method]
            colour, marker = style[method]
            xs = [p[0] for p in pts]
            if len(pts) > 1:
                ax.fill_between(xs, [p[2] for p in pts], [p[3] for p in pts], color=colour, alpha=0.12, lw=0)
            (line,) = ax.plot(xs, [p[1] for p in pts], color=colour, marker=marker, markersize=4, lw=1.4,
                              label=label[method])
            handles.setdefault(label[method], line)
        ax.set_title(f"batch {batch}", fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_xlim(0, max(p[0] for pts in data[batch].values() for p in pts) * 1.05)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("test accuracy (%)")
        ax.yaxis.set_tick_params(labelleft=True)
        ax.grid(True, alpha=0.3)
    for j in range(len(batches), rows * cols):
        axes[j // cols][j % cols].set_visible(False)
    bottom = figure_legend(fig, list(handles.values()), list(handles))
    fig.text(0.99, 0.005, "lines: mean over the completed seeds; bands: lowest to highest seed", ha="right",
             va="bottom", fontsize=7, color="0.4")
    title_and_layout(fig, f"test accuracy vs epoch\n{title_protocol(report.runs)}", bottom=bottom)
    return fig
