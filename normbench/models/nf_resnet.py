"""Normalizer-free CIFAR ResNet (NF-ResNet; Brock, De & Smith 2021a), ``norm.kind: nf``.

No normalization layer anywhere; signal propagation is controlled analytically instead:

* every convolution is a Scaled Weight Standardized conv (normbench.norms.
  weight_standardization.ScaledWSConv2d: W_hat = gain (W - mean) / sqrt(max(var fan_in, 1e-4)), learnable gain
  (init 1) and bias (init 0));
* residual blocks compute h_{i+1} = h_i + alpha * s_i * f_i(h_i / beta_i) (Eq. 2 of the
  paper), alpha = ``norm.nf_alpha`` (0.2), s_i a learnable scalar gain initialised to 0
  ("zero-init residual gain", so every block starts as the identity), beta_i =
  sqrt(Var(h_i)) the expected standard deviation of the block's input, tracked
  analytically: Var(h_0) = 1 after the stem, Var(h_{i+1}) = Var(h_i) + alpha^2, and
  after a transition block (stride 2 / more channels), whose shortcut also takes the
  scaled input, Var = 1 + alpha^2 (the next block gets beta = sqrt(1 + alpha^2));
* the ReLU is scaled by gamma = 1.7139588594 (the authors' code's empirical constant; the
  closed form sqrt(2 / (1 - 1/pi)) = 1.7128586 is not used);
* the classifier ``fc`` has weights drawn from N(0, 0.01^2) and zero bias (AGC never clips
  it: normbench.clip excludes ``model.fc``).

No official basic-block (ResNet-20-sized) NF design exists. normbench's adaptation (project
choice) is a pre-activation basic block::

    x = gamma * relu(h / beta)                    # the block's input activation
    shortcut = h                 (identity)        or  conv1x1_sws(x, stride) on transition blocks
    out = conv3x3_sws(gamma * relu(conv3x3_sws(x, stride)))
    h' = shortcut + alpha * skip_gain * out       # skip_gain init 0

following the authors' NF-ResNet bottleneck code in taking the transition shortcut from the
activated, scaled input x (unit variance, so the shortcut output has unit variance too). The
stem is one 3x3 scaled-WS conv (16 channels x width, no activation: the first block
activates); the network ends with gamma * relu(h), global average pooling and ``fc``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from normbench.models.resnet import DEPTHS
from normbench.norms.weight_standardization import ScaledReLU, ScaledWSConv2d

CLASSIFIER_STD = 0.01


class NFBasicBlock(nn.Module):
    """Pre-activation NF basic block; see the module docstring."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, alpha: float, beta: float):
        super().__init__()
        self.alpha, self.beta = alpha, beta
        self.act_in = ScaledReLU(1.0 / beta)  # gamma relu(h / beta) = (gamma / beta) relu(h)
        self.conv1 = ScaledWSConv2d(in_ch, out_ch, 3, stride)
        self.act_mid = ScaledReLU()
        self.conv2 = ScaledWSConv2d(out_ch, out_ch, 3, 1)
        self.transition = stride != 1 or in_ch != out_ch
        self.shortcut = ScaledWSConv2d(in_ch, out_ch, 1, stride) if self.transition else None
        self.skip_gain = nn.Parameter(torch.zeros(()))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta:.6g}"

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.act_in(h)
        shortcut = self.shortcut(x) if self.shortcut is not None else h
        out = self.conv2(self.act_mid(self.conv1(x)))
        return shortcut + out * (self.skip_gain * self.alpha)


class NFResNet(nn.Module):
    """CIFAR NF-ResNet-{20,32,...}: 3 stages of (depth - 2) / 6 NF basic blocks at 16/32/64
    channels (times ``width``); see the module docstring for every design decision."""

    def __init__(self, cfg, num_classes: int = 10):
        super().__init__()
        depth = DEPTHS[cfg.model.arch]
        blocks = (depth - 2) // 6
        alpha = float(cfg.norm.nf_alpha)
        widths = [max(1, round(c * cfg.model.width)) for c in (16, 32, 64)]
        self.stem = ScaledWSConv2d(3, widths[0], 3, 1)
        layers, in_ch, expected_var = [], widths[0], 1.0
        self.betas: list[float] = []
        for s, out_ch in enumerate(widths):
            for b in range(blocks):
                stride = 2 if (s > 0 and b == 0) else 1
                beta = math.sqrt(expected_var)
                block = NFBasicBlock(in_ch, out_ch, stride, alpha, beta)
                layers.append(block)
                self.betas.append(beta)
                expected_var = 1.0 + alpha ** 2 if block.transition else expected_var + alpha ** 2
                in_ch = out_ch
        self.blocks = nn.Sequential(*layers)
        self.final_act = ScaledReLU()
        self.fc = nn.Linear(in_ch, num_classes)
        nn.init.normal_(self.fc.weight, std=CLASSIFIER_STD)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.final_act(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def nf_resnet(cfg) -> NFResNet:
    return NFResNet(cfg)
