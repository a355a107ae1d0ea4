"""One training run: data, model, SGD with a scaled LR schedule, clipping, eval, checkpoints.

``train(cfg)`` is the library entry point behind ``normbench train`` and every sweep cell.
It returns the run's summary (also written to ``summary.json``). Guarantees:

* a config whose run already completed is not trained again (unless ``fresh``), and a
  summary or checkpoint made on other data (another fingerprint of ``data.root``'s files) is
  refused, never reused;
* one process at a time trains a run folder (the lock of :mod:`normbench.runlock`, shared
  with the sweep); a run that fails before it starts leaves no folder behind;
* a run with a checkpoint resumes from it and ends bit-identical (weights and metrics) to an
  uninterrupted run on the same device and thread count: batches derive from (seed, epoch),
  the LR from the step, and the logging accumulators travel in the checkpoint;
* the step is free of host syncs: loss, accuracy and clip statistics stay on the device and
  are read once per ``train.log_every`` steps;
* a non-finite loss or gradient norm ends the run as ``diverged`` with the first bad step;
  the last good checkpoint is kept;
* SIGINT / SIGTERM write a checkpoint and end the run as ``interrupted`` (a second SIGINT
  exits at once; atomic writes keep every file whole).
"""
from __future__ import annotations

import math
import os
import signal
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from normbench.config import RunConfig, dump_config
from normbench.errors import OtherDataError, UserError
from normbench.flat_sgd import FlatSGD, flattenable
from normbench.tracking import ReadOnlyRunDir, RunDir, TensorBoardLog, git_commit

INTERRUPT_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


