"""How many local workers a sweep runs, how many torch threads each gets, and which GPU each sees."""
from __future__ import annotations

import bisect
import os
import re
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


def visible_gpus(env: Optional[str], count: int) -> list[str]:
    """The GPUs this process may use, named as ``CUDA_VISIBLE_DEVICES`` names them (indices or
    UUIDs; ``env`` its value, None when unset), the first ``count`` (what CUDA sees)."""
    if env is None:
        return [str(i) for i in range(count)]
    return [v.strip() for v in env.split(",") if v.strip()][:count]


def worker_gpus(cells: Sequence, env: Optional[str], count: int) -> list[str]:
    """The GPUs to spread local workers over, one each: the visible ones when cells train on
    ``cuda`` or ``auto``; none (workers see every visible GPU) when a cell names its own
    device index (``cuda:1``), or when no cell uses CUDA."""
    devices = [c.cfg.device for c in cells]
    if not any(d == "cuda" or d == "auto" or d.startswith("cuda:") for d in devices):
        return []
    if any(re.fullmatch(r"cuda:\d+", d) for d in devices):
        return []
    return visible_gpus(env, count)


class GpuSlots:
    """Which GPU each local worker sees: worker slot k gets the k-th of ``gpus`` (round robin
    when there are more workers than GPUs), and a worker that replaces a dead one takes the
    slot it left, so respawns never double up on one GPU."""

    def __init__(self, gpus: Sequence[str], workers: int):
        self.gpus = list(gpus)
        self.free = list(range(workers))
        self.slot_of: dict[int, int] = {}

    def take(self, worker_id: int) -> Optional[str]:
        """The ``CUDA_VISIBLE_DEVICES`` of a new worker (None: leave it as it is)."""
        slot = self.free.pop(0) if self.free else len(self.slot_of)
        self.slot_of[worker_id] = slot
        return self.gpus[slot % len(self.gpus)] if self.gpus else None

    def release(self, worker_id: int) -> None:
        slot = self.slot_of.pop(worker_id, None)
        if slot is not None:
            bisect.insort(self.free, slot)


def ray_local_cpus(workers: int, threads: int, gpus_per_cell: float, gpus: int) -> int:
    """CPUs of a private local Ray instance: room for ``workers`` cells of ``threads`` CPUs, or,
    when cells declare a GPU share, for as many cells as the GPUs hold (two cells per GPU at
    ``--gpus-per-cell 0.5``), so the CPUs never cap what the GPU shares allow."""
    cells = workers
    if gpus_per_cell > 0 and gpus:
        cells = max(cells, int(gpus / gpus_per_cell + 1e-9))
    return cells * threads
