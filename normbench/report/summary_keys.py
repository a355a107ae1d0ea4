"""What the report reads from a ``summary.json``: the keys it averages and the table each one
feeds (named in the warnings of :func:`normbench.report.runs.collect`), the analysis columns
with the scale and unit they are shown in, a numeric value by its dotted key, and how a run
probed the loss landscape.
"""
from __future__ import annotations

import math
from typing import Any, Optional

# Summary keys the main tables average, and the table each one feeds.
NUMERIC_KEYS = ("final_test_acc", "best_test_acc", "images_per_s", "wall_time_s", "epochs")
TABLE_OF = {"final_test_acc": "the test accuracy table (--metric final)",
            "best_test_acc": "the test accuracy table (--metric best)",
            "images_per_s": "the throughput table", "wall_time_s": "the seconds-per-epoch table",
            "epochs": "the seconds-per-epoch table"}
# Keys every completed run has (the engine's final evaluation).
REQUIRED_IF_COMPLETED = ("final_test_acc", "best_test_acc")
# Summary keys the study tables read (normbench.report.study), and the table each one feeds.
STUDY_TABLE_OF = {"test_acc_eval_mode": "the batch-statistics accuracy table",
                  "test_acc_train_mode": "the batch-statistics accuracy table",
                  "test_acc_precise_bn": "the batch-statistics accuracy table",
                  "probe_beta_median": "the fixed-probe beta table",
                  "probe_linearity_median": "the fixed-probe linearity table"}

# The analysis figures the engine adds to a summary: (summary key, column header); each gets
# a table of its own in the report's files.
ANALYSIS_COLUMNS = [
    ("test_acc_eval_mode", "acc (eval mode)"),
    ("test_acc_train_mode", "acc (train mode)"),
    ("train_eval_gap", "train-eval gap"),
    ("test_acc_precise_bn", "acc (precise BN)"),
    ("dead_unit_frac", "dead units, share of channels"),
    ("probe_beta_mean", "probe beta (mean, lr-mode probe)"),
    ("probe_grad_pred_mean", "probe grad change (mean, lr-mode probe)"),
    ("probe_loss_range_mean", "probe loss range (mean, lr-mode probe)"),
]


def summary_columns() -> list[tuple[str, str]]:
    """(summary.json key, column header) for each figure the analysis contributes. The
    accuracies and the gap are fractions (0-1; the gap may be negative); dead units is a
    fraction of channels; the probe means average ``probe/*`` over a run's probes."""
    return list(ANALYSIS_COLUMNS)


def summary_units() -> dict[str, tuple[float, str]]:
    """summary key -> (scale, unit) the report shows it in (units named as in
    :mod:`normbench.report.units`): fractions as percent, their differences in points."""
    pct = {k: (100.0, "percent") for k in ("test_acc_eval_mode", "test_acc_train_mode", "test_acc_precise_bn",
                                           "dead_unit_frac")}
    return {**pct, "train_eval_gap": (100.0, "points"), "probe_beta_mean": (1.0, "grad norm per unit distance"),
            "probe_grad_pred_mean": (1.0, "grad norm"), "probe_loss_range_mean": (1.0, "nats")}


def value(summary: dict, key: str) -> Optional[float]:
    """The finite number at dotted ``key`` of ``summary``, as a float; None when it is absent,
    null, a bool or anything but a finite number."""
    node: Any = summary
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, (int, float)) or not math.isfinite(node):
        return None
    return float(node)


def probe_mode(summary: dict) -> Optional[str]:
    """``fixed`` or ``lr`` for a run that probed the landscape (the summary's ``probe_mode``,
    else its config's), None for a run that did not."""
    config = summary.get("config") if isinstance(summary.get("config"), dict) else {}
    analysis = config.get("analysis") if isinstance(config.get("analysis"), dict) else {}
    mode = summary.get("probe_mode") or analysis.get("probe_mode")
    if mode == "fixed":
        return "fixed"
    probed = summary.get("probe_count") or analysis.get("probe") or summary.get("probe_beta_mean") is not None
    return "lr" if probed else None
