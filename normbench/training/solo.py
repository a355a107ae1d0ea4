"""A run trained alone: its own model steps (eager, compiled, or under DDP with torchrun).

The step is free of host syncs: loss, accuracy and clip statistics stay on the device in the
run's :class:`~normbench.training.metrics.StepMetrics` until the loop logs them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from normbench.config import RunConfig
from normbench.evaluation import evaluate
from normbench.progress import Progress
from normbench.tracking import RunDir
from normbench.training.optim import compile_mode, lr_at
from normbench.training.run import Run


class SoloStepper:
    """Steps one :class:`Run`'s model: the loop's :class:`~normbench.training.loop.Stepper`."""

    def __init__(self, run: Run):
        self.run = run
        self.runs = [run]
        self.label = run.cfg.run_name
        self.distributed = run.dist.enabled
        self.stops_mid_interval = not run.dist.enabled
        self.summary_extra: dict = {}
        self.train_model = run.model
        if run.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [run.device.index] if run.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(run.model, device_ids=ids)
        else:  # under DDP the step stays eager
            run.compile_mode = compile_mode(run.cfg, run.device, run.total_steps)
        if run.compile_mode is not None:  # e.g. "reduce-overhead": CUDA graphs for the fixed-shape step
            self.train_model = torch.compile(run.model, mode=run.compile_mode)
        self.autocast = None
        if run.cfg.train.amp == "bf16":
            self.autocast = lambda: torch.autocast(run.device.type, dtype=torch.bfloat16)
        self.progress_modules = [m for m in run.model.modules() if hasattr(m, "set_progress")]

    # -- the loop's interface ------------------------------------------------------------------
    def plans(self, epoch: int) -> list:
        from normbench.data import EpochPlan

        r, cfg = self.run, self.run.cfg
        return [EpochPlan(len(r.data.train_y), cfg.train.batch_size, cfg.seed, epoch, cfg.data.augment, r.device,
                          r.dist.rank, r.dist.world_size)]

    def begin_epoch(self) -> None:
        self.run.model.train()

    def step(self, plans: list, i: int) -> None:
        """One optimizer step on batch ``i`` of the epoch's plan: LR and schedules, then train_step."""
        r = self.run
        lr = lr_at(r.cfg, r.state.step, r.total_steps, r.steps_per_epoch, r.dist.world_size)
        for group in r.optimizer.param_groups:
            group["lr"] = lr
        for m in self.progress_modules:
            m.set_progress(r.state.step / r.steps_per_epoch)
        self.train_step(*plans[0].batch(r.data, i))
        r.state.step += 1

    def sync(self) -> None:
        """The run's model is the stepping model: nothing to copy."""

    def evaluate(self, on_images=None) -> list[dict]:
        r = self.run
        return [evaluate(r.model, r.data, r.normalize, r.cfg.train.eval_batch_size, dist_ctx=r.dist,
                         on_images=on_images)]

    # -- the step --------------------------------------------------------------------------------
    def train_step(self, x_u8: torch.Tensor, y: torch.Tensor) -> None:
        r = self.run
        x = r.normalize(x_u8)
        probing = r.analysis is not None and r.analysis.wants_steps  # lr-mode probe / histograms only
        if probing:
            r.analysis.before_forward(r)
        if self.autocast is None:
            out = self.train_model(x)
        else:
            with self.autocast():
                out = self.train_model(x).float()
        loss = F.cross_entropy(out, y)
        r.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if probing:
            r.analysis.after_backward(r, x, y, loss, self.autocast)
        stats = r.clipper()
        r.optimizer.step()
        r.metrics.add(loss.detach(), (out.detach().argmax(1) == y).sum(), stats.norm, stats.clipped_frac,
                      stats.threshold)


def solo_stepper(cfg: RunConfig, run_dir: RunDir, progress: Progress, dist_ctx=None, data=None) -> SoloStepper:
    """A run and its stepper, as ``normbench train`` builds them (benchmarks use this too)."""
    return SoloStepper(Run(cfg, run_dir, progress, dist_ctx, data))
