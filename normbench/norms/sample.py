"""Per-sample normalizers: statistics never look across the batch."""
from __future__ import annotations

from torch import nn


class GroupNorm(nn.GroupNorm):
    """GroupNorm (Wu & He 2018, Eq. 1-3 with S_i = the C/G channels of i's group).

    mu, sigma^2 over (C/G, H, W) of each sample and group; x_hat = (x - mu) / sqrt(sigma^2 +
    eps); y = gamma * x_hat + beta with per-channel gamma, beta. PyTorch's kernel.
    """


class LayerNorm2d(nn.GroupNorm):
    """LayerNorm for conv maps (Ba et al. 2016): statistics over (C, H, W) of each sample,
    per-channel affine. Exactly GroupNorm with one group (Wu & He 2018, Sec. 3.1)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__(1, channels, eps=eps)


class InstanceNorm2d(nn.GroupNorm):
    """InstanceNorm (Ulyanov et al. 2016, Eq. 2): statistics over (H, W) of each sample and
    channel, per-channel affine, no running statistics. Exactly GroupNorm with G = C."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__(channels, channels, eps=eps)
