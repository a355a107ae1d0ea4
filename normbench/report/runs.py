"""Reading run folders: :func:`collect` turns every ``summary.json`` under a folder (a sweep's
output folder or any tree of loose runs) into a :class:`Run` with its method.

It tolerates what a live or broken sweep leaves behind: a run folder with a ``config.yaml``
but no summary yet counts as *running*, and an unreadable summary is skipped with a warning
(the engine writes summaries atomically, so a torn one is corruption, not a race); so is a
malformed one, and a value it cannot average is a warning too.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from normbench.errors import UserError
from normbench.report.methods import assign_methods
from normbench.report.summary_keys import (NUMERIC_KEYS, REQUIRED_IF_COMPLETED, STUDY_TABLE_OF, TABLE_OF,
                                           summary_columns)
from normbench.tracking import read_summary

# Summary statuses the engine writes (a folder without a summary is "running").
STATUSES = ("completed", "diverged", "failed", "interrupted")


@dataclass
class Run:
    """One run folder: its summary (or None while it is running) and resolved config."""

    path: Path
    status: str  # completed | diverged | failed | interrupted | running
    config: dict
    summary: dict = field(default_factory=dict)
    method: str = ""  # the row key (registry names, e.g. "none+agc")
    label: str = ""  # its display name (normbench.report.styles, e.g. "no norm + AGC (λ 0.16)")

    @property
    def batch_size(self) -> int:
        return int(self.config.get("train", {}).get("batch_size", 0))

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))


def collect(folder: Path, warn: Callable[[str], None] = lambda m: None) -> list[Run]:
    """Every run under ``folder`` (summaries, and run folders still in progress).

    Nothing malformed ends in a traceback or goes unsaid: a summary that cannot be read or
    placed in a table (not a JSON object, unknown status, a config key of the wrong type) is
    left out with one ``warn`` line naming the file and the run; a value that cannot be
    averaged (a completed run without its accuracy, a metric that is not a finite number) is
    one line naming the file, the key, the run and the table it is left out of, whose n then
    counts only the runs averaged."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"report: {folder} is not a folder")
    runs: list[Run] = []
    seen: set[Path] = set()
    extra = list(STUDY_TABLE_OF) + [key for key, _ in summary_columns()]
    numeric = NUMERIC_KEYS + tuple(dict.fromkeys(k for k in extra if k not in NUMERIC_KEYS))
    for path in sorted(folder.rglob("summary.json")):
        try:
            summary = read_summary(path)
        except UserError as err:
            seen.add(path.parent)  # named as left out: not listed as running either
            warn(f"skipping {path}: {err}")
            continue
        if summary is None:
            continue
        seen.add(path.parent)
        problem = _run_problem(summary)
        if problem is not None:
            warn(f"skipping {path}: {problem}; run {path.parent.name} left out of the report")
            continue
        for line in _value_problems(summary, numeric, path.parent.name):
            warn(f"{path}: {line}")
        runs.append(Run(path.parent, summary["status"], summary["config"], summary))
    for path in sorted(folder.rglob("config.yaml")):
        if path.parent in seen or not (path.parent / "metrics.jsonl").exists() and not (path.parent / "checkpoint.pt").exists():
            continue  # a finished run, or a plain config file rather than a run folder
        try:
            config = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(config, dict) and isinstance(config.get("norm"), dict) and isinstance(config.get("train"), dict):
            problem = _config_problem(config)
            if problem is not None:
                warn(f"skipping {path}: {problem}; running run {path.parent.name} left out of the report")
                continue
            runs.append(Run(path.parent, "running", config))
    assign_methods(runs)
    return runs


def _show(value: Any) -> str:
    """A value as it reads in the JSON file, on one line and at most 40 characters."""
    try:
        text = json.dumps(value, default=str)
    except ValueError:
        text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _config_problem(config: Any) -> Optional[str]:
    """Why a run's config cannot place it in a table (None when it can): the keys that make
    its row and column must be there with the types the engine writes."""
    if not isinstance(config, dict):
        return f"config is {_show(config)}, not a mapping"
    for section in ("norm", "train"):
        if not isinstance(config.get(section), dict):
            what = _show(config[section]) if section in config else "missing"
            return f"config.{section} is {what}, not a mapping"
    for section in ("clip", "model"):
        if section in config and not isinstance(config[section], dict):
            return f"config.{section} is {_show(config[section])}, not a mapping"
    kind = config["norm"].get("kind")
    if not isinstance(kind, str) or not kind:
        return f"norm.kind is {_show(kind) if 'kind' in config['norm'] else 'missing'}, not a scheme name"
    mode = config.get("clip", {}).get("mode", "none")
    if mode is not None and not isinstance(mode, str):
        return f"clip.mode is {_show(mode)}, not a mode name"
    batch = config["train"].get("batch_size")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        what = _show(batch) if "batch_size" in config["train"] else "missing"
        return f"train.batch_size is {what}, not a positive integer"
    seed = config.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        return f"seed is {_show(seed)}, not an integer"
    return None


def _run_problem(summary: dict) -> Optional[str]:
    """Why a summary cannot be a run of the report (None when it can)."""
    status = summary.get("status")
    if status not in STATUSES:
        return f"status is {_show(status)}, not one of {', '.join(STATUSES)}"
    return _config_problem(summary.get("config"))


def _value_problems(summary: dict, keys: tuple, run: str) -> list[str]:
    """One line per value the report cannot average: a completed run without its final or
    best accuracy, or any of ``keys`` that is there but not a finite number (null is "not
    measured" for the others). ``run`` names the run (its folder)."""
    out = []
    for key in keys:
        value = summary.get(key)
        table = TABLE_OF.get(key) or STUDY_TABLE_OF.get(key, f"the '{key}' table")
        if _is_number(value):
            continue
        if value is None:
            if key in REQUIRED_IF_COMPLETED and summary.get("status") == "completed":
                what = "null" if key in summary else "missing"
                out.append(f"{key} is {what} in a completed run; run {run} left out of {table}")
            continue
        out.append(f"{key} is {_show(value)}, not a number; run {run} left out of {table}")
    return out
