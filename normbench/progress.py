"""Progress display for a run: a rich progress bar on a terminal, plain lines otherwise."""
from __future__ import annotations

import sys
import time


class Progress:
    """Callbacks a run reports its progress through; these defaults do nothing."""

    def start(self, run_name: str, total_steps: int, done_steps: int, steps_per_epoch: int) -> None: ...
    def update(self, step: int, metrics: dict) -> None: ...
    def message(self, text: str) -> None: ...
    def finish(self) -> None: ...


class PlainProgress(Progress):
    """One line at most every ``every_s`` seconds, plus every message; for logs and pipes."""

    def __init__(self, every_s: float = 10.0, stream=None):
        self.every_s, self.stream = every_s, stream or sys.stdout
        self._last = 0.0

    def start(self, run_name, total_steps, done_steps, steps_per_epoch):
        self.name, self.total, self.spe = run_name, total_steps, steps_per_epoch
        self._t0, self._step0 = time.perf_counter(), done_steps
        print(f"{run_name}: {total_steps} steps ({steps_per_epoch} per epoch), starting at {done_steps}",
              file=self.stream, flush=True)

    def update(self, step, metrics):
        now = time.perf_counter()
        if now - self._last < self.every_s and step < self.total:
            return
        self._last = now
        rate = (step - self._step0) / max(1e-9, now - self._t0)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        print(f"{self.name}: step {step}/{self.total} epoch {metrics['epoch']:.2f} loss {metrics['train/loss']:.4f} "
              f"acc {metrics['train/acc']:.3f} {metrics['perf/images_per_s']:.0f} img/s eta {eta:.0f}s",
              file=self.stream, flush=True)

    def message(self, text):
        print(text, file=self.stream, flush=True)


class RichProgress(Progress):
    """A rich progress bar: epoch, step, img/s, loss, running accuracy, ETA."""

    def __init__(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

        self.console = Console()
        self.bar = Bar(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=self.console)
        self.task = None

    def start(self, run_name, total_steps, done_steps, steps_per_epoch):
        self.bar.start()
        self.task = self.bar.add_task(run_name, total=total_steps, completed=done_steps, info="")

    def update(self, step, metrics):
        info = (f"ep {metrics['epoch']:.2f} loss {metrics['train/loss']:.3f} acc {metrics['train/acc']:.3f} "
                f"{metrics['perf/images_per_s']:.0f} img/s")
        self.bar.update(self.task, completed=step, info=info)

    def message(self, text):
        self.console.print(text)

    def finish(self):
        self.bar.stop()


def make_progress(no_progress: bool = False) -> Progress:
    if not no_progress and sys.stdout.isatty():
        return RichProgress()
    return PlainProgress()


def print_summary(summary: dict) -> None:
    """A final table of the run's summary."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"run {summary.get('run_name')} — {summary['status']}", show_header=False)
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)
    for key in ("status", "final_test_acc", "best_test_acc", "train_eval_gap", "steps", "epochs", "diverged_step",
                "note", "clipped_frac", "wall_time_s", "images_per_s", "device", "data_source", "run_dir"):
        if summary.get(key) is not None:
            table.add_row(key, fmt(summary[key]))
    Console(width=120).print(table)
