"""What a cell's run folder holds, judged in one place, and the per-cell lock.

:func:`judge_run` is the sweep's only answer to "is this run complete?" and "was it made on
other data?": planning (:func:`cell_state`), the worker that re-checks a cell under its lock,
the pack trainer and the final tally all go through it. A cell is locked with an
``fcntl.flock`` on ``<run dir>/.lock`` (:mod:`normbench.runlock`); the kernel drops it when
its process dies, so a stale lock from a killed sweep is simply free again.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from normbench.config import RunConfig
from normbench.errors import OtherDataError, RunFolderError, UserError
from normbench.runlock import LOCK_NAME, RunLock
from normbench.sweep.spec import Cell

CellLock = RunLock  # the sweep's name for the per-run lock (normbench.runlock)
TRAIN_LOG = "train.log"

# What a sweep user does about a cell whose folder cannot be used as it is (the run folder's
# own messages name `normbench train`'s --fresh).
RETRAIN_REMEDY = "run the sweep again with --rerun-failed to retrain the cell from scratch"
OTHER_DATA_REMEDY = ("give the sweep another --out to keep those results, or run it with --force to retrain "
                     "every cell on this data")


def sweep_remedy(err: UserError) -> UserError:
    """``err`` restated with the sweep's flags where it is about a run folder."""
    if isinstance(err, OtherDataError):
        return err.with_remedy(OTHER_DATA_REMEDY)
    if isinstance(err, RunFolderError):
        return err.with_remedy(RETRAIN_REMEDY)
    return err


def safe_summary(run_dir: Path) -> tuple[Optional[dict], Optional[str]]:
    """(the run's summary or None, None) or (None, why it cannot be read, with the sweep's remedy)."""
    from normbench.tracking import read_summary

    try:
        return read_summary(run_dir / "summary.json"), None
    except UserError as err:
        return None, str(sweep_remedy(err))


def other_data(cfg: RunConfig, summary: Optional[dict]) -> Optional[OtherDataError]:
    """The refusal for a cell whose summary was made on other data than its ``data.root``
    holds (the same rule as ``normbench train``); None when it matches, or when the data is
    not there to compare (it is prepared before any cell trains, and the engine checks again)."""
    from normbench.data import present_identity
    from normbench.training.records import check_summary_data

    if summary is None:
        return None
    try:
        check_summary_data(cfg.run_dir(), summary, present_identity(cfg.data.resolved_root()), cfg)
    except OtherDataError as err:
        return err.with_remedy(OTHER_DATA_REMEDY)
    return None


@dataclass(frozen=True)
class RunRecord:
    """What a run folder holds, as the sweep judges it.

    ``state``: done (a completed run on this cell's data) | diverged | failed (recorded so, or
    a summary that cannot be read) | partial (begun, not finished) | new | other-data (a run
    made on other data than the cell's ``data.root`` holds)."""

    state: str
    summary: Optional[dict] = None
    problem: Optional[str] = None  # the summary cannot be read: why, with the sweep's remedy
    refusal: Optional[OtherDataError] = None  # state other-data: the refusal, with the sweep's remedy

    @property
    def complete(self) -> bool:
        return self.state == "done"


def judge_run(cfg: RunConfig, check_data: bool = True) -> RunRecord:
    """Read ``cfg``'s run folder and say what it holds (see :class:`RunRecord`). With
    ``check_data`` False (``--force``, which retrains on any data), a run made on other data
    counts by its recorded status."""
    run_dir = cfg.run_dir()
    summary, problem = safe_summary(run_dir)
    if problem is not None:
        return RunRecord("failed", problem=problem)
    if summary is not None:
        refusal = other_data(cfg, summary) if check_data else None
        if refusal is not None:
            return RunRecord("other-data", summary, refusal=refusal)
        status = summary.get("status")
        if status == "completed":
            return RunRecord("done", summary)
        if status in ("diverged", "failed"):
            return RunRecord(status, summary)
        return RunRecord("partial", summary)
    if (run_dir / "checkpoint.pt").exists():
        return RunRecord("partial")
    return RunRecord("new")


def cell_state(cell: Cell) -> str:
    """done | diverged | failed | partial | running (locked by a live process) | new |
    other-data (the folder holds a run on other data than the cell's data.root)."""
    if CellLock(cell.run_dir / LOCK_NAME).is_held():
        return "running"
    return judge_run(cell.cfg).state


def log_path(run_dir: Path) -> Path:
    """The most useful log of a cell: its traceback if it failed, else its training log."""
    err = run_dir / "error.log"
    return err if err.exists() else run_dir / TRAIN_LOG
