"""The report's analysis plots (PNG, SVG or PDF), drawn from the analysis figures the engine
adds to ``summary.json`` and the probe records of ``metrics.jsonl``. (The analysis columns of the
report's tables, with their units, are listed in :mod:`normbench.report.summary_keys`.)

* :func:`plots` takes ``summaries``: a list of summary dicts as read from ``summary.json``
  (:func:`normbench.tracking.read_summary`), each with one extra key ``_dir``: the run folder
  that holds that summary.json (a ``str`` or ``Path``; a ``run_dir`` key, as returned by
  ``normbench.training.entry.train``, is accepted instead). ``_dir`` is only needed for the
  probe plot, which reads ``probe/*`` records from the run's ``metrics.jsonl``. Optional ``_label`` and
  ``_method`` keys give the run's display name and row key as the report's tables have them
  (:func:`normbench.report.runs.collect`), so two methods the display name alone does not
  tell apart stay apart; without them a run is named by
  :func:`normbench.report.styles.display_name`.
  Runs whose ``status`` is not ``completed`` are ignored. It writes ``analysis_*.<fmt>``
  (``fmt``: png, svg or pdf) into ``out_dir`` and returns their paths: only the plots for
  which some run has data (possibly none).

Plots (``.png`` below; ``.svg`` or ``.pdf`` when asked):

* ``analysis_bn_gap.png``: for each batch-statistics method (``get_scheme(kind).batch_dependent``)
  the train/eval gap (train-mode minus eval-mode test accuracy, points) against the batch
  size on a log2 axis, and the test accuracies with running statistics (eval mode, solid,
  filled markers) and batch statistics (train mode, dashed, open markers), plus precise BN
  (dotted, half-filled) where the summaries have it (the panel's title names only what it
  draws; the three sit side by side at each batch size). Several seeds of a (method, batch)
  cell are averaged; in the gap panel each run is also drawn as a dot.
* ``analysis_probe.png`` (runs probed in lr mode only; fixed-mode runs have their own plot):
  the landscape probe of Santurkar et al. 2018 (Fig. 4) over
  training (x = epochs, so different batch sizes align): the band between the smallest and
  largest loss along the gradient, the band of gradient changes ||g_s - g|| and the effective
  beta-smoothness (log scale), one colour per method, one row per batch size (largest first).
  Seeds of a cell are averaged step by step; raw probe values are noisy, so lines show a
  centred running median over 5 probes.
* ``analysis_probe_vs_batch.png``: the same three quantities against the batch size (log2
  axis, largest batch left as in the accuracy plot): per run the median over its probes, then
  the mean over seeds. All three are measured along the run's own step (lr times the
  gradient, lr = 0.1 B/128 in the study): the loss range and the gradient change scale with
  it, and beta, though per unit step, still depends on it (the gradient change does not grow
  linearly with the step), so compare methods within a batch size; across batch sizes only
  the fixed probe compares one landscape. lr-mode runs only.
* ``analysis_probe_fixed.png``: runs probed with ``analysis.probe_mode: fixed`` (the same
  distances at every batch size and lr): per run ``probe_beta_median`` and
  ``probe_linearity_median``, against the batch size, mean over seeds with 95% t-intervals.

Every plot names a method by its display name and draws it in its fixed colour and marker
(:mod:`normbench.report.styles`), as the report's accuracy plot does, and its title carries the
protocol read from the summaries (:func:`normbench.report.styles.protocol`).
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from statistics import mean, median
from typing import Optional

from normbench.report.figures import batch_axis, figure, plot_format, save_figure, title_and_layout
from normbench.report.methods import base_method, method_sort_key
from normbench.report.stats import interval
from normbench.report.styles import Style, assign_styles, display_name, protocol, style_key
from normbench.report.summary_keys import probe_mode

DPI = 120  # of every analysis PNG


# ----------------------------------------------------------------------------- helpers


def _run_dir(summary: dict) -> Optional[Path]:
    where = summary.get("_dir") or summary.get("run_dir")
    return Path(where) if where else None


def _method(summary: dict) -> str:
    """The method's display name (``no norm + AGC (λ 0.16)``): the report's label when the
    summary carries one (``_label``), else the config's display name."""
    label = summary.get("_label")
    return label if isinstance(label, str) and label else display_name(summary.get("config") or {})


