"""Weight-standardized convolutions: the normalization acts on the weights, not the activations.

* Weight Standardization: Qiao, Wang, Liu, Shen & Yuille 2019, "Micro-Batch Training with
  Batch-Channel Normalization and Weight Standardization", Eq. 5 (docs/methods.md#ws_gn, where a
  GroupNorm follows every convolution). For output filter i, over its fan-in (C_in, kh, kw):

      mu_i    = mean of W[i]
      var_i   = mean of (W[i] - mu_i)^2                      biased
      W_hat_i = (W[i] - mu_i) / sqrt(var_i + 1e-5)           the convolution uses W_hat

* Scaled Weight Standardization and the scaled ReLU of the normalizer-free ResNet: Brock, De &
  Smith 2021a, "Characterizing signal propagation to close the performance gap in unnormalized
  ResNets", Eq. 3 and Sec. 4 (docs/methods.md#nf):

      W_hat_i = g_i (W[i] - mu_i) / sqrt(max(var_i fan_in, 1e-4))      fan_in = C_in kh kw
      act(x)  = 1.7139588594 max(x, 0)

Gradients flow through the standardization to the raw W. These are plain PyTorch, the
reference and the implementation at once (no speed path).
"""
from __future__ import annotations

import math

import torch
from torch import nn

WS_EPS = 1e-5  # inside the root of the weight variance (Qiao et al. 2019, Eq. 5)
NF_VAR_FLOOR = 1e-4  # floor of var * fan_in (Brock et al. 2021a, Sec. 4 / their code)


def standardize_weight(weight: torch.Tensor, eps: float = WS_EPS) -> torch.Tensor:
    """(W - mean(W)) / sqrt(var(W) + eps) per output filter, over (C_in, kh, kw), biased var."""
    var, mean = torch.var_mean(weight, dim=tuple(range(1, weight.ndim)), keepdim=True, unbiased=False)
    return (weight - mean) * torch.rsqrt(var + eps)


def scaled_standardize_weight(weight: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """gain * (W - mean(W)) / sqrt(max(var(W) * fan_in, 1e-4)) per output filter (biased var)."""
    fan_in = weight[0].numel()
    var, mean = torch.var_mean(weight, dim=tuple(range(1, weight.ndim)), keepdim=True, unbiased=False)
    scale = torch.rsqrt(torch.clamp(var * fan_in, min=NF_VAR_FLOOR)) * gain.view(-1, *([1] * (weight.ndim - 1)))
    return (weight - mean) * scale


class WSConv2d(nn.Conv2d):
    """Convolution with Weight Standardization (Qiao, Wang, Liu, Shen & Yuille 2019, Eq. 5).

    W_hat[i] = (W[i] - mu_i) / sqrt(sigma_i^2 + eps), mu_i and sigma_i^2 the mean and (biased)
    variance of output filter i over its fan-in (C_in, kh, kw), eps = 1e-5; the convolution
    uses W_hat. normbench implements the paper's formula (the authors' released code instead
    divides by the unbiased std + 1e-5; the two differ by a factor sqrt(n / (n - 1)) ~ 1.003
    at n = 144 and by where eps sits). Bias-free: a GroupNorm follows.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, eps: float = WS_EPS):
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False)
        self.ws_eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, standardize_weight(self.weight, self.ws_eps), self.bias)


class ScaledWSConv2d(nn.Conv2d):
    """Convolution with Scaled Weight Standardization (Brock, De & Smith 2021a, Eq. 3).

    W_hat[i] = g_i * (W[i] - mu_i) / sqrt(max(sigma_i^2 * fan_in, 1e-4)), fan_in = C_in * kh
    * kw, mu_i and sigma_i^2 the mean and (biased) variance of filter i; learnable gain g
    (init 1) and bias (init 0) per output channel. With unit-variance inputs the output has
    unit variance at init (the weights act like a He/LeCun-normalized filter of norm 1).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, bias: bool = True):
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=bias)
        self.gain = nn.Parameter(torch.ones(out_ch))
        self.fan_in = in_ch * kernel * kernel
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(self.fan_in))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def standardized_weight(self) -> torch.Tensor:
        return scaled_standardize_weight(self.weight, self.gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)


def standardized_conv(cfg, in_ch: int, out_ch: int, kernel: int, stride: int) -> nn.Module:
    """NormScheme.conv for ``ws_gn``."""
    return WSConv2d(in_ch, out_ch, kernel, stride)


def scaled_ws_conv(cfg, in_ch: int, out_ch: int, kernel: int, stride: int) -> nn.Module:
    """NormScheme.conv for ``nf``."""
    return ScaledWSConv2d(in_ch, out_ch, kernel, stride)


NF_RELU_GAIN = 1.7139588594  # the NF authors' code's empirical constant; sqrt(2/(1-1/pi)) = 1.7128586


class ScaledReLU(nn.Module):
    """gamma * ReLU(x) with gamma = 1.7139588594 (Brock, De & Smith 2021a, Sec. 4 / App. D;
    the constant of the authors' code, an empirical estimate of 1 / std(ReLU(z)) for z ~
    N(0, 1); the closed form sqrt(2 / (1 - 1/pi)) = 1.7128586 differs in the 4th digit):
    keeps unit variance through the non-linearity. ``scale`` multiplies in an extra constant
    (the NF block folds its 1/beta in: gamma ReLU(h / beta) = (gamma / beta) ReLU(h))."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.gain = NF_RELU_GAIN * scale

    def extra_repr(self) -> str:
        return f"gain={self.gain:.10g}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) * self.gain
