"""How many local workers a sweep runs and how many torch threads each gets."""
from __future__ import annotations

import os
from typing import Optional, Sequence


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def cuda_device_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001
        return 0


def default_workers(cells: Sequence) -> int:
    """One worker per GPU when cells run on CUDA; otherwise one per core (at most 8): small
    batches scale far better across processes than across threads."""
    on_gpu = any(c.cfg.device.startswith("cuda") or c.cfg.device == "auto" for c in cells)
    gpus = cuda_device_count() if on_gpu else 0
    if gpus:
        return gpus
    return max(1, min(8, usable_cores()))


def default_threads(workers: int) -> int:
    return max(1, usable_cores() // max(1, workers))


def local_layout(n_tasks: int, workers: Optional[int], threads: Optional[int], cells: Sequence) -> tuple[int, int]:
    """(workers, threads per worker) for the local executor. Defaults: one single-thread worker
    per core (small-batch cells scale far better across processes than across threads), but
    never more workers than cells to train: with fewer cells than cores, each cell gets the
    spare cores as threads (a lone cell on 2 cores trains with 2 threads, not 1)."""
    n_workers = workers or default_workers(cells)
    if threads:
        return n_workers, threads
    busy = min(n_workers, n_tasks) if n_tasks > 0 else n_workers
    return n_workers, default_threads(busy)
