"""The local executor: spawned worker processes, each with its own torch thread count, pull
tasks one at a time; the parent schedules them, replaces workers that die, and draws the
progress view."""
from __future__ import annotations

import itertools
import os
import signal
import sys
import time
import traceback
from collections import deque
from typing import Any, Optional, Sequence

from normbench.sweep.cell import run_cell
from normbench.sweep.display import SweepDisplay
from normbench.sweep.layout import GpuSlots
from normbench.sweep.signals import install_interrupt_handler, restore_signal_handlers
from normbench.sweep.tasks import CellResult, CellTask, Task, settle


def set_parent_death_signal() -> None:
    """Linux: SIGTERM this worker when the sweep process dies (even by SIGKILL), so the
    engine checkpoints and stops instead of training on as an orphan."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def worker_main(worker_id: int, task_q, result_q, threads: int, parent_pid: int, cuda_device: Optional[str]) -> None:
    """A local worker: pull a task, train it (output to its train.log), post the result; repeat.

    Events to the parent, as tuples: (ready, id), (claim, id, index), (start, id, index,
    total steps, done steps), (step, id, index, step, eta), (phase, id, index, step, phase text
    or None at its end, eta), (result, id, CellResult); eta: the cell's own seconds left."""
    set_parent_death_signal()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    if cuda_device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = cuda_device
    stop = {"flag": False}

    def on_signal(signum, frame):
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; the engine handles it while training
    import queue as queue_mod

    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass

    def parent_gone() -> bool:
        return os.getppid() != parent_pid

    def notify(kind, *args):
        result_q.put((kind, worker_id, *args))

    notify("ready")
    while not stop["flag"] and not parent_gone():
        try:
            task = task_q.get(timeout=0.5)
        except queue_mod.Empty:
            continue
        if task is None or stop["flag"]:
            break
        notify("claim", task.index)
        try:
            result = run_cell(task, notify, should_stop=lambda: stop["flag"] or parent_gone())
        except BaseException:  # noqa: BLE001 - a bug in the sweep machinery itself: report, keep serving
            result = CellResult.crashed(task, traceback.format_exc().splitlines()[-1])
        if parent_gone():
            os._exit(0)  # nobody reads the queue any more: leave at once
        notify("result", result)
    if parent_gone():
        os._exit(0)


class LocalExecutor:
    """``workers`` spawned processes with ``threads`` torch threads each. Workers pull cells
    from one task queue; the parent keeps at most one queued cell per idle worker (so the
    order and any deferral stay in its hands), replaces a worker that dies, and shows the
    progress. SIGINT / SIGTERM: running cells checkpoint and stop; nothing new starts."""

    LOST_AFTER_S = 5.0  # a queued cell no idle worker claimed by then was lost with a dead worker

    def __init__(self, workers: int, threads: int, display: SweepDisplay, gpus: Sequence[str] = ()):
        self.workers, self.threads, self.display = workers, threads, display
        self.gpus = list(gpus)  # one of these per worker (layout.worker_gpus); empty: no GPU pinning
        self.interrupted = False
        self.exit_code = 130  # when interrupted: 130 SIGINT, 143 SIGTERM
        self.signalled: Optional[int] = None  # the signal that asked the sweep to stop

    def run(self, tasks: list[Task]) -> list[CellResult]:
        if not tasks:
            return []
        run = _LocalRun(self, tasks)
        old_handlers = self._install_signal_handlers()
        try:
            run.start_workers()
            run.loop()
        finally:
            run.shutdown()
            restore_signal_handlers(old_handlers)
        return list(run.results.values())

    def _install_signal_handlers(self) -> dict:
        def handler(signum, frame):
            if self.signalled is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # second Ctrl-C: leave now (workers get SIGTERM on the way out)
            self.signalled = signum
            self.exit_code = 130 if signum == signal.SIGINT else 143

        return install_interrupt_handler(handler)


