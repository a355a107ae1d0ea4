"""GroupNorm and its two special cases, LayerNorm and InstanceNorm: statistics per sample, never
across the batch.

* GroupNorm: Wu & He 2018, "Group Normalization", Sec. 3.1, Eq. 1-3 (docs/methods.md#gn);
* LayerNorm for conv maps: Ba, Kiros & Hinton 2016, "Layer Normalization", Sec. 3, as GN with
  G = 1 (Wu & He 2018, Sec. 3.1; docs/methods.md#ln);
* InstanceNorm: Ulyanov, Vedaldi & Lempitsky 2016, "Instance Normalization: The Missing
  Ingredient for Fast Stylization", Eq. 2, as GN with G = C (docs/methods.md#in).

The C channels fall into G consecutive groups of C/G; per sample n and group g:

    mu_ng   = mean over (C/G channels of g, H, W) of x
    var_ng  = mean over (C/G channels of g, H, W) of (x - mu_ng)^2     biased
    x_hat   = (x - mu_ng) / sqrt(var_ng + eps)                         for the channels of g
    y       = gamma_c x_hat + beta_c                                   per-channel affine

then ``max(y, 0)`` when the layer carries the ReLU after it (``relu=True``). Training and eval
compute the same function.

:func:`group_norm_reference` is this as plain PyTorch. The layer asks ``speed.group_norm`` for
the fused CPU kernels (ReLU in the same pass) and runs PyTorch's GroupNorm kernel, then the
ReLU, wherever they do not apply.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from normbench.norms import speed
from normbench.norms.norm_act import TrailingReLU


def group_norm_reference(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor,
                         eps: float) -> torch.Tensor:
    """The output, as written above."""
    xg = x.reshape(x.shape[0], groups, -1)  # (B, G, C/G * H * W)
    mu = xg.mean(-1, keepdim=True)
    var = (xg - mu).square().mean(-1, keepdim=True)
    x_hat = ((xg - mu) / torch.sqrt(var + eps)).reshape(x.shape)
    return weight.view(1, -1, 1, 1) * x_hat + bias.view(1, -1, 1, 1)


class GroupNorm(TrailingReLU, nn.GroupNorm):
    """GroupNorm (Wu & He 2018, Eq. 1-3 with S_i = the C/G channels of i's group); see the
    module docstring. ``relu=True``: the ReLU that follows, applied by the layer. On CPU
    (float32/64, NCHW or channels_last) the fused kernels compute it, ReLU included
    (``speed.group_norm``); elsewhere PyTorch's kernel, then the ReLU.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 relu: bool = False):
        super().__init__(num_groups, num_channels, eps=eps, affine=affine)
        self.relu = relu

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, relu={self.relu}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = speed.group_norm(x, self.weight, self.bias, self.num_groups, self.eps, self.relu)
        if y is None:  # no fused kernel for x: PyTorch's GroupNorm kernel, then the ReLU
            y = self.trailing_relu(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))
        return y


class LayerNorm2d(GroupNorm):
    """LayerNorm for conv maps (Ba et al. 2016): statistics over (C, H, W) of each sample,
    per-channel affine. Exactly GroupNorm with one group (Wu & He 2018, Sec. 3.1)."""

    def __init__(self, channels: int, eps: float = 1e-5, relu: bool = False):
        super().__init__(1, channels, eps=eps, relu=relu)


class InstanceNorm2d(GroupNorm):
    """InstanceNorm (Ulyanov et al. 2016, Eq. 2): statistics over (H, W) of each sample and
    channel, per-channel affine, no running statistics. Exactly GroupNorm with G = C."""

    def __init__(self, channels: int, eps: float = 1e-5, relu: bool = False):
        super().__init__(channels, channels, eps=eps, relu=relu)
