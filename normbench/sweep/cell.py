"""Running a task inside a worker: lock the cell, judge its folder again under the lock, then
train it with :func:`normbench.training.entry.train` (one cell) or :func:`normbench.training.packed.train_packed`
(a pack), its output going to the cell's ``train.log``. A failing run is recorded, never raised.

The engine resumes from a checkpoint and never re-trains a completed run. A cell held by
another sweep process comes back ``locked``: the executor defers it and waits for it at the
end; if that process completes it, it counts as done; if it dies, this sweep resumes it.
"""
from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional

from normbench.config import RunConfig
from normbench.errors import OtherDataError, UserError, first_line
from normbench.runlock import LOCK_NAME
from normbench.sweep.state import TRAIN_LOG, CellLock, RunRecord, judge_run, safe_summary, sweep_remedy
from normbench.sweep.tasks import CellResult, CellTask, PackTask, Task

if TYPE_CHECKING:
    from normbench.tracking import RunDir

ATTEMPT_MARK = "=== normbench sweep: training"

Notify = Callable[..., None]  # notify("start", index, total_steps, done_steps) / ("step", index, step, eta)
# / ("phase", index, step, text or None when it ended, eta): see cell_progress


@contextmanager
def redirect_output(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2) to ``path`` (append)."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    saved = os.dup(1), os.dup(2)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def cell_progress(notify: Optional[Notify], index: int, min_interval_s: float = 0.5):
    """The engine's progress for a cell: plain lines into its train.log, and to ``notify``
    (the sweep's parent) its start, its steps and phases with its own ETA, at most one
    message every ``min_interval_s`` seconds except a phase's beginning and end."""
    from normbench.progress import PlainProgress

    class CellProgress(PlainProgress):
        """Plain lines into the cell's train.log; steps, phases and the ETA to the sweep's parent."""

        def __init__(self):
            super().__init__(every_s=30.0, stream=sys.stdout)
            self._sent: Optional[float] = None
            self._step = 0

        def _send(self, kind: str, *args, force: bool = False) -> None:
            now = time.monotonic()
            if notify and (force or self._sent is None or now - self._sent > min_interval_s):
                self._sent = now
                notify(kind, index, self._step, *args, self.eta.seconds_left())

        def start(self, run_name, total_steps, done_steps, steps_per_epoch):
            super().start(run_name, total_steps, done_steps, steps_per_epoch)
            self._step = done_steps
            if notify:
                notify("start", index, total_steps, done_steps)

        def update(self, step, metrics):
            super().update(step, metrics)
            self._step = step
            self._send("step")

        def begin_phase(self, kind, what, total=0, unit="test images"):
            super().begin_phase(kind, what, total, unit)
            self._send("phase", self.eta.phase_text(), force=True)

        def advance_phase(self, done):
            super().advance_phase(done)
            self._send("phase", self.eta.phase_text())

        def end_phase(self):
            super().end_phase()
            self._send("phase", None, force=True)

    return CellProgress()


def decide_cell(record: RunRecord, task: CellTask) -> str:
    """What to do with a cell whose lock this process holds, alone or as a pack member:
    refuse | skip | fresh | resume."""
    if record.state == "other-data":
        return "refuse"
    if record.complete:
        if task.mode != "force":
            return "skip"
        if (task.run_dir / "summary.json").stat().st_mtime >= task.since:
            return "skip"  # a concurrent --force sweep redid it
    if record.state in ("failed", "diverged") and record.problem is None and task.mode == "normal":
        return "skip"  # recorded result; --rerun-failed redoes it
    if task.mode == "force" or (task.mode == "rerun" and record.state in ("failed", "diverged")):
        return "fresh"
    return "resume"


def run_cell(task: Task, notify: Optional[Notify] = None,
             should_stop: Callable[[], bool] = lambda: False) -> CellResult:
    """Lock, re-check and train one cell (or a pack of cells); never raises for a failing run."""
    from normbench.tracking import RunDir

    if isinstance(task, PackTask):
        return run_pack(task, notify)
    run_dir = RunDir(task.run_dir)
    run_dir.create()
    lock = CellLock(run_dir.path / LOCK_NAME)
    if not lock.acquire(task.wait, should_stop):
        return CellResult.of(task, "locked", holder=lock.holder())
    try:
        record = judge_run(task.config, check_data=task.mode != "force")
        action = decide_cell(record, task)
        if action == "refuse":
            return CellResult.of(task, "refused", record.summary, error=str(record.refusal))
        if action == "skip":
            return CellResult.of(task, "skipped", record.summary)
        return train_cell(task, run_dir, action == "fresh", notify)
    finally:
        lock.release()


