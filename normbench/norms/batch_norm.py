"""BatchNorm (Ioffe & Szegedy 2015, "Batch Normalization: Accelerating Deep Network Training by
Reducing Internal Covariate Shift", Alg. 1 and Sec. 3.2; specified in docs/methods.md#bn).

Training, per channel c over the batch and both spatial axes (B, H, W):

    mu_c    = mean over (B, H, W) of x                       the batch mean
    var_c   = mean over (B, H, W) of (x - mu_c)^2            the biased batch variance
    x_hat   = (x - mu_c) / sqrt(var_c + eps)                 eps inside the root
    y       = gamma_c x_hat + beta_c                         per-channel affine (init 1, 0)

then ``max(y, 0)`` when the layer carries the ReLU after it. Running statistics, once per
step at momentum m: ``run_mean <- (1 - m) run_mean + m mu_c``, ``run_var <- (1 - m) run_var +
m var_c n / (n - 1)`` (n = B H W, unbiased); eval normalizes with them instead.

:func:`batch_norm_reference` is that training step as plain PyTorch; the layer runs PyTorch's
own BatchNorm kernel (the fused kernel of the chunked path, with one chunk, was measured no
faster for a whole ResNet-20 training step on CPU: step-time ratio 0.88 at batch 2, 0.96-1.02
at 8-128).
"""
from __future__ import annotations

import torch
from torch import nn

from normbench.errors import UserError
from normbench.norms.norm_act import TrailingReLU


def batch_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    """A training step's output, as written above: (y, mu_c, unbiased var_c for the running average)."""
    mu = x.mean((0, 2, 3), keepdim=True)
    var = (x - mu).square().mean((0, 2, 3), keepdim=True)
    x_hat = (x - mu) / torch.sqrt(var + eps)
    y = weight.view(1, -1, 1, 1) * x_hat + bias.view(1, -1, 1, 1)
    n = x.shape[0] * x.shape[2] * x.shape[3]
    return y, mu.flatten(), var.flatten() * n / (n - 1)


def reject_single_value(x: torch.Tensor, per_stat_samples: int, layer: str, what: str = "BatchNorm") -> None:
    """UserError when a batch statistic would be computed from one value per channel."""
    if per_stat_samples * x.shape[2] * x.shape[3] == 1:
        raise UserError(f"{what} at layer {layer} sees one value per channel "
                        f"(batch {x.shape[0]} on {x.shape[2]}x{x.shape[3]} maps): its variance is undefined; "
                        "use a larger batch or a per-sample norm (gn, ln, frn)")


class BatchNorm2d(TrailingReLU, nn.BatchNorm2d):
    """BatchNorm (Ioffe & Szegedy 2015, Alg. 1); see the module docstring.

    Running mean/var (momentum 0.1, unbiased variance) replace the batch statistics in eval.
    ``relu=True``: the ReLU that follows, applied by the layer (in place). The one undefined
    case (one value per channel: B = 1 on 1x1 maps) is an error that names the layer.
    """

    def __init__(self, channels: int, eps: float = 1e-5, momentum: float = 0.1, layer: str = "?",
                 relu: bool = False):
        super().__init__(channels, eps=eps, momentum=momentum)
        self.layer = layer
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            reject_single_value(x, x.shape[0], self.layer)
        return self.trailing_relu(super().forward(x))  # PyTorch's kernel: the fused one was no faster for a whole step
