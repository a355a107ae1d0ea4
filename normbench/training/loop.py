"""The training loop: epochs of steps, logging, divergence, checkpoints, evaluation, the end.

One loop for every way of training. It drives a :class:`Stepper`, which owns the network
that steps (one run's model, or several runs packed into one network) and keeps each
:class:`~normbench.training.run.Run` current; the loop does the bookkeeping every run shares:

* every ``train.log_every`` steps (and at each epoch's end) each run logs one metrics line;
  a non-finite loss or gradient norm ends that run as ``diverged`` at its first bad step,
  and its last good checkpoint is kept; the loop ends when no run is left healthy;
* every ``log.checkpoint_every_s`` seconds mid-epoch, and after every epoch, each healthy run
  writes a checkpoint from which it resumes bit-identically;
* after every ``train.eval_every`` epochs (and the last) each run's buffers are checked finite
  (a non-finite running statistic ends it as ``diverged``) and it is evaluated on the test set;
  then the epoch-end measurements run;
* on SIGINT / SIGTERM (:class:`~normbench.training.signals.StopFlag`) each healthy run writes a
  checkpoint and ends as ``interrupted``;
* at the end each run writes its summary (with the end-of-run measurements if it completed).

The progress view hears of every phase that is not training (each evaluation, with the test
images done; the landscape probes and epoch-end measurements; the end-of-run measurements)
and of the evaluations and measurements still due, so that its ETA counts them
(:mod:`normbench.training.phases`).
"""
from __future__ import annotations

import time
from typing import Optional, Protocol

from normbench.evaluation import buffers_finite
from normbench.progress import Progress, percent
from normbench.training.phases import FinalWork, evaluations_due_after, final_work
from normbench.training.run import Run
from normbench.training.signals import StopFlag


class Stepper(Protocol):
    runs: list[Run]  # runs[0] leads: all runs share its step counters
    label: str  # the name progress shows
    distributed: bool  # under torchrun: ranks agree on stopping after every log line
    stops_mid_interval: bool  # may stop with unlogged steps pending (they travel in the checkpoint)
    summary_extra: dict  # added to every run's summary

    def plans(self, epoch: int) -> list: ...  # the epoch's batch order, one per run
    def begin_epoch(self) -> None: ...
    def step(self, plans: list, i: int) -> None: ...  # one optimizer step of every run on batch i
    def sync(self) -> None: ...  # make every run's model and optimizer hold the current weights
    def evaluate(self, on_images=None) -> list[dict]: ...  # test loss and accuracy of every run;
    # on_images(n): n test images evaluated so far (progress only)


def healthy(stepper: Stepper) -> list[Run]:
    return [r for r in stepper.runs if r.healthy]


def probe_due(stepper: Stepper, progress: Optional[Progress] = None) -> None:
    """Fixed-mode landscape probes due before this step, each on its run's current weights."""
    progress = progress or Progress()
    due = [r for r in stepper.runs  # every step: the cheap test first
           if r.analysis is not None and r.analysis.next_probe_step == r.state.step and r.healthy]
    if due:
        progress.begin_phase("probe", f"probing the loss landscape at step {due[0].state.step}")
        try:
            stepper.sync()
            for r in due:
                r.analysis.probe_if_due(r)
        finally:
            progress.end_phase()


class _Clocks:
    """Each run's wall time: what it had when this process took it over, plus time since."""

    def __init__(self, runs: list[Run]):
        now = time.perf_counter()
        self.starts = {id(r): now - r.state.wall_time_s for r in runs}

    def stamp(self, run: Run) -> None:
        run.state.wall_time_s = time.perf_counter() - self.starts[id(run)]


def _save(stepper: Stepper, clocks: _Clocks, synced: bool = False) -> float:
    """Checkpoint every healthy run (``synced``: the runs already hold the current weights);
    returns the time of the save."""
    if not synced:
        stepper.sync()
    for r in healthy(stepper):
        clocks.stamp(r)
        r.save()
    return time.perf_counter()


def _evaluate(stepper: Stepper, epoch_done: int, progress: Progress, final: FinalWork) -> list[dict]:
    """Every run's test evaluation, shown as a phase; the ETA hears what is due after it."""
    lead = stepper.runs[0]
    n_test = len(lead.data.test_y)
    progress.work_left(evaluations_due_after(lead.cfg, epoch_done) + final.passes, n_test, final.forward_images)
    progress.begin_phase("evaluation", "evaluating", n_test)
    try:
        return stepper.evaluate(on_images=progress.advance_phase)
    finally:
        progress.end_phase()


def _epoch_end_measurements(stepper: Stepper, epoch_done: int, progress: Progress) -> None:
    """Dead units and the probes due now, each on its run's own model, shown as a phase when
    there are any."""
    measured = [r for r in healthy(stepper) if r.analysis is not None]
    if not measured:
        return
    busy = any(r.analysis.dead or r.analysis.next_probe_step == r.state.step for r in measured)
    if busy:
        progress.begin_phase("probe", f"epoch {epoch_done} measurements")
    try:
        for r in measured:
            r.analysis.on_epoch_end(r, epoch_done, r.tb)
    finally:
        if busy:
            progress.end_phase()