def _fixed(summary: dict) -> bool:
    return probe_mode(summary) == "fixed"


def _title(fig, what: str, summaries: list[dict]) -> None:
    """The figure's two-line title (what it shows, the protocol) and its layout below it."""
    title_and_layout(fig, f"{what}\n{protocol(summaries)}")


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


def _colours(summaries: list[dict]) -> dict:
    """display name -> :class:`normbench.report.styles.Style` for every method with a completed
    run, in report order (the accuracy plot's styles)."""
    first: dict[str, dict] = {}
    for s in summaries:
        if s.get("status") == "completed":
            first.setdefault(_method(s), s)

    def row_key(s: dict) -> str:
        key = s.get("_method")
        return key if isinstance(key, str) and key else base_method(s.get("config") or {})
    ordered = sorted(first, key=lambda m: (method_sort_key(row_key(first[m])), m))
    return assign_styles((m, style_key(first[m].get("config") or {})) for m in ordered)


def _large_to_small(ax, batches: list[int]) -> None:
    """The accuracy plot's batch axis (large to small, log2), with a grid."""
    batch_axis(ax, batches)
    ax.grid(True, alpha=0.3)


def _in_report_order(methods, colours: dict) -> list[str]:
    return [m for m in colours if m in methods] + sorted(m for m in methods if m not in colours)


def _style(colours: dict, method: str):
    return colours.get(method, Style("0.5", "o"))


def _running_median(values: list[float], k: int = 5) -> list[float]:
    half = k // 2
    return [median(values[max(0, i - half): i + half + 1]) for i in range(len(values))]


# ----------------------------------------------------------------------------- plots


# The test accuracies of the bn gap plot: (summary key, line style, marker fill, name).
BN_GAP_STATS = (("test_acc_eval_mode", "-", "full", "running stats (eval)"),
                ("test_acc_train_mode", "--", "none", "batch stats (train)"),
                ("test_acc_precise_bn", ":", "bottom", "precise BN"))


def plot_bn_gap(summaries: list[dict], path: Path, colours: dict) -> Optional[Path]:
    """The train/eval gap and the accuracies with running and batch statistics against the
    batch size (log2 axis), and with precise-BN statistics where the summaries have them."""
    cells: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for s in summaries:
        if s.get("status") != "completed" or not _batch_dependent(s):
            continue
        if _num(s.get("train_eval_gap")) is None or _batch(s) is None:
            continue
        cells[_method(s)][_batch(s)].append(s)
    if not cells:
        return None
    fig, axes = figure(1, 2, 11.0, 4.8, dpi=DPI)
    gap_ax, acc_ax = axes[0]
    batches_seen: set[int] = set()
    drawn: set[str] = set()
    for method in _in_report_order(cells, colours):
        by_batch = cells[method]
        xs = sorted(by_batch)
        batches_seen.update(xs)
        c, marker = _style(colours, method)
        gaps = [100 * mean(_num(s["train_eval_gap"]) for s in by_batch[b]) for b in xs]
        gap_ax.plot(xs, gaps, "-", marker=marker, color=c, label=method)
        for b in xs:
            if len(by_batch[b]) > 1:
                gap_ax.scatter([b] * len(by_batch[b]), [100 * s["train_eval_gap"] for s in by_batch[b]],
                               color=c, alpha=0.35, s=12)
        for j, (key, style, fill, name) in enumerate(BN_GAP_STATS):
            pts = [(b, [_num(s.get(key)) for s in by_batch[b]]) for b in xs]
            pts = [(b, mean(v for v in vals if v is not None)) for b, vals in pts if any(v is not None for v in vals)]
            if pts:
                drawn.add(name)
                dodge = 2.0 ** (0.03 * (1 - j))  # side by side, left to right on the reversed axis
                acc_ax.plot([b * dodge for b, _ in pts], [100 * v for _, v in pts], style, marker=marker, color=c,
                            fillstyle=fill, markerfacecoloralt="white", label=f"{method}, {name}")
    for ax in (gap_ax, acc_ax):
        _large_to_small(ax, sorted(batches_seen))
    gap_ax.axhline(0.0, color="black", lw=0.8)
    gap_ax.set_ylabel("train-mode minus eval-mode test acc (points)")
    gap_ax.set_title("train/eval gap (colour and marker: method)")
    gap_ax.legend(fontsize=8)
    acc_ax.set_ylabel("test accuracy (%)")
    names = [n for _, _, _, n in BN_GAP_STATS if n in drawn]
    acc_ax.set_title(" vs ".join(names) if names else "no accuracy measured")
    if names:  # the statistics by line and fill; the methods by colour, as in the gap panel
        from matplotlib.lines import Line2D

        acc_ax.legend([Line2D([], [], color="0.3", linestyle=st, marker="o", fillstyle=fill,
                              markerfacecoloralt="white") for _, st, fill, n in BN_GAP_STATS if n in drawn],
                      names, fontsize=7, title="statistics", title_fontsize=7)
    _title(fig, "batch-statistics methods: test accuracy by the statistics used",
           [s for by_batch in cells.values() for runs in by_batch.values() for s in runs])
    return save_figure(fig, path)


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


