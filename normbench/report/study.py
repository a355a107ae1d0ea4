"""The report's study tables, beside the accuracy table of :mod:`normbench.report.build`:

* **batch effect** (the study's main estimand): per method, accuracy at a small batch minus
  accuracy at a reference batch (default: the smallest batch minus batch 32), from paired
  per-seed differences: only seeds completed at both batch sizes count; mean ± 95% t-interval
  over the pairs, n = pairs;
* **batch-statistics accuracies**: test accuracy with running statistics (eval mode), with
  each test batch's own statistics (train mode) and with precise-BN statistics, for every
  method whose summaries have the last two (BN, Ghost BN, Batch Renorm in a study run);
* **fixed landscape probe**: ``probe_beta_median`` and ``probe_linearity_median`` per method
  and batch, from runs probed with ``analysis.probe_mode: fixed`` only (lr-mode probes
  measure along each run's own step and are never mixed in; their means stay in the
  analysis tables of :mod:`normbench.report.build` and the plots of
  :mod:`normbench.report.analysis_plots`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from normbench.errors import UserError
from normbench.report.methods import method_sort_key
from normbench.report.stats import paired_differences
from normbench.report.summary_keys import probe_mode, value
from normbench.report.tables import CellStat, Table, cell_text, make_table

DEFAULT_REF_BATCH = 32
# The summary keys these tables read, with the table each one feeds, are listed in
# normbench.report.summary_keys.STUDY_TABLE_OF (for the warnings of collect).

# The analysis tables these keys would otherwise get (the batch-statistics table shows them).
COVERED_KEYS = ("test_acc_eval_mode", "test_acc_train_mode", "test_acc_precise_bn")
BATCH_STATS = (("eval", "running statistics (eval mode)", ("test_acc_eval_mode", "final_test_acc")),
               ("train", "batch statistics (train mode)", ("test_acc_train_mode",)),
               ("precise", "precise-BN statistics", ("test_acc_precise_bn",)))


def effect_batches(batches: list[int], small: Optional[int], ref: Optional[int]) -> Optional[tuple[int, int]]:
    """(small, reference) batch of the batch-effect table: the smallest batch and 32 unless
    told (the largest batch when there is no 32); None when the folder has one batch size.
    A batch size that no run has is a UserError."""
    for flag, value in (("--small-batch", small), ("--ref-batch", ref)):
        if value is not None and value not in batches:
            raise UserError(f"{flag}: no run has batch size {value}; batch sizes here: "
                            f"{', '.join(map(str, batches))}")
    if small is not None and small == ref:
        raise UserError(f"--small-batch and --ref-batch are both {small}; give two different batch sizes")
    if len(batches) < 2:
        return None
    if ref is None:
        if DEFAULT_REF_BATCH in batches and small != DEFAULT_REF_BATCH:
            ref = DEFAULT_REF_BATCH
        else:
            ref = max(b for b in batches if b != small)
    if small is None:
        small = min(b for b in batches if b != ref)
    return small, ref


def batch_effect_table(runs: list, acc: Callable, small: int, ref: int, what: str):
    """Per method: ``acc`` at batch ``small`` minus at batch ``ref`` over the seeds completed
    at both; one column."""
    methods = sorted({r.method for r in runs if r.batch_size in (small, ref)}, key=method_sort_key)
    cells = {}
    for method in methods:
        stat = CellStat()
        by_batch: dict[int, dict] = {small: {}, ref: {}}
        present = set()
        for run in runs:
            if run.method != method or run.batch_size not in by_batch:
                continue
            present.add(run.batch_size)
            stat.runs.append(str(run.path))
            value = acc(run) if run.status == "completed" else None
            if value is not None:
                by_batch[run.batch_size][run.seed] = value
            else:
                attr = {"diverged": "n_diverged", "failed": "n_failed", "running": "n_running",
                        "interrupted": "n_interrupted"}.get(run.status, "n_nodata")
                setattr(stat, attr, getattr(stat, attr) + 1)
        seeds, stat.values = paired_differences(by_batch[small], by_batch[ref])
        unpaired = len(by_batch[small]) + len(by_batch[ref]) - 2 * len(seeds)
        if present != {small, ref}:
            stat.text = f"missing at b={ref if small in present else small}"
        elif not stat.values:
            stat.text = "no seed at both" + _counts(stat, unpaired)
        else:
            stat.text = cell_text(stat, 2, True) + (f" +{unpaired} unpaired" if unpaired else "")
            if stat.n_nodata:
                stat.text += f" +{stat.n_nodata} no value"
        stat.paired_seeds = seeds
        cells[(method, small)] = stat
    note = (f"{what} at batch {small} minus {what} at batch {ref}, percentage points: for each seed "
            f"completed at both batch sizes the difference, then mean ± half-width of the 95% "
            f"confidence interval over those paired seeds (Student t, n−1 degrees of freedom; n = "
            f"pairs; no interval for n=1); unpaired = seeds with a value at one of the two batch "
            f"sizes only, left out; div / failed = runs at either batch size that did not complete")
    table = Table("batch_effect", f"Batch effect: test {what} at batch {small} minus batch {ref} (points)",
                  "points", methods, [small], cells, None, 2, True, note)
    table.column_names = {small: f"b={small} − b={ref}"}
    return table


def _counts(stat, unpaired: int) -> str:
    parts = [f"{k} {what}" for k, what in ((unpaired, "unpaired"), (stat.n_diverged, "div"),
                                            (stat.n_failed, "failed"), (stat.n_running, "running"),
                                            (stat.n_interrupted, "interrupted"), (stat.n_nodata, "no value")) if k]
    return f" ({', '.join(parts)})" if parts else ""


def _run_value(run, keys: tuple) -> Optional[float]:
    """The first of ``keys`` that the run's summary has as a number."""
    for key in keys:
        v = value(run.summary, key)
        if v is not None:
            return v
    return None


