"""Progress display for a run: a rich progress bar on a terminal, plain lines otherwise.

A run reports its training steps and the phases between them (a test-set evaluation, a
landscape probe, the end-of-run measurements) through :class:`Progress`. Both views show the
phase under way with what it has done ("evaluating 3,000 / 10,000 test images") and an ETA
(:class:`~normbench.progress_eta.Eta`) that counts the evaluations still due, not only the
training steps. Accuracies a person reads are shown in percent (:func:`percent`); the run's
files keep fractions.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Optional

from normbench.progress_eta import Eta, fmt_duration, percent

__all__ = ["Progress", "PlainProgress", "RichProgress", "make_progress", "print_summary", "percent", "fmt_duration"]


class Progress:
    """Callbacks a run reports its progress through; these defaults do nothing.

    Phases: ``begin_phase(kind, what, total, unit)`` starts one (kind ``evaluation``: one pass
    over the test set; ``measurements``: the end-of-run measurements, which use up the
    :meth:`work_left`; ``probe``: a short in-run measurement), ``advance_phase(done)`` says how
    many of its ``total`` items are done, ``end_phase()`` ends it. ``work_left(passes,
    test_images, forward_images)``: the test-set evaluations still due after the phase under
    way and the other images still to forward (train-mode evaluation), for the ETA."""

    def start(self, run_name: str, total_steps: int, done_steps: int, steps_per_epoch: int) -> None: ...
    def update(self, step: int, metrics: dict) -> None: ...
    def message(self, text: str) -> None: ...
    def work_left(self, passes: float, test_images: int, forward_images: int = 0) -> None: ...
    def begin_phase(self, kind: str, what: str, total: int = 0, unit: str = "test images") -> None: ...
    def advance_phase(self, done: int) -> None: ...
    def end_phase(self) -> None: ...
    def finish(self) -> None: ...


class PrefixedMessages(Progress):
    """Only the messages of a run, each prefixed, passed on to ``inner``: a packed member's
    own notes (TensorBoard) reach the pack's view; its steps and phases are the pack's."""

    def __init__(self, inner: Progress, prefix: str):
        self.inner, self.prefix = inner, prefix

    def message(self, text: str) -> None:
        self.inner.message(f"{self.prefix}{text}")


class TrackedProgress(Progress):
    """A view that keeps the ETA and the phase under way; subclasses draw them."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.eta = Eta(clock)
        self.name = ""
        self.total = 0

    def start(self, run_name, total_steps, done_steps, steps_per_epoch):
        self.name, self.total = run_name, total_steps
        self.eta.start(total_steps, done_steps)

    def update(self, step, metrics):
        self.eta.update(step, metrics.get("perf/images_per_s"))

    def work_left(self, passes, test_images, forward_images=0):
        self.eta.work_left(passes, test_images, forward_images)

    def begin_phase(self, kind, what, total=0, unit="test images"):
        self.eta.begin(kind, what, total, unit)

    def advance_phase(self, done):
        self.eta.advance(done)

    def end_phase(self):
        self.eta.end()

    def eta_text(self) -> str:
        return fmt_duration(self.eta.seconds_left())


def training_text(metrics: dict, digits: int = 4) -> str:
    """The training part of a progress line: epoch, loss, running accuracy (%), throughput."""
    return (f"epoch {metrics['epoch']:.2f} loss {metrics['train/loss']:.{digits}f} "
            f"acc {percent(metrics['train/acc'], 1)} {metrics['perf/images_per_s']:.0f} img/s")


