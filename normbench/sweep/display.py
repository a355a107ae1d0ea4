"""The sweep's progress views: the callbacks an executor calls (:class:`SweepDisplay`), plain
log lines for pipes and files, and a rich live view for a terminal.

Clocks run on wall time (a cell evaluating after its last step still counts), the running
cells' phases ("evaluating 3,000 / 10,000 test images") are shown as they come, and the view
ends with the sweep's results table (:mod:`normbench.sweep.results`)."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from normbench.progress_eta import fmt_duration, percent
from normbench.sweep.tasks import CellResult

__all__ = ["SweepDisplay", "PlainSweepDisplay", "RichSweepDisplay", "SweepCounts", "fmt_duration", "make_display",
           "result_line"]


class SweepDisplay:
    """Callbacks an executor uses to show the sweep's progress; the defaults do nothing.

    ``step(index, step, eta)``: a running cell's step and its own seconds left; ``phase(index,
    step, text, eta)``: it began or advanced a phase that is not training (``text`` None: the
    phase ended); ``tick()``: nothing happened for a while (a view may redraw a status line)."""

    def begin(self, total: int, weights: Optional[dict[int, float]] = None, out_dir: Optional[Path] = None) -> None: ...
    def started(self, index: int, name: str, total_steps: int, done_steps: int) -> None: ...
    def step(self, index: int, step: int, eta: Optional[float] = None) -> None: ...
    def phase(self, index: int, step: int, text: Optional[str], eta: Optional[float] = None) -> None: ...
    def tick(self) -> None: ...
    def finished(self, result: CellResult, waits: bool = True) -> None:
        """A task ended; its cells another process held are waited for at the end (``waits``),
        or not (the sweep is stopping)."""
    def message(self, text: str) -> None: ...
    def end(self, show_results: bool = True) -> None:
        """Stop the view; print the sweep's results table unless ``show_results`` is False
        (the sweep stopped on an error, which is then the only thing said)."""


def counts_as_failed(result: CellResult) -> bool:
    """Whether a finished task counts in a view's failed/diverged tally: it failed, diverged, or
    was refused (never trained)."""
    return result.status in ("failed", "diverged") or result.outcome == "refused"


def locked_cells(result: CellResult) -> list[CellResult]:
    """The cells of a finished task that another process held (the executor comes back to
    them at the end): the task itself, or some of a pack's members."""
    return [r for r in result.cell_results if r.outcome == "locked"]


def wait_line(result: CellResult, waits: bool = True) -> str:
    then = "will wait for it at the end" if waits else "not waited for: the sweep is stopping"
    return f"{result.name}: being trained by {result.holder}; {then}"


def result_line(result: CellResult) -> str:
    """One line for a finished task: its name, how it ended, accuracy (%), error, time, log."""
    status = "refused" if result.outcome == "refused" else result.status or result.outcome
    bits = [f"{result.name}: {status}"]
    if result.outcome == "skipped":
        bits[0] += " (already recorded, not trained)"
    if result.final_test_acc is not None:
        bits.append(f"test acc {percent(result.final_test_acc)}")
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
    """Tasks done, running and failed, the running cells' phases, and the ETA from the work
    this invocation has done (and, near the end, from the running cells' own ETAs)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.total = self.done = self.failed = 0
        self.running: dict[int, list] = {}  # index -> [name, total, step]
        self.weights: dict[int, float] = {}  # index -> estimated cost (cost_proxy); empty: all alike
        self.done_weight = 0.0
        self.start_frac: dict[int, float] = {}  # index -> fraction already done when it (re)started
        self.work_done = 0.0  # estimated cost trained by THIS invocation (resumed parts excluded)
        self.phases: dict[int, str] = {}  # index -> the phase a running cell is in
        self.cell_eta: dict[int, tuple[float, float]] = {}  # index -> (seconds left, when it said so)
        self.t0 = clock()

    def _w(self, index: int) -> float:
        return self.weights.get(index, 0.0) if self.weights else 1.0

    def start(self, index: int, name: str, total_steps: int, done_steps: int) -> None:
        self.running[index] = [name, total_steps, done_steps]
        self.start_frac[index] = done_steps / total_steps if total_steps else 0.0

    def progress(self, index: int, step: int, eta: Optional[float] = None) -> None:
        """A running cell's step and its own seconds left."""
        if index in self.running:
            self.running[index][2] = step
            if eta is not None:
                self.cell_eta[index] = (eta, self.clock())

    def set_phase(self, index: int, text: Optional[str]) -> None:
        if text and index in self.running:
            self.phases[index] = text
        else:
            self.phases.pop(index, None)

    def stop(self, index: int) -> None:
        """A cell left the running set (finished, or handed back)."""
        self.running.pop(index, None)
        self.phases.pop(index, None)
        self.cell_eta.pop(index, None)

    def come_back(self, result: CellResult, locked: int, waits: bool = True) -> None:
        """``locked`` cells of a finished task become tasks of their own, run at the end (a
        wholly locked task stands for one of them); none when the sweep does not wait."""
        if waits:
            self.total += locked - (result.outcome == "locked")

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

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def cell_seconds_left(self, index: int) -> Optional[float]:
        """A running cell's own ETA, counted down since it was reported."""
        if index not in self.cell_eta:
            return None
        eta, at = self.cell_eta[index]
        return max(0.0, eta - (self.clock() - at))

    def eta(self) -> Optional[float]:
        """Seconds left: the work still to do at the rate of the work THIS invocation has done
        (a resumed cell's earlier steps count as done, not as speed), and never less than the
        longest running cell's own ETA (which counts its evaluations still due)."""
        cells = [self.cell_seconds_left(i) for i in self.running]
        known = [c for c in cells if c is not None]
        frac = self.fraction_done()
        running_work = sum(self._w(i) * (step / tot - self.start_frac.get(i, 0.0))
                           for i, (_, tot, step) in self.running.items() if tot)
        work_now = self.work_done + running_work
        total_w = sum(self.weights.values()) if self.weights else float(self.total)
        if frac <= 0.05 or work_now <= 0.01 * total_w:
            all_running = self.running and self.done + len(self.running) >= self.total and len(known) == len(cells)
            return max(known) if all_running else None
        remaining = total_w * (1.0 - frac / max(self.total, 1))
        return max([self.elapsed() / work_now * remaining] + known)


