"""The units the report writes its numbers in, by name: one vocabulary for the ``unit`` column
of ``report.csv``, the ``unit`` of every table in ``report.json`` (and its ``units`` map), and
the column-name suffixes of the per-run CSV (:mod:`normbench.report.per_run`).

Summaries keep accuracies as fractions (0-1), as the engine writes them; everything the report
writes for a person shows them in percent, and every number says its unit.
"""
from __future__ import annotations

# unit name -> (what it means, the short form in a table title)
UNITS = {
    "percent": ("per cent (accuracies: of the test images; dead units: of the channels)", "%"),
    "points": ("percentage points: the difference of two percentages", "points"),
    "seconds": ("seconds of wall time", "s"),
    "img/s": ("training images per second", "img/s"),
    "nats": ("cross-entropy loss, natural logarithm", "nats"),
    "ratio": ("a dimensionless ratio", "ratio"),
    "count": ("a number of runs, steps, epochs or images", "count"),
    "grad norm": ("the norm of a gradient difference, ||g(θ - t d) - g(θ)||", "‖Δg‖"),
    "grad norm per unit distance": ("gradient change per unit distance along the step (effective "
                                    "β-smoothness)", "‖Δg‖/t"),
}

# unit name -> the suffix of a per-run CSV column in that unit ("" where the name says it)
SUFFIXES = {"percent": "_pct", "points": "_points", "seconds": "_s", "nats": "_nats"}


def short(unit: str) -> str:
    """The form of ``unit`` in a table title (``%`` for percent); unknown units as they are."""
    return UNITS[unit][1] if unit in UNITS else unit


def meaning(unit: str) -> str:
    """One line on what ``unit`` is, for the files' legends; empty for an unknown unit."""
    return UNITS[unit][0] if unit in UNITS else ""
