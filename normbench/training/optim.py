"""How a run optimizes: the LR schedule, the optimizer, and whether the step is compiled."""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
from torch import nn

from normbench.config import RunConfig
from normbench.flat_sgd import FlatSGD, flattenable

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