class _LocalRun:
    """One :meth:`LocalExecutor.run`: the worker processes, the two queues, and the books on
    every task (queued, claimed by a worker, deferred because another process holds it, done)."""

    def __init__(self, executor: LocalExecutor, tasks: list[Task]):
        import multiprocessing as mp

        self.ex, self.display = executor, executor.display
        self.ctx = mp.get_context("spawn")
        self.task_q, self.result_q = self.ctx.Queue(), self.ctx.Queue()
        self.n_workers = max(1, min(executor.workers, len(tasks)))
        self.procs: dict[int, Any] = {}
        self.state: dict[int, str] = {}  # worker id -> starting | idle | busy
        self.claims: dict[int, int] = {}  # worker id -> cell index
        self.by_index: dict[int, Task] = {t.index: t for t in tasks}  # every task sent, and every deferred cell
        self.sent: dict[int, Task] = {}  # task index -> the task as queued
        self.unclaimed: dict[int, float] = {}  # queued, not yet claimed: index -> time queued
        self.outstanding: set[int] = set()
        self.pending = deque(tasks)
        self.deferred: list[CellTask] = []  # cells another process held, waited for at the end
        self.results: dict[int, CellResult] = {}  # cell index -> its result (a pack's members one by one)
        self.counter = itertools.count()
        self.respawns = 0
        self.stopping = False
        self.gpu_slots = GpuSlots(executor.gpus, self.n_workers)

    def start_workers(self) -> None:
        for _ in range(self.n_workers):
            self.spawn()

    def spawn(self) -> None:
        wid = next(self.counter)
        dev = self.gpu_slots.take(wid)
        p = self.ctx.Process(target=worker_main, daemon=True, name=f"normbench-sweep-worker-{wid}",
                             args=(wid, self.task_q, self.result_q, self.ex.threads, os.getpid(), dev))
        p.start()
        self.procs[wid], self.state[wid] = p, "starting"

    def loop(self) -> None:
        """Hand out tasks and take in events until every task has a result, or, once stopping,
        until no worker trains a cell any more."""
        while True:
            if self.ex.signalled is not None and not self.stopping:
                self.begin_stopping()
            if self.stopping:
                if not self.claims or not any(p.is_alive() for p in self.procs.values()):
                    return
            elif not self.dispatch():
                return
            event = self.next_event()
            if event is not None:
                self.handle(event)
                continue
            # quiet half-second: look for dead workers and for cells lost with them
            self.display.tick()
            self.reap_dead_workers()
            self.requeue_lost()
            if not self.procs:
                self.fail_outstanding()
                return

    def begin_stopping(self) -> None:
        """A signal arrived: start nothing new; running cells checkpoint and stop."""
        self.stopping = True
        self.ex.interrupted = True
        self.display.message("stopping: running cells write a checkpoint and stop (run the sweep "
                             "again to resume them)")
        self.pending.clear()
        self.deferred.clear()
        for p in self.procs.values():
            if p.is_alive() and p.pid:
                os.kill(p.pid, signal.SIGTERM)

    def dispatch(self) -> bool:
        """Queue one task per idle worker (deferred ones last, now waiting for their lock);
        False when nothing is left to queue or to wait for."""
        free = sum(1 for s in self.state.values() if s == "idle") - len(self.unclaimed)
        while free > 0 and (self.pending or self.deferred):
            task = self.pending.popleft() if self.pending else self.deferred.pop(0)
            self.sent[task.index] = task
            self.unclaimed[task.index] = time.monotonic()
            self.outstanding.add(task.index)
            self.task_q.put(task)
            free -= 1
        return bool(self.pending or self.deferred or self.outstanding)

    def next_event(self) -> Optional[tuple]:
        import queue as queue_mod

        try:
            return self.result_q.get(timeout=0.5)
        except queue_mod.Empty:
            return None

    def handle(self, event: tuple) -> None:
        kind, wid = event[0], event[1]
        if kind == "ready":
            self.state[wid] = "idle"
        elif kind == "claim":
            self.state[wid], self.claims[wid] = "busy", event[2]
            self.unclaimed.pop(event[2], None)
        elif kind == "start":
            self.display.started(event[2], self.by_index[event[2]].name, event[3], event[4])
        elif kind == "step":
            self.display.step(event[2], event[3], *event[4:5])
        elif kind == "phase":
            self.display.phase(event[2], event[3], event[4], *event[5:6])
        elif kind == "result":
            self.state[wid] = "idle"
            self.claims.pop(wid, None)
            result: CellResult = event[2]
            self.record(result.index, result)
            if result.status == "interrupted" and self.ex.signalled is None:
                self.ex.signalled = signal.SIGTERM  # someone stopped a cell: stop the sweep too

    def record(self, index: int, result: CellResult) -> None:
        """A task ended: its cells' results, and the cells another process held deferred."""
        self.outstanding.discard(index)
        self.unclaimed.pop(index, None)
        self.display.finished(result, waits=not self.stopping)
        results, later = settle(self.sent[index], result, defer=not self.stopping)
        for r in results:
            self.results[r.index] = r
        for cell in later:
            self.by_index[cell.index] = cell
            self.deferred.append(cell)

    def reap_dead_workers(self) -> None:
        """Record the cell a dead worker was training as failed; replace the worker while
        there is work left (at most 4 replacements per worker)."""
        for wid, p in list(self.procs.items()):
            if p.is_alive():
                continue
            self.procs.pop(wid)
            self.state.pop(wid, None)
            self.gpu_slots.release(wid)
            index = self.claims.pop(wid, None)
            if index is not None:
                self.record(index, CellResult.crashed(
                    self.sent[index], f"worker process died (exit code {p.exitcode}) while training this cell"))
            if (not self.stopping and (self.pending or self.deferred or self.outstanding)
                    and self.respawns < 4 * self.n_workers):
                self.respawns += 1
                self.spawn()

    def requeue_lost(self) -> None:
        """Queue again a task that no idle worker claimed in time (lost with a dead worker)."""
        now = time.monotonic()
        if self.unclaimed and any(s == "idle" for s in self.state.values()):
            for index, t in list(self.unclaimed.items()):
                if now - t > self.ex.LOST_AFTER_S:
                    self.unclaimed[index] = now
                    self.task_q.put(self.sent[index])

    def fail_outstanding(self) -> None:
        for index in sorted(self.outstanding):
            self.record(index, CellResult.crashed(self.sent[index], "no worker process left to train this cell"))

    def shutdown(self) -> None:
        """Tell every worker to leave; wait up to 60 s in all, then terminate the rest."""
        for _ in self.procs:
            try:
                self.task_q.put(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 60
        for p in self.procs.values():
            p.join(timeout=max(0.1, deadline - time.monotonic()))
        for p in self.procs.values():
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