def batch_stats_table(runs: list):
    """Rows: each method with a train-mode or precise-BN accuracy, × the three statistics."""
    methods = {r.method for r in runs if r.status == "completed"
               and (_run_value(r, ("test_acc_train_mode",)) is not None or _run_value(r, ("test_acc_precise_bn",)) is not None)}
    if not methods:
        return None
    rows, labels, order = [], {}, []
    for method in sorted(methods, key=method_sort_key):
        for which, words, _ in BATCH_STATS:
            order.append(f"{method} | {which}")
    for run in runs:
        if run.method not in methods:
            continue
        for which, words, _ in BATCH_STATS:
            row = f"{run.method} | {which}"
            rows.append(dataclasses.replace(run, method=row))
            labels[row] = f"{run.label or run.method}: {words}"

    def get(run) -> Optional[float]:
        which = run.method.rsplit(" | ", 1)[1]
        keys = next(k for w, _, k in BATCH_STATS if w == which)
        v = _run_value(run, keys)
        return None if v is None else 100.0 * v

    table = make_table(rows, "batch_stats_accuracy",
                       "Test accuracy (%) with running, batch and precise-BN statistics", "percent", get, None, 2,
                       True,
                       note="batch-statistics methods: test accuracy with the running statistics (eval mode, "
                            "the usual test accuracy), with each test batch of the run's batch size "
                            "normalized by its own statistics (train mode), and with the running statistics "
                            "recomputed over training images with the weights frozen (precise BN); mean ± "
                            "half-width of the 95% t-interval over seeds (n = runs averaged); — = not measured")
    table.methods = [m for m in order if any(table.cell(m, b).values for b in table.batch_sizes)]
    table.labels = labels
    return table


FIXED_PROBE = (("probe_beta_median", "probe_beta_fixed",
                "Fixed-probe effective β-smoothness, median over the run (‖Δg‖/t)", "grad norm per unit distance", 2,
                "β = least-squares slope of the gradient change ‖g(θ − t d) − g(θ)‖ against the "
                "distance t along the normalized gradient d, on a held-out test batch, at the same distances "
                "for every batch size and lr; per run the median over its fixed probes"),
               ("probe_linearity_median", "probe_linearity_fixed", "Fixed-probe linearity, median over the run (ratio)",
                "ratio", 3, "(‖Δg‖/t at the largest t) / (the same at the smallest t): 1 where the gradient "
                "changes linearly with the distance; per run the median over its fixed probes"))


def fixed_probe_tables(runs: list) -> list:
    """One table per fixed-probe summary key that some fixed-mode run has."""
    fixed = [r for r in runs if r.summary and probe_mode(r.summary) == "fixed"]
    out = []
    for key, table_key, title, unit, digits, what in FIXED_PROBE:
        if not any(value(r.summary, key) is not None for r in fixed):
            continue
        table = make_table(fixed, table_key, title, unit, lambda r, k=key: value(r.summary, k), None, digits, True,
                           note=f"{what}; mean ± half-width of the 95% t-interval over seeds (n = runs averaged); "
                                "only runs with analysis.probe_mode fixed (lr-mode probes are not comparable)")
        table.methods = [m for m in table.methods if any(table.cell(m, b).values for b in table.batch_sizes)]
        out.append(table)
    return out


def study_tables(runs: list, acc: Callable, what: str, small: Optional[int] = None,
                 ref: Optional[int] = None) -> list:
    """The batch-effect, batch-statistics and fixed-probe tables that ``runs`` have data for."""
    tables = []
    pair = effect_batches(sorted({r.batch_size for r in runs}), small, ref)
    if pair is not None:
        tables.append(batch_effect_table(runs, acc, *pair, what))
    stats = batch_stats_table(runs)
    if stats is not None:
        tables.append(stats)
    return tables + fixed_probe_tables(runs)