class PlainProgress(TrackedProgress):
    """Plain lines for logs and pipes: the first and the last step's line, between them at most
    one line every ``every_s`` seconds while training or evaluating, one when the end-of-run
    measurements begin, and every message."""

    def __init__(self, every_s: float = 10.0, stream=None, clock: Callable[[], float] = time.monotonic):
        super().__init__(clock)
        self.every_s, self.stream = every_s, stream or sys.stdout
        self._last: Optional[float] = None

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def _due(self, force: bool = False) -> bool:
        now = self.clock()
        if not force and self._last is not None and now - self._last < self.every_s:
            return False
        self._last = now
        return True

    def start(self, run_name, total_steps, done_steps, steps_per_epoch):
        super().start(run_name, total_steps, done_steps, steps_per_epoch)
        self._last = None  # the first training line comes at once
        self._print(f"{run_name}: {total_steps} steps ({steps_per_epoch} per epoch), starting at {done_steps}")

    def update(self, step, metrics):
        super().update(step, metrics)
        if self._due(force=step >= self.total):
            self._print(f"{self.name}: step {step}/{self.total} {training_text(metrics)} eta {self.eta_text()}")

    def begin_phase(self, kind, what, total=0, unit="test images"):
        super().begin_phase(kind, what, total, unit)
        if kind == "measurements" and self._due(force=True):
            self._print(f"{self.name}: {self.eta.phase_text()}, eta {self.eta_text()}")

    def advance_phase(self, done):
        super().advance_phase(done)
        if self._due():
            self._print(f"{self.name}: {self.eta.phase_text()}, eta {self.eta_text()}")

    def message(self, text):
        self._print(text)


class RichProgress(TrackedProgress):
    """A rich progress bar: steps, epoch, loss, running accuracy (or the phase under way),
    elapsed wall time and an ETA that keeps counting down between updates."""

    def __init__(self, console=None, clock: Callable[[], float] = time.monotonic):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn

        from normbench.live_columns import CountdownColumn, WallClockColumn

        super().__init__(clock)
        self.console = console or Console()
        self.bar = Bar(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[info]}"), WallClockColumn(clock), TextColumn("eta"),
                       CountdownColumn(clock), console=self.console)
        self.task = None
        self._train_info = ""

    def _show(self, **fields) -> None:
        if self.task is None:
            return
        info = self.eta.phase_text() if self.eta.phase is not None else self._train_info
        self.bar.update(self.task, info=info, eta=self.eta.seconds_left(), eta_at=self.clock(), **fields)

    def start(self, run_name, total_steps, done_steps, steps_per_epoch):
        super().start(run_name, total_steps, done_steps, steps_per_epoch)
        self.bar.start()
        self.task = self.bar.add_task(run_name, total=max(total_steps, 1), completed=done_steps, info="",
                                      t0=self.clock(), eta=None, eta_at=self.clock())

    def update(self, step, metrics):
        super().update(step, metrics)
        self._train_info = training_text(metrics, digits=3)
        self._show(completed=step)

    def begin_phase(self, kind, what, total=0, unit="test images"):
        super().begin_phase(kind, what, total, unit)
        self._show()

    def advance_phase(self, done):
        super().advance_phase(done)
        self._show()

    def end_phase(self):
        super().end_phase()
        self._show()

    def message(self, text):
        self.console.print(text, highlight=False)

    def finish(self):
        self.bar.stop()


def make_progress(no_progress: bool = False) -> Progress:
    if not no_progress and sys.stdout.isatty():
        return RichProgress()
    return PlainProgress()


SUMMARY_ROWS = (  # (summary key, label, how a person reads it)
    ("status", "status", str),
    ("final_test_acc", "final test acc", percent),
    ("best_test_acc", "best test acc", percent),
    ("test_acc_train_mode", "test acc, train mode", percent),
    ("test_acc_precise_bn", "test acc, precise BN", percent),
    ("train_eval_gap", "train - eval mode", lambda v: f"{100.0 * v:+.2f} points"),
    ("steps", "steps", str),
    ("epochs", "epochs", lambda v: f"{v:g}"),
    ("diverged_step", "diverged at step", str),
    ("note", "note", str),
    ("clipped_frac", "steps clipped", lambda v: percent(v, 1)),
    ("wall_time_s", "wall time", lambda v: f"{fmt_duration(v)} ({v:.1f} s)"),
    ("images_per_s", "images/s", lambda v: f"{v:.0f}"),
    ("device", "device", str),
    ("data_source", "data", str),
    ("run_dir", "run dir", str),
)


def summary_rows(summary: dict) -> list[tuple[str, str]]:
    """(label, text) for each summary entry a person reads, accuracies in percent."""
    return [(label, show(summary[key])) for key, label, show in SUMMARY_ROWS if summary.get(key) is not None]


def print_summary(summary: dict, console=None) -> None:
    """A final table of the run's summary, accuracies in percent."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"run {summary.get('run_name')} — {summary['status']}", show_header=False)
    for label, text in summary_rows(summary):
        table.add_row(label, text)
    (console or Console(width=120)).print(table)