def train_cell(task: CellTask, run_dir: RunDir, fresh: bool, notify: Optional[Notify],
               progress_index: Optional[int] = None) -> CellResult:
    """Train (or resume) one locked cell, its output appended to its train.log; its progress
    goes to ``notify`` under ``progress_index`` (default: the cell's own index)."""
    cfg = task.config
    log = run_dir.path / TRAIN_LOG
    with redirect_output(log):
        print(f"\n{ATTEMPT_MARK} {task.name} (pid {os.getpid()} on {socket.gethostname()}, "
              f"{time.strftime('%Y-%m-%d %H:%M:%S')}, {'fresh' if fresh else 'resume if possible'}, "
              f"{cfg.threads} thread(s))", flush=True)
        try:
            from normbench.training.entry import train

            index = task.index if progress_index is None else progress_index
            summary = train(cfg, fresh=fresh, progress=cell_progress(notify, index))
        except Exception as err:  # noqa: BLE001 - a failing cell is recorded, the sweep goes on
            if isinstance(err, UserError):
                err = sweep_remedy(err)
            if isinstance(err, OtherDataError):  # another run's results: left as they are, nothing recorded
                print(str(err), flush=True)
                return CellResult.of(task, "refused", error=str(err))
            text = f"{err}\n" if isinstance(err, UserError) else traceback.format_exc()  # a user error: its one line
            print(text, flush=True)
            summary, _ = safe_summary(run_dir.path)
            if summary is None or summary.get("status") != "failed" or not run_dir.error_log.exists():
                summary = record_failure(cfg, run_dir, text, failure_note(err))
            # the whole first line: a remedy after a long path stays whole
            return CellResult.of(task, "trained", summary, error=first_line(err, limit=None))
        print(f"=== {summary['status']} after {summary.get('steps')} steps", flush=True)
    return CellResult.of(task, "trained", summary)


def run_pack(task: PackTask, notify: Optional[Notify] = None) -> CellResult:
    """Train the member cells of a pack task as one packed network (normbench.training.packed).

    Every member is locked first; members held by another process or already recorded are
    left out (a pack of one trains alone); the executor waits for the locked ones at the end.
    Each member starts fresh or resumes as it would alone (:func:`decide_cell`); one whose
    folder cannot be resumed is recorded failed (or refused) alone while the rest train. The packed
    training writes each member's own run folder; its output goes to every member's
    train.log; its progress is reported under the pack task's index. Returns the lead
    member's result with all members' results, in their order, under ``members``."""
    locks: list = []
    results: list[CellResult] = []
    try:
        members = _claim_members(task, locks, results)
        if len(members) == 1:
            member, run_dir, fresh = members[0]
            results.append(train_cell(member, run_dir, fresh, notify, progress_index=task.index))
        elif members:
            results.extend(_train_packed(members, notify, progress_index=task.index))
    finally:
        for lock in locks:
            lock.release()
    results.sort(key=lambda r: r.index)  # the members' order, whichever were trained
    lead = next((r for r in results if r.index == task.index), results[0])
    outcome = "trained" if any(r.outcome == "trained" for r in results) else lead.outcome
    return lead.with_members(outcome, results)


def _claim_members(task: PackTask, locks: list, results: list[CellResult]) -> list[tuple[CellTask, RunDir, bool]]:
    """Lock every member (each lock into ``locks``); the members to train, with their run
    folders and whether each starts fresh. The others' results (locked, refused, skipped)
    go into ``results``."""
    from normbench.tracking import RunDir

    members = []
    for member in task.members:
        run_dir = RunDir(member.run_dir)
        run_dir.create()
        lock = CellLock(run_dir.path / LOCK_NAME)
        if not lock.acquire(False):
            results.append(CellResult.of(member, "locked", holder=lock.holder()))
            continue
        locks.append(lock)
        record = judge_run(member.config, check_data=member.mode != "force")
        action = decide_cell(record, member)
        if action == "refuse":
            results.append(CellResult.of(member, "refused", record.summary, error=str(record.refusal)))
        elif action == "skip":
            results.append(CellResult.of(member, "skipped", record.summary))
        else:
            members.append((member, run_dir, action == "fresh"))
    return members


