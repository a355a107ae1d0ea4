"""Per-step training metrics, kept on the device and read once per logging interval.

The step appends device tensors (no host sync); :meth:`StepMetrics.reduce` reads an interval
in one transfer. The pending values and the interval's first step travel in checkpoints, so a
resumed run logs exactly the lines an uninterrupted one would.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch

from normbench.evaluation import sum_dtype

KEYS = ("loss", "correct", "norm", "clipped", "threshold")


@dataclass
class IntervalStats:
    """One logging interval, read from the device."""

    steps: int
    first_bad: Optional[int]  # the first step with a non-finite loss or gradient norm
    loss: float
    correct: float
    grad_norm: float
    clipped_frac: float
    clipped_sum: float
    threshold: float
    elapsed_s: float


class StepMetrics:
    def __init__(self):
        self.pending: dict[str, list] = {k: [] for k in KEYS}
        self.start = 0  # the step before the first pending one
        self.interval_t0 = time.perf_counter()

    def __len__(self) -> int:
        return len(self.pending["loss"])

    def add(self, loss: torch.Tensor, correct: torch.Tensor, norm: torch.Tensor, clipped: torch.Tensor,
            threshold: torch.Tensor) -> None:
        p = self.pending
        p["loss"].append(loss)
        p["correct"].append(correct)
        p["norm"].append(norm)
        p["clipped"].append(clipped)
        p["threshold"].append(threshold)

    def restart_clock(self) -> None:
        self.interval_t0 = time.perf_counter()

    def reduce(self, dist_ctx) -> Optional[IntervalStats]:
        """Read the pending steps (None if there are none), all-reduced over ranks under
        torchrun (loss and accuracy over all ranks' shards; any rank's fault counts), and start
        a new interval."""
        p = self.pending
        if not p["loss"]:
            return None
        losses = torch.stack(p["loss"]).float()
        norms = torch.stack(p["norm"]).float()
        bad = ~(torch.isfinite(losses) & torch.isfinite(norms))
        correct = torch.stack(p["correct"]).sum()
        clipped = torch.stack(p["clipped"]).float()
        n = len(p["loss"])
        stats = torch.stack([losses.mean(), correct.float(), norms.mean(), clipped.mean(), clipped.sum(),
                             p["threshold"][-1].float(), bad.any().float()])
        if dist_ctx.enabled:
            from normbench.distributed import all_reduce_sum

            wide = sum_dtype(stats.device)
            shared = all_reduce_sum(stats[[0, 1, 6]].to(wide), dist_ctx)
            stats = stats.to(wide)
            stats[0], stats[1], stats[6] = shared[0] / dist_ctx.world_size, shared[1], shared[2]
        values = stats.tolist()
        first_bad = None
        if values[6]:
            local = bad.nonzero()
            first_bad = self.start + (int(local[0, 0]) if len(local) else 0)
        elapsed = time.perf_counter() - self.interval_t0
        self.pending = {k: [] for k in KEYS}
        self.start += n
        self.interval_t0 = time.perf_counter()
        return IntervalStats(n, first_bad, values[0], values[1], values[2], values[3], values[4], values[5], elapsed)

    # -- checkpoint (the keys of the run checkpoint's top level) -------------------------------
    def state_dict(self) -> dict:
        return {"pending": {k: (torch.stack(v).cpu() if v else torch.zeros(0)) for k, v in self.pending.items()},
                "buffer_start": self.start}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.pending = {k: [t.to(device) for t in v] for k, v in state["pending"].items()}
        self.start = state["buffer_start"]
