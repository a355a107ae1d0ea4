"""The dry run's time estimate: a short throughput probe per distinct model, batch size and
clipping (a few SGD steps on random data in this process), scaled by each task's remaining
steps, and a greedy schedule of the tasks over the workers."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from normbench.config import RunConfig
from normbench.sweep.keys import freeze
from normbench.sweep.plan import Plan
from normbench.sweep.state import safe_summary


def _data_sizes(cfg: RunConfig, cache: dict) -> tuple[int, int]:
    root = cfg.data.resolved_root()
    if str(root) not in cache:
        sizes = (50000, 10000)
        try:
            from normbench.data import FOLDER, TEST_FILES, TRAIN_FILES, load_batch

            folder = root / FOLDER
            if all((folder / f).is_file() for f in TRAIN_FILES + TEST_FILES):
                sizes = (sum(len(load_batch(folder / f)[1]) for f in TRAIN_FILES),
                         sum(len(load_batch(folder / f)[1]) for f in TEST_FILES))
        except Exception:  # noqa: BLE001 - an estimate only
            pass
        cache[str(root)] = sizes
    n_train, n_test = cache[str(root)]
    if cfg.data.train_subset:
        n_train = min(n_train, cfg.data.train_subset)
    return n_train, n_test


def probe_step_time(cfg: RunConfig, threads: int, min_time_s: float = 0.3, max_steps: int = 5) -> tuple[float, float]:
    """(seconds per training step, seconds per evaluated image) for this cell's model, norm,
    clipping and batch size: a few SGD steps on random data in this process."""
    import torch
    import torch.nn.functional as F

    from normbench.clip import make_clipper
    from normbench.device import build_model_on, memory_format, resolve_device
    from normbench.training.optim import build_optimizer

    torch.set_num_threads(threads)
    device = resolve_device(cfg.device)
    torch.manual_seed(0)
    model, channels_last = build_model_on(cfg, device)
    model.train()
    fmt = memory_format(channels_last)
    opt = build_optimizer(cfg, model)
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

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()
    sync()
    n, t0 = 0, time.perf_counter()
    while n < max_steps and (n == 0 or time.perf_counter() - t0 < min_time_s):
        step()
        n += 1
    sync()
    per_step = (time.perf_counter() - t0) / n
    eb = min(cfg.train.eval_batch_size, 100)
    xe = torch.randn(eb, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    model.eval()
    with torch.no_grad():
        model(xe)
        sync()
        t0 = time.perf_counter()
        model(xe)
        sync()
    per_eval_image = (time.perf_counter() - t0) / eb
    return per_step, per_eval_image


def estimate(plan: Plan, workers: int, log: Callable[[str], None] = lambda m: None) -> tuple[dict[int, float], float]:
    """Estimated seconds per task (remaining steps only) and the sweep's wall time with
    ``workers`` parallel workers (greedy: next task to the first free worker). A pack is
    estimated as its lead cell."""
    probes: dict[str, tuple[float, float]] = {}
    sizes: dict = {}
    per_task: dict[int, float] = {}
    for task in plan.tasks:
        cfg = task.config
        key = freeze([cfg.model.model_dump(), cfg.norm.model_dump(), cfg.clip.model_dump(), cfg.train.batch_size,
                      cfg.train.channels_last, cfg.device])
        if key not in probes:
            log(f"probing {cfg.norm.kind} at batch {cfg.train.batch_size}")
            try:
                probes[key] = probe_step_time(cfg, plan.threads)
            except Exception as err:  # noqa: BLE001 - the run itself will report it properly
                log(f"probe of {task.name} failed ({type(err).__name__}: {err}); no estimate for it")
                probes[key] = (float("nan"), float("nan"))
        per_step, per_eval_image = probes[key]
        n_train, n_test = _data_sizes(cfg, sizes)
        total = (n_train // cfg.train.batch_size) * cfg.train.epochs
        done = 0
        if task.mode != "force" and plan.states.get(task.index) == "partial":
            done = _checkpoint_step(task.run_dir)
        evals = len([e for e in range(1, cfg.train.epochs + 1)
                     if e % cfg.train.eval_every == 0 or e == cfg.train.epochs])
        frac = (total - done) / total if total else 0.0
        per_task[task.index] = (total - done) * per_step + frac * evals * n_test * per_eval_image + 3.0
    finish = [0.0] * max(1, workers)
    for task in plan.tasks:
        if per_task[task.index] != per_task[task.index]:
            continue  # NaN: no estimate for this cell
        i = min(range(len(finish)), key=finish.__getitem__)
        finish[i] += per_task[task.index]
    return per_task, max(finish) if plan.tasks else 0.0


def _checkpoint_step(run_dir: Path) -> int:
    summary, _ = safe_summary(run_dir)
    if summary and summary.get("steps"):
        return int(summary["steps"])
    try:
        from normbench.tracking import RunDir

        ckpt = RunDir(run_dir).load_checkpoint()
        return int(ckpt["state"]["step"]) if ckpt else 0
    except Exception:  # noqa: BLE001 - an estimate only
        return 0
