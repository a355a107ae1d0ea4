"""The report's statistics: Student-t 95% intervals over seeds, paired differences, and the
rule that marks a cell best.

No SciPy: the t distribution's two-sided probability for an integer number of degrees of
freedom has a closed form (a finite sum in theta = atan(t / sqrt(df)); Abramowitz & Stegun
26.7.3-4), and the quantile is found by bisection on it, to double precision.
"""
from __future__ import annotations

import math
import statistics
from functools import lru_cache
from typing import Iterable, NamedTuple, Optional

LEVEL = 0.95


def t_two_sided_prob(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with ``df`` (>= 1, integer) degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if t <= 0:
        return 0.0
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2:  # odd: (2/pi) (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...))
        total, term = 0.0, 1.0
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        return 2.0 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total) if df > 1 else 2 * theta / math.pi
    total, term = 0.0, 1.0  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
    for k in range(1, df // 2 + 1):
        total += term
        term *= c2 * (2 * k - 1) / (2 * k)
    return math.sin(theta) * total


@lru_cache(maxsize=None)
def t_quantile(df: int, level: float = LEVEL) -> float:
    """The t with P(|T| <= t) = ``level``: the half-width factor of a two-sided interval
    (12.706 for df = 1 at 95%, 4.303 for df = 2, 1.96 as df grows)."""
    lo, hi = 0.0, 1.0
    while t_two_sided_prob(hi, df) < level:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_two_sided_prob(mid, df) < level:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    return 0.5 * (lo + hi)


class Interval(NamedTuple):
    mean: float
    half: Optional[float]  # None with one value: no interval
    n: int

    @property
    def lo(self) -> Optional[float]:
        return None if self.half is None else self.mean - self.half

    @property
    def hi(self) -> Optional[float]:
        return None if self.half is None else self.mean + self.half


def interval(values: Iterable[float], level: float = LEVEL) -> Optional[Interval]:
    """Mean and the half-width of its Student-t interval, t(n-1) * s / sqrt(n) with s the
    sample standard deviation; None for no values, no half-width for one."""
    v = list(values)
    if not v:
        return None
    m = statistics.fmean(v)
    if len(v) < 2:
        return Interval(m, None, 1)
    return Interval(m, t_quantile(len(v) - 1, level) * statistics.stdev(v) / math.sqrt(len(v)), len(v))


def half_width(values: list[float], level: float = LEVEL) -> Optional[float]:
    ci = interval(values, level)
    return None if ci is None else ci.half


def paired_differences(a: dict, b: dict) -> tuple[list, list[float]]:
    """``a`` and ``b`` map a seed to a value; the seeds present in both, sorted, and a - b
    for each of them. Seeds in only one are not used."""
    common = sorted(set(a) & set(b))
    return common, [a[s] - b[s] for s in common]


def best_index(cells: list[Interval], better: str) -> Optional[int]:
    """The cell of a column to mark best, or None: the cell with the best mean, when its
    interval lies entirely above (``better="max"``) or below (``"min"``) the interval of every
    other cell. A column with fewer than two cells, or a single-value cell (no interval)
    among them, has no best."""
    if len(cells) < 2 or any(c.half is None for c in cells):
        return None
    order = sorted(range(len(cells)), key=lambda i: cells[i].mean, reverse=better == "max")
    top, rest = cells[order[0]], [cells[i] for i in order[1:]]
    if better == "max" and all(top.lo > c.hi for c in rest):
        return order[0]
    if better == "min" and all(top.hi < c.lo for c in rest):
        return order[0]
    return None
