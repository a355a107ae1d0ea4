"""Planning a sweep: which cells to train (from each cell's state and the mode), in which
order (a cost proxy, longest first), which to pack together; the manifest (``sweep.json``)
and the data every cell needs, made ready before any worker starts."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from normbench.config import RunConfig
from normbench.errors import UserError
from normbench.progress_eta import STEP_IN_FORWARDS
from normbench.sweep.layout import cuda_device_count
from normbench.sweep.spec import Sweep
from normbench.sweep.state import cell_state, judge_run
from normbench.sweep.tasks import CellTask, PackTask, Task
from normbench.training.phases import evaluations_due_after

MANIFEST = "sweep.json"
# The cell states each mode trains (the rest are left alone).
RUNNABLE = {"normal": {"new", "partial", "running"},
            "rerun": {"new", "partial", "running", "failed", "diverged"},
            "force": {"new", "partial", "running", "failed", "diverged", "done", "other-data"}}


@dataclass
class Plan:
    """What a sweep invocation will do: the tasks to run and the cells it leaves alone."""

    sweep: Sweep
    states: dict[int, str]
    tasks: list[Task]
    skipped: list[int]
    threads: int
    since: float = field(default_factory=time.time)


def plan_sweep(sweep: Sweep, threads: int, force: bool = False, rerun_failed: bool = False, pack: int = 1,
               pack_max_batch: Optional[int] = None) -> Plan:
    """Decide, per cell, whether to train it; tasks come out longest first (a cheap proxy)."""
    states = {cell.index: cell_state(cell) for cell in sweep.cells}
    mode = "force" if force else "rerun" if rerun_failed else "normal"
    foreign = [cell for cell in sweep.cells if states[cell.index] == "other-data"]
    if foreign and not force:
        cell = foreign[0]
        more = f" (and {len(foreign) - 1} more cell(s))" if len(foreign) > 1 else ""
        raise UserError(f"sweep cell {cell.index} '{cell.name}'{more}: {judge_run(cell.cfg).refusal}")
    since = time.time()
    tasks: list[Task] = []
    skipped = []
    for cell in sweep.cells:
        if states[cell.index] not in RUNNABLE[mode]:
            skipped.append(cell.index)
            continue
        cfg = cell.cfg.model_copy(update={"threads": threads}, deep=True)
        tasks.append(CellTask(cell.index, cell.name, cfg, mode=mode, wait=False, since=since,
                              cost=cost_proxy(cell.cfg)))
    tasks.sort(key=lambda t: -t.cost)
    return Plan(sweep, states, pack_tasks(tasks, pack, pack_max_batch), skipped, threads, since)


def pack_tasks(tasks: list[Task], pack: int, pack_max_batch: Optional[int] = None) -> list[Task]:
    """Group tasks whose cells differ only in seed into pack tasks of up to ``pack`` cells;
    with ``pack_max_batch``, only cells whose batch size is at most that (packing pays at
    small batches, where one network leaves the cores idle)."""
    from normbench.training.packing import pack_key, why_not_packable

    if pack <= 1:
        return tasks
    groups: dict[tuple, list[CellTask]] = {}
    out: list[Task] = []
    for task in tasks:
        cfg = task.config
        too_large = pack_max_batch is not None and cfg.train.batch_size > pack_max_batch
        if too_large or why_not_packable(cfg) is not None:
            out.append(task)
            continue
        groups.setdefault((pack_key(cfg), task.mode), []).append(task)
    for members in groups.values():
        for start in range(0, len(members), pack):
            chunk = members[start:start + pack]
            if len(chunk) == 1:
                out.append(chunk[0])
                continue
            out.append(PackTask(tuple(chunk), cost=sum(t.cost for t in chunk) / 3, wait=chunk[0].wait))
    out.sort(key=lambda t: -t.cost)
    return out


STEP_OVERHEAD_IMAGES = {"cpu": 3, "other": 24}  # a step's fixed cost, in images' worth of compute
EVAL_IMAGES = 10000 / STEP_IN_FORWARDS  # one evaluation of the test set (forward only) in training images' worth


def cost_proxy(cfg: RunConfig) -> float:
    """Relative cost of a cell without measuring: images seen plus a per-step overhead, plus
    its evaluations. The overhead (in images' worth) is what a ResNet-20 step costs beyond its
    images: ~3 on one CPU thread (measured: batch 2 at ~140 img/s, batch 32 at ~290 img/s per
    single-thread worker on the 2-core machine), far more on a GPU, where small steps are
    almost all launch overhead."""
    n = cfg.data.train_subset or 50000
    steps = (n // cfg.train.batch_size) * cfg.train.epochs
    overhead = STEP_OVERHEAD_IMAGES["cpu" if cfg.device == "cpu" or not cuda_device_count() else "other"]
    evals = evaluations_due_after(cfg, 0)
    return (steps * (cfg.train.batch_size + overhead) + evals * EVAL_IMAGES) * cfg.model.width ** 2


def write_manifest(sweep: Sweep) -> None:
    """``<out_dir>/sweep.json``: the sweep file and every cell's name, axis values and run dir."""
    from normbench.tracking import atomic_write_json

    sweep.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(sweep.out_dir / MANIFEST, {
        "sweep_file": str(sweep.path.resolve()), "description": sweep.description, "axes": sweep.axes,
        "cells": [{"index": c.index, "name": c.name, "values": c.values, "run_dir": str(c.run_dir)}
                  for c in sweep.cells]})
    from normbench.tensorboard_sweep import write_sweep_experiment  # the HParams experiment at the root

    write_sweep_experiment(sweep.out_dir, [c.cfg for c in sweep.cells])


def ensure_data(sweep: Sweep, log: Callable[[str], None]) -> None:
    """Make each distinct data root ready once, before any worker starts (no N-way decode)."""
    from normbench.data import ensure_cifar10

    seen = set()
    for cell in sweep.cells:
        key = (str(cell.cfg.data.resolved_root()), cell.cfg.data.allow_download)
        if key not in seen:
            seen.add(key)
            ensure_cifar10(cell.cfg.data.resolved_root(), cell.cfg.data.allow_download, log)
