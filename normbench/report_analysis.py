"""The analysis part of the report: summary columns and plots (for normbench.report).

Contract with the report:

* :func:`summary_columns` lists (summary key, column header) pairs the analysis adds to
  ``summary.json``; a run without a key shows an empty cell.
* :func:`plots` takes ``summaries``: a list of summary dicts as read from ``summary.json``
  (:func:`normbench.tracking.read_summary`), each with one extra key ``_dir``: the run folder
  that holds that summary.json (a ``str`` or ``Path``; a ``run_dir`` key, as returned by
  ``engine.train``, is accepted instead). ``_dir`` is only needed for the probe plot, which
  reads ``probe/*`` records from the run's ``metrics.jsonl``. Runs whose ``status`` is not
  ``completed`` are ignored. It writes PNGs into ``out_dir`` and returns their paths: only
  the plots for which some run has data (possibly none).

Plots:

* ``analysis_bn_gap.png``: for each batch-statistics method (``get_scheme(kind).batch_dependent``)
  the train/eval gap (train-mode minus eval-mode test accuracy, points) against the batch
  size on a log2 axis, and the three test accuracies (eval mode, train mode, precise BN).
  Several seeds of a (method, batch) cell are averaged; each run is also drawn as a dot.
* ``analysis_probe.png``: the landscape probe of Santurkar et al. 2018 (Fig. 4) over
  training (x = epochs, so different batch sizes align): the band between the smallest and
  largest loss along the gradient, the band of gradient changes ||g_s - g|| and the effective
  beta-smoothness (log scale), one colour per method, one row per batch size (largest first).
  Seeds of a cell are averaged step by step; raw probe values are noisy, so lines show a
  centred running median over 5 probes.
* ``analysis_probe_vs_batch.png``: the same three quantities against the batch size (log2
  axis, largest batch left as in the accuracy plot): per run the median over its probes, then
  the mean over seeds. Beta is per unit step and compares across batch sizes; the loss range
  and the gradient change scale with the step (lr = 0.1 B/128 in the study), so compare
  methods within a batch size.

Every plot gives a method the colour it has in the report's accuracy plot
(:func:`normbench.report.method_colours`) and names it as the report does (``none+agc``).
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from statistics import mean, median
from typing import Optional

COLUMNS = [
    ("test_acc_eval_mode", "acc (eval mode)"),
    ("test_acc_train_mode", "acc (train mode)"),
    ("train_eval_gap", "train-eval gap"),
    ("test_acc_precise_bn", "acc (precise BN)"),
    ("dead_unit_frac", "dead units"),
    ("probe_beta_mean", "probe beta (mean)"),
    ("probe_grad_pred_mean", "probe grad change (mean)"),
    ("probe_loss_range_mean", "probe loss range (mean)"),
]


def summary_columns() -> list[tuple[str, str]]:
    """(summary.json key, column header) for each figure the analysis contributes. The
    accuracies and the gap are fractions (0-1; the gap may be negative); dead units is a
    fraction of channels; the probe means average ``probe/*`` over a run's probes."""
    return list(COLUMNS)


# ----------------------------------------------------------------------------- helpers


def _run_dir(summary: dict) -> Optional[Path]:
    where = summary.get("_dir") or summary.get("run_dir")
    return Path(where) if where else None


def _method(summary: dict) -> str:
    """The report's row name (``kind``, or ``kind+clip`` when clipping is on)."""
    from normbench.report import base_method

    return base_method(summary.get("config") or {})


def _kind(summary: dict) -> str:
    return ((summary.get("config") or {}).get("norm") or {}).get("kind", "?")


def _batch(summary: dict) -> Optional[int]:
    return ((summary.get("config") or {}).get("train") or {}).get("batch_size")


def _batch_dependent(summary: dict) -> bool:
    try:
        from normbench.norms import get_scheme

        return get_scheme(_kind(summary)).batch_dependent
    except Exception:  # noqa: BLE001 - a scheme this checkout does not know: trust the summary
        return bool(summary.get("batch_dependent", summary.get("train_eval_gap") is not None))


def _num(v) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _figure(rows: int, cols: int, width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _colours(summaries: list[dict]) -> dict[str, tuple]:
    """The report's colour for every method with a completed run (the accuracy plot's colours)."""
    from normbench.report import method_colours

    return method_colours([_method(s) for s in summaries if s.get("status") == "completed"])


def _large_to_small(ax, batches: list[int]) -> None:
    """The accuracy plot's batch axis (large to small, log2), with a grid."""
    from normbench.report import batch_axis

    batch_axis(ax, batches)
    ax.grid(True, alpha=0.3)


def _in_report_order(methods) -> list[str]:
    from normbench.report import _method_sort_key

    return sorted(methods, key=_method_sort_key)


def _running_median(values: list[float], k: int = 5) -> list[float]:
    half = k // 2
    return [median(values[max(0, i - half): i + half + 1]) for i in range(len(values))]


# ----------------------------------------------------------------------------- plots


def plot_bn_gap(summaries: list[dict], path: Path, colours: dict[str, tuple]) -> Optional[Path]:
    """The train/eval gap and the three accuracies against the batch size (log2 axis)."""
    cells: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for s in summaries:
        if s.get("status") != "completed" or not _batch_dependent(s):
            continue
        if _num(s.get("train_eval_gap")) is None or _batch(s) is None:
            continue
        cells[_method(s)][_batch(s)].append(s)
    if not cells:
        return None
    fig, axes = _figure(1, 2, 11.0, 4.2)
    gap_ax, acc_ax = axes[0]
    batches_seen: set[int] = set()
    for method, by_batch in sorted(cells.items()):
        xs = sorted(by_batch)
        batches_seen.update(xs)
        c = colours[method]
        gaps = [100 * mean(_num(s["train_eval_gap"]) for s in by_batch[b]) for b in xs]
        gap_ax.plot(xs, gaps, "-o", color=c, label=method)
        for b in xs:
            if len(by_batch[b]) > 1:
                gap_ax.scatter([b] * len(by_batch[b]), [100 * s["train_eval_gap"] for s in by_batch[b]],
                               color=c, alpha=0.35, s=12)
        for key, style, name in (("test_acc_eval_mode", "-o", "eval mode"), ("test_acc_train_mode", "--s", "train mode"),
                                 ("test_acc_precise_bn", ":^", "precise BN")):
            pts = [(b, [_num(s.get(key)) for s in by_batch[b]]) for b in xs]
            pts = [(b, mean(v for v in vals if v is not None)) for b, vals in pts if any(v is not None for v in vals)]
            if pts:
                acc_ax.plot([b for b, _ in pts], [100 * v for _, v in pts], style, color=c, label=f"{method}, {name}")
    for ax in (gap_ax, acc_ax):
        _large_to_small(ax, sorted(batches_seen))
    gap_ax.axhline(0.0, color="black", lw=0.8)
    gap_ax.set_ylabel("train-mode minus eval-mode test acc (points)")
    gap_ax.set_title("BN train/eval gap")
    gap_ax.legend(fontsize=8)
    acc_ax.set_ylabel("test accuracy (%)")
    acc_ax.set_title("running stats (eval) vs batch stats (train) vs precise BN")
    acc_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _probe_records(run_dir: Path) -> list[dict]:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return []
    out = []
    for line in metrics.read_text().splitlines():
        if '"probe/' not in line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        step = rec.get("step") if isinstance(rec, dict) else None
        if isinstance(step, int) and not isinstance(step, bool) and "probe/loss_range" in rec:
            out.append(rec)  # a record without an integer step cannot be placed on the curve
    return sorted(out, key=lambda r: r["step"])


def _probe_runs(summaries: list[dict]) -> dict[int, dict[str, list[list[dict]]]]:
    """batch size -> method -> the probe records of each completed run (one list per seed)."""
    rows: dict[int, dict[str, list[list[dict]]]] = defaultdict(lambda: defaultdict(list))
    for s in summaries:
        where = _run_dir(s)
        if s.get("status") != "completed" or where is None or _batch(s) is None:
            continue
        recs = _probe_records(where)
        if recs:
            rows[_batch(s)][_method(s)].append(recs)
    return rows


def _seed_mean(runs: list[list[dict]], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values): ``key`` at every probe step the runs share, averaged over the runs
    (seeds of one cell probe the same steps), smoothed by a running median over 5 probes."""
    by_step: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for recs in runs:
        for rec in recs:
            v = _num(rec.get(key))
            if v is not None:
                epoch = _num(rec.get("epoch"))
                by_step[rec["step"]].append((rec["step"] if epoch is None else epoch, v))
    steps = [st for st in sorted(by_step) if len(by_step[st]) == len(runs)]
    epochs = [mean(e for e, _ in by_step[st]) for st in steps]
    return epochs, _running_median([mean(v for _, v in by_step[st]) for st in steps])


def plot_probe(rows: dict[int, dict[str, list[list[dict]]]], path: Path,
               colours: dict[str, tuple]) -> Optional[Path]:
    """Santurkar et al. Fig. 4 per method: loss band, gradient-change band, effective beta."""
    if not rows:
        return None
    batches = sorted(rows, reverse=True)
    fig, axes = _figure(len(batches), 3, 15.0, 3.6 * len(batches))
    for r, b in enumerate(batches):
        loss_ax, grad_ax, beta_ax = axes[r]
        for method in _in_report_order(rows[b]):
            runs, c = rows[b][method], colours.get(method, "0.5")
            ep, lo = _seed_mean(runs, "probe/loss_min")
            _, hi = _seed_mean(runs, "probe/loss_max")
            loss_ax.fill_between(ep, lo, hi, color=c, alpha=0.3, lw=0)
            loss_ax.plot(ep, lo, color=c, lw=0.8, label=method)
            ep, glo = _seed_mean(runs, "probe/grad_pred_min")
            _, ghi = _seed_mean(runs, "probe/grad_pred")
            grad_ax.fill_between(ep, glo, ghi, color=c, alpha=0.3, lw=0)
            grad_ax.plot(ep, ghi, color=c, lw=0.8, label=method)
            ep, beta = _seed_mean(runs, "probe/beta")
            beta_ax.plot(ep, beta, color=c, lw=1.2, label=method)
        loss_ax.set_title(f"batch {b}: loss along the gradient (min-max band)")
        loss_ax.set_ylabel("training loss")
        grad_ax.set_title(f"batch {b}: gradient predictiveness, ||g_s - g||")
        grad_ax.set_yscale("log")
        beta_ax.set_title(f"batch {b}: effective beta-smoothness")
        beta_ax.set_yscale("log")
        for ax in (loss_ax, grad_ax, beta_ax):
            ax.set_xlabel("epoch")
            ax.grid(True, alpha=0.3)
        beta_ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    return path


PROBE_SUMMARY = (("probe/beta", "effective beta-smoothness", "comparable across batch sizes (per unit step)"),
                 ("probe/grad_pred", "gradient change ||g_s - g||", "scales with the step: compare within a batch size"),
                 ("probe/loss_range", "loss range along the step", "scales with the step: compare within a batch size"))


def plot_probe_vs_batch(rows: dict[int, dict[str, list[list[dict]]]], path: Path,
                        colours: dict[str, tuple]) -> Optional[Path]:
    """Each probe quantity against the batch size: per run the median over its probes (robust
    to the rise at the end of a cosine schedule), then the mean over seeds; one line per method."""
    if not rows:
        return None
    batches = sorted(rows)
    methods = _in_report_order({m for by_method in rows.values() for m in by_method})
    from normbench.report import MARKERS

    fig, axes = _figure(1, 3, 16.0, 4.6)
    for ax, (key, title, note) in zip(axes[0], PROBE_SUMMARY):
        for i, method in enumerate(methods):
            pts = []
            for b in batches:
                per_run = [median(vals) for recs in rows[b].get(method, [])
                           if (vals := [v for rec in recs if (v := _num(rec.get(key))) is not None])]
                if per_run:
                    pts.append((b, mean(per_run)))
            if pts:
                ax.plot([b for b, _ in pts], [v for _, v in pts], "-" + MARKERS[i % len(MARKERS)],
                        color=colours.get(method, "0.5"), label=method, markersize=4)
        _large_to_small(ax, batches)
        ax.set_yscale("log")
        ax.set_title(f"{title}\n({note})", fontsize=10)
        ax.set_ylabel("median over the run's probes")
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plots(summaries: list[dict], out_dir: Path) -> list[Path]:
    """Write the analysis PNGs for ``summaries`` (each with ``_dir``: its run folder; see the
    module docstring) into ``out_dir``; return the paths written (plots without data are
    skipped)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    colours = _colours(summaries)
    probes = _probe_runs(summaries)
    written = [plot_bn_gap(summaries, out_dir / "analysis_bn_gap.png", colours),
               plot_probe(probes, out_dir / "analysis_probe.png", colours),
               plot_probe_vs_batch(probes, out_dir / "analysis_probe_vs_batch.png", colours)]
    return [p for p in written if p is not None]
