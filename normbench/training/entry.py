"""``train(cfg)``: the library entry point behind ``normbench train`` and every sweep cell.

It returns the run's summary (also written to ``summary.json``). Guarantees:

* a config whose run already completed is not trained again (unless ``fresh``), and a
  summary or checkpoint made on other data (another fingerprint of ``data.root``'s files) is
  refused, never reused (:mod:`normbench.training.records`);
* one process at a time trains a run folder (the lock of :mod:`normbench.runlock`, shared
  with the sweep); a run that fails before it starts leaves no folder behind;
* a run with a checkpoint resumes from it and ends bit-identical (weights and metrics) to an
  uninterrupted run on the same device and thread count: batches derive from (seed, epoch),
  the LR from the step, and the logging accumulators travel in the checkpoint;
* a non-finite loss or gradient norm ends the run as ``diverged`` with the first bad step;
  the last good checkpoint is kept;
* SIGINT / SIGTERM write a checkpoint and end the run as ``interrupted`` (a second SIGINT
  exits at once; atomic writes keep every file whole).
"""
from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Optional

import torch

from normbench.config import RunConfig, dump_config
from normbench.errors import UserError
from normbench.progress import Progress
from normbench.tracking import ReadOnlyRunDir, RunDir
from normbench.training.loop import train_loop
from normbench.training.records import check_summary_data, completed_result
from normbench.training.signals import INTERRUPT_EXIT, StopFlag
from normbench.training.solo import SoloStepper
from normbench.training.run import Run


def take_run_lock(run_dir: RunDir, dist_ctx, device: torch.device, wait: bool, progress: Progress,
                  poll_s: float = 0.5):
    """The run folder's lock (normbench.runlock), taken by rank 0 for all ranks. Held by another
    process: one-line UserError naming the holder, or with ``wait`` poll until it is free."""
    from normbench.distributed import all_reduce_max
    from normbench.runlock import RunLock

    lock = RunLock.of(run_dir.path)
    told = False
    while True:
        got = True
        if dist_ctx.is_main:
            run_dir.create()  # again: a holder we waited for may have removed a folder it made
            try:
                got = lock.try_acquire()
            except FileNotFoundError:
                continue
        if dist_ctx.enabled:  # every rank learns rank 0's answer
            got = all_reduce_max(torch.tensor([0.0 if got else 1.0], device=device), dist_ctx).item() == 0
        if got:
            return lock
        if not wait:
            raise UserError(f"run folder {run_dir.path} is being trained by {lock.holder()} (it holds "
                            f"{lock.path.name}); let it finish, or pass --wait to continue once it is done")
        if not told:
            progress.message(f"waiting for {lock.holder()}, which is training {run_dir.path}")
            told = True
        time.sleep(poll_s)


def _missing_dirs(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _remove_unstarted(run_dir: RunDir, created: list[Path]) -> None:
    """A run that failed before its first file (a layer the norm cannot take, missing data):
    remove the folders this call created, which hold nothing but the lock."""
    from normbench.runlock import LOCK_NAME

    if not created:
        return
    run_dir.remove_stale_temp_files()
    (run_dir.path / LOCK_NAME).unlink(missing_ok=True)
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            return

def train(cfg: RunConfig, fresh: bool = False, progress: Optional[Progress] = None, wait: bool = False) -> dict:
    """Train one run (or resume it, or return its summary if it already completed).

    The run folder is locked for the whole call (normbench.runlock): another process that
    holds it makes this raise a UserError naming it, or, with ``wait``, wait for it. A summary
    or checkpoint made on other data than ``data.root``'s is refused (OtherDataError), never
    reused. A run that fails before it has started leaves no folder behind.
    Under torchrun every rank calls this; only rank 0 writes the run folder."""
    from normbench.device import resolve_device
    from normbench.distributed import init_from_env, local_device, shutdown

    dist_ctx = init_from_env(resolve_device(cfg.device))
    progress = progress if (progress is not None and dist_ctx.is_main) else Progress()
    run_dir = RunDir(cfg.run_dir()) if dist_ctx.is_main else ReadOnlyRunDir(cfg.run_dir())
    created = _missing_dirs(run_dir.path) if dist_ctx.is_main else []
    run_dir.create()
    lock = take_run_lock(run_dir, dist_ctx, local_device(resolve_device(cfg.device), dist_ctx), wait, progress)
    started: list[bool] = []
    try:
        return _train_locked(cfg, fresh, progress, dist_ctx, run_dir, started)
    except BaseException:
        if not started and dist_ctx.is_main:
            _remove_unstarted(run_dir, created)
        raise
    finally:
        lock.release()
        shutdown(dist_ctx)


def _train_locked(cfg: RunConfig, fresh: bool, progress: Progress, dist_ctx, run_dir: RunDir,
                  started: list) -> dict:
    from normbench.data import data_identity, ensure_cifar10
    from normbench.distributed import barrier

    if fresh:
        run_dir.wipe()
    if dist_ctx.enabled and dist_ctx.is_main:  # rank 0 downloads or decodes the data; the others wait
        ensure_cifar10(cfg.data.resolved_root(), cfg.data.allow_download, progress.message)
    barrier(dist_ctx)  # no rank reads the folder before rank 0 has wiped it, nor the data before it is there
    existing = None if fresh else run_dir.read_summary()
    done = completed_result(run_dir, existing, cfg, lambda: data_identity(cfg.data, progress.message))
    if done is not None:
        progress.message(f"{run_dir.path} already completed; not training again (use --fresh to redo)")
        return done
    run = Run(cfg, run_dir, progress, dist_ctx)
    stepper = SoloStepper(run)
    if existing is not None:
        check_summary_data(run_dir.path, existing, run.data.identity, cfg)
    if run.resume_or_start():
        progress.message(f"resuming {run_dir.path.name} from step {run.state.step}")
    run_dir.write_config(dump_config(cfg))
    started.append(True)
    stop = StopFlag()
    try:
        with stop.installed():
            summary = train_loop(stepper, progress, stop)[0]
    except UserError:
        raise
    except Exception:
        run_dir.write_error_log(traceback.format_exc())
        run_dir.write_summary({**run.summary("failed", None, f"see {run_dir.error_log}"),
                               "error_log": str(run_dir.error_log)})
        raise
    summary["run_dir"] = str(run_dir.path)
    if stop.signum is not None:
        summary["exit_code"] = INTERRUPT_EXIT[stop.signum]
    return summary


def dry_run(cfg: RunConfig) -> str:
    """Validate everything short of training: device, model (with a forward at the run's
    batch size), parameter count, run folder. Returns a short human-readable report."""
    from normbench.device import preflight, resolve_device
    from normbench.models import build_model
    from normbench.tracking import check_folder_creatable

    device = resolve_device(cfg.device)
    check_folder_creatable(cfg.log.out_dir, "log.out_dir")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    preflight(cfg, model, device)
    params = sum(p.numel() for p in model.parameters())
    return (f"config ok: {cfg.model.arch} with norm '{cfg.norm.kind}', {params:,} parameters, "
            f"batch {cfg.train.batch_size}, clip '{cfg.clip.mode}', device {device}\n"
            f"run dir: {cfg.run_dir()}")
