"""The measurements behind the dry run's estimate (:mod:`normbench.sweep.estimate`), taken in
the dry run's own process on this machine:

* :func:`probe_times`: for one model, norm, clipping and batch size, a few SGD steps on random
  data, eval-mode and train-mode forwards, the model's build and one checkpoint write;
* :func:`process_start_s`: a fresh Python process importing torch and normbench (what every
  sweep worker pays once), with the device's start-up when it is a GPU;
* :func:`data_load`: the data set's sizes and how long loading it takes (md5 check included),
  as every cell does; never fetches (absent data: the official sizes, no load time)."""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from normbench.config import RunConfig

FULL_SIZES = (50000, 10000)  # CIFAR-10's training and test sets


@dataclass(frozen=True)
class ProbeTimes:
    """Seconds measured for one model, norm, clipping and batch size."""

    step_s: float  # one training step at the cell's batch
    eval_image_s: float  # one test image forwarded in eval mode at the evaluation batch (<= 100)
    train_forward_image_s: float  # one image forwarded in train mode, without gradients, at the cell's batch
    build_s: float  # building the model on its device, with its optimizer
    checkpoint_s: float  # writing one checkpoint (model and optimizer, atomically, fsynced)

    @classmethod
    def unknown(cls) -> "ProbeTimes":
        nan = float("nan")
        return cls(nan, nan, nan, nan, nan)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, min_time_s: float, max_runs: int) -> float:
    """Seconds per call of ``fn`` after one warm-up call."""
    fn()
    _sync(device)
    n, t0 = 0, time.perf_counter()
    while n < max_runs and (n == 0 or time.perf_counter() - t0 < min_time_s):
        fn()
        n += 1
    _sync(device)
    return (time.perf_counter() - t0) / n


def probe_times(cfg: RunConfig, threads: int, min_time_s: float = 0.3, max_steps: int = 5) -> ProbeTimes:
    """Time this cell's model on random data in this process (see :class:`ProbeTimes`)."""
    import torch
    import torch.nn.functional as F

    from normbench.clip import make_clipper
    from normbench.device import build_model_on, memory_format, prepare_kernels, resolve_device
    from normbench.tracking import RunDir
    from normbench.training.optim import build_optimizer

    torch.set_num_threads(threads)
    device = resolve_device(cfg.device)
    prepare_kernels(device)  # once per process, as the first optimizer's set-up: counted in process_start_s
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, channels_last = build_model_on(cfg, device)
    opt = build_optimizer(cfg, model)
    _sync(device)
    build_s = time.perf_counter() - t0
    model.train()
    fmt = memory_format(channels_last)
    clipper = make_clipper(cfg.clip, model)
    b = cfg.train.batch_size
    x = torch.randn(b, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (b,), device=device)

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clipper()
        opt.step()

    step_s = _timed(step, device, min_time_s, max_steps)
    with torch.no_grad():
        train_forward_s = _timed(lambda: model(x), device, min_time_s / 3, max_steps)
        eb = min(cfg.train.eval_batch_size, 100)
        xe = torch.randn(eb, 3, 32, 32, device=device).contiguous(memory_format=fmt)
        model.eval()
        eval_s = _timed(lambda: model(xe), device, min_time_s / 3, 2)
    model.train()
    with tempfile.TemporaryDirectory(prefix="normbench-probe-") as tmp:
        t0 = time.perf_counter()
        RunDir(Path(tmp)).save_checkpoint({"model": model.state_dict(), "optimizer": opt.state_dict()})
        checkpoint_s = time.perf_counter() - t0
    return ProbeTimes(step_s, eval_s / eb, train_forward_s / b, build_s, checkpoint_s)


START_CODE = ("import torch, normbench.sweep.cell, normbench.training.entry\n"
              "from normbench.device import prepare_kernels, resolve_device\n"
              "d = resolve_device({device!r})\n"
              "prepare_kernels(d)\n"
              "torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)\n"
              "torch.zeros(1, device=d).sum().item()\n")


def process_start_s(device: str = "cpu") -> float:
    """Seconds a fresh Python process takes to import torch and normbench's training, load
    the CPU kernels (or start the GPU) for ``device`` and set up its first optimizer (torch
    does much of that once per process): what every sweep worker pays before its first
    cell; NaN when it cannot be measured."""
    code = START_CODE.format(device=device)
    t0 = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300)
    except (OSError, subprocess.SubprocessError):
        return float("nan")
    return time.perf_counter() - t0 if done.returncode == 0 else float("nan")


def data_load(cfg: RunConfig) -> tuple[int, int, float]:
    """(training images, test images, seconds to load them) for this cell's data: the files
    in ``data.root`` are loaded and checked as a run loads them; absent (a dry run never
    fetches): the official sizes and 0 s."""
    from normbench.data import load_cifar10, present_identity

    n_train, n_test = FULL_SIZES
    seconds = 0.0
    if present_identity(cfg.data.resolved_root()) is not None:
        t0 = time.perf_counter()
        data = load_cifar10(cfg.data.model_copy(update={"allow_download": False}), log=lambda m: None)
        seconds = time.perf_counter() - t0
        n_train, n_test = len(data.train_y), len(data.test_y)
    elif cfg.data.train_subset:
        n_train = min(n_train, cfg.data.train_subset)
    return n_train, n_test, seconds
