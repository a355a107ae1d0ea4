"""Rich progress columns that run on wall time: the elapsed time since a task's ``t0`` field
and a countdown from its ``eta`` field (seconds left as of its ``eta_at`` field).

Rich's own elapsed and remaining columns stop when a bar reaches its total and estimate
from the bar's advance alone, so they freeze at "0:00:00" while a run evaluates after its
last step. These read only the task's fields and the clock, so the live view's refresh thread
keeps them moving between updates."""
from __future__ import annotations

import time
from typing import Callable

from rich.progress import ProgressColumn
from rich.text import Text

from normbench.progress_eta import fmt_duration


class WallClockColumn(ProgressColumn):
    """Wall time since the task's ``t0`` field (a ``clock()`` reading); blank without one."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.clock = clock

    def render(self, task) -> Text:
        t0 = task.fields.get("t0")
        return Text("" if t0 is None else fmt_duration(self.clock() - t0), style="progress.elapsed")


class CountdownColumn(ProgressColumn):
    """The task's ``eta`` field (seconds left at ``eta_at``), counted down on the clock; '?' while
    unknown."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.clock = clock

    def render(self, task) -> Text:
        eta, at = task.fields.get("eta"), task.fields.get("eta_at")
        if eta is None or at is None:
            return Text("?", style="progress.remaining")
        return Text(fmt_duration(max(0.0, eta - (self.clock() - at))), style="progress.remaining")
