"""``runs.csv`` (``normbench report --per-run``): one row per run, for a researcher's own
analysis (pandas, R, a spreadsheet).

Columns, in this order:

* who the run is: ``run`` (its folder name), ``path``, ``status`` (completed, diverged,
  failed, interrupted, running), ``method`` (the report's row key from the registry names,
  e.g. ``none+agc``, ``gn groups=16``), ``name`` (its display name, e.g. ``no norm + AGC
  (λ 0.16)``), ``norm`` (``norm.kind``), ``batch_size``, ``seed``;
* every final figure of its summary (:data:`METRICS`), each in the unit its name ends with
  (:data:`normbench.report.units.SUFFIXES`: ``_pct`` percent, ``_points`` percentage points,
  ``_s`` seconds, ``_nats`` cross-entropy; ``images_per_s`` is img/s; the probe figures and
  counts are named in :data:`METRICS`); empty where the run did not measure it; plus the
  training loss and accuracy of the last epoch, averaged over its logged intervals in
  ``metrics.jsonl``;
* ``config.<key>`` for every config key whose value differs between the runs (seed, batch
  size, norm kind and ``log.*`` aside: they have their own columns or place files).

Rows are in the report's order: method, batch size, seed, folder.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from statistics import fmean
from typing import Any, Optional

from normbench.errors import UserError
from normbench.report.methods import flatten_config, method_sort_key
from normbench.report.runs import Run
from normbench.report.summary_keys import probe_mode, value
from normbench.tracking import atomic_write

# (column, summary key, scale, unit): the summary's final figures as runs.csv writes them.
METRICS = (
    ("final_test_acc_pct", "final_test_acc", 100.0, "percent"),
    ("best_test_acc_pct", "best_test_acc", 100.0, "percent"),
    ("test_acc_eval_mode_pct", "test_acc_eval_mode", 100.0, "percent"),  # running statistics
    ("test_acc_train_mode_pct", "test_acc_train_mode", 100.0, "percent"),  # each test batch's statistics
    ("test_acc_precise_bn_pct", "test_acc_precise_bn", 100.0, "percent"),
    ("train_eval_gap_points", "train_eval_gap", 100.0, "points"),
    ("final_test_loss_nats", "final_test_loss", 1.0, "nats"),
    ("wall_time_s", "wall_time_s", 1.0, "seconds"),
    ("images_per_s", "images_per_s", 1.0, "img/s"),
    ("epochs", "epochs", 1.0, "count"),
    ("steps", "steps", 1.0, "count"),
    ("diverged_step", "diverged_step", 1.0, "count"),
    ("clipped_pct", "clipped_frac", 100.0, "percent"),
    ("dead_units_pct", "dead_unit_frac", 100.0, "percent"),
    ("precise_bn_images", "precise_bn_images", 1.0, "count"),
    ("probe_count", "probe_count", 1.0, "count"),
    ("probe_beta_mean", "probe_beta_mean", 1.0, "grad norm per unit distance"),
    ("probe_beta_median", "probe_beta_median", 1.0, "grad norm per unit distance"),
    ("probe_grad_pred_mean", "probe_grad_pred_mean", 1.0, "grad norm"),
    ("probe_loss_range_mean_nats", "probe_loss_range_mean", 1.0, "nats"),
    ("probe_linearity_median", "probe_linearity_median", 1.0, "ratio"),
)
# Columns computed from a run rather than read from one summary key: (column, unit).
DERIVED = (("epoch_wall_time_s", "seconds"), ("train_loss_last_epoch_nats", "nats"),
           ("train_acc_last_epoch_pct", "percent"))
IDENTITY = ("run", "path", "status", "method", "name", "norm", "batch_size", "seed")
TEXT = ("probe_mode",)  # a word, not a number: fixed | lr, empty for a run that did not probe
# Config keys that are columns already, or say where files go rather than what was trained.
NOT_CONFIG_COLUMNS = ("name", "seed", "train.batch_size", "norm.kind")
NOT_CONFIG_PREFIXES = ("log.",)


def column_units() -> dict[str, str]:
    """Every metric column of ``runs.csv`` -> its unit (:mod:`normbench.report.units`)."""
    return {**{column: unit for column, _, _, unit in METRICS}, **dict(DERIVED)}


def last_epoch_training(run_dir: Path) -> tuple[Optional[float], Optional[float]]:
    """(loss, accuracy in %) of the last epoch's training: the mean of the ``train/loss`` and
    ``train/acc`` records of ``metrics.jsonl`` logged in the final epoch (each record is the
    mean over its logging interval); None where nothing finite was logged."""
    try:
        text = (Path(run_dir) / "metrics.jsonl").read_text()
    except (OSError, UnicodeDecodeError):
        return None, None
    records = []
    for line in text.splitlines():
        if '"train/loss"' not in line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and _finite(rec.get("epoch")):
            records.append(rec)
    if not records:
        return None, None
    last = max(float(r["epoch"]) for r in records)
    final = [r for r in records if float(r["epoch"]) > last - 1.0]
    losses = [float(r["train/loss"]) for r in final if _finite(r.get("train/loss"))]
    accs = [100.0 * float(r["train/acc"]) for r in final if _finite(r.get("train/acc"))]
    return (fmean(losses) if losses else None), (fmean(accs) if accs else None)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def varying_config_keys(runs: list[Run]) -> list[str]:
    """The dotted config keys whose value differs between the runs that have them."""
    seen: dict[str, set[str]] = {}
    for run in runs:
        for key, v in flatten_config(run.config).items():
            if key in NOT_CONFIG_COLUMNS or key.startswith(NOT_CONFIG_PREFIXES):
                continue
            seen.setdefault(key, set()).add(json.dumps(v, sort_keys=True, default=str))
    return sorted(k for k, values in seen.items() if len(values) > 1)


def _config_text(v: Any) -> Any:
    if isinstance(v, (list, dict)):
        return json.dumps(v, sort_keys=True, default=str)
    return "" if v is None else v


def run_row(run: Run, config_keys: list[str]) -> dict[str, Any]:
    """One run's row of ``runs.csv`` (None: not measured)."""
    s = run.summary
    row: dict[str, Any] = {"run": run.path.name, "path": str(run.path), "status": run.status,
                           "method": run.method, "name": run.label or run.method,
                           "norm": str(run.config.get("norm", {}).get("kind", "")),
                           "batch_size": run.batch_size, "seed": run.seed}
    for column, key, scale, unit in METRICS:
        v = value(s, key) if s else None
        row[column] = None if v is None else int(v) if unit == "count" and v.is_integer() else v * scale
    wall, epochs = row["wall_time_s"], row["epochs"]
    row["epoch_wall_time_s"] = wall / epochs if wall and epochs else None
    loss, acc = last_epoch_training(run.path) if s else (None, None)
    row["train_loss_last_epoch_nats"], row["train_acc_last_epoch_pct"] = loss, acc
    row["probe_mode"] = probe_mode(s) if s else None
    flat = flatten_config(run.config)
    for key in config_keys:
        row[f"config.{key}"] = _config_text(flat.get(key))
    return row


def per_run_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """``runs.csv`` as dicts, one per run, in the report's order."""
    keys = varying_config_keys(runs)
    ordered = sorted(runs, key=lambda r: (method_sort_key(r.method), r.batch_size, r.seed, str(r.path)))
    return [run_row(r, keys) for r in ordered]


def to_per_run_csv(runs: list[Run]) -> str:
    """The text of ``runs.csv``; numbers with 6 significant digits, empty = not measured."""
    rows = per_run_rows(runs)
    columns = [*IDENTITY, *(c for c, *_ in METRICS), *(c for c, _ in DERIVED), *TEXT]
    columns += [c for c in (rows[0] if rows else {}) if c.startswith("config.")]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
    return buf.getvalue()


def write_per_run(runs: list[Run], out_dir: Path) -> Path:
    """Write ``runs.csv`` into ``out_dir`` (made when missing); its path."""
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out: cannot create {out_dir}: {err.strerror}") from None
    path = Path(out_dir) / "runs.csv"
    atomic_write(path, to_per_run_csv(runs).encode())
    return path

