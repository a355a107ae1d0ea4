"""What an executor hands a worker (a task: one cell, or a pack of cells trained as one
network) and what comes back (a result): small frozen dataclasses, pickled to local worker
processes and to Ray tasks. A task carries its cell's config as the validated
:class:`~normbench.config.RunConfig` (with the sweep's thread count), never re-validated."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Optional, Union

from normbench.config import RunConfig
from normbench.sweep.state import log_path

Mode = Literal["normal", "rerun", "force"]  # plain | --rerun-failed | --force
Outcome = Literal["trained", "skipped", "locked", "refused"]


@dataclass(frozen=True)
class CellTask:
    """Train one cell.

    ``mode``: normal | rerun (retrain failed and diverged runs from scratch) | force (retrain
    every run from scratch); ``wait``: block on a cell another process holds instead of
    deferring it; ``since``: when the sweep started (with ``force``, a summary newer than this
    was written by a concurrent ``--force`` sweep and is kept); ``cost``: the planner's
    relative cost (longest first)."""

    index: int
    name: str
    config: RunConfig
    mode: Mode = "normal"
    wait: bool = False
    since: float = 0.0
    cost: float = 0.0

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir()

    @property
    def cell_tasks(self) -> tuple[CellTask, ...]:
        return (self,)


@dataclass(frozen=True)
class PackTask:
    """Train cells that differ only in seed as one packed network (:mod:`normbench.training.packed`).
    It stands for its first member (the lead) wherever one cell is meant: index, run dir,
    config, mode, progress."""

    members: tuple[CellTask, ...]
    cost: float
    wait: bool = False

    @property
    def lead(self) -> CellTask:
        return self.members[0]

    @property
    def index(self) -> int:
        return self.lead.index

    @property
    def name(self) -> str:
        return f"{self.lead.name} (+{len(self.members) - 1} packed)"

    @property
    def config(self) -> RunConfig:
        return self.lead.config

    @property
    def mode(self) -> Mode:
        return self.lead.mode

    @property
    def since(self) -> float:
        return self.lead.since

    @property
    def run_dir(self) -> Path:
        return self.lead.run_dir

    @property
    def cell_tasks(self) -> tuple[CellTask, ...]:
        return self.members


Task = Union[CellTask, PackTask]


def waiting(task: Task) -> Task:
    """``task`` again, now blocking on its cell's lock instead of deferring it."""
    return replace(task, wait=True)


def settle(task: Task, result: CellResult, defer: bool) -> tuple[list[CellResult], list[CellTask]]:
    """Split a finished task's result into its cells' own results and the cells to come back
    to: with ``defer``, a cell another process held (``locked``; a pack's member, or the
    whole task) is not a result yet but a task to run again at the end, waiting for its
    lock; without it (a task that already waited, or a sweep that is stopping), every cell's
    result stands as it is."""
    results = list(result.cell_results)
    if not defer or task.wait:
        return results, []
    members = {m.index: m for m in task.cell_tasks}
    later = [waiting(members[r.index]) for r in results if r.outcome == "locked"]
    return [r for r in results if r.outcome != "locked"], later


@dataclass(frozen=True)
class CellResult:
    """How a task ended. ``outcome``: trained (or resumed; ``status`` says how it ended) |
    skipped (already recorded) | locked (another process holds it: ``holder``) | refused
    (its folder holds a run on other data: ``error``). A pack's result is its lead's, with
    every member's own result in ``members``."""

    index: int
    name: str
    run_dir: str
    outcome: Outcome
    status: Optional[str] = None
    final_test_acc: Optional[float] = None
    steps: Optional[int] = None
    total_steps: Optional[int] = None
    diverged_step: Optional[int] = None
    wall_time_s: Optional[float] = None
    note: Optional[str] = None
    log: str = ""
    pid: int = 0
    host: str = ""
    error: Optional[str] = None
    holder: Optional[str] = None
    members: tuple[CellResult, ...] = ()

    @classmethod
    def of(cls, task: Task, outcome: Outcome, summary: Optional[dict] = None, error: Optional[str] = None,
           holder: Optional[str] = None) -> CellResult:
        """The result of ``task`` from the run's summary (None: nothing recorded), in this process."""
        summary = summary or {}
        run_dir = task.run_dir
        return cls(index=task.index, name=task.name, run_dir=str(run_dir), outcome=outcome,
                   status=summary.get("status"), final_test_acc=summary.get("final_test_acc"),
                   steps=summary.get("steps"), total_steps=summary.get("total_steps"),
                   diverged_step=summary.get("diverged_step"), wall_time_s=summary.get("wall_time_s"),
                   note=summary.get("note"), log=str(log_path(run_dir)), pid=os.getpid(),
                   host=socket.gethostname(), error=error, holder=holder)

    @classmethod
    def crashed(cls, task: Task, error: str) -> CellResult:
        """A task whose worker failed outside the run itself (died, or a bug in the sweep);
        a pack's result names every member."""
        result = cls.of(task, "trained", {"status": "failed"}, error=error)
        if isinstance(task, PackTask):
            result = result.with_members("trained", [cls.of(m, "trained", {"status": "failed"}, error=error)
                                                     for m in task.members])
        return result

    def with_members(self, outcome: Outcome, members: list[CellResult]) -> CellResult:
        return replace(self, outcome=outcome, members=tuple(members))

    @property
    def cell_results(self) -> tuple[CellResult, ...]:
        """One result per cell: a pack's members, else this one."""
        return self.members or (self,)