def _train_packed(members: list[tuple[CellTask, RunDir, bool]], notify: Optional[Notify],
                  progress_index: int) -> list[CellResult]:
    """Train two or more locked members as one network; their results."""
    from normbench.training.packed import train_packed

    log = members[0][1].path / TRAIN_LOG
    names = ", ".join(m.name for m, _, _ in members)
    refused: dict[int, OtherDataError] = {}

    def left_out(idx: int, err: UserError) -> Optional[dict]:
        """A member whose folder cannot be resumed: refused (other data, its folder left as
        it is) or recorded as failed; the other members train without it."""
        member, run_dir, _ = members[idx]
        err = sweep_remedy(err)
        print(f"{member.name}: {err}", flush=True)
        if isinstance(err, OtherDataError):
            refused[idx] = err
            return None
        return record_failure(member.config, run_dir, f"{err}\n", failure_note(err))

    with redirect_output(log):
        print(f"\n{ATTEMPT_MARK} packed x{len(members)}: {names} (pid {os.getpid()}, "
              f"{time.strftime('%Y-%m-%d %H:%M:%S')})", flush=True)
        try:
            summaries = train_packed([m.config for m, _, _ in members],
                                     progress=cell_progress(notify, progress_index),
                                     fresh=[fresh for _, _, fresh in members], on_member_error=left_out)
        except OtherDataError as err:  # not one member's folder: leave every folder as it is
            err = sweep_remedy(err)
            print(str(err), flush=True)
            return [CellResult.of(member, "refused", error=str(err)) for member, _, _ in members]
        except Exception as err:  # noqa: BLE001 - record every member as failed, go on
            text = traceback.format_exc()
            why = type(err).__name__
            if isinstance(err, UserError):
                why = str(sweep_remedy(err))
                text = why + "\n"
            print(text, flush=True)
            summaries = [record_failure(member.config, run_dir, text, f"packed training failed: {why}")
                         for member, run_dir, _ in members]
    results = []
    for idx, ((member, run_dir, _), summary) in enumerate(zip(members, summaries)):
        if idx in refused:
            results.append(CellResult.of(member, "refused", error=str(refused[idx])))
            continue
        if run_dir.path / TRAIN_LOG != log:
            with open(run_dir.path / TRAIN_LOG, "a") as f:
                f.write(f"\n{ATTEMPT_MARK} packed with {names}: see {log}\n=== {summary.get('status')}\n")
        results.append(CellResult.of(member, "trained", summary))
    return results


def failure_note(err: BaseException) -> str:
    """A failed run's note: the error's type and the first line of its message."""
    return f"{type(err).__name__}: {str(err).strip() and first_line(err, limit=None)}"


def record_failure(cfg: RunConfig, run_dir: RunDir, text: str, note: str) -> dict:
    """Record a run that failed before the engine could write its own summary: ``text`` as
    its error log, a failed summary with ``note``; returns that summary."""
    run_dir.write_error_log(text)
    summary = failed_summary(cfg, note, run_dir)
    run_dir.write_summary(summary)
    return summary


def failed_summary(cfg: RunConfig, note: str, run_dir: RunDir) -> dict:
    """The summary recorded for a run that failed before the engine could write its own; its
    ``steps`` are those the folder's previous summary recorded (how far an interrupted run had
    got before its checkpoint failed to load), None when it had none."""
    previous, _ = safe_summary(run_dir.path)
    return {"status": "failed", "run_name": cfg.run_name, "run_id": cfg.config_hash(), "final_test_acc": None,
            "best_test_acc": None, "steps": (previous or {}).get("steps"), "note": note,
            "error_log": str(run_dir.error_log), "config": cfg.to_dict()}
