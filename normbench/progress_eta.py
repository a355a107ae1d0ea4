"""How long a run has left (:class:`Eta`), the phase it is in (:class:`Phase`), and how a
person reads durations and accuracies (:func:`fmt_duration`, :func:`percent`).

The ETA is the sum of

* the training steps left, at the step rate this process has measured, the time spent in
  evaluations and end-of-run measurements left out (they are counted on their own);
* the rest of the phase under way: an evaluation from the share of test images it has done,
  or from how long the last one took;
* the test-set evaluations still due, each as long as the last one took (before the first:
  the test images at :data:`STEP_IN_FORWARDS` times the training throughput), and the other
  images still to forward (the train-mode evaluation) at that speed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

# A training step (forward, backward, update) costs about three forward passes of the same
# images. The one figure every time guess uses: this ETA, the sweep planner's cost of an
# evaluation (normbench.sweep.plan) and the dry run's probes and histograms
# (normbench.sweep.estimate).
STEP_IN_FORWARDS = 3.0
# Phases whose time is not training time: the ETA counts them on their own.
TIMED_APART = ("evaluation", "measurements")
PHASE_KINDS = ("evaluation", "measurements", "probe")


def fmt_duration(seconds: Optional[float]) -> str:
    """Seconds for people: 42s, 3m05s, 2h07m; '?' when unknown."""
    if seconds is None or seconds != seconds or seconds in (float("inf"), float("-inf")):
        return "?"
    seconds = int(round(max(0.0, seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def percent(fraction, digits: int = 2) -> str:
    """A fraction as a percentage for people: 0.6588 -> '65.88%'; '?' for None or NaN."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        return "?" if fraction is None else str(fraction)
    if fraction != fraction:
        return "?"
    return f"{100.0 * fraction:.{digits}f}%"


@dataclass
class Phase:
    """A stretch of a run that is not training: what it does, since when, how far along."""

    kind: str  # evaluation | measurements | probe
    what: str  # e.g. "evaluating"
    started: float
    total: int = 0  # items it will do (0: not counted)
    unit: str = "test images"
    done: int = 0
    estimate_s: Optional[float] = None  # how long it should take, when known at its start

    def text(self) -> str:
        if self.total and self.done:
            return f"{self.what} {self.done:,} / {self.total:,} {self.unit}"
        return f"{self.what} {self.total:,} {self.unit}" if self.total else self.what


class Eta:
    """Seconds left in a run (see the module docstring); ``clock`` is injectable for tests."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.total = self.step = self.step0 = 0
        self.t0 = clock()
        self.apart_s = 0.0  # time in finished TIMED_APART phases
        self.images_per_s: Optional[float] = None  # training throughput, latest interval
        self.test_images = 0
        self.pass_s: Optional[float] = None  # the last evaluation of the test set took this long
        self.passes_left = 0.0  # test-set evaluations due after the phase under way
        self.forward_images_left = 0  # train-mode forward images due after it
        self.phase: Optional[Phase] = None

    # -- what the run reports -------------------------------------------------------------------
    def start(self, total_steps: int, done_steps: int) -> None:
        self.total, self.step = total_steps, done_steps
        self.step0, self.t0, self.apart_s = done_steps, self.clock(), 0.0

    def update(self, step: int, images_per_s: Optional[float] = None) -> None:
        self.step = step
        if images_per_s is not None and images_per_s == images_per_s and images_per_s > 0:
            self.images_per_s = float(images_per_s)

    def work_left(self, passes: float, test_images: int, forward_images: int = 0) -> None:
        self.passes_left, self.test_images, self.forward_images_left = float(passes), test_images, forward_images

    def begin(self, kind: str, what: str, total: int = 0, unit: str = "test images") -> None:
        if kind not in PHASE_KINDS:
            raise ValueError(f"phase kind {kind!r}: expected one of {', '.join(PHASE_KINDS)}")
        if self.phase is not None:
            self.end()
        estimate = None
        if kind == "evaluation":
            estimate = self.one_pass_s()
        elif kind == "measurements":  # the phase is the work still due: it is used up now
            estimate = self._work_s()
            self.passes_left, self.forward_images_left = 0.0, 0
        self.phase = Phase(kind, what, self.clock(), total, unit, estimate_s=estimate)

    def advance(self, done: int) -> None:
        if self.phase is not None:
            self.phase.done = done

    def end(self) -> None:
        phase, self.phase = self.phase, None
        if phase is None:
            return
        took = self.clock() - phase.started
        if phase.kind in TIMED_APART:
            self.apart_s += took
        if phase.kind == "evaluation" and (not phase.total or phase.done >= phase.total):
            self.pass_s = took

    # -- what it makes of it ----------------------------------------------------------------------
    def phase_text(self) -> str:
        return self.phase.text() if self.phase is not None else ""

    def step_rate(self) -> Optional[float]:
        """Training steps per second of training time in this process (None before any)."""
        now = self.clock()
        busy = now - self.t0 - self.apart_s
        if self.phase is not None and self.phase.kind in TIMED_APART:
            busy -= now - self.phase.started
        steps = self.step - self.step0
        return steps / busy if steps > 0 and busy > 0 else None

    def one_pass_s(self) -> Optional[float]:
        """One evaluation of the test set: as the last one took, else from the throughput."""
        if self.pass_s is not None:
            return self.pass_s
        return self._forward_s(self.test_images)

    def _forward_s(self, images: int) -> Optional[float]:
        if not images:
            return 0.0
        if self.images_per_s is None:
            return None
        return images / (STEP_IN_FORWARDS * self.images_per_s)

    def _work_s(self) -> Optional[float]:
        """The evaluations and forward images still due, in seconds (None: no speed known)."""
        passes = self.one_pass_s() if self.passes_left else 0.0
        forward = self._forward_s(self.forward_images_left)
        if passes is None or forward is None:
            return None
        return self.passes_left * passes + forward

    def phase_left_s(self) -> Optional[float]:
        """The rest of the phase under way (0 without one)."""
        phase = self.phase
        if phase is None:
            return 0.0
        elapsed = self.clock() - phase.started
        if phase.total and phase.done > 0:
            return elapsed * max(0, phase.total - phase.done) / phase.done
        if phase.estimate_s is None:  # a probe's time counts as training time
            return None if phase.kind in TIMED_APART else 0.0
        return max(0.0, phase.estimate_s - elapsed)

    def seconds_left(self) -> Optional[float]:
        """The ETA in seconds; None while a part of it has nothing to go on yet."""
        steps_left = max(0, self.total - self.step)
        train = 0.0
        if steps_left:
            rate = self.step_rate()
            if rate is None:
                return None
            train = steps_left / rate
        phase, work = self.phase_left_s(), self._work_s()
        if phase is None or work is None:
            return None
        return train + phase + work
