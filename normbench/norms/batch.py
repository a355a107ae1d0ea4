"""Batch-statistics normalizers: statistics mix the samples of a batch."""
from __future__ import annotations

import torch
from torch import nn

from normbench.errors import UserError


class BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm (Ioffe & Szegedy 2015, Alg. 1).

    Training: x_hat = (x - mu_B) / sqrt(sigma_B^2 + eps) with mu_B, sigma_B^2 over (B, H, W)
    per channel; y = gamma * x_hat + beta. Running mean/var (momentum 0.1, unbiased
    variance) replace the batch statistics in eval. PyTorch's kernel does the maths; this
    subclass only turns the undefined case (one value per channel: B = 1 on 1x1 maps) into
    an error that names the layer.
    """

    def __init__(self, channels: int, eps: float = 1e-5, momentum: float = 0.1, layer: str = "?"):
        super().__init__(channels, eps=eps, momentum=momentum)
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] * x.shape[2] * x.shape[3] == 1:
            raise UserError(f"BatchNorm at layer {self.layer} sees one value per channel "
                            f"(batch {x.shape[0]} on {x.shape[2]}x{x.shape[3]} maps): its variance is undefined; "
                            "use a larger batch or a per-sample norm (gn, ln, frn)")
        return super().forward(x)
