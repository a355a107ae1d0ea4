"""One run: its config, folder, model, optimizer, clipper, counters, logs and checkpoints.

A :class:`Run` holds everything that belongs to one run folder. It does not step: a stepper
(:mod:`normbench.training.solo` for a run alone, :mod:`normbench.training.packed` for runs
trained as one packed network) moves its weights, and the loop (:mod:`normbench.training.loop`)
drives steppers through epochs. A run alone steps its own model; a packed run's model and
optimizer hold its share of the packed network whenever the packed stepper syncs them
(before checkpoints, measurements and the end of the run).

The measurements of :mod:`normbench.analysis` see a run through a few attributes (its model,
data, normalizer, device, step counters, learning rate, last evaluation, metrics file):
:class:`normbench.analysis.hooks.RunView`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from normbench import __version__
from normbench.config import RunConfig
from normbench.errors import UserError
from normbench.progress import Progress
from normbench.hparams import config_hparams, final_metrics, runtime_hparams
from normbench.tensorboard_log import TensorBoardLog
from normbench.tracking import RunDir, git_commit
from normbench.training.metrics import StepMetrics
from normbench.training.records import check_recorded_data


@dataclass
class RunState:
    step: int = 0
    best_acc: float = 0.0
    last_eval: dict = field(default_factory=dict)
    wall_time_s: float = 0.0
    images_seen_timed: int = 0
    train_time_s: float = 0.0
    clipped_sum: float = 0.0
    clip_steps: int = 0
    # the last epoch whose end (evaluation, measurements) is done; a signal during an epoch's
    # last step checkpoints before it, and the resumed run does it first. None: a checkpoint
    # written before this was recorded (its epoch ends are taken as done).
    epochs_ended: Optional[int] = 0


def hparams_of(run: "Run") -> dict:
    """The values TensorBoard's HParams dashboard shows for a run (:mod:`normbench.hparams`):
    its config, resolved (the peak LR of its global batch, the norm's eps), and what it
    resolved when it started (device, compile mode, memory format, world size)."""
    world = run.dist.world_size
    return {**config_hparams(run.cfg, world), **runtime_hparams(run.device, run.compile_mode, run.channels_last, world)}


class Run:
    def __init__(self, cfg: RunConfig, run_dir: RunDir, progress: Progress, dist_ctx=None, data=None):
        from normbench.analysis.hooks import make_analysis
        from normbench.clip import make_clipper
        from normbench.data import Normalizer, load_cifar10
        from normbench.device import build_model_on, check_amp, device_line, resolve_device
        from normbench.distributed import DistContext, local_device
        from normbench.training.optim import build_optimizer

        self.cfg, self.run_dir, self.progress = cfg, run_dir, progress
        self.dist = dist_ctx or DistContext()
        self.device = local_device(resolve_device(cfg.device), self.dist)
        check_amp(cfg, self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN picks its fastest algorithms once
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.model, self.channels_last = build_model_on(cfg, self.device, check_batch=True)
        self.data = data if data is not None else load_cifar10(cfg.data, log=progress.message).to(self.device)
        self.global_batch = cfg.train.batch_size * self.dist.world_size
        if len(self.data.train_y) < self.global_batch:
            raise UserError(f"train.batch_size: got {cfg.train.batch_size} (global batch {self.global_batch}); "
                            f"the training set has only {len(self.data.train_y)} images")
        self.normalize = Normalizer(self.device, self.channels_last)
        self.optimizer = build_optimizer(cfg, self.model, flat=not self.dist.enabled)  # DDP keeps its own buckets
        self.clipper = make_clipper(cfg.clip, self.model)
        self.clipper.grad_source = getattr(self.optimizer, "flat_grads", None)
        self.steps_per_epoch = len(self.data.train_y) // self.global_batch
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        self.compile_mode: Optional[str] = None  # what the stepper ran; for the summary
        self.analysis = make_analysis(cfg, self)  # None unless an analysis.* option is on
        self.state = RunState()
        self.metrics = StepMetrics()
        self.status = "completed"  # until it diverges, fails or is interrupted
        self.diverged_step: Optional[int] = None
        self.note: Optional[str] = None
        self.last_record: dict = {}
        self.tb: Optional[TensorBoardLog] = None
        if data is None:  # once set up: a failed set-up says one line (a caller that gave the data said it)
            progress.message(device_line(cfg.device, self.device))

    # -- what measurements see (normbench.analysis.hooks.RunView) ---------------------------------
    @property
    def step(self) -> int:
        return self.state.step

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @property
    def last_eval(self) -> dict:
        return self.state.last_eval

    def append_metrics(self, record: dict) -> None:
        self.run_dir.append_metrics(record)

    @property
    def healthy(self) -> bool:
        return self.status == "completed"

    def stop(self, status: str, step: Optional[int] = None, note: Optional[str] = None) -> None:
        """End this run as ``status`` (diverged / interrupted); the first cause is kept."""
        if self.healthy:
            self.status, self.diverged_step, self.note = status, step, note

    # -- checkpoint ------------------------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        metrics = self.metrics.state_dict()
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "clipper": self.clipper.state_dict(),
            "state": {k: (v if not isinstance(v, dict) else dict(v)) for k, v in self.state.__dict__.items()},
            "rng": rng,
            "pending": metrics["pending"],
            "analysis": self.analysis.state_dict() if self.analysis is not None else {},
            "buffer_start": metrics["buffer_start"],
            "metrics_size": self.run_dir.metrics_size(),
            "data": {"source": self.data.source, "fingerprint": self.data.fingerprint},
        }

    def restore(self, ckpt: dict) -> None:
        recorded = ckpt.get("data") or {}  # checkpoints written before data fingerprints: accepted
        check_recorded_data(self.run_dir.path, "a checkpoint", recorded.get("source"), recorded.get("fingerprint"),
                            self.data.identity, self.cfg)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.clipper.load_state_dict(ckpt["clipper"])
        self.state.epochs_ended = None  # unless the checkpoint records it
        for k, v in ckpt["state"].items():
            setattr(self.state, k, v)
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if "cuda" in ckpt["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], self.device)
        self.metrics.load_state_dict(ckpt, self.device)
        if self.analysis is not None:
            self.analysis.load_state_dict(ckpt.get("analysis", {}))
        self.run_dir.truncate_metrics(ckpt["metrics_size"])

    def resume_or_start(self) -> bool:
        """Restore the folder's checkpoint if it has one (True), else start the metrics afresh."""
        ckpt = self.run_dir.load_checkpoint()
        if ckpt is None:
            self.run_dir.truncate_metrics(0)
            return False
        self.restore(ckpt)
        return True

    def save(self) -> None:
        self.run_dir.save_checkpoint(self.checkpoint_state())

    # -- logging ---------------------------------------------------------------------------------
    def open_log(self) -> TensorBoardLog:
        self.tb = TensorBoardLog(self.run_dir.tb, self.cfg.log.tensorboard and self.dist.is_main,
                                 purge_step=self.state.step or None)
        if self.tb.enabled:
            note = self.tb.begin_hparams(hparams_of(self), self.run_dir.path.parent, self.state.wall_time_s)
            if note:
                self.progress.message(note)
        return self.tb

    def close_log(self, status: str) -> None:
        """End the TensorBoard log: the HParams entry as ``status`` with the final metrics
        (test accuracy in percent, best test accuracy, last train loss), then close it. The
        log is closed even when the entry fails; a file TensorBoard could not write is shown
        as one line, never raised (the run's summary comes next). Once closed, later calls
        do nothing (a run that finished keeps its status)."""
        if self.tb is None:
            return
        st = self.state
        notes = []
        try:
            notes.append(self.tb.end_hparams(
                status, final_metrics(status, st.last_eval, st.best_acc, self.last_record.get("train/loss")), st.step))
        finally:
            notes.append(self.tb.close())
            for note in filter(None, notes):
                self.progress.message(note)

    def flush(self) -> Optional[int]:
        """Log the pending steps as one metrics line; return the first non-finite step, if any."""
        interval = self.metrics.reduce(self.dist)
        if interval is None:
            return None
        n, batch = interval.steps, self.global_batch
        record = {
            "step": self.metrics.start, "epoch": round(self.state.step / self.steps_per_epoch, 4),
            "train/loss": interval.loss, "train/acc": interval.correct / (n * batch),
            "opt/lr": self.lr,
            "grad/norm": interval.grad_norm, "grad/threshold": interval.threshold,
            "grad/clipped_frac": interval.clipped_frac,
            "perf/images_per_s": n * batch / interval.elapsed_s if interval.elapsed_s > 0 else float("nan"),
        }
        self.state.clipped_sum += interval.clipped_sum
        self.state.clip_steps += n
        self.state.images_seen_timed += n * batch
        self.state.train_time_s += interval.elapsed_s
        self.last_record = record
        self.run_dir.append_metrics(record)
        self.tb.scalars(record["step"], {k: v for k, v in record.items() if "/" in k})
        return interval.first_bad

    def record_eval(self, epoch: int, result: dict) -> None:
        st = self.state
        st.last_eval = {"epoch": epoch, **result}
        st.best_acc = max(st.best_acc, result["acc"])
        self.run_dir.append_metrics({"step": st.step, "epoch": epoch, "test/loss": result["loss"],
                                     "test/acc": result["acc"]})
        self.tb.scalars(st.step, {"test/loss": result["loss"], "test/acc": result["acc"]})

    # -- the end ---------------------------------------------------------------------------------
    def finish(self, extra: Optional[dict] = None) -> dict:
        """Summary (with the end-of-run measurements of a completed run), hparams, files closed."""
        summary = {**self.summary(self.status, self.diverged_step, self.note), **(extra or {})}
        if self.analysis is not None and self.status == "completed":
            summary.update(self.analysis.on_finish(self, self.tb))
        self.close_log(self.status)
        self.run_dir.write_summary(summary)
        return summary

    def summary(self, status: str, diverged_step: Optional[int], note: Optional[str]) -> dict:
        st = self.state
        done = status == "completed"
        return {
            "status": status,
            "run_name": self.cfg.run_name,
            "run_id": self.cfg.config_hash(),
            "final_test_acc": st.last_eval.get("acc") if done else None,
            "final_test_loss": st.last_eval.get("loss") if done else None,
            "best_test_acc": st.best_acc if st.last_eval else None,
            "last_eval": st.last_eval or None,
            "train_eval_gap": None,
            "steps": st.step,
            "total_steps": self.total_steps,
            "epochs": st.step / self.steps_per_epoch,
            "diverged_step": diverged_step,
            "note": note,
            "clipped_frac": st.clipped_sum / st.clip_steps if st.clip_steps else None,
            "wall_time_s": st.wall_time_s,
            "images_per_s": st.images_seen_timed / st.train_time_s if st.train_time_s else None,
            "device": str(self.device),
            "world_size": self.dist.world_size,
            "global_batch": self.global_batch,
            "threads": torch.get_num_threads(),
            "channels_last": self.channels_last,
            "compiled": self.compile_mode,
            "torch_version": torch.__version__,
            "data_source": self.data.source,
            "data_fingerprint": self.data.fingerprint,
            "train_size": len(self.data.train_y),
            "git_commit": git_commit(),
            "normbench_version": __version__,
            "config": self.cfg.to_dict(),
        }
