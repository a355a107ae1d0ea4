"""The sweep's progress views: the callbacks an executor calls (:class:`SweepDisplay`), plain
log lines for pipes and files, and a rich live view for a terminal."""
from __future__ import annotations

import sys
import time
from typing import Any, Optional

from normbench.sweep.tasks import CellResult


def fmt_duration(seconds: Optional[float]) -> str:
    if seconds is None or seconds != seconds:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


class SweepDisplay:
    """Callbacks an executor uses to show the sweep's progress; the defaults do nothing."""

    def begin(self, total: int, weights: Optional[dict[int, float]] = None) -> None: ...
    def started(self, index: int, name: str, total_steps: int, done_steps: int) -> None: ...
    def step(self, index: int, step: int) -> None: ...
    def finished(self, result: CellResult) -> None: ...
    def message(self, text: str) -> None: ...
    def end(self) -> None: ...


def result_line(result: CellResult) -> str:
    """One line for a finished task: its name, how it ended, accuracy, error, time, log."""
    status = "refused" if result.outcome == "refused" else result.status or result.outcome
    bits = [f"{result.name}: {status}"]
    if result.outcome == "skipped":
        bits[0] += " (already recorded, not trained)"
    if result.final_test_acc is not None:
        bits.append(f"test acc {result.final_test_acc:.4f}")
    if status == "diverged" and result.diverged_step is not None:
        bits.append(f"at step {result.diverged_step}")
    if result.error:
        bits.append(result.error[:240])
    if result.wall_time_s is not None and result.outcome == "trained":
        bits.append(fmt_duration(result.wall_time_s))
    if status in ("failed", "diverged"):
        bits.append(f"log {result.log}")
    return ", ".join(bits)


class SweepCounts:
    """Tasks done, running and failed, and the ETA from the work this invocation has done."""

    def __init__(self):
        self.total = self.done = self.failed = 0
        self.running: dict[int, list] = {}  # index -> [name, total, step]
        self.weights: dict[int, float] = {}  # index -> estimated cost (cost_proxy); empty: all alike
        self.done_weight = 0.0
        self.start_frac: dict[int, float] = {}  # index -> fraction already done when it (re)started
        self.work_done = 0.0  # estimated cost trained by THIS invocation (resumed parts excluded)
        self.t0 = time.monotonic()

    def _w(self, index: int) -> float:
        return self.weights.get(index, 0.0) if self.weights else 1.0

    def start(self, index: int, name: str, total_steps: int, done_steps: int) -> None:
        self.running[index] = [name, total_steps, done_steps]
        self.start_frac[index] = done_steps / total_steps if total_steps else 0.0

    def finish(self, index: int) -> None:
        self.done += 1
        self.done_weight += self._w(index)
        self.work_done += self._w(index) * (1.0 - self.start_frac.get(index, 0.0))

    def fraction_done(self) -> float:
        """Tasks done, each counted by its estimated cost when known (long cells run first, so
        counting tasks alike would make the ETA far too long early on), in units of tasks."""
        if not self.weights:
            return self.done + sum(step / tot for _, tot, step in self.running.values() if tot)
        part = sum(self.weights.get(i, 0.0) * step / tot for i, (_, tot, step) in self.running.items() if tot)
        return self.total * (self.done_weight + part) / max(sum(self.weights.values()), 1e-9)

    def eta(self) -> Optional[float]:
        """Seconds left: the work still to do at the rate of the work THIS invocation has done
        (a resumed cell's earlier steps count as done, not as speed)."""
        frac = self.fraction_done()
        running_work = sum(self._w(i) * (step / tot - self.start_frac.get(i, 0.0))
                           for i, (_, tot, step) in self.running.items() if tot)
        work_now = self.work_done + running_work
        total_w = sum(self.weights.values()) if self.weights else float(self.total)
        if frac <= 0.05 or work_now <= 0.01 * total_w:
            return None
        remaining = total_w * (1.0 - frac / max(self.total, 1))
        return (time.monotonic() - self.t0) / work_now * remaining


class PlainSweepDisplay(SweepDisplay):
    """One line per event, and a status line at most every ``every_s`` seconds."""

    def __init__(self, stream=None, every_s: float = 30.0):
        self.stream, self.every_s, self.c, self._last = stream or sys.stdout, every_s, SweepCounts(), time.monotonic()

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def begin(self, total, weights=None):
        self.c.total, self.c.weights = total, dict(weights or {})

    def started(self, index, name, total_steps, done_steps):
        self.c.start(index, name, total_steps, done_steps)
        self._print(f"[start] {name}" + (f" (resuming at step {done_steps}/{total_steps})" if done_steps else ""))

    def step(self, index, step):
        if index in self.c.running:
            self.c.running[index][2] = step
        if time.monotonic() - self._last > self.every_s:
            self._last = time.monotonic()
            self._print(f"[sweep] {self.c.done}/{self.c.total} done, {len(self.c.running)} running, "
                        f"{self.c.failed} failed/diverged, eta {fmt_duration(self.c.eta())}")

    def finished(self, result):
        self.c.running.pop(result.index, None)
        if result.outcome == "locked":
            self._print(f"[wait] {result.name}: being trained by {result.holder}; will wait for it at the end")
            return
        self.c.finish(result.index)
        if result.status in ("failed", "diverged"):
            self.c.failed += 1
        self._print(f"[{self.c.done}/{self.c.total}] {result_line(result)}")

    def message(self, text):
        self._print(text)


class RichSweepDisplay(SweepDisplay):
    """A rich live view: one overall bar (done / running / failed, ETA) and a bar per running cell."""

    def __init__(self):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.console = Console()
        self.c = SweepCounts()
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console)
        self.overall = None
        self.tasks: dict[int, Any] = {}

    def _refresh(self):
        info = f"{self.c.done}/{self.c.total} done · {len(self.c.running)} running · {self.c.failed} failed/diverged"
        self.bar.update(self.overall, completed=self.c.fraction_done(), info=info)

    def begin(self, total, weights=None):
        self.c.total, self.c.weights = total, dict(weights or {})
        self.bar.start()
        self.overall = self.bar.add_task("[bold]sweep", total=max(total, 1), info="")
        self._refresh()

    def started(self, index, name, total_steps, done_steps):
        self.c.start(index, name, total_steps, done_steps)
        self.tasks[index] = self.bar.add_task(f"  {name}", total=max(total_steps, 1), completed=done_steps,
                                              info=f"{done_steps}/{total_steps} steps")
        self._refresh()

    def step(self, index, step):
        if index in self.c.running:
            self.c.running[index][2] = step
            self.bar.update(self.tasks[index], completed=step, info=f"{step}/{self.c.running[index][1]} steps")
        self._refresh()

    def finished(self, result):
        self.c.running.pop(result.index, None)
        if result.index in self.tasks:
            self.bar.remove_task(self.tasks.pop(result.index))
        if result.outcome == "locked":
            self.console.print(f"[yellow]wait[/] {result.name}: being trained by {result.holder}; "
                               "will wait for it at the end")
        else:
            self.c.finish(result.index)
            bad = result.status in ("failed", "diverged") or result.outcome == "refused"
            self.c.failed += bad
            self.console.print(f"[{'red' if bad else 'green'}]{'✗' if bad else '✓'}[/] {result_line(result)}",
                               highlight=False)
        self._refresh()

    def message(self, text):
        self.console.print(text, highlight=False)

    def end(self):
        self.bar.stop()


def make_display(no_progress: bool = False) -> SweepDisplay:
    if not no_progress and sys.stdout.isatty():
        return RichSweepDisplay()
    return PlainSweepDisplay()