class ResultsAtEnd:
    """Where the sweep writes (given to ``begin``, else learned from its results), so that
    ``end`` can print the results table."""

    out_dir: Optional[Path] = None

    def _learn_out_dir(self, result: CellResult) -> None:
        if self.out_dir is None and result.run_dir:
            from normbench.sweep.results import MANIFEST

            parent = Path(result.run_dir).parent
            if (parent / MANIFEST).is_file():
                self.out_dir = parent

    def _results(self):
        """The sweep's results (None: nothing to show), or an error line."""
        if self.out_dir is None:
            return None
        from normbench.sweep.results import sweep_results

        try:
            results = sweep_results(self.out_dir)
        except Exception as err:  # noqa: BLE001 - the table is a courtesy; the sweep's outcome stands
            return f"results table not available ({type(err).__name__}: {err})"
        return results if results is not None and (results.rows or results.not_started) else None


class PlainSweepDisplay(ResultsAtEnd, SweepDisplay):
    """One line per event, a status line at most every ``every_s`` seconds (with the phases
    of the running cells), and the results table at the end."""

    def __init__(self, stream=None, every_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.stream, self.every_s, self.clock = stream or sys.stdout, every_s, clock
        self.c = SweepCounts(clock)
        self._last = clock()

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def begin(self, total, weights=None, out_dir=None):
        self.c.total, self.c.weights = total, dict(weights or {})
        self.c.t0 = self._last = self.clock()
        if out_dir is not None:
            self.out_dir = Path(out_dir)

    def started(self, index, name, total_steps, done_steps):
        self.c.start(index, name, total_steps, done_steps)
        self._print(f"[start] {name}" + (f" (resuming at step {done_steps}/{total_steps})" if done_steps else ""))

    def status_line(self) -> str:
        line = (f"[sweep] {self.c.done}/{self.c.total} done, {len(self.c.running)} running, "
                f"{self.c.failed} failed/diverged, elapsed {fmt_duration(self.c.elapsed())}, "
                f"eta {fmt_duration(self.c.eta())}")
        phases = [f"{self.c.running[i][0]}: {text}" for i, text in sorted(self.c.phases.items()) if i in self.c.running]
        return line + "".join(f"; {p}" for p in phases)

    def tick(self):
        if self.clock() - self._last > self.every_s:
            self._last = self.clock()
            self._print(self.status_line())

    def step(self, index, step, eta=None):
        self.c.progress(index, step, eta)
        self.c.set_phase(index, None)
        self.tick()

    def phase(self, index, step, text, eta=None):
        self.c.progress(index, step, eta)
        self.c.set_phase(index, text)
        self.tick()

    def finished(self, result, waits=True):
        self.c.stop(result.index)
        self._learn_out_dir(result)
        locked = locked_cells(result)
        for cell in locked:
            self._print(f"[wait] {wait_line(cell, waits)}")
        self.c.come_back(result, len(locked), waits)
        if result.outcome == "locked":
            return
        self.c.finish(result.index)
        for cell in result.cell_results:
            if cell.outcome != "locked":
                self.c.failed += counts_as_failed(cell)
                self._print(f"[{self.c.done}/{self.c.total}] {result_line(cell)}")

    def message(self, text):
        self._print(text)

    def end(self, show_results=True):
        from normbench.sweep.results import plain_table

        results = self._results() if show_results else None
        if isinstance(results, str):
            self._print(results)
        elif results is not None:
            self._print(plain_table(results))


class RichSweepDisplay(ResultsAtEnd, SweepDisplay):
    """A rich live view: one overall bar (done / running / failed, wall clock, ETA) and a bar
    per running cell (steps or its phase, its wall clock, its own ETA); the clocks and ETAs
    keep moving between events. Ends with the results table."""

    def __init__(self, console=None, clock: Callable[[], float] = time.monotonic):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn

        from normbench.live_columns import CountdownColumn, WallClockColumn

        self.console = console or Console()
        self.clock = clock
        self.c = SweepCounts(clock)
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                            WallClockColumn(clock), TextColumn("eta"), CountdownColumn(clock), console=self.console)
        self.overall = None
        self.tasks: dict[int, Any] = {}

    def _refresh(self):
        info = f"{self.c.done}/{self.c.total} done · {len(self.c.running)} running · {self.c.failed} failed/diverged"
        self.bar.update(self.overall, completed=self.c.fraction_done(), info=info, eta=self.c.eta(),
                        eta_at=self.clock())

    def begin(self, total, weights=None, out_dir=None):
        self.c.total, self.c.weights = total, dict(weights or {})
        self.c.t0 = self.clock()
        if out_dir is not None:
            self.out_dir = Path(out_dir)
        self.bar.start()
        self.overall = self.bar.add_task("[bold]sweep", total=max(total, 1), info="", t0=self.c.t0, eta=None,
                                         eta_at=self.c.t0)
        self._refresh()

    def started(self, index, name, total_steps, done_steps):
        self.c.start(index, name, total_steps, done_steps)
        now = self.clock()
        self.tasks[index] = self.bar.add_task(f"  {name}", total=max(total_steps, 1), completed=done_steps,
                                              info=f"{done_steps}/{total_steps} steps", t0=now, eta=None, eta_at=now)
        self._refresh()

    def _show_cell(self, index: int) -> None:
        if index not in self.tasks or index not in self.c.running:
            return
        _, total, step = self.c.running[index]
        info = self.c.phases.get(index) or f"{step}/{total} steps"
        self.bar.update(self.tasks[index], completed=step, info=info, eta=self.c.cell_seconds_left(index),
                        eta_at=self.clock())

    def step(self, index, step, eta=None):
        self.c.progress(index, step, eta)
        self.c.set_phase(index, None)
        self._show_cell(index)
        self._refresh()

    def phase(self, index, step, text, eta=None):
        self.c.progress(index, step, eta)
        self.c.set_phase(index, text)
        self._show_cell(index)
        self._refresh()

    def tick(self):
        if self.overall is not None:
            self._refresh()

    def finished(self, result, waits=True):
        self.c.stop(result.index)
        self._learn_out_dir(result)
        if result.index in self.tasks:
            self.bar.remove_task(self.tasks.pop(result.index))
        locked = locked_cells(result)
        for cell in locked:
            self.console.print(f"[yellow]wait[/] {wait_line(cell, waits)}", highlight=False)
        self.c.come_back(result, len(locked), waits)
        if result.outcome != "locked":
            self.c.finish(result.index)
            for cell in result.cell_results:
                if cell.outcome == "locked":
                    continue
                bad = counts_as_failed(cell)
                self.c.failed += bad
                self.console.print(f"[{'red' if bad else 'green'}]{'✗' if bad else '✓'}[/] {result_line(cell)}",
                                   highlight=False)
        self._refresh()

    def message(self, text):
        self.console.print(text, highlight=False)

    def end(self, show_results=True):
        from normbench.sweep.results import rich_table

        self.bar.stop()
        results = self._results() if show_results else None
        if isinstance(results, str):
            self.console.print(results, highlight=False)
        elif results is not None:
            self.console.print(rich_table(results))


def make_display(no_progress: bool = False) -> SweepDisplay:
    if not no_progress and sys.stdout.isatty():
        return RichSweepDisplay()
    return PlainSweepDisplay()