def probe_runs(summaries: list[dict], used: Optional[list] = None) -> dict[int, dict[str, list[list[dict]]]]:
    """batch size -> method -> the probe records of each completed lr-mode run (one list per
    seed); ``used`` collects the summaries of those runs."""
    rows: dict[int, dict[str, list[list[dict]]]] = defaultdict(lambda: defaultdict(list))
    for s in summaries:
        where = _run_dir(s)
        if s.get("status") != "completed" or where is None or _batch(s) is None or _fixed(s):
            continue  # fixed-mode probes measure something else: analysis_probe_fixed.png
        recs = _probe_records(where)
        if recs:
            rows[_batch(s)][_method(s)].append(recs)
            if used is not None:
                used.append(s)
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
               colours: dict, protocol_line: str = "") -> Optional[Path]:
    """Santurkar et al. Fig. 4 per method: loss band, gradient-change band, effective beta."""
    if not rows:
        return None
    batches = sorted(rows, reverse=True)
    fig, axes = figure(len(batches), 3, 15.0, 3.6 * len(batches), dpi=DPI)
    for r, b in enumerate(batches):
        loss_ax, grad_ax, beta_ax = axes[r]
        for method in _in_report_order(rows[b], colours):
            runs, c = rows[b][method], _style(colours, method).colour
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
        loss_ax.set_ylabel("training loss (nats)")
        grad_ax.set_title(f"batch {b}: gradient predictiveness, ||g_s - g||")
        grad_ax.set_yscale("log")
        beta_ax.set_title(f"batch {b}: effective beta-smoothness")
        beta_ax.set_yscale("log")
        for ax in (loss_ax, grad_ax, beta_ax):
            ax.set_xlabel("epoch")
            ax.grid(True, alpha=0.3)
        beta_ax.legend(fontsize=7, ncol=2)
    title_and_layout(fig, f"landscape probe along each training step (lr mode)\n{protocol_line}")
    return save_figure(fig, path)


PROBE_SUMMARY = (("probe/beta", "effective beta-smoothness", "per unit step, but the step is lr·g, lr ∝ batch",
                  "‖Δg‖/t"),
                 ("probe/grad_pred", "gradient change ||g_s - g||", "scales with the step: compare within a batch size",
                  "‖Δg‖"),
                 ("probe/loss_range", "loss range along the step", "scales with the step: compare within a batch size",
                  "nats"))


