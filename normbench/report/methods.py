"""What a method (a table row) is: a run's row key, its display label, and the order of rows.

The row key is the norm kind, ``+clip mode`` when clipping is on (:func:`base_method`), plus
``key=value`` for every other config key that differs between runs of the same norm, clip
and batch size (:func:`assign_methods`), and for a training-budget key (:data:`BUDGET_KEYS`)
that differs anywhere in the report, so that a row trained for another budget says so
(``BN (epochs=18)``); the label is the display name of :mod:`normbench.report.styles` (BN, GN,
no norm + AGC (λ 0.16), ...).
"""
from __future__ import annotations

import json
from typing import Any

from normbench.report.styles import method_label

# Row order of the reference study; anything else follows alphabetically.
METHOD_ORDER = ("bn", "ghost_bn", "brn", "ln", "gn", "in", "ws_gn", "frn", "evonorm_s0", "nf", "none")
# Config keys that never make two runs different methods.
IGNORED = ("name", "seed", "train.batch_size", "threads", "device", "data.root", "data.allow_download",
           "norm.kind", "clip.mode")
IGNORED_PREFIXES = ("log.", "analysis.")
# Config keys that set a run's training budget: when they differ anywhere in a report, every
# row names its own, never only the rows that share a norm and batch size with another budget.
BUDGET_KEYS = ("train.epochs", "data.train_subset")


def base_method(config: dict) -> str:
    kind = str(config.get("norm", {}).get("kind", "?"))
    clip = config.get("clip", {}).get("mode", "none")
    return kind if clip in (None, "none") else f"{kind}+{clip}"


def method_sort_key(method: str) -> tuple:
    kind = method.split("+")[0].split(" ")[0]
    rank = METHOD_ORDER.index(kind) if kind in METHOD_ORDER else len(METHOD_ORDER)
    return rank, kind, method


def flatten_config(d: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"train.batch_size": 8, ...}`` (dotted keys, leaves only)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flatten_config(value, dotted))
        else:
            out[dotted] = value
    return out


def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def assign_methods(runs: list) -> None:
    """Set ``method`` and ``label`` of each :class:`normbench.report.runs.Run`: label = base
    method, plus ``key=value`` for every config key that differs between runs sharing the base
    method and batch size (seeds aside): such runs are different methods; plus a budget key
    (:data:`BUDGET_KEYS`) on every run once it differs anywhere. A key absent from a run (an
    older or partial config) is not a difference."""
    flat = [flatten_config(r.config) for r in runs]
    groups: dict[tuple, list[int]] = {}
    for i, run in enumerate(runs):
        groups.setdefault((base_method(run.config), run.batch_size), []).append(i)
    varying: dict[str, set[str]] = {}
    for (base, _), members in groups.items():
        keys = set().union(*(flat[i].keys() for i in members))
        for key in keys:
            if key in IGNORED or key.startswith(IGNORED_PREFIXES):
                continue
            values = {json.dumps(flat[i][key], sort_keys=True, default=str) for i in members if key in flat[i]}
            if len(values) > 1:
                varying.setdefault(base, set()).add(key)
    for key in BUDGET_KEYS:
        if len({json.dumps(f[key], sort_keys=True, default=str) for f in flat if key in f}) > 1:
            for run in runs:
                varying.setdefault(base_method(run.config), set()).add(key)
    for i, run in enumerate(runs):
        base = base_method(run.config)
        keys = [k for k in sorted(varying.get(base, ())) if k in flat[i]]
        run.method = " ".join([base, *(f"{k.split('.')[-1]}={_short(flat[i][k])}" for k in keys)])
        run.label = method_label(run.config, [(k, flat[i][k]) for k in keys])
    labels: dict[str, set[str]] = {}
    for run in runs:
        labels.setdefault(run.label, set()).add(run.method)
    for run in runs:  # two methods that the display name does not tell apart keep their key too
        if len(labels[run.label]) > 1:
            run.label = f"{run.label} [{run.method}]"
