"""Batch Renormalization (Ioffe 2017, "Batch Renormalization: Towards Reducing Minibatch
Dependence in Batch-Normalized Models", Alg. 1; specified in docs/methods.md#brn).

Training, per channel c over (B, H, W), with mu_c and sigma_c the moving mean and standard
deviation from before this step's update:

    mu_B    = mean over (B, H, W) of x
    sigma_B = sqrt(mean over (B, H, W) of (x - mu_B)^2 + eps)       biased variance, eps inside
    r       = clip(sigma_B / sigma_c, 1 / r_max, r_max)             constant in backward
    d       = clip((mu_B - mu_c) / sigma_c, -d_max, d_max)          constant in backward
    x_hat   = (x - mu_B) / sigma_B * r + d
    y       = gamma_c x_hat + beta_c

then ``mu_c += rate (mu_B - mu_c)``, ``sigma_c += rate (sigma_B - sigma_c)`` (rate
``renorm_momentum``, 0.01 in the paper). Eval: ``y = gamma_c (x - mu_c) / sigma_c + beta_c``.
With r_max = 1, d_max = 0 training is exactly BatchNorm. The limits follow the paper's
schedule in epochs (:meth:`BatchRenorm2d.limits_at`).

:func:`batch_renorm_reference` is the training step as plain PyTorch. The layer runs it through
``speed.batch_renorm`` (normbench.norms.speed.chunked): the chunked BatchNorm Function with one
chunk, or PyTorch's BN kernel with weight gamma r and bias beta + gamma d.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from normbench.norms import speed
from normbench.norms.batch_norm import reject_single_value
from normbench.norms.norm_act import TrailingReLU


def batch_renorm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor,
                           running_std: torch.Tensor, r_max: float, d_max: float, eps: float):
    """A training step's output, as written above: (y, mu_B, sigma_B)."""
    mu_b = x.mean((0, 2, 3))
    sigma_b = torch.sqrt((x - mu_b.view(1, -1, 1, 1)).square().mean((0, 2, 3)) + eps)
    r = torch.clamp(sigma_b / running_std, 1 / r_max, r_max).detach()
    d = torch.clamp((mu_b - running_mean) / running_std, -d_max, d_max).detach()
    x_hat = (x - mu_b.view(1, -1, 1, 1)) / sigma_b.view(1, -1, 1, 1) * r.view(1, -1, 1, 1) + d.view(1, -1, 1, 1)
    return weight.view(1, -1, 1, 1) * x_hat + bias.view(1, -1, 1, 1), mu_b, sigma_b


def _ramp(progress: float, start: float, end: float) -> float:
    """0 until ``start``, then linear to 1 at ``end`` (a step to 1 at ``start`` if end <= start)."""
    if end <= start:
        return 1.0 if progress >= start else 0.0
    return min(1.0, max(0.0, (progress - start) / (end - start)))


class BatchRenorm2d(speed.ChunkedLayer, TrailingReLU, nn.Module):
    """Batch Renormalization (Ioffe 2017, Alg. 1); see the module docstring.

    Schedule (the paper's, in epochs; driven by ``set_progress(epoch)``, which the engine
    calls every step): r_max = 1, d_max = 0 (plain BatchNorm) until ``warmup_epochs``, then
    linear rises to ``r_max`` (reached at ``r_max_epochs``) and ``d_max`` (at
    ``d_max_epochs``). The limits in force live in buffers, so a checkpoint restores them.

    ``path`` picks one of two implementations of the same maths (``speed.batch_renorm``):
    ``chunked`` (hand-written backward, fastest for large CPU batches), ``kernel`` (PyTorch's
    BN kernel: fastest for small CPU batches, where per-op overhead dominates, and on GPUs) or
    ``auto`` (by size, device and whether the fused kernels apply; both are tested).
    """

    def __init__(self, channels: int, eps: float = 1e-5, momentum: float = 0.01, r_max: float = 3.0,
                 d_max: float = 5.0, warmup_epochs: float = 0.0, r_max_epochs: float = 0.0,
                 d_max_epochs: float = 0.0, layer: str = "?", relu: bool = False):
        super().__init__()
        self.relu = relu  # the ReLU that follows, fused into the chunked kernels (applied after otherwise)
        self.num_features, self.eps, self.momentum, self.layer = channels, eps, momentum, layer
        self.r_max, self.d_max = float(r_max), float(d_max)
        self.warmup_epochs, self.r_max_epochs, self.d_max_epochs = warmup_epochs, r_max_epochs, d_max_epochs
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_std", torch.ones(channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.register_buffer("r_limit", torch.tensor(1.0))
        self.register_buffer("d_limit", torch.tensor(0.0))
        self.path = "auto"  # "kernel" | "chunked" | "auto" (by size and device; both are tested)
        self.set_progress(0.0)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, r_max={self.r_max}, "
                f"d_max={self.d_max}")

    def limits_at(self, epoch: float) -> tuple[float, float]:
        """(r_max, d_max) in force at fractional epoch ``epoch``."""
        r = 1.0 + (self.r_max - 1.0) * _ramp(epoch, self.warmup_epochs, self.r_max_epochs)
        d = self.d_max * _ramp(epoch, self.warmup_epochs, self.d_max_epochs)
        return r, d

    def set_progress(self, epoch: float) -> None:
        r, d = self.limits_at(float(epoch))
        self.r_limit.fill_(r)
        self.d_limit.fill_(d)

    def chunk_sizes(self, batch: int) -> list[int]:
        return [batch]  # one chunk: the whole batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.trailing_relu(F.batch_norm(x, self.running_mean, self.running_std.square(), self.weight,
                                                   self.bias, False, 0.0, 0.0))
        reject_single_value(x, x.shape[0], self.layer, "Batch Renorm")
        return speed.batch_renorm(self, x)  # calls update_running unless the kernel did

    def update_running(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        """Move the moving statistics towards this step's mu_B and sigma_B = sqrt(var_B + eps)."""
        with torch.no_grad():
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_std.lerp_((var + self.eps).sqrt().to(self.running_std.dtype), self.momentum)
            self.num_batches_tracked.add_(1)