def plot_probe_vs_batch(rows: dict[int, dict[str, list[list[dict]]]], path: Path,
                        colours: dict, protocol_line: str = "") -> Optional[Path]:
    """Each probe quantity against the batch size: per run the median over its probes (robust
    to the rise at the end of a cosine schedule), then the mean over seeds; one line per method."""
    if not rows:
        return None
    batches = sorted(rows)
    methods = _in_report_order({m for by_method in rows.values() for m in by_method}, colours)
    fig, axes = figure(1, 3, 16.0, 5.0, dpi=DPI)
    for ax, (key, title, note, unit) in zip(axes[0], PROBE_SUMMARY):
        for method in methods:
            pts = []
            for b in batches:
                per_run = [median(vals) for recs in rows[b].get(method, [])
                           if (vals := [v for rec in recs if (v := _num(rec.get(key))) is not None])]
                if per_run:
                    pts.append((b, mean(per_run)))
            if pts:
                colour, marker = _style(colours, method)
                ax.plot([b for b, _ in pts], [v for _, v in pts], "-", marker=marker,
                        color=colour, label=method, markersize=5)
        _large_to_small(ax, batches)
        ax.set_yscale("log")
        ax.set_title(f"{title}\n({note})", fontsize=10)
        ax.set_ylabel(f"median over the run's probes ({unit})")
    axes[0][0].legend(fontsize=7, ncol=2)
    title_and_layout(fig, f"landscape probe along each training step (lr mode), per batch size\n{protocol_line}")
    return save_figure(fig, path)


def plots(summaries: list[dict], out_dir: Path, fmt: str = "png") -> list[Path]:
    """Write the analysis plots for ``summaries`` (each with ``_dir``: its run folder; see the
    module docstring) into ``out_dir`` as ``fmt`` (png, svg or pdf); return the paths written
    (plots without data are skipped)."""
    out_dir = Path(out_dir)
    ext = plot_format(Path(f"plot.{fmt}"))
    out_dir.mkdir(parents=True, exist_ok=True)
    colours = _colours(summaries)
    probed: list[dict] = []
    probes = probe_runs(summaries, probed)
    lr_line = protocol(probed)
    written = [plot_bn_gap(summaries, out_dir / f"analysis_bn_gap.{ext}", colours),
               plot_probe(probes, out_dir / f"analysis_probe.{ext}", colours, lr_line),
               plot_probe_vs_batch(probes, out_dir / f"analysis_probe_vs_batch.{ext}", colours, lr_line),
               plot_probe_fixed(summaries, out_dir / f"analysis_probe_fixed.{ext}", colours)]
    return [p for p in written if p is not None]


FIXED_SUMMARY = (("probe_beta_median", "effective β-smoothness (fixed probe)", "‖Δg‖ per unit distance", True),
                 ("probe_linearity_median", "linearity of the gradient change (fixed probe)",
                  "1 = linear in the distance", False))


def plot_probe_fixed(summaries: list[dict], path: Path, colours: dict) -> Optional[Path]:
    """Fixed-mode runs only: per run the median of each fixed-probe quantity over its probes,
    against the batch size; mean over seeds with the 95% t-interval (none for one seed)."""
    done = [s for s in summaries if s.get("status") == "completed" and _fixed(s) and _batch(s) is not None]
    cells: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for s in done:
        for key, *_ in FIXED_SUMMARY:
            v = _num(s.get(key))
            if v is not None:
                cells[key][_method(s)][_batch(s)].append(v)
    if not cells:
        return None
    fig, axes = figure(1, len(FIXED_SUMMARY), 13.0, 5.0, dpi=DPI)
    batches = sorted({b for by_method in cells.values() for by_batch in by_method.values() for b in by_batch})
    for ax, (key, title, unit, log) in zip(axes[0], FIXED_SUMMARY):
        for method in _in_report_order(cells.get(key, {}), colours):
            colour, marker = _style(colours, method)
            by_batch = cells[key][method]
            xs = sorted(by_batch)
            cis = [interval(by_batch[b]) for b in xs]
            ax.errorbar(xs, [c.mean for c in cis], yerr=[c.half or 0.0 for c in cis], color=colour, marker=marker,
                        capsize=3, markersize=5, label=method)
        _large_to_small(ax, batches)
        if log:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(f"median over the run's probes ({unit})")
    axes[0][0].legend(fontsize=7, ncol=2)
    title_and_layout(fig, "fixed landscape probe (same distances at every batch size and lr); mean over seeds, "
                     f"95% t-intervals\n{protocol(done)}")
    return save_figure(fig, path)
