"""Synchronized BatchNorm for data-parallel training, on CPU (gloo) as well as CUDA.

The BatchNorm transform of Ioffe & Szegedy 2015 (Alg. 1) over the global batch of all processes
(cross-GPU statistics as in Peng et al. 2018, "MegDet: A Large Mini-Batch Object Detector");
specified in docs/methods.md#syncbn. Per channel c, with n = the number of values over every
rank's (B_r, H, W):

    mu_c    = (sum over ranks of sum over (B_r, H, W) of x) / n        first all-reduce
    var_c   = (sum over ranks of sum of (x - mu_c)^2) / n              second all-reduce, biased
    y       = gamma_c (x - mu_c) / sqrt(var_c + eps) + beta_c

Running statistics as BatchNorm's, with the unbiased var_c n / (n - 1). Plain PyTorch (no speed
path); PyTorch's ``nn.SyncBatchNorm`` refuses CPU tensors, so normbench has its own.
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import nn

from normbench.norms.batch_norm import BatchNorm2d


class AllReduceSum(torch.autograd.Function):
    """Sum over ranks, differentiable: y = sum_r x_r on every rank. Each rank's y feeds its
    own loss L_r and the total is sum_r L_r, so dL/dx_r = sum_r' dL_r'/dy: the backward is
    the same all-reduce of the incoming gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    return AllReduceSum.apply(x)


def global_moments(x: torch.Tensor, reduce_sum) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n, per-channel mean, biased per-channel variance) of ``x`` (N, C, H, W) over (N, H, W)
    of every rank, where ``reduce_sum`` is a differentiable sum over ranks: the mean first,
    then the sum of squared deviations from it (two passes, no cancellation)."""
    dims = (0, 2, 3)
    count = torch.full((1,), float(x.shape[0] * x.shape[2] * x.shape[3]), dtype=x.dtype, device=x.device)
    first = reduce_sum(torch.cat([count, x.sum(dims)]))
    n, mean = first[0], first[1:] / first[0]
    sq_dev = reduce_sum((x - mean.view(1, -1, 1, 1)).square().sum(dims))
    return n, mean, sq_dev / n


class SyncBatchNorm2d(BatchNorm2d):
    """BatchNorm (Ioffe & Szegedy 2015, Alg. 1) with statistics over the global batch.

    Two differentiable all-reduces (:func:`global_moments`): the per-channel count n and sum
    S of every rank's activations over (B_r, H, W) give mu = S / n; then the sums of squared
    deviations from that global mean give sigma^2 = sum (x - mu)^2 / n (biased, used to
    normalize; never Q / n - mu^2, which cancels when the mean is large against the spread),
    and the running variance takes the unbiased sigma^2 * n / (n - 1), exactly as BatchNorm on
    the concatenated batch (docs/methods.md#syncbn). Because the all-reduces are
    differentiable, each rank's gradients include the other ranks' contributions through the
    shared statistics: after DDP averages them, they equal the single-process gradients.
    Running statistics are identical on every rank. Outside a process group it is plain
    BatchNorm (one notice on stderr).
    """

    _warned = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            if self.training and not SyncBatchNorm2d._warned:
                SyncBatchNorm2d._warned = True
                print("normbench: syncbn outside torchrun: using plain BatchNorm", file=sys.stderr)
            return super().forward(x)
        n, mean, var = global_moments(x, all_reduce_sum)
        c = self.num_features
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
        shape = (1, c, 1, 1)
        scale = self.weight.view(shape) * torch.rsqrt(var.view(shape) + self.eps)
        return (x - mean.view(shape)) * scale + self.bias.view(shape)
