"""Synchronized BatchNorm for data-parallel training, on CPU (gloo) as well as CUDA.

PyTorch's ``nn.SyncBatchNorm`` refuses CPU tensors, so normbench has its own.
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import nn

from normbench.norms.batch import BatchNorm2d


class SyncBatchNorm2d(BatchNorm2d):
    """BatchNorm (Ioffe & Szegedy 2015, Alg. 1) with statistics over the global batch.

    Each rank computes, per channel, the count n_r, sum S_r and sum of squares Q_r of its
    activations over (B_r, H, W); a differentiable all-reduce gives n, S, Q over all ranks;
    mu = S / n, sigma^2 = Q / n - mu^2 (biased, used to normalize), and the running variance
    takes the unbiased sigma^2 * n / (n - 1), exactly as BatchNorm on the concatenated batch.
    Because the all-reduce is differentiable (its backward all-reduces the gradients of S and
    Q), each rank's gradients include the other ranks' contributions through the shared
    statistics: after DDP averages them, they equal the single-process gradients. Running
    statistics are identical on every rank. Outside a process group it is plain BatchNorm
    (one notice on stderr).
    """

    _warned = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            if self.training and not SyncBatchNorm2d._warned:
                SyncBatchNorm2d._warned = True
                print("normbench: syncbn outside torchrun: using plain BatchNorm", file=sys.stderr)
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = (0, 2, 3)
        count = torch.full((1,), float(x.shape[0] * x.shape[2] * x.shape[3]), dtype=x.dtype, device=x.device)
        stats = torch.cat([count, x.sum(dims), (x * x).sum(dims)])
        stats = all_reduce(stats)  # differentiable SUM over ranks
        c = self.num_features
        n, mean = stats[0], stats[1:1 + c] / stats[0]
        var = (stats[1 + c:] / n - mean * mean).clamp_min(0)
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
        shape = (1, c, 1, 1)
        scale = self.weight.view(shape) * torch.rsqrt(var.view(shape) + self.eps)
        return (x - mean.view(shape)) * scale + self.bias.view(shape)