# ----------------------------------------------------------------------------- set-up helpers


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device: got '{spec}' but CUDA is not available on this machine; use device=cpu or auto")
        index = int(spec.split(":")[1]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise UserError(f"device: got '{spec}' but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if spec == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("device: got 'mps' but MPS is not available on this machine; use device=cpu or auto")
    return torch.device(spec)


def use_channels_last(cfg: RunConfig, device: torch.device) -> bool:
    if cfg.train.channels_last != "auto":
        return bool(cfg.train.channels_last)
    from normbench.norms import get_scheme, native

    scheme = get_scheme(cfg.norm.kind)
    if scheme.channels_last_needs_kernels and device.type == "cpu" and native.library() is None:
        return False  # PyTorch's GroupNorm kernel is 2-3x slower on channels_last input
    return scheme.prefers_channels_last


def lr_at(cfg: RunConfig, step: int, total_steps: int, steps_per_epoch: int, world_size: int = 1) -> float:
    """Linear scaling (Goyal et al. 2017): peak = lr * global batch / base_batch_size, the
    global batch being batch_size x world_size; linear warm-up over ``warmup_epochs`` then
    cosine decay to 0 (or constant)."""
    peak = cfg.optim.lr * cfg.train.batch_size * world_size / cfg.optim.base_batch_size
    warmup = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return peak * (step + 1) / warmup
    if cfg.optim.schedule == "constant":
        return peak
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def fast_sgd_flags() -> dict:
    """The fused SGD kernel (one pass over all parameters) where this torch has it, else foreach.
    Measured on the 2-core CPU for ResNet-20: fused 257 us per step, foreach 421, plain loop 604."""
    import inspect

    return {"fused": True} if "fused" in inspect.signature(torch.optim.SGD).parameters else {"foreach": True}


# Below this many steps, compiling costs more than it saves. Measured on the 2-core CPU
# (scripts/bench_compile.py, FlatSGD, fused kernels): compiling ResNet-20 takes 22-31 s
# (3-12 s when inductor's on-disk cache already holds the graph); it saves ~1.6 ms per step
# at batch 2 (~16% of 10 ms) and ~2.5 ms at batch 8 (~12% of 21 ms), so it pays from
# ~10,000-16,000 steps: a one-epoch run at batch 2 (25,000 steps) compiles, one at batch 8
# (6,250 steps) does not.
AUTO_COMPILE_MIN_STEPS = 10_000


def compile_mode(cfg: RunConfig, device: torch.device, total_steps: int) -> Optional[str]:
    """torch.compile mode for this run, or None (eager). ``auto`` compiles on CPU only where it
    was measured to pay (NormScheme.compile_max_batch, measured per scheme and batch size:
    e.g. BN and WS+GN up to batch 8, Ghost BN, IN, FRN and the plain net up to 32, Batch
    Renorm, GN, LN and NF-ResNet at 2 only, EvoNorm-S0 never), only for runs long enough to
    amortise the compile time (AUTO_COMPILE_MIN_STEPS), and only when a C compiler is present."""
    import shutil

    from normbench.norms import get_scheme

    if cfg.train.compile == "none":
        return None
    if cfg.train.compile != "auto":
        return cfg.train.compile
    if device.type != "cpu" or total_steps < AUTO_COMPILE_MIN_STEPS:
        return None
    if cfg.train.batch_size > get_scheme(cfg.norm.kind).compile_max_batch:
        return None
    return "default" if (shutil.which("cc") or shutil.which("gcc")) else None


def build_optimizer(cfg: RunConfig, model: nn.Module, flat: bool = True) -> torch.optim.Optimizer:
    """SGD with momentum (nesterov optional); weight decay optionally skips norms and biases.

    ``flat``: FlatSGD (normbench.flat_sgd: parameters, gradients and momentum in one flat
    buffer per group, one fused update) where the parameters allow it; else torch's SGD.
    ``NORMBENCH_FLAT_SGD=0`` in the environment turns it off (torch's per-tensor fused SGD)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.optim.no_decay_norm_bias:
        decay = [p for n, p in params if p.ndim > 1]
        no_decay = [p for n, p in params if p.ndim <= 1]
        groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
    else:
        groups = [{"params": [p for _, p in params], "weight_decay": cfg.optim.weight_decay}]
    kwargs = {"lr": cfg.optim.lr, "momentum": cfg.optim.momentum,
              "nesterov": cfg.optim.nesterov and cfg.optim.momentum > 0}
    flat = flat and os.environ.get("NORMBENCH_FLAT_SGD", "1") != "0"
    if flat and all(flattenable(g["params"]) for g in groups):
        return FlatSGD(groups, **kwargs)
    return torch.optim.SGD(groups, **kwargs, **fast_sgd_flags())


def preflight(cfg: RunConfig, model: nn.Module, device: torch.device) -> None:
    """One forward at the run's batch size on a copy of the model: shape errors surface now."""
    import copy

    probe = copy.deepcopy(model).to(device).train()
    try:
        with torch.no_grad():
            probe(torch.zeros(cfg.train.batch_size, 3, 32, 32, device=device))
    except (torch.OutOfMemoryError, RuntimeError) as err:
        text = str(err)
        if not isinstance(err, torch.OutOfMemoryError) and "allocate" not in text and "out of memory" not in text:
            raise
        raise UserError(f"train.batch_size: got {cfg.train.batch_size}; one forward pass at this batch size "
                        f"does not fit in the memory of {device}") from None


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: nn.Module, data, normalize, batch_size: int, train_mode: bool = False, dist_ctx=None) -> dict:
    """Test loss and accuracy over the whole test set. ``train_mode`` uses each test batch's
    own statistics (BN-like layers) without touching the running statistics. Under torchrun
    each rank takes every world_size-th test batch and the sums are all-reduced."""
    from normbench.distributed import DistContext, all_reduce_sum

    dist_ctx = dist_ctx or DistContext()
    saved = None
    if train_mode:
        saved = {k: v.clone() for k, v in model.state_dict().items()}
    model.train(train_mode)
    loss_sum = torch.zeros((), device=data.test_y.device)
    correct = torch.zeros((), device=data.test_y.device, dtype=torch.long)
    n = len(data.test_y)
    usable = n - (n % batch_size) if train_mode and n >= batch_size else n
    for start in range(dist_ctx.rank * batch_size, usable, batch_size * dist_ctx.world_size):
        x = normalize(data.test_x[start:start + batch_size])
        y = data.test_y[start:start + batch_size]
        out = model(x)
        loss_sum += F.cross_entropy(out.float(), y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
    if saved is not None:
        model.load_state_dict(saved)
    model.train()
    totals = all_reduce_sum(torch.stack([loss_sum.double(), correct.double()]), dist_ctx).tolist()
    return {"loss": totals[0] / usable, "acc": totals[1] / usable}


def buffers_finite(model: nn.Module) -> Optional[str]:
    """Name of the first buffer (e.g. a BN running variance) that is not finite, or None."""
    for name, buf in model.named_buffers():
        if buf.is_floating_point() and not torch.isfinite(buf).all():
            return name
    return None


# ----------------------------------------------------------------------------- signals


class StopFlag:
    """First SIGINT/SIGTERM asks the loop to checkpoint and stop; a second SIGINT exits now."""

    def __init__(self):
        self.signum: Optional[int] = None

    def agree(self, dist_ctx, device: torch.device) -> None:
        """Under torchrun: if any rank was signalled, every rank stops (at the same step)."""
        from normbench.distributed import all_reduce_max

        flag = torch.tensor([float(self.signum or 0)], device=device)
        signum = int(all_reduce_max(flag, dist_ctx).item())
        if signum and self.signum is None:
            self.signum = signum

    @contextmanager
    def installed(self):
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.getsignal(s) for s in INTERRUPT_EXIT}

        def handler(signum, frame):
            if self.signum is not None and signum == signal.SIGINT:
                os._exit(130)  # second Ctrl-C: every file on disk is whole (atomic writes)
            self.signum = signum

        for s in INTERRUPT_EXIT:
            signal.signal(s, handler)
        self._handler = handler
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


# ----------------------------------------------------------------------------- the run


@dataclass
class Progress:
    """Callbacks the CLI uses to draw progress; the defaults do nothing."""

    def start(self, run_name: str, total_steps: int, done_steps: int, steps_per_epoch: int) -> None: ...
    def update(self, step: int, metrics: dict) -> None: ...
    def message(self, text: str) -> None: ...
    def finish(self) -> None: ...


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


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: RunDir, progress: Progress, dist_ctx=None, data=None):
        from normbench.clip import make_clipper
        from normbench.data import EpochPlan, Normalizer, load_cifar10
        from normbench.distributed import DistContext, local_device
        from normbench.models import build_model

        self.cfg, self.run_dir, self.progress = cfg, run_dir, progress
        self.dist = dist_ctx or DistContext()
        self.device = local_device(resolve_device(cfg.device), self.dist)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg)
        preflight(cfg, model, self.device)
        self.channels_last = use_channels_last(cfg, self.device)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=memory_format)
        self.train_model = self.model
        self.compile_mode = None  # decided once the step count is known (below)
        self.autocast = None
        if cfg.train.amp == "bf16":
            self.autocast = lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.train_model, device_ids=ids)
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
        if not self.dist.enabled:  # under DDP the step stays eager
            self.compile_mode = compile_mode(cfg, self.device, self.total_steps)
        if self.compile_mode is not None:  # e.g. "reduce-overhead": CUDA graphs for the fixed-shape step
            self.train_model = torch.compile(self.model, mode=self.compile_mode)
        self.progress_modules = [m for m in self.model.modules() if hasattr(m, "set_progress")]
        from normbench.analysis import make_analysis

        self.analysis = make_analysis(cfg, self)  # None unless an analysis.* option is on
        self._plan_cls = EpochPlan
        self.state = RunState()
        self._buffers: dict[str, list] = {"loss": [], "correct": [], "norm": [], "clipped": [], "threshold": []}
        self._buffer_start = 0
        self._interval_t0 = time.perf_counter()

    # -- checkpoint ------------------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        pending = {k: (torch.stack(v).cpu() if v else torch.zeros(0)) for k, v in self._buffers.items()}
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "clipper": self.clipper.state_dict(),
            "state": {k: (v if not isinstance(v, dict) else dict(v)) for k, v in self.state.__dict__.items()},
            "rng": rng,
            "pending": pending,
            "analysis": self.analysis.state_dict() if self.analysis is not None else {},
            "buffer_start": self._buffer_start,
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
        for k, v in ckpt["state"].items():
            setattr(self.state, k, v)
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if "cuda" in ckpt["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], self.device)
        self._buffers = {k: [t.to(self.device) for t in v] for k, v in ckpt["pending"].items()}
        if self.analysis is not None:
            self.analysis.load_state_dict(ckpt.get("analysis", {}))
        self._buffer_start = ckpt["buffer_start"]
        self.run_dir.truncate_metrics(ckpt["metrics_size"])

    def save(self) -> None:
        self.run_dir.save_checkpoint(self.checkpoint_state())

    # -- logging ---------------------------------------------------------------------------
    def flush(self, tb: TensorBoardLog, epoch_float: float) -> Optional[int]:
        """Read the accumulated step metrics once; return the first non-finite step, if any."""
        if not self._buffers["loss"]:
            return None
        losses = torch.stack(self._buffers["loss"]).float()
        norms = torch.stack(self._buffers["norm"]).float()
        bad = ~(torch.isfinite(losses) & torch.isfinite(norms))
        correct = torch.stack(self._buffers["correct"]).sum()
        clipped = torch.stack(self._buffers["clipped"]).float()
        n = len(self._buffers["loss"])
        stats = torch.stack([losses.mean(), correct.float(), norms.mean(), clipped.mean(), clipped.sum(),
                             self._buffers["threshold"][-1].float(), bad.any().float()])
        if self.dist.enabled:  # loss and accuracy over all ranks' shards; any rank's fault counts
            from normbench.distributed import all_reduce_sum

            shared = all_reduce_sum(stats[[0, 1, 6]].double(), self.dist)
            stats = stats.double()
            stats[0], stats[1], stats[6] = shared[0] / self.dist.world_size, shared[1], shared[2]
        stats = stats.tolist()
        first_bad = None
        if stats[6]:
            local = bad.nonzero()
            first_bad = self._buffer_start + (int(local[0, 0]) if len(local) else 0)
        elapsed = time.perf_counter() - self._interval_t0
        batch = self.global_batch
        record = {
            "step": self._buffer_start + n, "epoch": round(epoch_float, 4),
            "train/loss": stats[0], "train/acc": stats[1] / (n * batch),
            "opt/lr": self.optimizer.param_groups[0]["lr"],
            "grad/norm": stats[2], "grad/threshold": stats[5], "grad/clipped_frac": stats[3],
            "perf/images_per_s": n * batch / elapsed if elapsed > 0 else float("nan"),
        }
        self.state.clipped_sum += stats[4]
        self.state.clip_steps += n
        self.state.images_seen_timed += n * batch
        self.state.train_time_s += elapsed
        self.last_record = record
        self.run_dir.append_metrics(record)
        tb.scalars(record["step"], {k: v for k, v in record.items() if "/" in k})
        self.progress.update(record["step"], record)
        self._buffers = {k: [] for k in self._buffers}
        self._buffer_start += n
        self._interval_t0 = time.perf_counter()
        return first_bad

    # -- loop ------------------------------------------------------------------------------
    def step(self, plan, i: int) -> None:
        """One optimizer step on batch ``i`` of ``plan``: LR and schedules, then train_step."""
        st = self.state
        if self.analysis is not None and self.analysis.next_probe_step == st.step:
            self.analysis.probe_if_due(self)  # fixed-mode probe of the parameters before this step
        lr = lr_at(self.cfg, st.step, self.total_steps, self.steps_per_epoch, self.dist.world_size)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for m in self.progress_modules:
            m.set_progress(st.step / self.steps_per_epoch)
        self.train_step(*plan.batch(self.data, i))
        st.step += 1

    def train_step(self, x_u8: torch.Tensor, y: torch.Tensor) -> None:
        x = self.normalize(x_u8)
        probing = self.analysis is not None and self.analysis.wants_steps  # probe / histograms only
        if probing:
            self.analysis.before_forward(self)
        if self.autocast is None:
            out = self.train_model(x)
        else:
            with self.autocast():
                out = self.train_model(x).float()
        loss = F.cross_entropy(out, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if probing:
            self.analysis.after_backward(self, x, y, loss)
        stats = self.clipper()
        self.optimizer.step()
        b = self._buffers
        b["loss"].append(loss.detach())
        b["correct"].append((out.detach().argmax(1) == y).sum())
        b["norm"].append(stats.norm)
        b["clipped"].append(stats.clipped_frac)
        b["threshold"].append(stats.threshold)

    def run(self, stop: StopFlag) -> dict:
        cfg, st = self.cfg, self.state
        tb = TensorBoardLog(self.run_dir.tb, cfg.log.tensorboard and self.dist.is_main, purge_step=st.step or None)
        self.progress.start(cfg.run_name, self.total_steps, st.step, self.steps_per_epoch)
        t_start = time.perf_counter() - st.wall_time_s
        self._interval_t0 = last_save = time.perf_counter()
        status, diverged_step, note = "completed", None, None
        try:
            while st.step < self.total_steps:
                epoch, in_epoch = divmod(st.step, self.steps_per_epoch)
                plan = self._plan_cls(len(self.data.train_y), cfg.train.batch_size, cfg.seed, epoch,
                                      cfg.data.augment, self.device, self.dist.rank, self.dist.world_size)
                self.model.train()
                for i in range(in_epoch, self.steps_per_epoch):
                    self.step(plan, i)
                    if len(self._buffers["loss"]) >= cfg.train.log_every or i == self.steps_per_epoch - 1:
                        diverged_step = self.flush(tb, st.step / self.steps_per_epoch)
                        if diverged_step is not None:
                            break
                        if self.dist.enabled:  # every rank stops at the same step
                            stop.agree(self.dist, self.device)
                        if (time.perf_counter() - last_save >= cfg.log.checkpoint_every_s
                                and i < self.steps_per_epoch - 1 and stop.signum is None):
                            st.wall_time_s = time.perf_counter() - t_start
                            self.save()  # mid-epoch: resumes bit-identically, like a signal's checkpoint
                            last_save = time.perf_counter()
                    if stop.signum is not None and (not self.dist.enabled or not self._buffers["loss"]):
                        break  # under torchrun only right after a flush, where all ranks agreed
                if diverged_step is not None:
                    status, note = "diverged", f"non-finite loss or gradient at step {diverged_step}"
                    break
                if stop.signum is not None:
                    st.wall_time_s = time.perf_counter() - t_start
                    self.save()
                    status = "interrupted"
                    break
                epoch_done = st.step // self.steps_per_epoch
                if epoch_done % cfg.train.eval_every == 0 or st.step >= self.total_steps:
                    if self.dist.enabled:
                        from normbench.distributed import broadcast_buffers

                        broadcast_buffers(self.model, self.dist)
                    bad_buffer = buffers_finite(self.model)
                    if bad_buffer is not None:
                        status, diverged_step = "diverged", st.step
                        note = f"buffer {bad_buffer} is not finite after step {st.step}"
                        break
                    result = evaluate(self.model, self.data, self.normalize, cfg.train.eval_batch_size,
                                      dist_ctx=self.dist)
                    st.last_eval = {"epoch": epoch_done, **result}
                    st.best_acc = max(st.best_acc, result["acc"])
                    record = {"step": st.step, "epoch": epoch_done, "test/loss": result["loss"], "test/acc": result["acc"]}
                    self.run_dir.append_metrics(record)
                    tb.scalars(st.step, {"test/loss": result["loss"], "test/acc": result["acc"]})
                    self.progress.message(f"epoch {epoch_done}: test acc {result['acc']:.4f}, loss {result['loss']:.4f}")
                if self.analysis is not None:
                    self.analysis.on_epoch_end(self, epoch_done, tb)
                st.wall_time_s = time.perf_counter() - t_start
                self.save()
                self._interval_t0 = last_save = time.perf_counter()
        finally:
            self.progress.finish()
        st.wall_time_s = time.perf_counter() - t_start
        summary = self.summary(status, diverged_step, note)
        if self.analysis is not None and status == "completed":
            summary.update(self.analysis.on_finish(self, tb))
        if status in ("completed", "diverged"):
            tb.hparams(hparams_of(cfg), {"hparam/test_acc": summary["final_test_acc"] or float("nan"),
                                         "hparam/best_test_acc": summary["best_test_acc"] or float("nan")})
        tb.close()
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
            "config": self.cfg.to_dict(),
        }


def hparams_of(cfg: RunConfig) -> dict:
    return {"norm": cfg.norm.kind, "batch_size": cfg.train.batch_size, "clip": cfg.clip.mode,
            "lr": cfg.optim.lr, "epochs": cfg.train.epochs, "seed": cfg.seed, "arch": cfg.model.arch}


OTHER_DATA_REMEDY = ("give another log.out_dir or name to keep it and train on this data there, "
                     "or rerun with --fresh to replace it")


def check_recorded_data(run_path, what: str, source: Optional[str], fingerprint: Optional[str],
                        current, cfg: RunConfig) -> None:
    """Refuse (OtherDataError) when ``what`` in the run folder was made on data other than
    ``current`` (a DataIdentity; None: unknown, nothing to check). A record with a
    fingerprint must match it; one without (written before fingerprints were recorded) is
    accepted when its data source matches, or when it names none."""
    if current is None:
        return
    if fingerprint:
        if fingerprint == current.fingerprint:
            return
        recorded = f"{source or 'unknown'} data {fingerprint}"
    elif source is None or source == current.source:
        return
    else:
        recorded = f"{source} data"
    raise OtherDataError(f"run folder {run_path} holds {what} made on other data ({recorded}; data.root "
                         f"{cfg.data.resolved_root()} holds {current.describe()})", OTHER_DATA_REMEDY)


def check_summary_data(run_path, summary: dict, current, cfg: RunConfig) -> None:
    check_recorded_data(run_path, f"a {summary.get('status')} run", summary.get("data_source"),
                        summary.get("data_fingerprint"), current, cfg)


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
    from normbench.distributed import init_from_env, local_device

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


def _train_locked(cfg: RunConfig, fresh: bool, progress: Progress, dist_ctx, run_dir: RunDir,
                  started: list) -> dict:
    from normbench.data import data_identity
    from normbench.distributed import barrier

    if fresh:
        run_dir.wipe()
    barrier(dist_ctx)  # no rank reads the folder before rank 0 has wiped it
    existing = None if fresh else run_dir.read_summary()
    if existing is not None and existing.get("status") == "completed":
        check_summary_data(run_dir.path, existing, data_identity(cfg.data, progress.message), cfg)
        progress.message(f"{run_dir.path} already completed; not training again (use --fresh to redo)")
        return {**existing, "skipped": True}
    trainer = Trainer(cfg, run_dir, progress, dist_ctx)
    if existing is not None:
        check_summary_data(run_dir.path, existing, trainer.data.identity, cfg)
    ckpt = run_dir.load_checkpoint()
    if ckpt is not None:
        trainer.restore(ckpt)
        progress.message(f"resuming {run_dir.path.name} from step {trainer.state.step}")
    else:
        run_dir.truncate_metrics(0)
    run_dir.write_config(dump_config(cfg))
    started.append(True)
    stop = StopFlag()
    try:
        with stop.installed():
            summary = trainer.run(stop)
    except UserError:
        raise
    except Exception:
        run_dir.write_error_log(traceback.format_exc())
        run_dir.write_summary({**trainer.summary("failed", None, f"see {run_dir.error_log}"), "error_log": str(run_dir.error_log)})
        raise
    summary["run_dir"] = str(run_dir.path)
    if stop.signum is not None:
        summary["exit_code"] = INTERRUPT_EXIT[stop.signum]
    return summary


def dry_run(cfg: RunConfig) -> str:
    """Validate everything short of training: device, model (with a forward at the run's
    batch size), parameter count, run folder. Returns a short human-readable report."""
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