def _end_of_epoch(stepper: Stepper, epoch_done: int, progress: Progress, final: FinalWork) -> None:
    lead, cfg = stepper.runs[0], stepper.runs[0].cfg
    stepper.sync()
    if epoch_done % cfg.train.eval_every == 0 or lead.state.step >= lead.total_steps:
        if stepper.distributed:  # every rank evaluates (and checks) rank 0's running statistics
            from normbench.distributed import broadcast_buffers

            broadcast_buffers(lead.model, lead.dist)
        for r in healthy(stepper):  # a non-finite running statistic: diverged, never evaluated
            bad_buffer = buffers_finite(r.model)
            if bad_buffer is not None:
                r.stop("diverged", r.state.step, f"buffer {bad_buffer} is not finite after step {r.state.step}")
        if not healthy(stepper):
            return
        for r, result in zip(stepper.runs, _evaluate(stepper, epoch_done, progress, final)):
            if not r.healthy:
                continue
            r.record_eval(epoch_done, result)
            who = f"{r.cfg.run_name} " if len(stepper.runs) > 1 else ""
            progress.message(f"{who}epoch {epoch_done}: test acc {percent(result['acc'])}, loss {result['loss']:.4f}")
    _epoch_end_measurements(stepper, epoch_done, progress)


def _epoch_end_pending(lead: Run) -> Optional[int]:
    """The epoch whose end a signal cut off (it came during the epoch's last step, so the
    checkpoint is at the epoch boundary before its evaluation and measurements), or None."""
    st, spe = lead.state, lead.steps_per_epoch
    if st.step == 0 or st.step % spe or st.epochs_ended is None or st.epochs_ended >= st.step // spe:
        return None
    return st.step // spe


def _finish_runs(stepper: Stepper, progress: Progress) -> list[dict]:
    """Every run's summary; the end-of-run measurements of the completed ones shown as a phase."""
    final = final_work(healthy(stepper))
    if final.parts:
        progress.begin_phase("measurements", final.text())
    try:
        return [r.finish(stepper.summary_extra) for r in stepper.runs]
    finally:
        if final.parts:
            progress.end_phase()


def train_loop(stepper: Stepper, progress: Progress, stop: StopFlag) -> list[dict]:
    """Train every run of ``stepper`` to its end (or divergence, or a signal); their summaries."""
    runs = stepper.runs
    lead, cfg = runs[0], runs[0].cfg
    spe = lead.steps_per_epoch
    for r in runs:
        r.open_log()
    progress.start(stepper.label, lead.total_steps, lead.state.step, spe)
    final = final_work(healthy(stepper))
    progress.work_left(evaluations_due_after(cfg, lead.state.step // spe) + final.passes, len(lead.data.test_y),
                       final.forward_images)
    clocks = _Clocks(runs)
    for r in runs:
        r.metrics.restart_clock()
    last_save = time.perf_counter()
    try:
        pending = _epoch_end_pending(lead)
        if pending is not None:  # resumed at an epoch boundary whose end was not done: do it first
            _end_of_epoch(stepper, pending, progress, final)
            for r in healthy(stepper):
                r.state.epochs_ended = pending
            if healthy(stepper):
                last_save = _save(stepper, clocks, synced=True)
        while lead.state.step < lead.total_steps and healthy(stepper):
            epoch, in_epoch = divmod(lead.state.step, spe)
            plans = stepper.plans(epoch)
            stepper.begin_epoch()
            for i in range(in_epoch, spe):
                probe_due(stepper, progress)
                stepper.step(plans, i)
                if len(lead.metrics) >= cfg.train.log_every or i == spe - 1:
                    for r in runs:
                        bad = r.flush()
                        if bad is not None:
                            r.stop("diverged", bad, f"non-finite loss or gradient at step {bad}")
                    progress.update(lead.state.step, lead.last_record)
                    if not healthy(stepper):
                        break
                    if stepper.distributed:  # every rank stops at the same step
                        stop.agree(lead.dist, lead.device)
                    if (time.perf_counter() - last_save >= cfg.log.checkpoint_every_s
                            and i < spe - 1 and stop.signum is None):
                        last_save = _save(stepper, clocks)  # mid-epoch: resumes bit-identically
                if stop.signum is not None and (stepper.stops_mid_interval or not len(lead.metrics)):
                    break
            if not healthy(stepper):
                break
            if stop.signum is not None:
                _save(stepper, clocks)
                for r in healthy(stepper):
                    r.stop("interrupted")
                break
            _end_of_epoch(stepper, lead.state.step // spe, progress, final)
            if not healthy(stepper):
                break
            for r in healthy(stepper):
                r.state.epochs_ended = lead.state.step // spe
            last_save = _save(stepper, clocks, synced=True)  # _end_of_epoch synced; measurements use copies
            for r in runs:
                r.metrics.restart_clock()
        for r in runs:  # every healthy run was synced at its last checkpoint
            clocks.stamp(r)
        return _finish_runs(stepper, progress)
    except Exception as err:
        # A UserError (bad input, a folder that cannot be written) is not a failure of the run:
        # the caller writes no failed summary and the run resumes once it is fixed, so
        # TensorBoard shows it as interrupted. Any other error fails the runs (the caller
        # records it). A run that already finished keeps its status (close_log runs once).
        from normbench.errors import UserError

        status = "interrupted" if isinstance(err, UserError) else "failed"
        for r in runs:
            try:  # one log that cannot be closed neither stops the others nor hides ``err``
                r.close_log(status)
            except Exception:  # noqa: BLE001
                pass
        raise
    finally:
        progress.finish()
